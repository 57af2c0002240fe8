"""The grpo stage: its losses against hand-worked values, group sampling, python rewards, exact
resume, and bad input."""
import json
import math

import mlx.core as mx
import numpy as np
import pytest
from test_cli import ROOT, invoke, only_run
from test_trainer import run_dir

from localtune import models
from localtune.errors import RecipeError, TrainingError
from localtune.methods import grpo, grpo_groups, grpo_math, prompts, rewards
from localtune.methods.prompts import encode_prompts, sample_groups
from localtune.recipe import Adapter, Rule, make_stage, parse
from localtune.train import adapters, data, trainer

# --- the maths, by hand ------------------------------------------------------------------------


def test_group_advantages_normalise_within_each_group():
    r = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330; group 2: all equal
    a = grpo_math.group_advantages(r, 4)
    std = 0.4330127 + 1e-4
    np.testing.assert_allclose(a[:4], [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], rtol=1e-5)
    assert a[4:].tolist() == [0.0] * 4
    np.testing.assert_allclose(grpo_math.group_advantages(r, 4, scale=False), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert grpo_math.zero_variance(r, 4).tolist() == [False, True]


def test_overlong_penalty_ramps_over_the_buffer():
    # L_max = 10, L_cache = 4: free up to 6, then (6 - |y|) / 4, -1 beyond 10
    assert grpo_math.overlong_penalty(np.array([5, 6, 8, 10, 11]), 10, 4).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]


# Two completions: tokens 0 and 1 belong to completion 0 (A = +1), token 2 to completion 1 (A = -1).
# ratios 1.5, 0.5, 1.1 (old log-probs 0); eps = 0.2:
#   t0: -min(1.5, 1.2) = -1.2 (clipped)   t1: -min(0.5, 0.8) = -0.5   t2: -min(-1.1, -1.1) = +1.1
LOGP = mx.log(mx.array([1.5, 0.5, 1.1]))
ARGS = (mx.zeros(3), mx.array([1.0, -1.0]), mx.ones(3), mx.array([0, 0, 1]), 2)


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", ((-1.2 - 0.5) / 2 + 1.1) / 2),  # each completion's token mean, then their mean: 0.125
    ("bnpo", (-1.2 - 0.5 + 1.1) / 3),  # every token: -0.2
    ("dapo", (-1.2 - 0.5 + 1.1) / 3),
    ("dr_grpo", (-1.2 - 0.5 + 1.1) / (2 * 4)),  # a constant: N x max_new_tokens = 2 x 4
])
def test_each_loss_type_averages_the_clipped_objective_its_own_way(loss_type, expected):
    loss, m = grpo_math.policy_loss(LOGP, *ARGS, loss_type=loss_type, epsilon=0.2, max_new_tokens=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(1 / 3)
    assert "kl" not in m


def test_clip_higher_widens_only_the_upper_side():
    loss, m = grpo_math.policy_loss(LOGP, *ARGS, loss_type="bnpo", epsilon=0.2, epsilon_high=0.6)
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 1.1) / 3, abs=1e-6)  # t0 is no longer clipped at 1.2
    assert m["clip_frac"].item() == 0.0


def test_sequence_level_ratios_are_gspo():
    # completion 0: s = exp((log 1.5 + log 0.5) / 2) = sqrt(0.75) = 0.8660, inside [0.8, 1.2]; completion 1: 1.1
    loss, _ = grpo_math.policy_loss(LOGP, *ARGS, loss_type="grpo", level="sequence")
    assert loss.item() == pytest.approx((-math.sqrt(0.75) + 1.1) / 2, abs=1e-6)


def test_the_kl_term_is_k3_to_the_reference():
    # ref log-probs 0: k3 = 1/r + log r - 1 per token
    k3 = [1 / r + math.log(r) - 1 for r in (1.5, 0.5, 1.1)]
    loss, m = grpo_math.policy_loss(LOGP, *ARGS, loss_type="bnpo", beta=0.1, ref_logp=mx.zeros(3))
    assert loss.item() == pytest.approx(-0.2 + 0.1 * sum(k3) / 3, abs=1e-6)
    assert m["kl"].item() == pytest.approx(sum(k3) / 3, abs=1e-6)


def test_masked_tokens_count_nowhere():
    # completion 1 filtered (an overlong one): grpo averages over completion 0 only
    loss, _ = grpo_math.policy_loss(LOGP, ARGS[0], ARGS[1], mx.array([1.0, 1.0, 0.0]), ARGS[3], 2)
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2, abs=1e-6)


