"""The stage loop: runs a recipe's stages in order on one model, each stage's method supplying its
hooks (methods/base.py), and records what each stage did in the run directory. It never asks which
method a stage is."""
from __future__ import annotations

import dataclasses
import hashlib
import platform
import time
from pathlib import Path

from .. import __version__, datasets, device, loading, methods
from ..methods.base import StageContext
from ..recipe import RUN_TEMPLATE, Recipe, Stage
from ..run import Run, atomic_write
from . import distributed
from .prepare import Prepared, batches, sha256


def train_args(stage: Stage, steps: int):
    from .trainer import TrainArgs

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    values = {k: v for k, v in dataclasses.asdict(stage).items() if k in fields}
    return TrainArgs(**{**values, "steps": steps})


def fingerprint(recipe: Recipe, stage: Stage) -> str:
    """The stage's settings and the content of its data files (and of files its method reads, such as
    reward functions): a checkpoint is only resumed under the same."""
    h = hashlib.sha256(repr(dataclasses.asdict(stage)).encode())
    h.update(datasets.fingerprint(datasets.spec_of(recipe, stage)).encode())
    if stage.valid:
        h.update(datasets.fingerprint(datasets.spec_of(recipe, stage, valid=True)).encode())
    for name in methods.of(stage).files(stage):
        if name and Path(recipe.resolve(name)).is_file():
            h.update(sha256(recipe.resolve(name)).encode())
    return h.hexdigest()


def attach(ctx: StageContext, method, where: str) -> dict:
    """The stage's adapters (seeded: the same recipe gives the same init) and its method's heads on
    ctx.model; returns the adapter_config that is saved with them. Training and the planner's
    calibration build a stage with this and `build`, in this order."""
    import mlx.core as mx

    from . import adapters

    mx.random.seed(ctx.stage.seed)
    return adapters.attach(ctx.model, ctx.stage.adapter, where) | method.heads(ctx.model)


def build(ctx: StageContext, method) -> tuple:
    """The stage's batches, its step count (unless ctx.steps is set) and its method's setup:
    (loss, training batches, validation batches)."""
    ctx.batches = batches(ctx.stage, ctx.train, method.collate)
    ctx.steps = ctx.steps or method.steps(ctx.stage, ctx.batches)
    return method.setup(ctx)


def log_task(run: Run, when: str, result: dict, report) -> None:
    """The task metric as an event, and its sample generations as "sample" records (the TUI shows them)."""
    formed = f", well-formed {result['well_formed']:.0%}" if "well_formed" in result else ""
    value = f"{result['value']:.3f} nats/token" if result["metric"] == "loglik" else f"{result['value']:.0%}"
    formed += "".join(f", {key} {share:.0%}" for key, share in result.get("secondary", {}).items())
    report(run.log("eval", 0, "event", event="task_metric", when=when, value=result["value"],
                   message=f"task metric {when}: {result['metric']} {value} on {result['n']} rows{formed}"))
    for sample in result.get("samples", []):
        run.log("eval", 0, "sample", when=when, **sample)


