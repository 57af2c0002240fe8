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

METHODS = {"sft": "localtune.methods.sft", "dpo": "localtune.methods.dpo"}


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class Prepared:
    """Everything checked before any weights load: the model folder, tokenizer and encoded data."""

    folder: Path
    tokenizer: object
    train: dict  # stage name -> data.Dataset
    valid: dict  # stage name -> data.Dataset | None
    eval_rows: list | None


def _read_stage(recipe: Recipe, s: Stage):
    rows, fmt = data.read_jsonl(recipe.resolve(s.data))
    if (s.kind == "dpo") != (fmt == "preference"):
        want = '{"prompt", "chosen", "rejected"} rows' if s.kind == "dpo" else 'messages, prompt/completion or text rows'
        raise RecipeError(f"{recipe.resolve(s.data)}: a {s.kind} stage needs {want}, but this file has {fmt!r} rows\n"
                          f"  fix: point [stages.{s.name}] data at the right file"
                          + ('' if s.kind == "dpo" else ', or set kind = "dpo" for preference pairs'))
    valid = None
    if s.valid:
        valid, vfmt = data.read_jsonl(recipe.resolve(s.valid))
        if vfmt != fmt:
            raise RecipeError(f"{s.valid}: validation rows are {vfmt!r} but training rows are {fmt!r}")
    elif s.valid_fraction:
        rows, valid = data.split(rows, s.valid_fraction, s.seed)
    return rows, valid, fmt


def prepare(recipe: Recipe) -> Prepared:
    """Strict at the door: read, validate and tokenize every input before the model's weights load."""
    from . import models

    for s in recipe.stages:
        if s.kind not in METHODS:
            raise RecipeError(f"{recipe.source}: [stages.{s.name}] kind = \"{s.kind}\" passes the license gate, "
                              "but this version cannot train it yet\n  fix: remove the stage")
    raw = {s.name: _read_stage(recipe, s) for s in recipe.stages}
    eval_rows = None
    if recipe.eval.data:
        eval_rows, fmt = data.read_jsonl(recipe.resolve(recipe.eval.data))
        if fmt == "text":
            raise RecipeError(f"{recipe.eval.data}: exact-match evaluation needs prompt/completion or messages rows")
    folder = models.resolve(recipe.resolve(recipe.model.path), recipe.model.revision)
    if recipe.model.quantize is not None or "quantization" in models._config(folder):
        for s in recipe.stages[1:]:
            if s.adapter.type == "dora":  # the earlier stages' adapters stay unfused (adapters.next_stage)
                raise RecipeError(f"{recipe.source}: [stages.{s.name}.adapter] type = \"dora\" cannot follow an "
                                  "earlier stage on a quantized base: DoRA rescales the weight it wraps, and here "
                                  "that weight is the 4-bit base plus the earlier, unfused adapters\n"
                                  '  fix: use type = "lora" for this stage, or a float base')
    tokenizer = models.load_tokenizer(folder)
    train, valid = {}, {}
    for s in recipe.stages:
        rows, valid_rows, fmt = raw[s.name]
        if fmt == "preference":
            from .methods.dpo import encode_pairs

            encode = lambda r, src: encode_pairs(r, tokenizer, s.max_seq_len, src)  # noqa: E731
        else:
            encode = lambda r, src: data.encode(r, fmt, tokenizer, s.max_seq_len, s.mask_prompt, src)  # noqa: E731
        train[s.name] = encode(rows, recipe.resolve(s.data))
        valid[s.name] = encode(valid_rows, s.valid or "valid split") if valid_rows else None
        data.Batches(train[s.name], s.batch_size, s.seed, s.group_by_length, s.packing, s.max_seq_len)
    return Prepared(folder, tokenizer, train, valid, eval_rows)


def train_args(stage: Stage, steps: int):
    from .trainer import TrainArgs

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    values = {k: v for k, v in dataclasses.asdict(stage).items() if k in fields}
    return TrainArgs(**{**values, "steps": steps})


def stage_steps(stage: Stage, batches) -> int:
    if stage.steps:
        return stage.steps
    return max(1, math.ceil(stage.epochs * batches.batches_per_epoch / stage.grad_accum))


