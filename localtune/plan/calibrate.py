"""Calibration: a few real steps of a stage on its widest rows, built as training builds them
(the method's heads and setup, the one loop), to measure the peak and time the formula estimates."""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

from .. import device, methods
from ..recipe import Stage
from ..train import adapters, data
from . import GiB, StagePlan, activation_bytes, adapted_blocks, dims, duration, example_length, micro_shapes


def _subset(dataset, stage: Stage, rows: int):
    """A copy of the dataset holding the `rows` longest examples of the widest batch."""
    batches = data.Batches(dataset, stage.batch_size, stage.seed or 0, stage.group_by_length, stage.packing,
                           stage.max_seq_len)
    plan = batches.plan(0)
    if stage.packing:
        widest = plan[0]
        examples = [e for b in widest[:rows] for e in b]
    else:
        widest = max(plan, key=lambda item: max(example_length(dataset.examples[i]) for i in item))
        examples = sorted((dataset.examples[i] for i in widest), key=example_length, reverse=True)[:rows]
    if examples and hasattr(examples[0], "chosen"):  # pairs carry their index in the set
        examples = [dataclasses.replace(e, id=j) for j, e in enumerate(examples)]
    sub = copy.copy(dataset)
    sub.examples = examples
    return sub


def _measure(model, tokenizer, stage: Stage, dataset, rows: int, steps: int, folder: Path, recipe) -> dict:
    """Run `steps` real steps of the stage on `rows` rows, built as training builds them:
    {"peak", "times", "step_sec", and the method's own timings (Method.plan_calibrate)}."""
    from ..methods.base import StageContext
    from ..run import Run
    from ..train import trainer
    from ..train.pipeline import attach, build, train_args

    method = methods.of(stage)
    units = rows // 2 if method.pairs else rows
    small = dataclasses.replace(stage, grad_accum=1, eval_every=0, save_every=10**9, report_every=1)
    if method.samples:  # the stage's own rollout batch: the longest prompts
        sub = copy.copy(dataset)
        sub.examples = sorted(dataset.examples, key=example_length, reverse=True)[:stage.batch_size]
    else:
        small = dataclasses.replace(small, batch_size=units)
        sub = _subset(dataset, stage, units)
    run = Run.create(folder, "calibration", "")
    ctx = StageContext(recipe, dataclasses.replace(small, seed=0), model, tokenizer, sub, None, folder / stage.name,
                       run=run, steps=steps, planning=True, report=lambda record: None)  # the stage's notes: not here
    own = set(model.keys())
    config = attach(ctx, method, "adapter")  # as training builds the stage
    records = []
    try:
        loss_fn, train_batches, _ = build(ctx, method)
        trainer.train(model, loss_fn, train_batches, train_args(small, steps), run=run, stage=stage.name,
                      stage_dir=folder / stage.name, adapter_config=config,
                      report=lambda r: records.append(r) if r.get("kind") == "train" else None)
    finally:
        adapters.detach(model)
        for name in set(model.keys()) - own:  # the method's heads
            model.pop(name)
    times = [r["time_sec"] for r in records]
    out = {"peak": max(r["peak_memory_gb"] for r in records) * GiB, "times": times,
           "step_sec": sorted(times[1:])[len(times[1:]) // 2]}
    return out | method.plan_calibrate(model, stage, sub, folder, len(dataset))


def calibrate(model, tokenizer, stage: Stage, dataset, p: StagePlan, limit: int, recipe) -> None:
    """Refine p's peak and time from real steps on the widest rows: at 1/2 and all of the batch when the
    formula puts it under 80% of the limit (the peak is then measured), else at 1/4 and 1/2 (the peak:
    the half batch's plus the formula's growth). A ppo stage: two whole rollout batches."""
    method = methods.of(stage)
    if method.not_calibrated:
        p.notes.append(method.not_calibrated)
        return
    with tempfile.TemporaryDirectory(prefix="localtune-plan-") as tmp:
        if method.samples:
            if p.peak > 0.6 * limit:
                p.notes.append("not calibrated: a rollout batch at full size might not fit")
                return
            updates = method.steps_per_batch(stage)
            m = _measure(model, tokenizer, stage, dataset, p.rows, 2 * updates, Path(tmp), recipe)
            p.peak = int(m["peak"])
            p.parts["activations"] = max(0, p.peak - static_bytes(p))
            p.step_sec = sum(m["times"][updates:]) / updates  # the second rollout batch: compiled, rollout included
            each = f"{updates} update" + ("s" if updates != 1 else "")
            p.how = f"calibrated: two rollout batches of {stage.batch_size} prompts ({each} each)"
        else:
            unit = 2 if method.pairs else 1
            full = p.rows // unit
            safe = p.peak < 0.8 * limit  # the formula's word that the full batch can run
            r1, r2 = (max(1, full // 2), full) if safe else (max(1, full // 4), max(1, full // 2))
            a = _measure(model, tokenizer, stage, dataset, r1 * unit, 4, Path(tmp) / "a", recipe)
            b = _measure(model, tokenizer, stage, dataset, r2 * unit, 4, Path(tmp) / "b", recipe) if r2 > r1 else a
            if r2 == full:
                p.peak = int(b["peak"])
            else:  # half the batch, plus the formula's growth to the full batch
                d, dtype_bytes = dims(model), device.policy().dtype_bytes

                def formula(rows: int) -> int:
                    return activation_bytes(d, stage, rows * unit, p.width, adapted_blocks(stage, d), dtype_bytes,
                                            p.scored * rows // full)

                p.peak = int(b["peak"] + formula(full) - formula(r2))
            p.parts["activations"] = max(0, p.peak - static_bytes(p))
            slope = (b["step_sec"] - a["step_sec"]) / (r2 - r1) if r2 > r1 else 0.0
            rows_worth = mean_tokens(stage, dataset) / (p.width * unit)  # the epoch's mean micro-batch
            p.step_sec = stage.grad_accum * max(a["step_sec"] - slope * r1, a["step_sec"] + slope * (rows_worth - r1))
            p.step_sec += b.get("extra_step_sec", 0.0)  # the method's work beside the steps (Method.plan_calibrate)
            if "before_steps_sec" in b:
                p.notes.append(f"{b['before_steps']} before the first step: about {duration(b['before_steps_sec'])}")
            p.how = f"calibrated: {r1} and {r2} {'pairs' if unit == 2 else 'rows'} of {p.width} tokens"
        p.stage_sec = p.step_sec * p.steps


def static_bytes(p: StagePlan) -> int:
    return sum(v for k, v in p.parts.items() if k != "activations" and not k.startswith("phase:"))


def mean_tokens(stage: Stage, dataset) -> float:
    shapes = micro_shapes(stage, dataset)
    return sum(r * w for r, w, _ in shapes) / len(shapes)
