"""Runs a recipe's stages in order, wiring each stage's output to the next."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import time
from pathlib import Path

from . import __version__, data, device
from .errors import LocaltuneError, RecipeError
from .recipe import Recipe, Stage
from .run import Run

METHODS = {"sft": "localtune.methods.sft"}


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class StageData:
    train_rows: list
    valid_rows: list | None
    fmt: str


def check_inputs(recipe: Recipe) -> tuple[dict[str, StageData], list | None]:
    """Read and validate every data file before any model loads (strict at the door)."""
    stages = {}
    for s in recipe.stages:
        rows, fmt = data.read_jsonl(recipe.resolve(s.data))
        valid = None
        if s.valid:
            valid, vfmt = data.read_jsonl(recipe.resolve(s.valid))
            if vfmt != fmt:
                raise RecipeError(f"{s.valid}: validation rows are {vfmt!r} but training rows are {fmt!r}")
        elif s.valid_fraction:
            rows, valid = data.split(rows, s.valid_fraction, s.seed)
        stages[s.name] = StageData(rows, valid, fmt)
    eval_rows = None
    if recipe.eval.data:
        eval_rows, fmt = data.read_jsonl(recipe.resolve(recipe.eval.data))
        if fmt == "text":
            raise RecipeError(f"{recipe.eval.data}: exact-match evaluation needs prompt/completion or messages rows")
    return stages, eval_rows


def train_args(stage: Stage, steps: int):
    from .trainer import TrainArgs

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    values = {k: v for k, v in dataclasses.asdict(stage).items() if k in fields}
    return TrainArgs(**{**values, "steps": steps})


def stage_steps(stage: Stage, batches) -> int:
    if stage.steps:
        return stage.steps
    return max(1, math.ceil(stage.epochs * batches.batches_per_epoch / stage.grad_accum))


def run_recipe(recipe: Recipe, run: Run, report=print) -> dict:
    """Run (or resume) every stage. Returns the manifest."""
    import importlib

    import mlx.core as mx

    from . import adapters, evaluate, models, trainer

    stage_data, eval_rows = check_inputs(recipe)
    manifest = run.manifest()
    done = manifest.get("stages_done", [])
    resuming = bool(manifest)
    if not resuming:
        run.update_manifest(
            localtune=__version__, mlx=mx.__version__, python=platform.python_version(),
            device=device.describe(), recipe=recipe.source, base_dir=str(Path(recipe.base_dir).resolve()),
            model={"path": recipe.model.path},
            data={s.name: {"path": s.data, "sha256": _sha256(recipe.resolve(s.data))} for s in recipe.stages},
            stages_done=[], started=time.time(),
        )
    run.set_status(state="running", stage="load", step=0)

    t0 = time.perf_counter()
    model, tokenizer, config, folder = models.load(recipe.model.path, recipe.model.revision, recipe.model.quantize)
    trainable, total = models.count_parameters(model)
    run.log("load", 0, "event", event="model_loaded", message=f"loaded {folder} ({total / 1e6:.1f}M parameters) "
            f"in {time.perf_counter() - t0:.1f}s")
    skipped = getattr(model, "skipped_quantization", [])
    if skipped:
        report(run.log("load", 0, "event", event="warning", message=f"{len(skipped)} layers stay in float: their "
                       f"width is not divisible by group_size={recipe.model.quantize.group_size}: {skipped[:4]}"))
    if not resuming:
        run.update_manifest(model={"path": recipe.model.path, "folder": str(folder),
                                   "parameters": total, "quantized": models.is_quantized(model),
                                   "model_type": config.get("model_type")})

    task = manifest.get("task", {})
    if eval_rows and "before" not in task:
        report(run.log("eval", 0, "event", event="task_eval", message="measuring the task metric before training"))
        task["before"] = evaluate.exact_match(model, tokenizer, eval_rows, recipe.eval.max_tokens, recipe.eval.limit)
        run.update_manifest(task=task)

    results = manifest.get("stage_results", {})
    for i, stage in enumerate(recipe.stages):
        stage_dir = run.stage_dir(stage.name)
        where = f"{recipe.source}: [stages.{stage.name}]"
        if stage.name in done:
            adapters.load(model, stage_dir)
        else:
            sd = stage_data[stage.name]
            train_set = data.encode(sd.train_rows, sd.fmt, tokenizer, stage.max_seq_len, stage.mask_prompt,
                                    recipe.resolve(stage.data))
            if train_set.truncated or train_set.dropped:
                report(run.log(stage.name, 0, "event", event="warning",
                               message=f"{train_set.truncated} of {len(sd.train_rows)} rows truncated to "
                                       f"max_seq_len={stage.max_seq_len}; {train_set.dropped} dropped "
                                       "(no target tokens left)"))
            valid_set = (data.encode(sd.valid_rows, sd.fmt, tokenizer, stage.max_seq_len, stage.mask_prompt,
                                     stage.valid or "valid split") if sd.valid_rows else None)
            adapter_config = adapters.attach(model, stage.adapter, f"{where}.adapter")
            adapter_config["base_model"] = str(folder)
            trainable, total = models.count_parameters(model)
            report(run.log(stage.name, 0, "event", event="stage_start",
                           message=f"{stage.kind}: {len(train_set)} examples, {trainable:,} trainable of "
                                   f"{total:,} parameters ({100 * trainable / total:.2f}%)"))
            batches = data.Batches(train_set, stage.batch_size, stage.seed, stage.group_by_length,
                                   stage.packing, stage.max_seq_len)
            method = importlib.import_module(METHODS[stage.kind])
            eval_fn = None
            if valid_set is not None:
                vb = data.eval_batches(valid_set, stage.batch_size, stage.eval_batches)
                eval_fn = lambda m, vb=vb: trainer.evaluate_loss(m, method.loss, vb)  # noqa: E731
            steps = stage_steps(stage, batches)
            summary = trainer.train(model, method.loss, batches, train_args(stage, steps), run=run,
                                    stage=stage.name, stage_dir=stage_dir, adapter_config=adapter_config,
                                    eval_fn=eval_fn, report=report)
            summary.update(examples=len(train_set), truncated=train_set.truncated, trainable=trainable,
                           total_parameters=total)
            results[stage.name] = summary
            done.append(stage.name)
            run.update_manifest(stages_done=done, stage_results=results)
            run.log(stage.name, steps, "event", event="stage_done", message=f"{stage.name} done: adapters in {stage_dir}")
        if i + 1 < len(recipe.stages):
            if models.is_quantized(model):
                raise LocaltuneError(f"{where}: chaining a second stage on a quantized (QLoRA) base is not "
                                     "supported yet\n  fix: use a float base for multi-stage recipes")
            adapters.fuse(model)

    if eval_rows:
        task["after"] = evaluate.exact_match(model, tokenizer, eval_rows, recipe.eval.max_tokens, recipe.eval.limit)
        run.update_manifest(task=task)
    run.update_manifest(finished=time.time())
    manifest = run.manifest()
    from .report import write_report

    write_report(run, recipe, manifest)
    run.set_status(state="done", stage=recipe.stages[-1].name, step=results.get(recipe.stages[-1].name, {}).get("step"))
    return manifest


def load_for_inference(target: str, until_stage: str | None = None):
    """A run directory (base + every stage's adapters, in order) or a plain model reference."""
    from . import adapters, models, recipe as recipe_mod
    from .run import Run

    path = Path(target)
    if not (path / "recipe.toml").exists():
        model, tokenizer, _, _ = models.load(target)
        return model, tokenizer
    run = Run.open(path)
    parsed = recipe_mod.parse((path / "recipe.toml").read_text(), str(path / "recipe.toml"),
                              run.manifest().get("base_dir", "."))
    names = [s.name for s in parsed.stages]
    if until_stage and until_stage not in names:
        raise LocaltuneError(f"{target}: no stage {until_stage!r}; stages are {names}")
    model, tokenizer, _, _ = models.load(parsed.model.path, parsed.model.revision, parsed.model.quantize)
    for i, name in enumerate(names[: names.index(until_stage) + 1] if until_stage else names):
        if not (path / name / "adapters.safetensors").exists():
            break  # a stage that has not saved yet
        if i:
            adapters.fuse(model)  # earlier stages become part of the base
        adapters.load(model, path / name)
    return model, tokenizer
