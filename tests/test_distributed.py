"""Data-parallel training: 2 processes on localhost (mlx.launch, ring backend, CPU) against 1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import ROOT, invoke, kill_at, only_run, write_recipe

from localtune.errors import DataError, RecipeError
from localtune.run import read_metrics
from localtune.train import data, distributed

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
MLX_LAUNCH = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def launch(n, *args):
    """`mlx.launch -n N --backend ring -- localtune ARGS` as a user types it (rank 0's output)."""
    cmd = [*MLX_LAUNCH, "-n", str(n), "--backend", "ring", "--",
           sys.executable, "-m", "localtune.cli", *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def single(recipe, runs):
    return subprocess.run([sys.executable, "-m", "localtune.cli", "run", str(recipe), "--no-tui", "--runs-dir",
                           str(runs)], env=ENV, capture_output=True, text=True, timeout=300)


def assert_same_adapters(a: Path, b: Path):
    import mlx.core as mx

    x, y = mx.load(str(a / "sft/adapters.safetensors")), mx.load(str(b / "sft/adapters.safetensors"))
    assert x.keys() == y.keys()
    moved = max(float(np.abs(np.array(x[k])).max()) for k in x if "lora_b" in k)
    assert moved > 1e-3  # the adapters trained: equality is not two zero tensors
    for k in x:
        np.testing.assert_allclose(np.array(x[k]), np.array(y[k]), rtol=1e-4, atol=2e-6, err_msg=k)


def recipe(folder, small_model_path, batch):
    folder.mkdir()
    return write_recipe(folder, small_model_path, steps=8, batch_size=batch, save_every=3, report_every=1)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, small_model_path):
    """The SFT stage with batch 8 in one process: both tests below compare two processes against it."""
    tmp = tmp_path_factory.mktemp("one")
    a = single(recipe(tmp / "one", small_model_path, 8), tmp / "a")
    assert a.returncode == 0, a.stderr
    return only_run(tmp / "a")


@pytest.fixture
def two(tmp_path, small_model_path):
    """The same stage with batch 4 per rank, for two processes."""
    return recipe(tmp_path / "two", small_model_path, 4)


def test_two_processes_equal_one_with_twice_the_batch(tmp_path, one_process_run, two):
    b = launch(2, "run", two, "--no-tui", "--runs-dir", tmp_path / "b")
    assert b.returncode == 0, b.stdout + b.stderr
    assert "data-parallel on 2 processes" in b.stdout and b.stdout.count("done:") == 1  # rank 1 prints nothing
    run_a, run_b = one_process_run, only_run(tmp_path / "b")  # rank 1 wrote no run directory here
    assert_same_adapters(run_a, run_b)
    # the metrics are every rank's: the same losses and token counts as the one process
    train = lambda run: [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]  # noqa: E731
    for x, y in zip(train(run_a), train(run_b), strict=True):
        assert x["step"] == y["step"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["tokens_per_sec"] * x["time_sec"] == pytest.approx(y["tokens_per_sec"] * y["time_sec"], rel=1e-6)
    assert json.loads((run_b / "manifest.json").read_text())["processes"] == 2


@pytest.mark.slow(minutes=0.5)  # 27 s of processes; the default suite keeps test_cli's one-process kill and resume
def test_two_processes_killed_resume_to_the_same_adapter(tmp_path, one_process_run, two):
    cmd = [*MLX_LAUNCH, "-n", "2", "--backend", "ring", "--",
           sys.executable, "-m", "localtune.cli", "run", str(two), "--no-tui", "--runs-dir", str(tmp_path / "b")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    kill_at(proc, "step     5/8", group=True)  # every process; checkpoint at 3, steps 4-5 are lost
    run = only_run(tmp_path / "b")
    assert json.loads((run / "status.json").read_text())["checkpoint_step"] == 3
    resumed = launch(2, "run", "--resume", run, "--no-tui")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from checkpoint at step 3" in resumed.stdout
    assert_same_adapters(one_process_run, run)

    # and one process cannot continue it: its global batches would hold other rows
    again = tmp_path / "again"
    subprocess.run(["cp", "-r", str(run), str(again)], check=True)
    status = json.loads((again / "status.json").read_text())
    (again / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))
    manifest = json.loads((again / "manifest.json").read_text())
    manifest.pop("finished")
    (again / "manifest.json").write_text(json.dumps({**manifest, "stages_done": [], "stage_results": {}}))
    result = invoke("run", "--resume", again, "--no-tui")
    assert result.exit_code != 0
    assert "trained on 2 process(es), and is resumed on 1" in result.output
    assert "mlx.launch -n 2 -- localtune run --resume RUN" in result.output


def test_shards_partition_each_global_batch(small_model_path):
    from localtune import models

    tok = models.load_tokenizer(small_model_path)
    rows, fmt = data.read_jsonl(ROOT / "data/dates/train.jsonl")
    ds = data.encode(rows[:40], fmt, tok, 64)
    whole = data.Batches(ds, 8, seed=3)
    parts = [data.Batches(ds, 4, seed=3, shard=(r, 2)) for r in range(2)]
    assert whole.batches_per_epoch == parts[0].batches_per_epoch == parts[1].batches_per_epoch == 5
    for _ in range(7):  # across an epoch boundary
        glob = next(whole.upcoming())
        mine = [next(p.upcoming()) for p in parts]
        assert sorted(mine[0] + mine[1]) == sorted(glob) and len(mine[0]) == len(mine[1]) == 4
        for b in (whole, *parts):
            next(b)
    with pytest.raises(DataError, match=r"(?s)40 examples is fewer than batch_size=32 x 2 processes.*at most 20"):
        data.Batches(ds, 32, seed=0, shard=(0, 2))


def test_ppo_stages_are_refused_on_several_processes(tmp_path, monkeypatch):
    from localtune import recipe as recipe_mod
    from localtune.train.prepare import prepare

    monkeypatch.setattr(distributed, "size", lambda: 2)
    parsed = recipe_mod.load(ROOT / "recipes/rlhf-rules.toml")
    with pytest.raises(RecipeError, match=r"(?s)\[stages\.ppo\] is a ppo stage.*run this recipe without mlx.launch"):
        prepare(parsed)


def test_the_two_mac_hostfile_example_is_what_mlx_launch_reads():
    from mlx._distributed_utils.common import Hostfile

    hosts = Hostfile.from_file(str(ROOT / "docs/two-macs/hosts.json"))
    assert hosts.backend == "ring" and [h.rank for h in hosts.hosts] == [0, 1]
    assert all(h.ssh_hostname and len(h.ips) == 1 for h in hosts.hosts)  # the ring listens on IPs, not names
    assert "mlx.launch --hostfile docs/two-macs/hosts.json -- " in (ROOT / "docs" / "planning.md").read_text()


def test_a_second_launch_on_a_held_run_is_refused_on_every_rank(tmp_path, small_model_path):
    """Rank 0 takes the run's lock; when it is refused, the other ranks stop too, without a traceback."""
    from test_lock import hold, kill9

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(write_recipe(tmp_path, small_model_path).read_text())
    holder = hold(run)
    try:
        result = launch(2, "run", "--resume", run, "--no-tui")
        out = result.stdout + result.stderr
        assert f"this run is being trained by pid {holder.pid}" in out and f"localtune watch {run}" in out
        assert "Traceback" not in out and "connection to a peer was lost" not in out
        assert sorted(p.name for p in run.iterdir()) == [".lock", "recipe.toml"] and holder.poll() is None
    finally:
        kill9(holder)
