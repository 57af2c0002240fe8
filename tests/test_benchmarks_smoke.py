"""Every benchmark still runs: each script's --smoke mode (tiny sizes, 1-4 steps, nothing written), and the
numbers it prints. bench_contamination (about 2 s of CPU) and bench_grpo (about 20 s: four 2-step runs on
models/smaller) are cheap enough for the default suite; the others train, export or convert real models (20-60 s
of CPU each on 2 cores), so they run in the slow suite."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tests" / "benchmarks"
sys.path.insert(0, str(BENCH))
from run_all import number, parse  # noqa: E402

# benchmark -> a column of its first table that must hold a number in every row
FAST = {"bench_contamination": "check (13-grams)", "bench_grpo": "completions/s steady"}
SLOW = {"bench_sft": "tok/s ratio", "bench_dpo": "pairs/s steady", "bench_ppo": "localtune rollouts tok/s",
        "bench_plan": "peak ratio", "bench_distributed": "ratio", "bench_tui": "median tok/s",
        "bench_export": "llama.cpp tok/s", "bench_gguf_quants": "convert every tensor"}


def smoke(name: str, column: str) -> None:
    # bench_dpo and bench_grpo compare against mlx-lm-lora, which .[dev] does not install: without it their
    # --smoke still runs localtune's side (the rows then compare localtune with itself)
    results = {p: p.stat().st_mtime for p in (BENCH / "results").glob("*")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the checkout under test, in every subprocess too
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke"], capture_output=True, text=True,
                          env=env, timeout=1800)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{name} --smoke failed (exit {proc.returncode}):\n{tail}"
    tables = [t for s in parse(proc.stdout) for t in s.tables if column in t.columns]
    assert tables and tables[0].rows, f"{name} --smoke printed no table with a {column!r} column:\n{tail}"
    for row in tables[0].rows:
        assert number(row[column]) >= 0, row
    assert {p: p.stat().st_mtime for p in (BENCH / "results").glob("*")} == results, "a smoke run wrote results"


@pytest.mark.parametrize("name", FAST)
def test_smoke(name):
    smoke(name, FAST[name])


@pytest.mark.slow(minutes=1)  # 0.3-1.6 each in CI
@pytest.mark.parametrize("name", SLOW)
def test_smoke_slow(name):
    smoke(name, SLOW[name])


def test_every_benchmark_has_a_smoke_test():
    scripts = {p.stem for p in BENCH.glob("bench_*.py")}
    assert scripts == set(FAST) | set(SLOW)
    assert all("--smoke" in (BENCH / f"{name}.py").read_text() for name in scripts)
