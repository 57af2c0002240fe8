"""One trainer per run directory (RUN/.lock): a second trainer is refused, a kill -9 frees the run,
readers take no lock, and fuse reads finished stages only while a trainer runs."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from run_fixtures import DEAD_PID, make_run
from test_cli import invoke, only_run, write_recipe

from localtune.cli import cli
from localtune.errors import LocaltuneError
from localtune.run import Run, lock

HOST = socket.gethostname()
HOLD = """import sys
from localtune.run import lock
if len(sys.argv) > 2:
    lock.adopt(int(sys.argv[2]), sys.argv[1])
else:
    lock.acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def hold(run_dir, fd=None):
    """Another process holding the run's lock through lock.acquire (or lock.adopt of an inherited fd)."""
    args = [sys.executable, "-c", HOLD, str(run_dir), *([str(fd)] if fd is not None else [])]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            pass_fds=(fd,) if fd is not None else ())
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


# The lock itself ---------------------------------------------------------------------------------


def test_a_held_run_refuses_a_second_holder_until_the_first_is_killed(tmp_path):
    proc = hold(tmp_path)
    try:
        assert lock.locked(tmp_path) is True
        assert lock.holder(tmp_path)["pid"] == proc.pid and lock.holder(tmp_path)["host"] == HOST
        with pytest.raises(lock.RunBusy) as refused:
            lock.acquire(tmp_path, retry=0.1)
        message = refused.value.message
        assert f"pid {proc.pid} on {HOST}" in message and f"localtune watch {tmp_path}" in message
    finally:
        kill9(proc)
    assert lock.locked(tmp_path) is False and lock.holder(tmp_path) is None  # the kernel dropped it
    mine = lock.acquire(tmp_path, retry=0)
    assert lock.holder(tmp_path)["pid"] == os.getpid()
    mine.release()
    assert lock.locked(tmp_path) is False


def test_a_child_given_the_descriptor_holds_the_lock_with_no_gap(tmp_path):
    """The TUI's hand-over: parent locks, the child inherits the descriptor, the parent lets go."""
    mine = lock.acquire(tmp_path)
    child = hold(tmp_path, fd=mine.fileno())
    try:
        mine.release()
        assert lock.holder(tmp_path)["pid"] == child.pid
        with pytest.raises(lock.RunBusy):
            lock.acquire(tmp_path, retry=0.1)
    finally:
        kill9(child)
    assert lock.locked(tmp_path) is False
    with open(tmp_path / "other", "w") as f, pytest.raises(LocaltuneError, match="not this run's lock file"):
        lock.adopt(f.fileno(), tmp_path)


def test_readers_probing_the_lock_never_make_a_trainer_fail(tmp_path):
    """Probes (shared, non-blocking, dropped at once) collide with a trainer's exclusive attempt;
    the trainer's brief retry absorbs them."""
    lock.acquire(tmp_path).release()
    probe = ("import sys\nfrom localtune.run import lock\nprint('probing', flush=True)\n"
             "while True:\n    lock.locked(sys.argv[1])\n")
    readers = [subprocess.Popen([sys.executable, "-c", probe, str(tmp_path)], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        assert all(r.stdout.readline().strip() == "probing" for r in readers)
        collisions, tries = 0, 0
        while collisions < 5 and tries < 3000:  # a collision is rare: about 1 try in 100
            tries += 1
            try:
                lock.acquire(tmp_path, retry=0).release()
            except lock.RunBusy:
                collisions += 1  # what a trainer without the retry would hit
            lock.acquire(tmp_path).release()  # never raises
    finally:
        for r in readers:
            kill9(r)
    assert collisions > 0


# Readers: status and runs ------------------------------------------------------------------------


def test_status_and_runs_show_who_holds_a_running_run(tmp_path):
    held = make_run(tmp_path, "held-20251129-090000", state="running", upto=20, pid=DEAD_PID)
    free = make_run(tmp_path, "free-20251129-080000", state="running", upto=40)  # its pid (ours) is alive...
    lock.acquire(free).release()  # ...but its lock is free: the trainer is gone
    proc = hold(held)
    try:
        status = json.loads((held / "status.json").read_text())
        (held / "status.json").write_text(json.dumps({**status, "pid": proc.pid}))
        result = invoke("status", held)
        assert result.exit_code == 0
        assert ": running  stage sft  step 20/100" in result.output
        assert f"trained by pid {proc.pid} on {HOST}" in result.output and f"localtune watch {held}" in result.output
        result = invoke("status", free)
        assert ": crashed  stage sft" in result.output and "trained by" not in result.output
        result = CliRunner().invoke(cli, ["runs", "--runs-dir", str(tmp_path)])
        lines = result.output.splitlines()
        assert lines[0].split()[-1] == "trainer"
        row = next(line for line in lines if line.startswith("held-"))
        assert "running" in row and row.endswith(f"{proc.pid}@{HOST}")
        row = next(line for line in lines if line.startswith("free-"))
        assert "crashed" in row and row.endswith("  -")
        rows = json.loads(CliRunner().invoke(cli, ["runs", "--runs-dir", str(tmp_path), "--json"]).output)
        assert {r["name"]: r["trainer"] for r in rows} == {held.name: {"pid": proc.pid, "host": HOST},
                                                          free.name: None}
    finally:
        kill9(proc)
    assert ": crashed" in invoke("status", held).output


# A real trainer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, small_model_path):
    """`localtune run` of sft (2 steps) then sft2 (12 steps, a checkpoint each), paused through
    control.json after sft2's first checkpoint: sft is finished, sft2 is not. A callable that starts
    a new one when a test has killed the last."""
    live = {}

    def start():
        if live and live["proc"].poll() is None:
            return live["proc"], live["run"]
        tmp = tmp_path_factory.mktemp("trainer")
        recipe = write_recipe(tmp, small_model_path, steps=2, save_every=1, report_every=1)
        text = recipe.read_text()
        second = text[text.index("[[stages]]"):text.index("[eval]")]
        second = second.replace("steps = 2", "steps = 12").replace("learning_rate = 0.001", "learning_rate = 0.01")
        recipe.write_text(text.replace("[eval]", second + "[eval]"))
        log = tmp / "trainer.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "LOCALTUNE_HOME": str(tmp / "home")}
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "localtune.cli", "run", str(recipe), "--no-tui",
                                     "--runs-dir", str(tmp / "runs")], stdout=out, stderr=subprocess.STDOUT, env=env)
        live.update(proc=proc, run=None)
        wait_for(lambda: "sft2  step     1/12" in log.read_text(), proc, log, "sft2's first step")
        run = live["run"] = only_run(tmp / "runs")
        Run(run).request(paused=True)
        wait_for(lambda: any(r.get("event") == "paused" for r in Run(run).metrics()), proc, log,
                 "the pause")  # logged after status.json says paused: the trainer's last write until it goes on
        return proc, run

    yield start
    if live and live["proc"].poll() is None:
        kill9(live["proc"])


