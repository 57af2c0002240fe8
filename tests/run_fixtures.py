"""Run directories as the trainer writes them, for the TUI and `localtune runs` tests.

Timestamps are fixed (T0) so that snapshots repeat; a live run uses the test's own pid.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

T0 = 1_764_400_000.0  # 2025-11-29 07:06:40 UTC
DEAD_PID = 2**22 + 4321  # above Linux's default pid_max: never a live process

# What each method logs besides the loss (names from localtune.train.metrics).
METHOD_FIELDS = {
    "sft": lambda s: {},
    "dpo": lambda s: {"reward_margin": 0.02 * s, "preference_accuracy": min(1.0, 0.5 + s / 200)},
    "reward": lambda s: {"accuracy": min(1.0, 0.5 + s / 150), "margin": 0.05 * s},
    "ppo": lambda s: {"reward_mean": -1 + s / 50, "reward_std": 0.5, "kl": 0.001 * s, "kl_coef": 0.2,
                      "entropy": 2.5 - s / 100, "clip_frac": 0.08, "approx_kl": 0.004, "value_loss": 0.3,
                      "explained_variance": 0.4, "response_length": 11.0, "rollout_sec": 0.3, "scoring_sec": 0.5},
    "grpo": lambda s: {"reward_mean": 0.2 + s / 250, "reward_std": 0.4, "solved": 0.2 + s / 250, "zero_variance": 0.25,
                       "entropy": 1.8 - s / 200, "clip_frac": 0.0, "ratio": 1.0, "completion_length": 3.5,
                       "rollout_sec": 0.4, "scoring_sec": 0.01, "completions": 32,
                       "reward_rule1": 0.2 + s / 250, "reward_rule2": 0.5},
    "distill": lambda s: {"kl": 1.5 * math.exp(-s / 40), "jsd": 0.3 * math.exp(-s / 40), "task_ratio": 0.8},
    "mystery": lambda s: {"widgets_per_sec": 10.0 + s, "wobble": 0.5},
}


def train_record(stage, kind, step, total, t):
    return {"t": t, "stage": stage, "step": step, "kind": "train", "loss": 0.5 + 2.0 * math.exp(-step / 50),
            "tokens_per_sec": 2100.0, "real_tokens_per_sec": 1500.0, "eta_sec": 2.0 * (total - step),
            "lr": 1e-4, "grad_norm": 0.8, "peak_memory_gb": 0.42, "steps_total": total, **METHOD_FIELDS[kind](step)}


def make_run(root: Path, name: str, stages=(("sft", "sft"),), state="done", steps=100, upto=None,
             report_every=10, pid=None, partial_line=False, error=None, task=True) -> Path:
    """A run dir: stages [(name, kind)], trained up to `upto` steps of the last stage (default: all)."""
    path = Path(root) / name
    path.mkdir(parents=True)
    recipe = ['name = "fixture"', '[model]', 'path = "models/small"']
    for stage, kind in stages:
        recipe += ["[[stages]]", f'name = "{stage}"', f'kind = "{kind}"', 'data = "train.jsonl"', f"steps = {steps}"]
    (path / "recipe.toml").write_text("\n".join(recipe) + "\n")
    records, t = [], T0
    done = []
    for i, (stage, kind) in enumerate(stages):
        last = i == len(stages) - 1
        end = upto if (last and upto is not None) else steps
        records.append({"t": t, "stage": stage, "step": 0, "kind": "event", "event": "stage_start",
                        "message": "64 examples, 12,288 trainable of 6,012,160 parameters (0.20%)"})
        for step in range(report_every, end + 1, report_every):
            t += 5
            records.append(train_record(stage, kind, step, steps, t))
            if step % 50 == 0:
                records.append({"t": t, "stage": stage, "step": step, "kind": "eval", "loss": 0.7 + math.exp(-step / 50),
                                "steps_total": steps})
                records.append({"t": t, "stage": stage, "step": step, "kind": "event", "event": "checkpoint",
                                "message": f"checkpoint at step {step}"})
        if end == steps:
            done.append(stage)
    manifest = {"started": T0, "base_dir": str(root), "stages": [{"name": s, "kind": k} for s, k in stages],
                "stages_done": done,
                "stage_results": {s: {"step": steps, "train_time_sec": 500.0} for s in done},
                "device": {"device": "cpu", "memory_limit_gb": 24.0}}
    if task:
        manifest["task"] = {"before": {"metric": "exact_match", "value": 0.05, "n": 40}}
        records.append({"t": T0, "stage": "eval", "step": 0, "kind": "sample", "when": "before",
                        "prompt": "When was the Eiffel Tower finished?", "expected": "1889-03-31", "got": "in the year"})
    if state == "done":
        manifest["finished"] = t
        if task:
            manifest["task"]["after"] = {"metric": "exact_match", "value": 0.9, "n": 40}
            records.append({"t": t, "stage": "eval", "step": 0, "kind": "sample", "when": "after",
                            "prompt": "When was the Eiffel Tower finished?", "expected": "1889-03-31",
                            "got": "1889-03-31"})
        (path / "report.md").write_text("# fixture report\n")
    if state == "failed":
        records.append({"t": t, "stage": stages[-1][0], "step": upto, "kind": "event", "event": "failed",
                        "message": f"the loss became nan at step {upto}"})
    (path / "manifest.json").write_text(json.dumps(manifest))
    stage, kind = stages[-1]
    last_step = upto if upto is not None else steps
    status = {"state": state, "stage": stage, "step": last_step, "steps_total": steps,
              "pid": pid if pid is not None else (os.getpid() if state in ("running", "paused") else DEAD_PID),
              "updated": t}
    if error:
        status["error"] = error
    (path / "status.json").write_text(json.dumps(status))
    text = "".join(json.dumps(r) + "\n" for r in records)
    if partial_line:
        text += json.dumps(train_record(stage, kind, last_step + report_every, steps, t + 5))[:37]
    (path / "metrics.jsonl").write_text(text)
    return path
