"""Distillation: the divergences, the teacher's top-k cache, and distill stages from the CLI."""
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from test_cli import invoke, kill_at, only_run, write_recipe

from localtune import models
from localtune.methods import distill
from localtune.methods.teacher import TeacherCache
from localtune.methods.base import StageContext
from localtune.recipe import make_stage
from localtune.train import data


def _logprobs(x):
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


@pytest.fixture
def pq():
    mx.random.seed(3)
    return _logprobs(mx.random.normal((6, 50)) * 2), _logprobs(mx.random.normal((6, 50)) * 2)


def test_forward_kl_and_jsd_equal_mlx_lms_losses(pq):
    from mlx_lm.tuner.losses import js_div_loss, kl_div_loss

    teacher, student = pq  # mlx-lm's (logits_q, logits_p): q the student, p the teacher
    ours = distill.divergence(student, teacher, "forward_kl")
    assert np.allclose(ours, kl_div_loss(student * 1.0, teacher), atol=1e-5)
    assert np.allclose(distill.divergence(student, teacher, "jsd", 0.5), js_div_loss(student, teacher), atol=1e-5)
    assert np.allclose(distill.device_divergence(student + 3.0, teacher, "forward_kl", 0.5), ours, atol=1e-5)


def test_divergence_identities(pq):
    p, q = pq
    assert np.allclose(distill.divergence(q, p, "reverse_kl"), distill.divergence(p, q, "forward_kl"), atol=1e-6)
    assert np.allclose(distill.divergence(q, p, "jsd", 0.3), distill.divergence(p, q, "jsd", 0.7), atol=1e-6)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert np.allclose(distill.divergence(p, p, kind, 0.4), 0.0, atol=1e-6)
        assert (np.array(distill.divergence(q, p, kind, 0.4)) > 0).all()
    jsd = np.array(distill.divergence(q, p, "jsd", 0.5))
    assert (jsd <= np.log(2) + 1e-6).all()  # JSD is bounded by log 2


def test_teacher_logprobs_from_top_k(pq):
    p, _ = pq
    top = mx.argsort(-p, axis=-1)[:, :8]
    full = distill.teacher_logprobs(mx.take_along_axis(p, top, axis=-1), top, 50)
    assert np.allclose(mx.exp(full).sum(-1), 1.0, atol=1e-5)  # the tail's mass is spread, not lost
    assert np.allclose(mx.take_along_axis(full, top, axis=-1), mx.take_along_axis(p, top, axis=-1))
    every = mx.argsort(-p, axis=-1)
    assert np.allclose(distill.teacher_logprobs(mx.take_along_axis(p, every, axis=-1), every, 50), p, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(small_model_path):
    model, tokenizer, _, _ = models.load(str(small_model_path))
    rows = [{"prompt": f"What is {a} plus 1?", "completion": str(a + 1)} for a in range(12)]
    return model, tokenizer, data.encode(rows, "completion", tokenizer, 64)


def setup(model, dataset, tmp_path, **options):
    """The distill method's setup, as the stage loop calls it (logits mode, a batch of 4)."""
    stage = make_stage("distill", teacher="t", batch_size=4, eval_batches=2, **options)
    ctx = StageContext(None, stage, model, None, dataset, None, tmp_path, batches=data.Batches(dataset, 4, 0))
    return distill.METHOD.setup(ctx)


def test_a_student_that_is_its_teacher_has_zero_loss_and_the_cache_round_trips(tmp_path, tiny):
    from localtune.train.trainer import to_mx

    model, tokenizer, dataset = tiny
    vocab = len(tokenizer.get_vocab())
    cache = TeacherCache.build(model, dataset, vocab, 1.0)  # k = V: the whole distribution
    assert cache.values.shape == (int(sum(e.loss_mask[1:].sum() for e in dataset.examples)), vocab)
    key = TeacherCache.key(dataset, "small", vocab, 1.0)
    cache.save(tmp_path / "c.safetensors", key)
    assert TeacherCache.load(tmp_path / "c.safetensors", key + "x") == (None, None)  # other data or teacher
    loaded, damage = TeacherCache.load(tmp_path / "c.safetensors", key)
    assert damage is None
    dataset.teacher_cache = loaded
    loss, batches, _ = setup(model, dataset, tmp_path)
    value, ntoks, metrics = loss(model, to_mx(next(batches)))
    assert ntoks.item() > 0 and abs(value.item()) < 1e-5 and abs(metrics["kl"].item()) < 1e-5
    small_k = TeacherCache.build(model, dataset, 16, 1.0)  # top-16: the tail is approximated
    assert small_k.nbytes * 30 < cache.nbytes


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_distill_loss_trains_a_student_towards_the_teacher(tmp_path, tiny, small_model_path, kind):
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from localtune.train.trainer import to_mx

    teacher, tokenizer, dataset = tiny
    dataset.teacher_cache = TeacherCache.build(teacher, dataset, 64, 2.0)
    student, _ = models.load_model(small_model_path.parent / "smaller")
    loss, batches, _ = setup(student, dataset, tmp_path, temperature=2.0, loss=kind)
    batch = to_mx(next(batches))
    grad_fn = nn.value_and_grad(student, lambda m, b: loss(m, b)[0])
    opt = optim.Adam(learning_rate=3e-4)
    first = None
    for _ in range(15):
        value, grads = grad_fn(student, batch)
        opt.update(student, grads)
        mx.eval(student.parameters(), opt.state)
        first = value.item() if first is None else first
    assert value.item() < 0.25 * first
    assert all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(grads))