def wait_for(predicate, proc, log, what, timeout=120):
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the trainer exited before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def snapshot(run):
    return {p.relative_to(run): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_a_second_trainer_is_refused_while_the_first_runs(trainer):
    proc, run = trainer()
    before = snapshot(run)
    result = invoke("run", "--resume", run, "--no-tui")
    assert result.exit_code == 1, result.output
    assert f"this run is being trained by pid {proc.pid} on {HOST}" in result.output
    assert f"watch it with: localtune watch {run}" in result.output and "Traceback" not in result.output
    assert snapshot(run) == before  # not a byte written: not even control.json
    assert proc.poll() is None and Run(run).status()["state"] == "paused"
    status = invoke("status", run).output
    assert ": paused  stage sft2" in status and f"trained by pid {proc.pid} on {HOST}" in status
    assert f"{proc.pid}@{HOST}" in invoke("runs", "--runs-dir", run.parent).output


def test_fuse_during_training_reads_finished_stages_only(trainer, tmp_path):
    from localtune import export
    from localtune.loading import load_for_inference

    proc, run = trainer()
    assert Run(run).manifest()["stages_done"] == ["sft"]
    assert (run / "sft2/adapters.safetensors").exists()  # sft2's checkpoint: what fuse must not take
    result = invoke("fuse", run / "sft2", "--out", tmp_path / "sft2")
    assert result.exit_code == 1 and not (tmp_path / "sft2").exists()
    step = Run(run).status()["step"]
    assert f"stage 'sft2' has not finished: it is still training (step {step}/12" in result.output
    assert f"pid {proc.pid} on {HOST}" in result.output and f"name a finished stage: {run / 'sft'}" in result.output
    result = invoke("generate", run, "--stage", "sft2", "--prompt", "hi")
    assert result.exit_code == 1 and "stage 'sft2' has not finished" in result.output

    result = invoke("fuse", run, "--out", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    assert "sft2: not finished" in result.output
    from mlx_lm import load

    fused, tokenizer = load(str(tmp_path / "fused"))
    tokens = export.prompt_tokens(tokenizer, export.PROMPTS)
    logits = export.mlx_logits(fused, tokens)
    finished = export.parity(export.mlx_logits(load_for_inference(str(run), "sft")[0], tokens), logits)
    everything = export.parity(export.mlx_logits(load_for_inference(str(run), in_progress=True)[0], tokens), logits)
    assert finished.max_abs_logit < 1e-3  # base + sft, exactly
    assert everything.max_abs_logit > 0.02  # sft2's checkpoint would have changed it
    assert proc.poll() is None


def test_a_kill_9_frees_the_run_for_resume(trainer):
    proc, run = trainer()
    kill9(proc)
    status = invoke("status", run).output
    assert ": crashed  stage sft2" in status and "trained by" not in status
    checkpoint = Run(run).status()["checkpoint_step"]
    result = invoke("run", "--resume", run, "--no-tui")
    assert result.exit_code == 0, result.output
    assert f"resumed from checkpoint at step {checkpoint}" in result.output
    assert Run(run).status()["state"] == "done" and Run(run).manifest()["stages_done"] == ["sft", "sft2"]
    assert lock.locked(run) is False  # released when the command ended
