"""Every file of a run directory, damaged every way, read by every command that reads it.

Each command must give no traceback, and either the result it gives on the intact run (resume:
the adapters of an uninterrupted run) or an error that names the damaged file and a fix.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from test_cli import kill_at, only_run, write_recipe

from localtune.cli import cli
from localtune.run import list_runs
from localtune.tui.state import RunState

# A run of 4 steps with a checkpoint at each: the killed run stops after step 3, so its newest
# checkpoint is step 3 and the previous one step 2.
STEPS = dict(steps=4, save_every=1, report_every=1, eval_every=0)
DAMAGES = ["truncated", "empty", "random", "deleted"]
SOURCE = {}  # the recipe both runs were made from (set by the `runs` fixture)


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(np.random.default_rng(len(raw)).integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    else:
        path.unlink()


def recipe(tmp: Path, small_model_path) -> Path:
    path = write_recipe(tmp, small_model_path, **STEPS)
    text = path.read_text()  # no golden set and no general texts: resumes stay quick
    path.write_text(text[: text.index("[eval]")] + '[eval]\ngeneral = "none"\n')
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_model_path):
    """{"finished": run, "killed": run (killed after step 3 of 4)}, and the recipe they share."""
    tmp = tmp_path_factory.mktemp("damage")
    path = SOURCE["recipe"] = recipe(tmp, small_model_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "localtune.cli", "run", str(path), "--no-tui", "--runs-dir"]
    assert subprocess.run(command + [str(tmp / "finished")], env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(command + [str(tmp / "killed")], env=env, stdout=subprocess.PIPE, text=True)
    kill_at(proc, "checkpoint at step 3")
    killed = only_run(tmp / "killed")
    assert json.loads((killed / "status.json").read_text())["checkpoint_step"] == 3
    return {"finished": only_run(tmp / "finished"), "killed": killed}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def adapters(run: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(run / "sft" / "adapters.safetensors")).items()}


# command name -> how to call it on a run (in `out`, a fresh folder for what it writes)
COMMANDS = {
    "status": lambda run, out: invoke("status", run),
    "runs": lambda run, out: invoke("runs", "--runs-dir", run.parent),
    "generate": lambda run, out: invoke("generate", run, "-p", "Convert to ISO 8601: March 5, 2021",
                                        "--max-tokens", 6),
    "eval": lambda run, out: invoke("eval", run, "--golden", Path(__file__).parent.parent / "data/dates/test.jsonl",
                                    "--limit", 2, "--general", "none"),
    "fuse": lambda run, out: invoke("fuse", run, "--out", out / "fused"),
    "export": lambda run, out: invoke("export", run, "--gguf", "--out", out / "m.gguf"),
    "export-lora": lambda run, out: invoke("export", run, "--lora", "--out", out / "a.gguf"),
    "resume": lambda run, out: invoke("run", "--resume", run, "--no-tui"),
    "plan": lambda run, out: invoke("plan", "--no-calibrate", teacher_recipe(run, out)),
}


def teacher_recipe(run: Path, out: Path) -> Path:
    """A recipe that distills from the run: `plan` reads the run as a teacher."""
    base = SOURCE["recipe"]
    text = base.read_text().replace('kind = "sft"', f'kind = "distill"\nteacher = "{run}"')
    (out / "train.jsonl").write_bytes((base.parent / "train.jsonl").read_bytes())
    (out / "recipe.toml").write_text(text)
    return out / "recipe.toml"
MODEL_READERS = ["generate", "eval", "fuse", "export", "export-lora", "resume"]
READERS = {  # (run, file) -> the commands that read it; resume (which writes) comes last
    ("finished", "recipe.toml"): ["status", "runs", "plan"] + MODEL_READERS,
    ("finished", "manifest.json"): ["status", "runs", "plan"] + MODEL_READERS,
    ("finished", "status.json"): ["status", "runs", "resume"],
    ("finished", "metrics.jsonl"): ["status", "runs"],
    ("finished", "sft/adapters.safetensors"): MODEL_READERS,
    ("finished", "sft/adapter_config.json"): MODEL_READERS,
    ("killed", "recipe.toml"): ["status", "runs", "generate", "resume"],
    ("killed", "manifest.json"): ["status", "runs", "generate", "resume"],
    ("killed", "status.json"): ["status", "runs", "resume"],
    ("killed", "metrics.jsonl"): ["status", "runs", "resume"],
    ("killed", "sft/adapters.safetensors"): ["generate", "resume"],  # a stage in progress: not read, rewritten
    ("killed", "sft/adapter_config.json"): ["generate", "resume"],
    ("killed", "sft/checkpoint/state.safetensors"): ["resume"],
    ("killed", "sft/checkpoint/previous.safetensors"): ["resume"],
    ("killed", ".lock"): ["status", "runs", "resume"],  # who holds the run: only its holder record
}


def same_form(text: str, run: Path, out: Path) -> str:
    """Output with this copy's folders and the timings taken out."""
    text = text.replace(str(run), "RUN").replace(str(run.parent), "RUNS").replace(str(out), "OUT")
    return re.sub(r"\d+(\.\d+)?s\b", "Ns", text)


