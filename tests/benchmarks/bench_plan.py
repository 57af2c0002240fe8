"""The planner's estimates against a real run: peak memory and time per step, per stage.

    python tests/benchmarks/bench_plan.py [--models small,smollm2]

For each shipped recipe with an SFT, DPO or PPO stage (small: quickstart, sft-dpo, rlhf;
SmolLM2: smollm2-qlora-sft, smollm2-dpo, smollm2-rlhf), in subprocesses:
1. `localtune plan RECIPE --json` (calibrated) and `--no-calibrate --json` (the formula);
2. `localtune run RECIPE --no-tui` (the golden-set limit cut to 20 rows: it runs outside the stages).
Measured, per stage from metrics.jsonl: the peak is the highest peak_memory_gb of its reports
(mx.get_peak_memory, reset at the stage's start); the step time is the median over report windows
after the first of time_sec / steps in the window. Targets: peak within +-25%, step time within
+-30% with calibration. The formula's numbers are shown beside them, without a target.
Writes tests/benchmarks/results/bench_plan.md.
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
from bench_sft import ROOT, VENV_BIN, _env, _spawn, machine_header, publish, standard_args  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_plan.md"
RECIPES = {"small": ["quickstart", "sft-dpo", "rlhf"],
           "smollm2": ["smollm2-qlora-sft", "smollm2-dpo", "smollm2-rlhf"],
           "smoke": ["quickstart"]}  # --smoke: on models/smaller, 4 steps, nothing written
KINDS = ("sft", "dpo", "ppo")


def localtune(*args) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", "localtune.cli", *map(str, args)]


def bench_copy(name: str, work: Path, smoke: bool = False) -> Path:
    """The recipe with absolute paths and a 20-row golden set (it is scored outside the stages)."""
    text = (ROOT / "recipes" / f"{name}.toml").read_text()
    if smoke:
        text = text.replace('"../models/small"', '"../models/smaller"').replace("[eval]", "[eval]\ngeneral_limit = 8")
        for key, value in (("steps", 4), ("warmup_steps", 0), ("report_every", 1), ("eval_every", 4)):
            text = re.sub(rf"(?m)^{key} = \d+", f"{key} = {value}", text)
    text = text.replace('"../', f'"{ROOT}/')
    text = re.sub(r"(?m)^limit = \d+", "limit = 4" if smoke else "limit = 20", text)
    path = work / f"{name}.toml"
    path.write_text(text)
    return path


def measured(run: Path) -> dict:
    """{stage: {"peak", "step_sec"}} from the run's metrics."""
    out = {}
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for stage in {r["stage"] for r in records if r["kind"] == "train"}:
        train = [r for r in records if r["kind"] == "train" and r["stage"] == stage]
        per_step, last = [], 0
        for r in train:
            per_step.append(r["time_sec"] / (r["step"] - last))
            last = r["step"]
        later = per_step[1:] or per_step
        out[stage] = {"peak": max(r["peak_memory_gb"] for r in train), "step_sec": statistics.median(later)}
    return out


def main() -> None:
    args = standard_args(__doc__, 1, RESULTS)
    if args.smoke:
        args.models = "smoke"
    t0 = time.perf_counter()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    for model in args.models.split(","):
        for name in RECIPES[model]:
            recipe = bench_copy(name, work, args.smoke)
            plans = {}
            for how, flags in (("calibrated", []), ("formula", ["--no-calibrate"])):
                log = work / f"{name}-{how}.json"
                _spawn(localtune("plan", recipe, "--json", *flags), _env(), log)
                text = log.read_text()
                plans[how] = {s["name"]: s for s in json.loads(text[text.index("\n{") + 1:])["stages"]}
            runs = work / f"runs-{name}"
            _spawn(localtune("run", recipe, "--no-tui", "--runs-dir", runs), _env(), work / f"{name}-run.log")
            got = measured(next(runs.iterdir()))
            for stage, m in got.items():
                cal, formula = plans["calibrated"][stage], plans["formula"][stage]
                if cal["kind"] not in KINDS:
                    continue
                cal_peak, f_peak = cal["peak"] / 2**30, formula["peak"] / 2**30
                row = (f"| {model} | `{name}` | {stage} ({cal['kind']}) | {cal_peak:.3f} | {m['peak']:.3f} | "
                       f"{cal_peak / m['peak']:.2f}x | {cal['step_sec']:.3g} | {m['step_sec']:.3g} | "
                       f"{cal['step_sec'] / m['step_sec']:.2f}x | {f_peak / m['peak']:.2f}x | "
                       f"{formula['step_sec'] / m['step_sec']:.2f}x | {cal['how'].split(':')[-1].strip()} |")
                rows.append(row)
                print(row, flush=True)

    class A:  # machine_header reads these
        models, repeats, steps, scenarios, blas_check = args.models, 1, 0, "equal,variable,fp32", False

    header = machine_header(A, time.perf_counter() - t0, {"MKL"}).replace(
        "# localtune SFT vs mlx_lm.lora", "# localtune plan: estimated vs measured peak memory and step time"
    ).replace("bench_sft.py", "bench_plan.py").replace(" --repeats 1`", "`")
    header = "\n".join(x for x in header.splitlines() if not x.startswith(("- BLAS", "- LoRA", "- tok/s")))
    text = "\n".join([
        header.rstrip(),
        "- estimate: `localtune plan RECIPE --json` (calibrated: a few real steps on the widest rows at half and "
        "all of the batch; ppo: two rollout batches); formula: `--no-calibrate`, which `localtune run` checks",
        "- measured: the same recipe run by `localtune run`; peak = highest peak_memory_gb of the stage's reports "
        "(GiB); s/step = median over report windows after the first",
        "- targets: peak ratio within 0.75-1.25x, step-time ratio within 0.70-1.30x (calibrated)", "",
        "| model | recipe | stage | est. peak GiB | measured peak GiB | peak ratio | est. s/step | measured s/step | "
        "time ratio | formula peak ratio | formula time ratio | calibration |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |", *rows, ""])
    publish(args, text)


if __name__ == "__main__":
    main()