def _distill_recipe(tmp_path, small_model_path, **stage):
    recipe = write_recipe(tmp_path, small_model_path, kind="distill", teacher=str(small_model_path),
                          student=str(small_model_path.parent / "smaller"), steps=4, learning_rate=3e-4, **stage)
    text = recipe.read_text().replace("[stages.adapter]\nrank = 4\nalpha = 8\n", '[stages.adapter]\ntype = "full"\n')
    recipe.write_text(text)
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    return recipe


def test_a_logits_distill_run_from_the_cli(tmp_path, small_model_path):
    recipe = _distill_recipe(tmp_path, small_model_path, valid_fraction=0.25, loss="jsd", temperature=2.0)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "teacher top-64 log-probs of" in result.output and "MiB for full logits" in result.output
    run = only_run(tmp_path / "runs")
    assert (run / "distill/teacher_cache.safetensors").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["task"]["teacher"]["tokens_per_sec"] > 0 and manifest["task"]["student_tokens_per_sec"] > 0
    assert manifest["task"]["student_before"]["model"] == str(small_model_path.parent / "smaller")
    result = manifest["stage_results"]["distill"]
    assert result["heldout_after"]["jsd"] < result["heldout_before"]["jsd"]
    assert result["trainable"] == 787_456  # the smaller model's 4 blocks, fully fine-tuned
    report = (run / "report.md").read_text()
    assert "## Distillation" in report and "Held-out JSD to the teacher (distill, jsd, T=2.0)" in report
    assert "| | base | student before | after distill |" in report  # the student's change is its own
    config = json.loads((run / "distill/adapter_config.json").read_text())
    assert config["provenance"]["sources"][0] == {"kind": "teacher", "source": str(small_model_path),
                                                  "license": "apache-2.0", "verdict": "allow", "attested": None,
                                                  "conditions": []}
    # the run's model is the student: generation and export use it
    shown = invoke("generate", run, "--prompt", "What is 2 plus 2?")
    assert shown.exit_code == 0, shown.output