def run_recipe(recipe: Recipe, run: Run, prepared: Prepared, report=print) -> dict:
    """Run (or resume) every stage. Returns the manifest."""
    import importlib

    import mlx.core as mx

    from . import adapters, evaluate, models, trainer

    manifest = run.manifest()
    done = manifest.get("stages_done", [])
    if "started" not in manifest:
        run.update_manifest(
            localtune=__version__, mlx=mx.__version__, python=platform.python_version(),
            device=device.describe(), recipe=recipe.source, base_dir=str(Path(recipe.base_dir).resolve()),
            data={s.name: {"path": s.data, "sha256": _sha256(recipe.resolve(s.data))} for s in recipe.stages},
            stages=[{"name": s.name, "kind": s.kind} for s in recipe.stages], stages_done=[], started=time.time(),
        )
    run.set_status(state="running", stage="load", step=0)

    t0 = time.perf_counter()
    tokenizer = prepared.tokenizer
    model, config = models.load_model(prepared.folder, recipe.model.quantize)
    trainable, total = models.count_parameters(model)
    report(run.log("load", 0, "event", event="model_loaded",
                   message=f"{prepared.folder}: {total / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f}s"))
    skipped = getattr(model, "skipped_quantization", [])
    if skipped:
        report(run.log("load", 0, "event", event="warning", message=f"{len(skipped)} layers stay in float: their "
                       f"width is not divisible by group_size={recipe.model.quantize.group_size}: {skipped[:4]}"))
    run.update_manifest(model={"path": recipe.model.path, "folder": str(prepared.folder), "parameters": total,
                               "quantized": models.is_quantized(model), "model_type": config.get("model_type")})

    def task_metric(when: str) -> dict:
        report(run.log("eval", 0, "event", event="task_eval", message=f"task metric {when}..."))
        result = evaluate.exact_match(model, tokenizer, prepared.eval_rows, recipe.eval.max_tokens,
                                      recipe.eval.limit, recipe.eval.format)
        _log_task(run, when, result, report)
        return result

    task = manifest.get("task", {})
    if prepared.eval_rows and "before" not in task:
        task["before"] = task_metric("before training")
        run.update_manifest(task=task)

    results = manifest.get("stage_results", {})
    for i, stage in enumerate(recipe.stages):
        stage_dir = run.stage_dir(stage.name)
        where = f"{recipe.source}: [stages.{stage.name}]"
        if stage.name in done:
            adapters.load(model, stage_dir)
        else:
            train_set, valid_set = prepared.train[stage.name], prepared.valid[stage.name]
            if train_set.truncated or train_set.dropped:
                report(run.log(stage.name, 0, "event", event="warning",
                               message=f"{train_set.truncated} of {len(train_set) + train_set.dropped} rows "
                                       f"truncated to max_seq_len={stage.max_seq_len}; {train_set.dropped} "
                                       "dropped (no target tokens left)"))
            if getattr(train_set, "identical", 0):
                report(run.log(stage.name, 0, "event", event="warning",
                               message=f"{train_set.identical} pairs have chosen identical to rejected; "
                                       "skipped (they carry no preference)"))
            mx.random.seed(stage.seed)  # the same recipe gives the same adapter init
            adapter_config = adapters.attach(model, stage.adapter, f"{where}.adapter")
            adapter_config["base_model"] = str(prepared.folder)
            if "provenance" in manifest:  # the data bill of materials travels with the adapters
                from .provenance import bill_of_materials

                adapter_config["provenance"] = bill_of_materials(manifest["provenance"])
            trainable, total = models.count_parameters(model)
            report(run.log(stage.name, 0, "event", event="stage_start",
                           message=f"{len(train_set)} examples, {trainable:,} trainable of "
                                   f"{total:,} parameters ({100 * trainable / total:.2f}%)"))
            method = importlib.import_module(METHODS[stage.kind])
            batches = data.Batches(train_set, stage.batch_size, stage.seed, stage.group_by_length,
                                   stage.packing, stage.max_seq_len, collate=getattr(method, "collate", None))
            steps = stage_steps(stage, batches)
            loss_fn, batches, valid_batches = method.setup(model, stage, batches, valid_set, steps, stage_dir,
                                                           lambda message: report(run.log(
                                                               stage.name, 0, "event", event="info", message=message)))
            eval_fn = None
            if valid_batches:
                eval_fn = lambda m, vb=valid_batches, f=loss_fn: trainer.evaluate_loss(m, f, vb)  # noqa: E731
            summary = trainer.train(model, loss_fn, batches, train_args(stage, steps), run=run,
                                    stage=stage.name, stage_dir=stage_dir, adapter_config=adapter_config,
                                    eval_fn=eval_fn, report=report)
            summary.update(examples=len(train_set), truncated=train_set.truncated, trainable=trainable,
                           total_parameters=total)
            results[stage.name] = summary
            done.append(stage.name)
            run.update_manifest(stages_done=done, stage_results=results)
            report(run.log(stage.name, steps, "event", event="stage_done",
                           message=f"adapters saved in {stage_dir}"))
        if i + 1 < len(recipe.stages):
            if prepared.eval_rows and stage.name not in task.get("stages", {}):  # what this stage alone did
                task.setdefault("stages", {})[stage.name] = task_metric(f"after {stage.name}")
                run.update_manifest(task=task)
            how = adapters.next_stage(model)  # fused into a float base; kept, frozen, on a quantized one
            report(run.log(stage.name, 0, "event", event="info",
                           message=f"{stage.name}'s adapters {how} under {recipe.stages[i + 1].name}'s"))

    if prepared.eval_rows:
        task["after"] = task_metric("after training")
        if len(recipe.stages) > 1:
            task.setdefault("stages", {})[recipe.stages[-1].name] = task["after"]
    run.update_manifest(task=task, finished=time.time())
    manifest = run.manifest()
    from .report import write_report

    write_report(run, recipe, manifest)
    last = recipe.stages[-1].name
    run.set_status(state="done", stage=last, step=results.get(last, {}).get("step"))
    return manifest


def _log_task(run: Run, when: str, result: dict, report) -> None:
    """The task metric as an event, and its sample generations as "sample" records (the TUI shows them)."""
    formed = f", well-formed {result['well_formed']:.0%}" if "well_formed" in result else ""
    report(run.log("eval", 0, "event", event="task_metric", when=when, value=result["value"],
                   message=f"task metric {when}: {result['metric']} {result['value']:.0%} of {result['n']}{formed}"))
    for sample in result.get("samples", []):
        run.log("eval", 0, "sample", when=when, **sample)


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
    model, tokenizer, _, _ = models.load(parsed.resolve(parsed.model.path), parsed.model.revision, parsed.model.quantize)
    for i, name in enumerate(names[: names.index(until_stage) + 1] if until_stage else names):
        if not (path / name / "adapters.safetensors").exists():
            break  # a stage that has not saved yet
        if i:
            adapters.next_stage(model)  # earlier stages become part of the model (fused or stacked)
        adapters.load(model, path / name)
    return model, tokenizer