def without_loss(text: str) -> str:
    """`status` and `runs` without the last loss, which only metrics.jsonl knows."""
    text = re.sub(r" +loss \d+\.\d{4}", "", text)
    return re.sub(r" +", " ", re.sub(r"\b\d+\.\d{4}\b", "-", text))


@pytest.fixture(scope="module")
def intact(runs, tmp_path_factory):
    """What each command gives on an intact copy of each run (resume: the finished run's adapters)."""
    cache = {}

    def get(kind, command):
        if (kind, command) not in cache:
            tmp = tmp_path_factory.mktemp("intact")
            run = Path(shutil.copytree(runs[kind], tmp / "runs" / runs[kind].name))
            out = tmp / f"out-{command}"
            out.mkdir()
            result = COMMANDS[command](run, out)
            assert result.exit_code in (0, 1), result.output
            cache[kind, command] = result.exit_code, same_form(result.output, run, out)
        return cache[kind, command]

    return get


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind,name", list(READERS))
def test_a_damaged_run_file_gives_a_named_error_or_the_right_result(runs, intact, tmp_path, kind, name, how):
    run = Path(shutil.copytree(runs[kind], tmp_path / "runs" / runs[kind].name))
    damage(run / name, how)
    state = RunState(run)  # the TUI's reader (`watch`): never raises
    state.refresh()
    assert state.state in ("done", "crashed", "damaged") or (name, how, state.state) == (
        "status.json", "deleted", "starting")  # as between creating a run and its first status
    for command in READERS[kind, name]:
        out = tmp_path / f"out-{command}"
        out.mkdir()
        result = COMMANDS[command](run, out)
        where = f"{command} on the {kind} run with {name} {how}:\n{result.output}"
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"{where}\n{result.exc_info and ''.join(__import__('traceback').format_exception(*result.exc_info))}"
        if command == "resume" and kind == "killed" and result.exit_code == 0:
            expected = adapters(runs["finished"])
            got = adapters(run)
            assert got.keys() == expected.keys(), where
            for k in got:
                np.testing.assert_array_equal(got[k], expected[k], err_msg=where)
            continue
        code, output = intact(kind, command)
        if (result.exit_code, same_form(result.output, run, out)) == (code, output):
            continue  # the command did not need the damaged file
        if name == "metrics.jsonl":  # readers tolerate it by design: the damaged records are missing
            assert result.exit_code == code and without_loss(same_form(result.output, run, out)) == \
                without_loss(output), where
            continue
        named = Path(name).name in result.output and "fix:" in result.output
        listing = command == "runs"  # lists every run, and names the damaged one's file and fix
        assert named and (result.exit_code != 0 or listing), f"neither the intact result nor a named error: {where}"
        if command in ("fuse", "export", "export-lora"):
            assert not any(out.iterdir()), f"{where}: wrote {list(out.iterdir())}"