class Chain:
    """One run of a recipe: the model as it goes through the stages, and the run's records of it
    (manifest.json "task", "general", "stage_results", "stages_done"), saved together by `save`."""

    def __init__(self, recipe: Recipe, run: Run, prepared: Prepared, report=print):
        self.recipe, self.run, self.prepared, self.report = recipe, run, prepared, report
        manifest = run.manifest()
        self.manifest = manifest
        self.done = manifest.get("stages_done", [])
        self.task, self.general = manifest.get("task", {}), manifest.get("general", {})
        self.results = manifest.get("stage_results", {})
        self.model, self.tokenizer = None, prepared.tokenizer
        self.measured = {}  # stage -> the task result its guard measured on the weights it kept

    def save(self) -> None:
        self.run.update_manifest(task=self.task, general=self.general, stage_results=self.results,
                                 stages_done=self.done)

    def log(self, stage: str, message: str, event: str = "info", step: int = 0) -> None:
        self.report(self.run.log(stage, step, "event", event=event, message=message))

    # measurements -----------------------------------------------------------------------------
    def task_metric(self, when: str, stage: str | None = None) -> dict:
        """The task metric of the model now; after `stage`, the forgetting guard's measurement of the weights
        it kept, when it made one in this process."""
        from ..integrity import evaluate

        result = self.measured.pop(stage, None)
        if result is None:
            self.log("eval", f"task metric {when}...", "task_eval")
            result = evaluate.task(self.model, self.tokenizer, self.prepared.eval_rows, self.recipe.eval)
        log_task(self.run, when, result, self.report)
        return result

    def few_shot_metric(self, plan: dict) -> dict:
        """Try prompting first: the base model with k training examples before each golden prompt."""
        from ..integrity import few_shot

        if plan["k"] == 0:  # a metric it does not apply to is said plainly; no examples to show is a warning
            self.log("eval", f"prompting baseline: {plan['note'] or 'not measured: no examples'}",
                     "info" if plan.get("applies", True) is False else "warning")
            return {"k": 0, "asked": plan["asked"], "note": plan["note"]}
        if plan["note"]:
            self.log("eval", f"prompting baseline: {plan['note']}", "warning")
        self.log("eval", f"task metric with {plan['k']} examples of [stages.{plan['stage']}] in the prompt...",
                 "task_eval")
        result = few_shot.measure(self.model, self.tokenizer, self.prepared.eval_rows, plan, self.recipe.eval)
        log_task(self.run, f"with {plan['k']} examples in the prompt", result, self.report)
        return result

    def general_metric(self, when: str, nll: float | None = None) -> dict:
        """General NLL of the model now; `nll`: the forgetting guard already measured these weights."""
        import math

        from ..integrity import evaluate

        if nll is None:
            result = evaluate.general_nll(self.model, self.tokenizer, self.prepared.general)
        else:  # the same texts and tokenizer as the guard's base measurement
            base = self.general.get("student_before", self.general["before"])
            result = {"nll": nll, "perplexity": math.exp(nll), "tokens": base["tokens"], "texts": base["texts"]}
        self.report(self.run.log("eval", 0, "event", event="general_metric", when=when, value=result["nll"],
                                 message=f"general NLL {when}: {result['nll']:.4f} nats/token (perplexity "
                                         f"{result['perplexity']:.1f}) on {result['texts']} texts"))
        return result

    def guard(self, stage: Stage):
        """The forgetting guard, when the recipe sets a budget: general NLL against the starting point."""
        from ..integrity import evaluate
        from ..integrity.forgetting import Guard

        spec, tokenizer, prepared = self.recipe.eval, self.tokenizer, self.prepared
        if not prepared.general or spec.max_general_nll_increase is None:
            return None

        def general_nll(model) -> float:
            return evaluate.general_nll(model, tokenizer, prepared.general)["nll"]

        def task_result(model) -> dict:
            return evaluate.task(model, tokenizer, prepared.eval_rows, spec)

        base = self.general.get("student_before", self.general["before"])
        best = task_result if spec.on_forgetting == "best" and prepared.eval_rows else None
        first = stage is self.recipe.stages[0] and not methods.of(stage).starts_from(stage)
        # the same weights, measured (LoRA's B and a full stage start exactly there; DoRA's rescaled W to rounding)
        start_task = self.task.get("before") if first else None
        return Guard(general_nll, base["nll"], spec.max_general_nll_increase, spec.guard_every,
                     spec.on_forgetting, best, start_task)

    # the run ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Record the run's versions and inputs, load the model and measure it before training."""
        import mlx.core as mx

        from .. import models

        recipe, run, prepared = self.recipe, self.run, self.prepared
        if "started" not in self.manifest:
            run.update_manifest(
                localtune=__version__, mlx=mx.__version__, python=platform.python_version(),
                device=device.describe(), processes=distributed.size(), recipe=recipe.source,
                base_dir=str(Path(recipe.base_dir).resolve()),
                data={s.name: {"path": s.data, "sha256": datasets.fingerprint(datasets.spec_of(recipe, s)),
                               "format": prepared.detected.get(s.name, "")} for s in recipe.stages},
                stages=[{"name": s.name, "kind": s.kind} for s in recipe.stages], stages_done=[],
                started=time.time())
            if template := recipe.chat_template():  # the run keeps its own copy: loading, fuse and export read it
                atomic_write(run.path / RUN_TEMPLATE, template)
                run.update_manifest(chat_template={"path": recipe.model.chat_template,
                                                   "sha256": hashlib.sha256(template.encode()).hexdigest()})
        run.set_status(state="running", stage="load", step=0)
        if prepared.lints:  # data-lint warnings (errors stopped the run in prepare)
            run.update_manifest(data_lints=prepared.lints)
            for name, found in prepared.lints.items():
                for f in found:
                    self.log("load", f"[stages.{name}] data lint {f['lint']}: {f['where']}: {f['message']}", "warning")
        if c := prepared.contamination:
            run.update_manifest(contamination={k: v for k, v in c.items() if k != "overlaps"} | {
                "overlaps": c["overlaps"][:50]})
            if c["contaminated_golden_rows"]:
                self.log("load", f"{c['contaminated_golden_rows']} of {c['golden_rows']} golden rows overlap the "
                         f"training data (within [eval] max_contamination); first: {c['overlaps'][0]['train']} ~ "
                         f"{c['overlaps'][0]['golden']}", "warning")
        t0 = time.perf_counter()
        self.model, config = models.load_model(prepared.folder, recipe.model.quantize)
        _, total = models.count_parameters(self.model)
        self.log("load", f"{prepared.folder}: {total / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f}s",
                 "model_loaded")
        if skipped := getattr(self.model, "skipped_quantization", []):
            self.log("load", f"{len(skipped)} layers stay in float: their width is not divisible by "
                     f"group_size={recipe.model.quantize.group_size}: {skipped[:4]}", "warning")
        run.update_manifest(model={"path": recipe.model.path, "folder": str(prepared.folder), "parameters": total,
                                   "quantized": models.is_quantized(self.model),
                                   "model_type": config.get("model_type")})
        if prepared.eval_rows and "before" not in self.task:
            self.task["before"] = self.task_metric("before training")
        if prepared.eval_rows and prepared.few_shot and "few_shot" not in self.task:
            self.task["few_shot"] = self.few_shot_metric(prepared.few_shot)
        if prepared.general and "before" not in self.general:
            self.general["before"] = self.general_metric("before training")
        self.save()

    def resume_stage(self, stage: Stage) -> None:
        """A finished stage: its adapters back on the model (a branch leaves the model as it was)."""
        from . import adapters

        method = methods.of(stage)
        if method.branch:
            return
        if method.starts_from(stage):  # the chain continues from that model
            self.model, self.tokenizer, _ = loading.chain_base(self.recipe, [stage])
        adapters.load(self.model, self.run.stage_dir(stage.name))

    def train_stage(self, stage: Stage) -> None:
        from .. import models
        from . import trainer

        recipe, run, prepared, method = self.recipe, self.run, self.prepared, methods.of(stage)
        ctx = StageContext(recipe, stage, self.model, self.tokenizer, prepared.train[stage.name],
                           prepared.valid[stage.name], run.stage_dir(stage.name), run=run,
                           eval_rows=prepared.eval_rows, task=self.task, report=self.report,
                           log_task=lambda when, result: log_task(run, when, result, self.report))
        method.before(ctx)  # may swap in another model (a distill student) or data (the teacher's answers)
        self.model, self.tokenizer = ctx.model, ctx.tokenizer
        model = ctx.model
        self.save()
        train_set = ctx.train
        if detected := prepared.detected.get(stage.name):
            self.log(stage.name, f"data {stage.data}: {detected}")
        if train_set.truncated or train_set.dropped:
            self.log(stage.name, f"{train_set.truncated} of {len(train_set) + train_set.dropped} rows truncated to "
                     f"max_seq_len={stage.max_seq_len}; {train_set.dropped} dropped (no target tokens left)", "warning")
        if getattr(train_set, "identical", 0):
            self.log(stage.name, f"{train_set.identical} pairs have chosen identical to rejected; skipped (they "
                     "carry no preference)", "warning")
        adapter_config = attach(ctx, method, f"{recipe.source}: [stages.{stage.name}].adapter")
        adapter_config["base_model"] = str(prepared.folder)
        if "provenance" in self.manifest:  # the data bill of materials travels with the adapters
            from ..integrity.bom import bill_of_materials

            adapter_config["provenance"] = bill_of_materials(self.manifest["provenance"])
        trainable, total = models.count_parameters(model)
        self.log(stage.name, f"{len(train_set)} examples, {trainable:,} trainable of {total:,} parameters "
                 f"({100 * trainable / total:.2f}%)", "stage_start")
        loss_fn, train_batches, valid_batches = build(ctx, method)
        steps = ctx.steps
        ctx.evaluate = method.evaluator(ctx, loss_fn, valid_batches)
        heldout = method.heldout(ctx, model)
        if heldout is not None and (line := method.heldout_line("before", heldout)):
            self.log(stage.name, line)
        if prepared.general and method.starts_from(stage) and "student_before" not in self.general:
            self.general["student_before"] = self.general_metric("of the student before training")
            self.general["student_stage"] = stage.name  # from here on, deltas are against the student
            self.save()
        guard = self.guard(stage)
        summary = trainer.train(model, loss_fn, train_batches, train_args(stage, steps), run=run, stage=stage.name,
                                stage_dir=ctx.stage_dir, adapter_config=adapter_config, eval_fn=ctx.evaluate,
                                guard=guard, fingerprint=fingerprint(recipe, stage), report=self.report)
        if guard is not None and not method.branch and (measured := guard.final_task()) is not None:
            self.measured[stage.name] = measured  # the weights the chain goes on with
        if heldout is not None:
            summary["heldout_before"], summary["heldout_after"] = heldout, method.heldout(ctx, model)
            if line := method.heldout_line("after", summary["heldout_after"]):
                self.log(stage.name, line, step=steps)
        method.after(ctx, summary)
        summary.update(examples=len(train_set), truncated=train_set.truncated, trainable=trainable,
                       total_parameters=total)
        self.results[stage.name] = summary
        self.done.append(stage.name)
        self.save()
        self.log(stage.name, f"adapters saved in {ctx.stage_dir}", "stage_done", step=steps)

    def run_all(self) -> dict:
        from . import adapters

        self.start()
        stages = self.recipe.stages
        for i, stage in enumerate(stages):
            if stage.name in self.done:
                self.resume_stage(stage)
            else:
                self.train_stage(stage)
            if methods.of(stage).branch:
                continue  # the policy is as it was: nothing to measure, nothing to fuse
            if self.prepared.general and stage.name not in self.general.get("stages", {}):
                known = self.results.get(stage.name, {}).get("forgetting", {}).get("final_nll")
                self.general.setdefault("stages", {})[stage.name] = self.general_metric(f"after {stage.name}", known)
            if i + 1 < len(stages):
                if self.prepared.eval_rows and stage.name not in self.task.get("stages", {}):
                    self.task.setdefault("stages", {})[stage.name] = self.task_metric(f"after {stage.name}", stage.name)
                how = adapters.next_stage(self.model)  # fused into a float base; kept, frozen, on a quantized one
                self.log(stage.name, f"{stage.name}'s adapters {how} under {stages[i + 1].name}'s")
            self.save()
        return self.finish()

    def finish(self) -> dict:
        from ..integrity import evaluate
        from ..report import write_report

        eval_rows, task = self.prepared.eval_rows, self.task
        if eval_rows:
            task["after"] = self.task_metric("after training", self.recipe.stages[-1].name)
            if task.get("few_shot", {}).get("k"):
                from ..integrity import few_shot

                decision = few_shot.compare(task["few_shot"], task["after"])
                task["few_shot"]["against_tune"] = decision | {
                    "sentence": few_shot.sentence(task["few_shot"], task["after"], decision)}
                self.log("eval", task["few_shot"]["against_tune"]["sentence"], "prompt_baseline")
            if len(self.recipe.stages) > 1:
                task.setdefault("stages", {})[self.recipe.stages[-1].name] = task["after"]
            if "teacher" in task and "student_tokens_per_sec" not in task:
                prompt = eval_rows[0].get("prompt") or evaluate.prompt_and_answer(eval_rows[0])[0]
                task["student_tokens_per_sec"] = evaluate.decode_speed(self.model, self.tokenizer, prompt)
        self.save()
        self.run.update_manifest(finished=time.time())
        manifest = self.run.manifest()
        write_report(self.run, self.recipe, manifest)
        last = self.recipe.stages[-1].name
        self.run.set_status(state="done", stage=last, step=self.results.get(last, {}).get("step"))
        return manifest


def run_recipe(recipe: Recipe, run: Run, prepared: Prepared, report=print) -> dict:
    """Run (or resume) every stage. Returns the manifest."""
    return Chain(recipe, run, prepared, report).run_all()