def test_on_policy_gradient_is_the_advantage_weighted_log_likelihood():
    """At ratio 1 (old = stop_gradient(logp)) grad L = -mean_i A_i / |y_i| sum_t grad log pi."""
    x = mx.array([-0.3, -1.2, -0.7])

    def L(x):
        return grpo_math.policy_loss(x, mx.stop_gradient(x), *ARGS[1:])[0]

    np.testing.assert_allclose(np.array(mx.grad(L)(x)), [-1 / 2 / 2, -1 / 2 / 2, 1 / 2], atol=1e-6)


@pytest.mark.parametrize("n, c, k, expected", [(4, 1, 1, 0.25), (4, 1, 4, 1.0), (4, 0, 4, 0.0), (4, 2, 2, 5 / 6)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert grpo_math.pass_at_k(n, c, k) == pytest.approx(expected)


# --- python rewards ------------------------------------------------------------------------------


def _recipe_with(tmp_path, source: str, function: str = "rw.py:exact"):
    (tmp_path / "rw.py").write_text(source)
    text = (f'[model]\npath = "m"\n[[stages]]\nkind = "grpo"\ndata = "d.jsonl"\nsteps = 1\n'
            f'[[stages.rewards]]\nkind = "python"\nfunction = "{function}"\n')
    return parse(text, str(tmp_path / "r.toml"), str(tmp_path))


def test_python_rewards_get_the_prompt_the_completion_and_the_row(tmp_path):
    recipe = _recipe_with(tmp_path, "def exact(prompt, completion, row):\n"
                                    "    return float(completion.strip() == row['answer'])\n")
    stage = recipe.stages[0]
    fns = rewards.load_functions(recipe, stage, stage.options.rewards)
    tok = models.load_tokenizer(ROOT / "models" / "small")
    reward = rewards.Reward(tok, stage.options.rewards + [Rule(kind="length", max=2, weight=0.5)], functions=fns)
    scores, parts = reward(None, ["p", "p"], [" 12 ", "7"], [{"answer": "12"}, {"answer": "8"}], ["row 1", "row 2"])
    assert parts["rule1"].tolist() == [1.0, 0.0] and scores.tolist() == [1.5, 0.5]


def test_a_reward_file_imports_its_own_helpers_beside_it(tmp_path):
    (tmp_path / "checks.py").write_text("def same(a, b):\n    return float(a.strip() == b)\n")
    recipe = _recipe_with(tmp_path, "from checks import same\n\ndef exact(prompt, completion, row):\n"
                                    "    return same(completion, row['answer'])\n")
    fn = rewards.load_functions(recipe, recipe.stages[0], recipe.stages[0].options.rewards)[0]
    assert fn("p", " 7", {"answer": "7"}) == 1.0


@pytest.mark.parametrize("body, words", [
    ("    raise KeyError('answer')", ["rw.py:exact raised KeyError", "row 7 of d.jsonl", "'12'"]),
    ("    return 'yes'", ["rw.py:exact returned 'yes' (str)", "row 7 of d.jsonl", "expected a finite number"]),
    ("    return float('nan')", ["returned nan", "finite number"]),
])
def test_a_reward_function_that_fails_stops_the_stage_naming_function_row_and_value(tmp_path, body, words):
    recipe = _recipe_with(tmp_path, f"def exact(prompt, completion, row):\n{body}\n")
    stage = recipe.stages[0]
    reward = rewards.Reward(models.load_tokenizer(ROOT / "models" / "small"), stage.options.rewards,
                            functions=rewards.load_functions(recipe, stage, stage.options.rewards))
    with pytest.raises(TrainingError) as e:
        reward(None, ["p"], ["12"], [{}], ["row 7 of d.jsonl"])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("source, function, words", [
    ("def exact(p, c, r):\n    return 1.0\n", "missing.py:exact", ["no such file", "missing.py"]),
    ("def exact_answer(p, c, r):\n    return 1.0\n", "rw.py:exact", ["has no function 'exact'",
                                                                      'Did you mean "exact_answer"?']),
    ("import nonexistent_module\n", "rw.py:exact", ["importing", "failed at line 1", "ModuleNotFoundError"]),
])
def test_a_reward_file_that_does_not_load_is_a_recipe_error(tmp_path, source, function, words):
    recipe = _recipe_with(tmp_path, source, function)
    with pytest.raises(RecipeError) as e:
        rewards.load_functions(recipe, recipe.stages[0], recipe.stages[0].options.rewards)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# --- sampling, training and resume on the bundled model ----------------------------------------------

STAGE = make_stage("grpo", name="grpo", batch_size=2, group_size=4, max_new_tokens=5, temperature=1.0, seed=0,
                   rewards=[Rule(kind="length", max=6), Rule(kind="contains", text="1", weight=0.5)],
                   adapter=Adapter(rank=4, alpha=8))


def _prompts(tok, n=8):
    rows = [json.loads(line) for line in (ROOT / "data/months/train.jsonl").read_text().splitlines()[:n]]
    return encode_prompts([{"prompt": r["prompt"], "answer": r["completion"]} for r in rows], tok, 64, 5, "mem")


def test_a_group_shares_its_prompt_pass_and_samples_as_separate_prompts_would(small_model_path):
    model, tok, _, _ = models.load(str(small_model_path))
    prompts = [p.tokens.tolist() for p in _prompts(tok, 3).examples]
    shared, stopped, entropy = sample_groups(model, tok, prompts, 2, 6, 0.0, 1.0)  # greedy: comparable
    assert len(shared) == 6 and entropy.shape == (6,) and (entropy > 0).all()
    assert shared[0] == shared[1] and shared[2] == shared[3]  # greedy: a group's members agree
    from localtune.methods.prompts import sample

    alone, _ = sample(model, tok, prompts, 6, 0.0, 1.0)
    assert [shared[2 * i] for i in range(3)] == alone


def _policy(path, seed=1):
    model, tok, _, _ = models.load(str(path))
    mx.random.seed(seed)
    adapters.attach(model, STAGE.adapter)
    return model, tok


def _train(model, tok, run, steps, stage=STAGE, report=lambda r: None, save_every=100):
    groups = grpo_groups.Groups(model, tok, data.Batches(_prompts(tok), stage.batch_size, 0, collate=prompts.collate),
                                rewards.Reward(tok, stage.options.rewards), stage, run.path / "grpo",
                                lambda kind, **kw: None)
    args = trainer.TrainArgs(steps=steps, learning_rate=1e-2, report_every=1, save_every=save_every, eval_every=0)
    return trainer.train(model, grpo.make_loss(stage), groups, args, run=run, stage="grpo",
                         stage_dir=run.path / "grpo", adapter_config={}, report=report), groups


def test_updates_move_the_adapters_and_log_what_grpo_lives_by(small_model_path, tmp_path):
    model, tok = _policy(small_model_path)
    records = []
    _train(model, tok, run_dir(tmp_path), 2, report=records.append)
    first = next(r for r in records if r["kind"] == "train")
    assert first["clip_frac"] == 0.0 and first["ratio"] == pytest.approx(1.0)  # on policy: ratio 1
    for key in ("reward_mean", "reward_std", "solved", "zero_variance", "entropy", "completion_length",
                "rollout_sec", "scoring_sec", "completions", "reward_rule1", "reward_rule2"):
        assert key in first, key
    assert first["completions"] == 8 and first["generations"] == 1


OFF_POLICY = make_stage("grpo", name="grpo", batch_size=2, group_size=4, max_new_tokens=5, temperature=1.0, seed=0,
                        mu=2, minibatch_size=4, beta=0.05, loss_type="dapo", epsilon_high=0.28,
                        rewards=STAGE.options.rewards, adapter=Adapter(rank=4, alpha=8))


def test_a_crashed_grpo_stage_resumes_mid_generation_to_the_same_weights(small_model_path, tmp_path):
    # mu = 2 passes x 2 minibatches = 4 updates per generation batch, from kept old and reference log-probs
    straight, tok = _policy(small_model_path)
    _train(straight, tok, run_dir(tmp_path, "straight"), 6, stage=OFF_POLICY)

    def crash_at_4(record):  # the checkpoint at step 3 is mid-way through the 1st generation's 4 minibatches
        if record["kind"] == "train" and record["step"] == 4:
            raise RuntimeError("simulated crash")

    run = run_dir(tmp_path, "crashed")
    crashed, _ = _policy(small_model_path)
    with pytest.raises(RuntimeError):
        _train(crashed, tok, run, 6, stage=OFF_POLICY, report=crash_at_4, save_every=3)
    saved = data_of(run.path / "grpo" / "generation-1.safetensors")
    assert {"old_logp", "ref_logp", "advantages"} <= set(saved)
    resumed, _ = _policy(small_model_path, seed=99)  # another init: the checkpoint restores it
    summary, groups = _train(resumed, tok, run, 6, stage=OFF_POLICY, save_every=3)
    assert summary["step"] == 6 and groups.count == 2
    a, b = adapters.trainable_weights(straight), adapters.trainable_weights(resumed)
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]))