def test_runs_lists_every_run_and_says_which_is_damaged(runs, tmp_path):
    for kind in runs:
        shutil.copytree(runs[kind], tmp_path / kind)
    (tmp_path / "killed" / "manifest.json").write_bytes(b'{"started": 1')
    rows = {r["name"]: r for r in list_runs(tmp_path)}
    assert rows["finished"]["state"] == "done" and "damage" not in rows["finished"]
    assert rows["killed"]["state"] == "damaged"
    assert "manifest.json: truncated: its JSON stops after 13 bytes" in rows["killed"]["damage"]
    result = invoke("runs", "--runs-dir", tmp_path)
    assert result.exit_code == 0 and "damaged" in result.output and "fix:" in result.output


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(runs, tmp_path):
    """The issue's case: the same adapters as an uninterrupted run, and a warning in the log and the report."""
    run = Path(shutil.copytree(runs["killed"], tmp_path / "run"))
    newest = run / "sft/checkpoint/state.safetensors"
    size = newest.stat().st_size
    newest.write_bytes(newest.read_bytes()[:size // 2])
    result = invoke("run", "--resume", run, "--no-tui")
    assert result.exit_code == 0, result.output
    message = (f"state.safetensors: truncated: {size // 2:,} of {size:,} bytes; resumed from the previous "
               "checkpoint (step 2) instead")
    assert message in result.output
    assert message in (run / "report.md").read_text()
    assert "resumed from checkpoint at step 2" in result.output
    got, expected = adapters(run), adapters(runs["finished"])
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_both_checkpoints_damaged_stops_naming_both_with_the_fix(runs, tmp_path):
    run = Path(shutil.copytree(runs["killed"], tmp_path / "run"))
    for name in ("state", "previous"):
        (run / f"sft/checkpoint/{name}.safetensors").write_bytes(b"")
    result = invoke("run", "--resume", run, "--no-tui")
    assert result.exit_code == 1
    assert "state.safetensors: empty (0 bytes)" in result.output
    assert "previous.safetensors: empty (0 bytes)" in result.output
    assert f"rm -r {run / 'sft' / 'checkpoint'} && localtune run --resume {run}" in result.output
    shutil.rmtree(run / "sft" / "checkpoint")  # the fix, as written: the stage trains again from step 0
    result = invoke("run", "--resume", run, "--no-tui")
    assert result.exit_code == 0, result.output
    got, expected = adapters(run), adapters(runs["finished"])
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_a_checkpoint_of_other_data_is_not_resumed(runs, tmp_path):
    """The checkpoint's fingerprint covers the stage's data: changed data is not resumed silently."""
    run = Path(shutil.copytree(runs["killed"], tmp_path / "run"))
    data = Path(json.loads((run / "manifest.json").read_text())["base_dir"]) / "train.jsonl"
    saved = data.read_bytes()
    try:
        data.write_bytes(saved.replace(b"2021", b"2022"))
        result = invoke("run", "--resume", run, "--no-tui")
    finally:
        data.write_bytes(saved)
    assert result.exit_code == 1
    assert "written for another recipe or data" in result.output and "rm -r" in result.output


@pytest.mark.parametrize("content,problem", [
    (b"", "empty (0 bytes)"),
    (b"\x05\x00", "truncated: 2 bytes, shorter than a safetensors header"),
    ((28801).to_bytes(8, "little") + b"{" * 4992, "truncated: 5,000 bytes, but its header alone is 28,809"),
    (b"\xff" * 64, "not a safetensors file (64 bytes of something else, or random bytes)"),
    ((4).to_bytes(8, "little") + b"\xfe\xff[]", "not a safetensors file (12 bytes whose header is not JSON)"),
    (None, "missing"),
])
def test_safetensors_damage_is_described_from_the_header(tmp_path, content, problem):
    from localtune.run.damage import safetensors_problem

    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    assert safetensors_problem(path) == problem
    mx.save_safetensors(str(path), {"a": mx.zeros((4, 4))})
    assert safetensors_problem(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    assert safetensors_problem(path) == f"truncated: {len(whole) - 10:,} of {len(whole):,} bytes"
    path.write_bytes(whole + b"xx")
    assert safetensors_problem(path) == f"2 bytes longer than its header says ({len(whole):,}): damaged"


def test_the_disk_full_message_says_what_to_do(tmp_path):
    import errno

    from localtune.run import disk_error

    run = tmp_path / "runs" / "r"
    (run / "sft" / "checkpoint").mkdir(parents=True)
    (run / "recipe.toml").write_text("")
    message = disk_error(OSError(errno.ENOSPC, "No space left"), run / "sft/checkpoint/state.safetensors").message
    assert "no space left on device; the last checkpoint is kept" in message
    assert f"free some disk space (`df -h {run / 'sft' / 'checkpoint'}` shows it)" in message
    assert f"then continue with `localtune run --resume {run}`" in message


# Caches in a stage folder: a damaged one is rebuilt with a warning, never trusted ----------------


def test_a_damaged_reference_cache_is_computed_again(tmp_path):
    from conftest import make_tiny_model
    from test_dpo import pairs

    from localtune.methods import dpo

    model, ps = make_tiny_model(), pairs(6)
    full = dpo.ReferenceCache.build(model, ps, tmp_path / "ref.safetensors", 4)
    damage(tmp_path / "ref.safetensors", "truncated")
    cache = dpo.ReferenceCache(model, ps, tmp_path / "ref.safetensors", 4)
    assert "ref.safetensors: truncated" in cache.damage and not cache.known.any()
    cache.fill()
    np.testing.assert_allclose(cache.chosen, full.chosen, rtol=1e-6)


def test_a_damaged_teacher_cache_is_not_trusted(tmp_path, small_model_path):
    from localtune import models
    from localtune.methods.teacher import TeacherCache
    from localtune.train import data

    model, tokenizer, _, _ = models.load(str(small_model_path))
    dataset = data.encode([{"prompt": "1 plus 1?", "completion": "2"}] * 3, "completion", tokenizer, 32)
    key = TeacherCache.key(dataset, "small", 8, 1.0)
    TeacherCache.build(model, dataset, 8, 1.0).save(tmp_path / "c.safetensors", key)
    for how in ("truncated", "random"):
        damage(tmp_path / "c.safetensors", how)
        cache, problem = TeacherCache.load(tmp_path / "c.safetensors", key)
        assert cache is None and problem.startswith(("truncated", "not a safetensors file")), problem
        TeacherCache.build(model, dataset, 8, 1.0).save(tmp_path / "c.safetensors", key)


def test_a_damaged_rollout_batch_is_sampled_again(small_model_path, tmp_path):
    from test_ppo import PPO, _policy, _prompts

    from localtune.methods import ppo, prompts, rewards
    from localtune.train import data

    model, tok, _ = _policy(small_model_path)
    events = []
    rollouts = ppo.Rollouts(model, tok, data.Batches(_prompts(tok), PPO.batch_size, 0, collate=prompts.collate),
                            rewards.Reward(tok, PPO.options.rules), PPO, tmp_path, lambda kind, **kw: events.append(kw))
    next(rollouts)
    state = rollouts.state()
    assert state["position"] == 1 and state["rollout"] == 1
    damage(tmp_path / "rollout-1.safetensors", "truncated")
    rollouts.restore(state)
    assert rollouts.buffer is None and rollouts.count == 0
    assert "rollout-1.safetensors: truncated" in events[-1]["message"] and events[-1]["event"] == "warning"
    next(rollouts)  # the same prompts, sampled again
    assert rollouts.count == 1 and (tmp_path / "rollout-1.safetensors").exists()