def test_a_sequence_distill_run_saves_the_teachers_answers_with_their_generator(tmp_path, small_model_path):
    recipe = _distill_recipe(tmp_path, small_model_path, mode="sequence", max_new_tokens=8)
    prompts = tmp_path / "train.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["messages"][0]["content"]}) + "\n"
                               for line in prompts.read_text().splitlines()))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (only_run(tmp_path / "runs") / "distill/generated.jsonl").open()]
    assert len(rows) == 64 and {r["generator"] for r in rows} == {str(small_model_path)}
    assert set(rows[0]) == {"prompt", "completion", "generator", "source"}


def test_logits_mode_refuses_a_teacher_with_another_tokenizer_before_loading(tmp_path, small_model_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(small_model_path, teacher)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 3072, "content": "<|tool|>"})
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    recipe = _distill_recipe(tmp_path, small_model_path)
    recipe.write_text(recipe.read_text().replace(f'teacher = "{small_model_path}"', f'teacher = "{teacher}"'))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 1, result.output
    assert f"the teacher's tokenizer ({teacher}, 3073 tokens) and the student's" in result.output
    assert "tokens in one only: ['<|tool|>']" in result.output and 'fix: set mode = "sequence"' in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stage, message", [
    ({"teacher": "no-such-org/no-such-model"}, "teacher = 'no-such-org/no-such-model' cannot be loaded"),
    ({"data": "missing.jsonl"}, "missing.jsonl"),
])
def test_bad_distill_inputs_are_clear_errors(tmp_path, small_model_path, stage, message):
    recipe = _distill_recipe(tmp_path, small_model_path)
    text = recipe.read_text()
    for key, value in stage.items():
        text = "\n".join(f"{key} = {json.dumps(value)}" if line.startswith(f"{key} = ") else line
                         for line in text.splitlines()) + "\n"
    recipe.write_text(text)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/distill"))


@pytest.mark.slow(minutes=0.5)  # 22 s: a teacher pass, a kill and a resume; the default suite keeps test_cli's kill
def test_a_killed_distill_run_resumes_from_its_checkpoint_and_reuses_the_cache(tmp_path, small_model_path):
    import os
    import subprocess
    import sys

    recipe = _distill_recipe(tmp_path, small_model_path)
    text = recipe.read_text().replace("steps = 4", "steps = 12").replace("save_every = 3", "save_every = 4")
    recipe.write_text(text.replace("report_every = 2", "report_every = 1"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_cmd = [sys.executable, "-m", "localtune.cli", "run", str(recipe), "--no-tui", "--runs-dir"]
    straight = subprocess.run(run_cmd + [str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(run_cmd + [str(tmp_path / "b")], env=env, stdout=subprocess.PIPE, text=True)
    kill_at(proc, "step     6/12")  # checkpoint at 4; steps 5 and 6 are lost
    run = only_run(tmp_path / "b")
    resumed = subprocess.run([sys.executable, "-m", "localtune.cli", "run", "--resume", str(run), "--no-tui"],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "teacher cache reused from" in resumed.stdout and "resumed from checkpoint at step 4" in resumed.stdout
    a = mx.load(str(only_run(tmp_path / "a") / "distill/adapters.safetensors"))
    b = mx.load(str(run / "distill/adapters.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-5)


def test_a_distilled_run_teaches_again_as_a_run_directory(tmp_path, small_model_path):
    (tmp_path / "one").mkdir()
    first = _distill_recipe(tmp_path / "one", small_model_path)
    assert invoke("run", first, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    teacher_run = only_run(tmp_path / "runs")
    (tmp_path / "two").mkdir()
    second = _distill_recipe(tmp_path / "two", small_model_path)
    second.write_text(second.read_text().replace(f'teacher = "{small_model_path}"', f'teacher = "{teacher_run}"'))
    result = invoke("run", second, "--no-tui", "--runs-dir", tmp_path / "runs2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((only_run(tmp_path / "runs2") / "manifest.json").read_text())
    assert manifest["task"]["teacher"]["model"] == str(teacher_run)
    assert manifest["provenance"]["findings"][0]["source"] == str(teacher_run)