def data_of(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_dynamic_sampling_replaces_groups_that_teach_nothing(small_model_path):
    model, tok = _policy(small_model_path)
    stage = make_stage("grpo", name="grpo", batch_size=2, group_size=4, max_new_tokens=5, seed=0,
                       dynamic_sampling=True, max_generation_rounds=3,
                       rewards=[Rule(kind="length", max=1000)], adapter=Adapter(rank=4, alpha=8))  # always 1
    groups = grpo_groups.Groups(model, tok, data.Batches(_prompts(tok), 2, 0, collate=prompts.collate),
                                rewards.Reward(tok, stage.options.rewards), stage, ROOT / "never-written",
                                lambda kind, **kw: None)
    groups._generate = lambda: None  # nothing written: build the buffer by hand below
    sampled = []
    for _ in range(3):
        sampled += grpo_groups.sample_and_score(model, tok, groups.reward, next(groups.prompts), stage, 4)
    stats = grpo_groups.statistics(sampled, 2, 1.0)
    assert stats["zero_variance"] == 1.0 and stats["groups_skipped"] == 4 and stats["completions"] == 24
    mixed = dict(sampled[5], scores=np.array([1.0, 0.0, 0.0, 0.0], np.float32))
    kept = grpo_groups.choose(sampled[:5] + [mixed], 2, dynamic=True)
    assert kept[0] is mixed and kept[1] is sampled[0]  # the group that teaches first, then in order drawn
    assert grpo_groups.choose(sampled, 2, dynamic=False) == sampled[:2]


# --- the recipe --------------------------------------------------------------------------------------

BASE = '[model]\npath = "m"\n[[stages]]\nkind = "grpo"\ndata = "d.jsonl"\nsteps = 4\n'
RULE = '[[stages.rewards]]\nkind = "regex"\npattern = "\\\\d+"\n'


@pytest.mark.parametrize("body, words", [
    ("", ["neither reward_model nor rewards", "[[stages.rewards]]"]),
    ("batch_size = 2\ngroup_size = 4\nminibatch_size = 3\n" + RULE, ["minibatch_size = 3 must divide",
                                                                      "2 x 4 = 8"]),
    ("epsilon_high = 0.1\n" + RULE, ["epsilon_high = 0.1 is below epsilon = 0.2"]),
    ('overlong = "penalty"\n' + RULE, ["needs 0 < overlong_buffer < max_new_tokens = 128"]),
    ("overlong_buffer = 8\n" + RULE, ['overlong_buffer only applies to overlong = "penalty"']),
    ('loss_type = "drgrpo"\n' + RULE, ["is not one of", 'Did you mean "dr_grpo"?']),
    ('group_size = 1\n' + RULE, ["group_size = 1 is too small"]),
    ('[[stages.rewards]]\nkind = "python"\n', ['a "python" rule needs function']),
    ('[[stages.rewards]]\nkind = "python"\nfunction = "rewards:exact"\n', ["is not FILE.py:NAME"]),
    ('[[stages.rewards]]\nkind = "python"\nfunction = "r.py:f"\npattern = "x"\n',
     ['pattern does not apply to a "python" rule']),
])
def test_bad_grpo_stages_are_refused_at_the_key(body, words):
    with pytest.raises(RecipeError) as e:
        parse(BASE + body, "r.toml")
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert "r.toml:" in str(e.value)


def test_grpo_keys_on_other_stages_name_the_kind_they_belong_to():
    with pytest.raises(RecipeError, match='group_size only applies to kind = "grpo" stages'):
        parse('[model]\npath = "m"\n[[stages]]\nkind = "sft"\ndata = "d.jsonl"\nsteps = 4\ngroup_size = 4\n', "r.toml")


def test_steps_from_epochs_count_every_minibatch_of_every_generation():
    stage = make_stage("grpo", batch_size=2, group_size=4, mu=2, minibatch_size=4, epochs=1.0, rewards=[])
    assert grpo.METHOD.steps_per_batch(stage) == 4
    batches = data.Batches(data.Dataset([data.Example(np.ones(3, np.int32), np.ones(3, bool))] * 10), 2, 0)
    assert grpo.METHOD.steps(stage, batches) == 5 * 4


# --- the whole stage from the CLI ----------------------------------------------------------------------


def write_grpo(tmp_path, small_model_path, **keys):
    rows = [json.loads(line) for line in (ROOT / "data/months/train.jsonl").read_text().splitlines()]
    for name, part in (("train.jsonl", rows[:32]), ("held.jsonl", rows[32:40])):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["completion"]}) + "\n"
                                             for r in part))
    (tmp_path / "rw.py").write_text("def exact(prompt, completion, row):\n"
                                    "    return float(completion.strip() == row['answer'])\n")
    stage = {"kind": "grpo", "data": "train.jsonl", "valid": "held.jsonl", "steps": 4, "batch_size": 2,
             "group_size": 4, "max_new_tokens": 4, "learning_rate": 1e-3, "max_seq_len": 64, "report_every": 2,
             "save_every": 2, "eval_every": 0, "heldout_prompts": 4, "heldout_samples": 2, **keys}
    lines = [f'[model]\npath = "{small_model_path}"\n', "[[stages]]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in stage.items()]
    lines += ["[stages.adapter]\nrank = 4\nalpha = 8\n",
              '[[stages.rewards]]\nkind = "python"\nfunction = "rw.py:exact"',
              '[[stages.rewards]]\nkind = "length"\nmax = 3\nweight = 0.1\n', "[eval]\ngeneral_limit = 8"]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def test_a_grpo_stage_runs_from_the_cli_and_reports_pass_at_1(tmp_path, small_model_path):
    recipe = write_grpo(tmp_path, small_model_path)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "held-out prompts before: pass@1" in result.output and "reward +" in result.output
    run = only_run(tmp_path / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    g = manifest["stage_results"]["grpo"]
    assert {"pass1", "pass1_se", "passk", "reward_rule1", "reward_rule2", "samples"} <= set(g["heldout_after"])
    report = (run / "report.md").read_text()
    for words in ("## GRPO (grpo: 4 held-out prompts", "| pass@1 |", "| pass@2 |", "python `rw.py:exact` (mean)",
                  "Training: 32 completions", "sampling"):
        assert words in report, words
    plan = invoke("plan", recipe)
    assert plan.exit_code == 0, plan.output
    assert "grpo" in plan.output


def test_a_broken_reward_file_stops_the_run_before_any_weights_load(tmp_path, small_model_path):
    recipe = write_grpo(tmp_path, small_model_path)
    (tmp_path / "rw.py").write_text("def exakt(prompt, completion, row):\n    return 1.0\n")
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 2
    assert "has no function 'exact'" in result.output and 'Did you mean "exakt"?' in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_killed_grpo_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, small_model_path):
    """kill -9 mid-way through a generation batch's updates, then `localtune run --resume`."""
    import os
    import signal
    import subprocess
    import sys

    from test_cli import kill_at

    recipe = write_grpo(tmp_path, small_model_path, steps=6, mu=2, minibatch_size=4, save_every=3, report_every=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "localtune.cli", "run", str(recipe), "--no-tui", "--runs-dir"]
    straight = subprocess.run(command + [str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(command + [str(tmp_path / "b")], env=env, stdout=subprocess.PIPE, text=True)
    kill_at(proc, "step     5/6")  # 4 updates per generation batch: the checkpoint at 3 is inside the first
    assert proc.returncode == -signal.SIGKILL
    run = only_run(tmp_path / "b")
    resumed = subprocess.run([sys.executable, "-m", "localtune.cli", "run", "--resume", str(run), "--no-tui"],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint at step 3" in resumed.stdout
    a = mx.load(str(only_run(tmp_path / "a") / "grpo/adapters.safetensors"))
    b = mx.load(str(run / "grpo/adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]))


def test_the_license_gate_and_the_forgetting_guard_cover_grpo_stages(tmp_path, small_model_path):
    recipe = write_grpo(tmp_path, small_model_path, steps=4, learning_rate=0.05)
    data = tmp_path / "train.jsonl"
    clean = data.read_text()
    data.write_text("".join(json.dumps({**json.loads(line), "model": "gpt-4-0613"}) + "\n"
                            for line in clean.splitlines()))
    blocked = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "blocked")
    assert blocked.exit_code == 3 and f"data {data}: records name 'gpt-4-0613'" in blocked.output
    data.write_text(clean)
    text = recipe.read_text().replace("max = 3", "max = 8")  # rewards that differ within groups: updates
    recipe.write_text(text.replace("[eval]\n", "[eval]\nmax_general_nll_increase = 0.0001\nguard_every = 2\n"
                                              'on_forgetting = "stop"\n'))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "forgetting guard: general NLL" in result.output and "stopping the stage" in result.output
    manifest = json.loads((only_run(tmp_path / "runs") / "manifest.json").read_text())
    assert manifest["stage_results"]["grpo"]["stopped_at"] == 2
