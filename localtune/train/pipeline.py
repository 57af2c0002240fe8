"""Runs a recipe's stages in order, wiring each stage's output to the next."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import time
from pathlib import Path

from .. import __version__, device
from ..errors import DataError, LocaltuneError, RecipeError
from ..models import families
from ..recipe import Recipe, Stage
from ..run import LIVE_STATES, Run, effective_state, is_run_dir, trainer_of
from . import data, distributed

METHODS = {"sft": "localtune.methods.sft", "dpo": "localtune.methods.dpo", "distill": "localtune.methods.distill",
           "reward": "localtune.methods.reward", "ppo": "localtune.methods.ppo"}
FORMATS = {"sft": ("messages", "completion", "text"), "dpo": ("preference",), "reward": ("preference",),
           "distill": ("messages", "completion", "text"), "sequence": ("prompt", "messages", "completion"),
           "ppo": ("prompt", "messages", "completion", "preference")}
WANT = {"preference": '{"prompt", "chosen", "rejected"}', "prompt": '{"prompt"}', "messages": '{"messages"}',
        "completion": '{"prompt", "completion"}', "text": '{"text"}'}


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
    contamination: dict | None = None  # the firewall's report, when there is a golden set
    general: list | None = None  # general-ability texts (the forgetting check)


def _read_stage(recipe: Recipe, s: Stage):
    try:
        rows, fmt = data.read_jsonl(recipe.resolve(s.data))
    except DataError as e:
        if s.kind != "ppo" or "expected" not in e.message:
            raise
        raise DataError(f"{e.message}\n  [stages.{s.name}] data: a ppo stage samples its own responses, so it needs "
                        'prompts: {"prompt"} rows (or {"messages"} or preference rows; their answers are ignored)\n'
                        '  fix: write each row as {"prompt": "..."}') from None
    kind = "sequence" if s.kind == "distill" and s.mode == "sequence" else s.kind
    if fmt not in FORMATS[kind]:
        what = f"a {s.kind} stage" + (' with mode = "sequence"' if kind == "sequence" else "")
        hint = {"preference": ', or set kind = "dpo" for preference pairs',
                "prompt": ' (prompts alone are for kind = "distill" with mode = "sequence", or "ppo")'}.get(fmt, "")
        raise RecipeError(f"{recipe.resolve(s.data)}: {what} needs {' or '.join(WANT[f] for f in FORMATS[kind])} "
                          f"rows, but this file has {WANT[fmt]} rows\n"
                          f"  fix: point [stages.{s.name}] data at the right file{hint}")
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
    from .. import models

    raw = {s.name: _read_stage(recipe, s) for s in recipe.stages}
    if distributed.size() > 1 and (ppo := [s.name for s in recipe.stages if s.kind == "ppo"]):
        raise RecipeError(f"{recipe.source}: [stages.{ppo[0]}] is a ppo stage, and ppo stages run in one process "
                          f"for now (this launch has {distributed.size()}): each rank would sample its own "
                          "rollouts and adapt its own KL coefficient\n  fix: run this recipe without mlx.launch")
    eval_rows = None
    if recipe.eval.data:
        eval_rows, fmt = data.read_jsonl(recipe.resolve(recipe.eval.data))
        want = ("preference",) if recipe.eval.metric == "preference" else ("completion", "messages")
        if fmt not in want:
            raise RecipeError(f"{recipe.eval.data}: [eval] metric = {recipe.eval.metric!r} needs "
                              f"{' or '.join(WANT[f] for f in want)} rows, but this file has {WANT[fmt]} rows\n"
                              "  fix: point [eval] data at the golden set, or choose another metric")
    folder = models.resolve(recipe.resolve(recipe.model.path), recipe.model.revision)
    config = models._config(folder)
    quantized = recipe.model.quantize is not None or "quantization" in config  # QLoRA, also on a quantized GGUF
    for s in recipe.stages:  # the support matrix, before any weights load
        for capability in families.stage_capabilities(s, quantized):
            families.require_known(config.get("model_type"), capability, f"{recipe.source}: [stages.{s.name}]")
    if quantized:
        for s in recipe.stages[1:]:
            if s.adapter.type == "dora":  # the earlier stages' adapters stay unfused (adapters.next_stage)
                raise RecipeError(f"{recipe.source}: [stages.{s.name}.adapter] type = \"dora\" cannot follow an "
                                  "earlier stage on a quantized base: DoRA rescales the weight it wraps, and here "
                                  "that weight is the 4-bit base plus the earlier, unfused adapters\n"
                                  '  fix: use type = "lora" for this stage, or a float base')
    contamination = firewall(recipe)
    tokenizer = models.load_tokenizer(folder)
    for s in recipe.stages:
        if s.kind == "distill":
            _check_distill(recipe, s, tokenizer)
        if s.kind == "ppo" and s.reward_model and s.reward_model not in [x.name for x in recipe.stages]:
            _check_reward_model(recipe, s, tokenizer, folder)
    train, valid = {}, {}
    for s in recipe.stages:
        rows, valid_rows, fmt = raw[s.name]
        if s.kind == "distill" and s.mode == "sequence":  # encoded once the teacher has answered
            train[s.name], valid[s.name] = (rows, fmt), ((valid_rows, fmt) if valid_rows else None)
            continue
        if s.kind == "ppo":
            from ..methods.ppo import encode_prompts

            encode = lambda r, src: encode_prompts(r, tokenizer, s.max_seq_len, s.max_new_tokens, src)  # noqa: E731
            train[s.name] = encode(rows, recipe.resolve(s.data))
            valid[s.name] = encode(valid_rows, s.valid or "valid split") if valid_rows else None
            data.Batches(train[s.name], s.batch_size, s.seed, s.group_by_length)
            continue
        if fmt == "preference":
            from ..methods.dpo import encode_pairs

            encode = lambda r, src: encode_pairs(r, tokenizer, s.max_seq_len, src)  # noqa: E731
        else:
            encode = lambda r, src: data.encode(r, fmt, tokenizer, s.max_seq_len, s.mask_prompt, src)  # noqa: E731
        train[s.name] = encode(rows, recipe.resolve(s.data))
        valid[s.name] = encode(valid_rows, s.valid or "valid split") if valid_rows else None
        data.Batches(train[s.name], s.batch_size, s.seed, s.group_by_length, s.packing, s.max_seq_len,
                     shard=distributed.shard())
    return Prepared(folder, tokenizer, train, valid, eval_rows, contamination, general_texts(recipe))


def general_texts(recipe: Recipe) -> list[str] | None:
    """The general-ability texts: the bundled set, a JSONL file of {"text"} rows, or none."""
    spec = recipe.eval
    if spec.general == "none":
        return None
    path = Path(__file__).parent.parent / "resources" / "general.jsonl" if spec.general == "bundled" else \
        Path(recipe.resolve(spec.general))
    rows, fmt = data.read_jsonl(path)
    if fmt != "text":
        raise RecipeError(f"{path}: [eval] general needs {{\"text\"}} rows (plain general text), got {WANT[fmt]} rows")
    return [r["text"] for r in rows[: spec.general_limit]]


def firewall(recipe: Recipe) -> dict | None:
    """Every stage's training data against the golden set: blocked above max_contamination."""
    from ..integrity import contamination as cont

    spec = recipe.eval
    golden = [recipe.resolve(spec.data)] if spec.data else []
    if spec.general != "none":  # trained-on general text would hide forgetting
        golden.append(Path(__file__).parent.parent / "resources" / "general.jsonl" if spec.general == "bundled" else
                      recipe.resolve(spec.general))
    if not golden:
        return None
    report = cont.check_files([recipe.resolve(s.data) for s in recipe.stages], golden, spec.ngram,
                              spec.near_duplicate)
    if report.share > spec.max_contamination:
        raise cont.Contaminated(
            f"{recipe.source}: training data overlaps the golden set ([eval] data) or the general-ability "
            "texts ([eval] general); the scores would mean nothing\n" + "\n".join(report.lines()) +
            "\n  fix: remove those rows from the training data (or the golden set), or make a clean split with "
            "`localtune data split FILE --test 0.1 --out DIR`; [eval] max_contamination = "
            f"{spec.max_contamination} allows {spec.max_contamination:.1%} of golden rows")
    return report.to_dict()


def _check_distill(recipe: Recipe, s: Stage, tokenizer) -> None:
    """Before any weights load: the teacher and student can be found, and in logits mode they
    share one vocabulary."""
    from .. import models
    from ..methods.distill import check_tokenizers

    names = [x.name for x in recipe.stages]
    teacher_folder = folder_of(recipe, s.teacher, f"[stages.{s.name}] teacher") \
        if s.teacher not in names else None
    if teacher_folder and (Path(recipe.resolve(s.teacher)) / "recipe.toml").exists():  # a run: all of it
        require_finished(recipe, Path(recipe.resolve(s.teacher)), None, f"[stages.{s.name}] teacher = {s.teacher!r}")
    student_folder = folder_of(recipe, s.student, f"[stages.{s.name}] student") if s.student else None
    if s.mode == "logits" and (teacher_folder or student_folder):
        teacher_tok = models.load_tokenizer(teacher_folder) if teacher_folder else tokenizer
        student_tok = models.load_tokenizer(student_folder) if student_folder else tokenizer
        check_tokenizers(teacher_tok, student_tok, s.teacher, s.student or recipe.model.path)


def _check_reward_model(recipe: Recipe, s: Stage, tokenizer, folder: Path) -> None:
    """A reward model given as RUN/stage: a reward stage of a run on the same base and tokenizer."""
    from .. import models

    key = f"{recipe.source}: [stages.{s.name}] reward_model = {s.reward_model!r}"
    path = Path(recipe.resolve(s.reward_model))
    config = path / "adapter_config.json"
    if not (config.exists() and is_run_dir(path.parent)):
        raise RecipeError(f"{key}: not a reward stage of a run (expected RUN/stage holding adapter_config.json)\n"
                          '  fix: name an earlier kind = "reward" stage of this recipe, or give runs/NAME/STAGE')
    from ..run.damage import read_json

    if not read_json(config, f"copy {path} back from another copy of that run").get("reward_head"):
        raise RecipeError(f"{key}: {path.name} is not a reward stage (its adapters have no reward head)\n"
                          "  fix: point at the run's kind = \"reward\" stage")
    theirs = folder_of(recipe, str(path.parent), "reward_model")
    if models.load_tokenizer(theirs).get_vocab() != tokenizer.get_vocab():
        raise RecipeError(f"{key}: the reward model's tokenizer ({theirs}) is not this run's ({folder}); it would "
                          "read other token ids\n  fix: train the reward stage on this recipe's base model")
    if Path(theirs).resolve() != Path(folder).resolve():
        raise RecipeError(f"{key}: the reward model was trained on a different base ({theirs}, not {folder})\n"
                          "  fix: train the reward stage on this recipe's base model, in this recipe or another run")
    require_finished(recipe, path.parent, path.name, f"[stages.{s.name}] reward_model = {s.reward_model!r}")


def folder_of(recipe: Recipe, ref: str, what: str) -> Path:
    """A model folder for a reference in the recipe: a folder, .gguf, repo id, or a run directory."""
    from .. import models
    from ..errors import ModelError

    path = Path(recipe.resolve(ref))
    if is_run_dir(path):  # a run: its model's folder
        parsed, stages = chain(path)
        if (student := student_stage(stages)) is not None:
            return folder_of(parsed, student.student, "student")
        return model_folder(path)
    try:
        return models.resolve(str(path) if path.exists() else ref)
    except ModelError as e:
        raise ModelError(f"{recipe.source}: {what} = {ref!r} cannot be loaded: {e.message}") from None


def model_folder(run_path: str | Path) -> Path:
    """The base model folder a run trained on, from its manifest."""
    folder = Run.open(run_path).manifest().get("model", {}).get("folder")
    if not folder:
        raise LocaltuneError(f"{run_path}: the run has not loaded its model yet (manifest.json names no model "
                             f"folder)\n  fix: wait for it to start (`localtune watch {run_path}`), or start it "
                             f"with `localtune run --resume {run_path}`")
    return Path(folder)


def require_finished(recipe: Recipe, run: Path, stage: str | None, key: str) -> None:
    """Another run used by this one (a teacher, a reward model) must have finished: its model up to
    `stage` (None: all of it), not a checkpoint that still changes or a prefix of its stages."""
    try:
        _, _, left = finished_chain(run, stage)
    except LocaltuneError as e:
        raise RecipeError(f"{recipe.source}: {key}: {e.message}") from None
    if left:
        raise RecipeError(f"{recipe.source}: {key}: {not_finished(run, left[0], [])}")


def load_teacher(recipe: Recipe, ref: str, what: str):
    """(model, tokenizer) of a teacher: a model reference, or a run directory (base + adapters)."""
    from .. import models

    path = Path(recipe.resolve(ref))
    if is_run_dir(path):
        return load_for_inference(str(path))
    folder = folder_of(recipe, ref, what)
    model, _ = models.load_model(folder)
    return model, models.load_tokenizer(folder)


def train_args(stage: Stage, steps: int):
    from .trainer import TrainArgs

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    values = {k: v for k, v in dataclasses.asdict(stage).items() if k in fields}
    return TrainArgs(**{**values, "steps": steps})


def fingerprint(recipe: Recipe, stage: Stage) -> str:
    """The stage's settings and the content of its data files: a checkpoint is only resumed under the same."""
    h = hashlib.sha256(repr(dataclasses.asdict(stage)).encode())
    for name in (stage.data, stage.valid):
        if name:
            h.update(_sha256(recipe.resolve(name)).encode())
    return h.hexdigest()


def stage_steps(stage: Stage, batches) -> int:
    if stage.steps:
        return stage.steps
    per_batch = 1
    if stage.kind == "ppo":  # each batch of prompts gives ppo_epochs passes of minibatches
        per_batch = stage.ppo_epochs * (stage.batch_size // (stage.minibatch_size or stage.batch_size))
    return max(1, math.ceil(stage.epochs * batches.batches_per_epoch * per_batch / stage.grad_accum))


def run_recipe(recipe: Recipe, run: Run, prepared: Prepared, report=print) -> dict:
    """Run (or resume) every stage. Returns the manifest."""
    import importlib

    import mlx.core as mx

    from .. import models
    from ..integrity import evaluate
    from . import adapters, trainer

    manifest = run.manifest()
    done = manifest.get("stages_done", [])
    if "started" not in manifest:
        run.update_manifest(
            localtune=__version__, mlx=mx.__version__, python=platform.python_version(),
            device=device.describe(), processes=distributed.size(), recipe=recipe.source,
            base_dir=str(Path(recipe.base_dir).resolve()),
            data={s.name: {"path": s.data, "sha256": _sha256(recipe.resolve(s.data))} for s in recipe.stages},
            stages=[{"name": s.name, "kind": s.kind} for s in recipe.stages], stages_done=[], started=time.time(),
        )
    run.set_status(state="running", stage="load", step=0)
    if prepared.contamination:
        c = prepared.contamination
        run.update_manifest(contamination={k: v for k, v in c.items() if k != "overlaps"} | {
            "overlaps": c["overlaps"][:50]})
        if c["contaminated_golden_rows"]:
            report(run.log("load", 0, "event", event="warning", message=(
                f"{c['contaminated_golden_rows']} of {c['golden_rows']} golden rows overlap the training data "
                f"(within [eval] max_contamination); first: {c['overlaps'][0]['train']} ~ "
                f"{c['overlaps'][0]['golden']}")))

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
        result = evaluate.task(model, tokenizer, prepared.eval_rows, recipe.eval)
        _log_task(run, when, result, report)
        return result

    general = manifest.get("general", {})

    def general_metric(when: str) -> dict:
        result = evaluate.general_nll(model, tokenizer, prepared.general)
        report(run.log("eval", 0, "event", event="general_metric", when=when, value=result["nll"],
                       message=f"general NLL {when}: {result['nll']:.4f} nats/token (perplexity "
                               f"{result['perplexity']:.1f}) on {result['texts']} texts"))
        return result

    task = manifest.get("task", {})
    if prepared.eval_rows and "before" not in task:
        task["before"] = task_metric("before training")
        run.update_manifest(task=task)
    if prepared.general and "before" not in general:
        general["before"] = general_metric("before training")
        run.update_manifest(general=general)

    results = manifest.get("stage_results", {})
    for i, stage in enumerate(recipe.stages):
        stage_dir = run.stage_dir(stage.name)
        where = f"{recipe.source}: [stages.{stage.name}]"
        if stage.name in done and stage.kind == "reward":
            pass  # a branch: the chain goes on from the model as the stage found it
        elif stage.name in done:
            if stage.kind == "distill" and stage.student:  # the chain continues from the student
                model, tokenizer, _ = chain_base(recipe, [stage])
            adapters.load(model, stage_dir)
        else:
            train_set, valid_set = prepared.train[stage.name], prepared.valid[stage.name]
            if stage.kind == "distill":
                model, tokenizer, train_set, valid_set = _distill_inputs(recipe, stage, model, tokenizer, prepared,
                                                                         run, report, task, stage_dir)
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
            if stage.kind == "reward":
                from ..methods import reward as reward_method

                reward_method.attach_head(model)
                adapter_config["reward_head"] = True
            extra = {}
            if stage.kind == "ppo":
                from ..methods import ppo

                ppo.attach_value_head(model)
                adapter_config["value_head"] = True
                extra = {"tokenizer": tokenizer, "reward": _reward(recipe, stage, model, tokenizer, run),
                         "log": lambda kind, s=stage.name, **kw: run.log(s, 0, kind, **kw)}
            if "provenance" in manifest:  # the data bill of materials travels with the adapters
                from ..integrity.provenance import bill_of_materials

                adapter_config["provenance"] = bill_of_materials(manifest["provenance"])
            trainable, total = models.count_parameters(model)
            report(run.log(stage.name, 0, "event", event="stage_start",
                           message=f"{len(train_set)} examples, {trainable:,} trainable of "
                                   f"{total:,} parameters ({100 * trainable / total:.2f}%)"))
            method = importlib.import_module(METHODS[stage.kind])
            batches = data.Batches(train_set, stage.batch_size, stage.seed, stage.group_by_length,
                                   stage.packing, stage.max_seq_len, collate=getattr(method, "collate", None),
                                   shard=distributed.shard())
            steps = stage_steps(stage, batches)
            def note(message, warning=False):
                report(run.warn(stage.name, 0, message) if warning else
                       run.log(stage.name, 0, "event", event="info", message=message))

            loss_fn, batches, valid_batches = method.setup(model, stage, batches, valid_set, steps, stage_dir, note,
                                                           **extra)
            eval_fn = None
            if valid_batches:
                eval_fn = lambda m, vb=valid_batches, f=loss_fn: trainer.evaluate_loss(m, f, vb)  # noqa: E731
            rl_check = None
            if stage.kind == "ppo" and valid_set:  # reward and KL on held-out prompts, during and around the stage
                rl_check = lambda m, x=extra: ppo.heldout(m, tokenizer, x["reward"],  # noqa: E731
                                                          valid_set.examples[:stage.heldout_prompts], stage)
                eval_fn = lambda m: {k: v for k, v in rl_check(m).items() if k != "samples"}  # noqa: E731
            heldout = eval_fn(model) if stage.kind == "distill" and eval_fn else None  # divergence to the teacher
            if rl_check:
                heldout = rl_check(model)
                report(run.log(stage.name, 0, "event", event="info", message=_ppo_line("before", heldout)))
            if prepared.general and stage.kind == "distill" and stage.student and "student_before" not in general:
                general["student_before"] = general_metric("of the student before training")
                general["student_stage"] = stage.name  # from here on, deltas are against the student
                run.update_manifest(general=general)
            guard = None
            if prepared.general and recipe.eval.max_general_nll_increase is not None:
                base = general.get("student_before", general["before"])
                guard = _guard(recipe, prepared, tokenizer, base["nll"])
            summary = trainer.train(model, loss_fn, batches, train_args(stage, steps), run=run,
                                    stage=stage.name, stage_dir=stage_dir, adapter_config=adapter_config,
                                    eval_fn=eval_fn, guard=guard, fingerprint=fingerprint(recipe, stage),
                                    report=report)
            if heldout is not None:
                summary["heldout_before"], summary["heldout_after"] = heldout, (rl_check or eval_fn)(model)
            if rl_check:
                report(run.log(stage.name, steps, "event", event="info",
                               message=_ppo_line("after", summary["heldout_after"])))
            if stage.kind == "ppo":
                model.pop("value_head")  # the critic ends with the stage; the policy's adapters go on
            if stage.kind == "reward":
                if valid_set:
                    summary["heldout"] = reward_method.summary(reward_method.margins(model, valid_set.examples))
                    h = summary["heldout"]
                    report(run.log(stage.name, steps, "event", event="info", message=(
                        f"held-out pairs: accuracy {h['pair_accuracy']:.1%}, reward margin {h['margin_mean']:+.3f} "
                        f"± {h['margin_std']:.3f} (p10 {h['margin_p10']:+.3f}, p90 {h['margin_p90']:+.3f})")))
                adapters.detach(model)
            summary.update(examples=len(train_set), truncated=train_set.truncated, trainable=trainable,
                           total_parameters=total)
            results[stage.name] = summary
            done.append(stage.name)
            run.update_manifest(stages_done=done, stage_results=results)
            report(run.log(stage.name, steps, "event", event="stage_done",
                           message=f"adapters saved in {stage_dir}"))
        if stage.kind == "reward":
            continue  # the policy is as it was: nothing to measure, nothing to fuse
        if prepared.general and stage.name not in general.get("stages", {}):
            general.setdefault("stages", {})[stage.name] = general_metric(f"after {stage.name}")
            run.update_manifest(general=general)
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
        if "teacher" in task and "student_tokens_per_sec" not in task:
            task["student_tokens_per_sec"] = evaluate.decode_speed(model, tokenizer, prepared.eval_rows[0].get(
                "prompt") or evaluate.prompt_and_answer(prepared.eval_rows[0])[0])
    run.update_manifest(task=task, finished=time.time())
    manifest = run.manifest()
    from ..report import write_report

    write_report(run, recipe, manifest)
    last = recipe.stages[-1].name
    run.set_status(state="done", stage=last, step=results.get(last, {}).get("step"))
    return manifest


def _reward(recipe: Recipe, stage: Stage, model, tokenizer, run: Run):
    """The ppo stage's reward: an earlier reward stage on this model's own base (its adapters kept
    aside, swapped in to score), a reward stage of another run (its own copy), and/or rules."""
    from ..methods import ppo
    from . import adapters

    ref = stage.reward_model
    if ref is None:
        return ppo.Reward(tokenizer, stage.rules)
    if ref in [s.name for s in recipe.stages]:
        folder = run.stage_dir(ref)
        layers, _ = adapters.side_adapters(model, folder)
        return ppo.Reward(tokenizer, stage.rules, layers, ppo.load_reward_head(folder, model.model.norm.weight.shape[0]))
    path = Path(recipe.resolve(ref))
    separate, _ = load_for_inference(str(path.parent), path.name)
    separate.freeze()
    return ppo.Reward(tokenizer, stage.rules, model=separate)


def _ppo_line(when: str, h: dict) -> str:
    rules = "".join(f", {k[7:]} pass rate {v:.0%}" for k, v in h.items() if k.startswith("reward_rule"))
    return (f"held-out prompts {when}: reward {h['reward_mean']:+.3f} ± {h['reward_std']:.3f}, KL to the "
            f"reference {h['kl']:.3f} nats per response{rules} ({h['n']} sampled answers)")


def _guard(recipe: Recipe, prepared: Prepared, tokenizer, base_nll: float):
    from ..integrity import evaluate
    from ..integrity.forgetting import Guard

    spec = recipe.eval
    task = None
    if spec.on_forgetting == "best" and prepared.eval_rows:
        task = lambda m: evaluate.task(m, tokenizer, prepared.eval_rows, spec)["value"]  # noqa: E731
    return Guard(lambda m: evaluate.general_nll(m, tokenizer, prepared.general)["nll"], base_nll,
                 spec.max_general_nll_increase, spec.guard_every, spec.on_forgetting, task)


def _distill_inputs(recipe: Recipe, stage: Stage, model, tokenizer, prepared: Prepared, run: Run, report,
                    task: dict, stage_dir: Path):
    """Run the teacher once: its task metric and speed, then its top-k cache (logits mode) or its
    answers (sequence mode). Then the student takes its place. Returns (model, tokenizer, train, valid)."""
    import mlx.core as mx

    from ..integrity import evaluate
    from ..methods import distill

    def note(message, warning=False):
        report(run.warn(stage.name, 0, message) if warning else
               run.log(stage.name, 0, "event", event="info", message=message))

    if stage.teacher in [s.name for s in recipe.stages]:
        teacher, teacher_tok, teacher_id = model, tokenizer, f"{run.path.name}/{stage.teacher}"
    else:
        teacher, teacher_tok = load_teacher(recipe, stage.teacher, f"[stages.{stage.name}] teacher")
        teacher_id = stage.teacher
    if prepared.eval_rows and "teacher" not in task:
        # an earlier stage as the teacher was measured when it ended
        result = dict(task.get("stages", {}).get(stage.teacher) or
                      evaluate.task(teacher, teacher_tok, prepared.eval_rows, recipe.eval))
        prompt = evaluate.prompt_and_answer(prepared.eval_rows[0])[0]
        result["tokens_per_sec"] = evaluate.decode_speed(teacher, teacher_tok, prompt)
        task["teacher"] = {**result, "model": teacher_id}
        _log_task(run, f"of the teacher ({teacher_id})", result, report)
    train_set, valid_set = prepared.train[stage.name], prepared.valid[stage.name]
    if stage.mode == "logits":
        for ds, name in ((train_set, "teacher_cache"), (valid_set, "teacher_valid_cache")):
            if ds is None:
                continue
            key = distill.TeacherCache.key(ds, teacher_id, stage.top_k, stage.temperature)
            path = stage_dir / f"{name}.safetensors"
            cache, damage = distill.TeacherCache.load(path, key)
            if damage:
                note(f"{path}: {damage}; the teacher cache is built again", warning=True)
            if cache is None:
                t0 = time.perf_counter()
                cache = distill.TeacherCache.build(teacher, ds, stage.top_k, stage.temperature)
                stage_dir.mkdir(parents=True, exist_ok=True)
                cache.save(path, key)
                note(distill.cache_summary(cache, len(teacher_tok.get_vocab()), time.perf_counter() - t0, len(ds)))
            else:
                note(f"teacher cache reused from {path}")
            ds.teacher_cache = cache
    else:
        sets = []
        for part, name in ((train_set, "generated"), (valid_set, "generated_valid")):
            if part is None:
                sets.append(None)
                continue
            rows, fmt = part
            path = stage_dir / f"{name}.jsonl"
            answered = _read_generated(path, len(rows), note)
            if answered is None:
                t0 = time.perf_counter()
                prompts = [r["prompt"] if "prompt" in r else evaluate.prompt_and_answer(r)[0] for r in rows]
                answers = evaluate.generate(teacher, teacher_tok, prompts, stage.max_new_tokens)
                stage_dir.mkdir(parents=True, exist_ok=True)
                distill.write_generated(path, [
                    ({"messages": p + [{"role": "assistant", "content": a}]} if isinstance(p, list) else
                     {"prompt": p, "completion": a}) | {"generator": teacher_id, "source": "localtune distill"}
                    for p, a in zip(prompts, answers)])
                note(f"the teacher answered {len(rows)} prompts in {time.perf_counter() - t0:.1f}s: {path}")
                answered = data.read_jsonl(path)
            sets.append(answered)
        train_set, valid_set = sets
    if stage.student:
        del teacher
        model = None
        mx.clear_cache()
        model, tokenizer, _ = chain_base(recipe, [stage])
        if prepared.eval_rows:
            result = evaluate.task(model, tokenizer, prepared.eval_rows, recipe.eval)
            task["student_before"] = {**result, "model": stage.student}
            _log_task(run, f"of the student ({stage.student}) before training", result, report)
    if stage.mode == "sequence":
        (rows, fmt), valid_rows = train_set, valid_set
        train_set = data.encode(rows, fmt, tokenizer, stage.max_seq_len, stage.mask_prompt, str(stage_dir))
        valid_set = data.encode(valid_rows[0], valid_rows[1], tokenizer, stage.max_seq_len, stage.mask_prompt,
                                "generated_valid") if valid_rows else None
    run.update_manifest(task=task)
    return model, tokenizer, train_set, valid_set


def _read_generated(path: Path, n: int, note):
    """A distill stage's saved teacher answers when complete; damaged ones are answered again."""
    if not path.exists():
        return None
    try:
        rows, fmt = data.read_jsonl(path)
    except LocaltuneError as e:
        problem = e.message.split("\n")[0]
    else:
        if len(rows) == n:
            return rows, fmt
        problem = f"{path}: {len(rows)} answers for {n} prompts"
    note(f"{problem}; the teacher answers again", warning=True)
    return None


def _log_task(run: Run, when: str, result: dict, report) -> None:
    """The task metric as an event, and its sample generations as "sample" records (the TUI shows them)."""
    formed = f", well-formed {result['well_formed']:.0%}" if "well_formed" in result else ""
    report(run.log("eval", 0, "event", event="task_metric", when=when, value=result["value"],
                   message=f"task metric {when}: {result['metric']} {result['value']:.0%} of {result['n']}{formed}"))
    for sample in result.get("samples", []):
        run.log("eval", 0, "sample", when=when, **sample)


def chain(target: str | Path, until_stage: str | None = None):
    """(parsed recipe, the stages whose weights make the run's model, up to `until_stage`). A distill
    stage with a `student` starts the chain again from that student. Reward stages are branches:
    left out, unless `until_stage` names one (then it comes last, on the chain before it)."""
    path = Path(target)
    parsed = Run.open(path).recipe()
    names = [s.name for s in parsed.stages]
    if until_stage and until_stage not in names:
        raise LocaltuneError(f"{target}: no stage {until_stage!r}; stages are {names}")
    stages = parsed.stages[: names.index(until_stage) + 1] if until_stage else parsed.stages
    stages = [s for s in stages if s.kind != "reward" or s.name == until_stage]
    start = max((i for i, s in enumerate(stages) if s.kind == "distill" and s.student), default=0)
    return parsed, stages[start:]


def student_stage(stages: list):
    """The distill stage whose `student` the chain starts from, if it does (see `chain`)."""
    first = stages[0] if stages else None
    return first if first is not None and first.kind == "distill" and first.student else None


def chain_base(parsed: Recipe, stages: list) -> tuple:
    """(model, tokenizer, folder) the chain starts from: the recipe's base, or a distill student."""
    from .. import models

    if (student := student_stage(stages)) is not None:
        folder = folder_of(parsed, student.student, f"[stages.{student.name}] student")
        model, _ = models.load_model(folder)
        return model, models.load_tokenizer(folder), folder
    model, tokenizer, _, folder = models.load(parsed.resolve(parsed.model.path), parsed.model.revision,
                                              parsed.model.quantize)
    return model, tokenizer, folder


def finished_chain(target: str | Path, until_stage: str | None = None):
    """`chain`, cut at the first stage that has not finished (manifest.json "stages_done"): a stage in
    progress rewrites its adapters.safetensors at every checkpoint, so fuse, export, generate and eval
    read finished stages only. Naming an unfinished stage, or a run whose model has no finished stage
    yet, is an error. Returns (parsed recipe, the finished stages, names of the stages left out)."""
    parsed, stages = chain(target, until_stage)
    done = set(Run.open(target).manifest().get("stages_done", []))
    n = next((i for i, s in enumerate(stages) if s.name not in done), len(stages))
    if n < len(stages) and (until_stage or n == 0):
        raise LocaltuneError(not_finished(Path(target), stages[n].name, [s.name for s in stages[:n]]))
    return parsed, stages[:n], [s.name for s in stages[n:]]


def not_finished(run: Path, name: str, finished: list[str]) -> str:
    """Why stage `name` of `run` cannot be read yet, and what to do."""
    status = Run.open(run).status()
    state, current = effective_state(status, run), status.get("stage")
    if state in LIVE_STATES:
        who = trainer_of(run, status) or {}
        by = f"pid {who.get('pid') or status.get('pid')} on {who.get('host') or '?'}"
        why = (f"it is still training (step {status.get('step', 0)}/{status.get('steps_total') or '?'}, {by})"
               if current == name else f"it has not started (the run is training {current!r}, {by})")
        fix = f"wait for it to finish (`localtune watch {run}`)"
    else:
        why = f"it stopped at step {status.get('step', 0)} ({state})" if current == name else "it has not started"
        fix = f"`localtune run --resume {run}` trains it to the end"
    other = f", or name a finished stage: {run / finished[-1]}" if finished else ""
    return (f"{run}: stage {name!r} has not finished: {why}. Until it does, its adapters are a checkpoint "
            f"that changes as it trains, so they are not read.\n  fix: {fix}{other}")


def load_for_inference(target: str, until_stage: str | None = None, in_progress: bool = False):
    """A run directory (base + each finished stage's adapters, in order; see `finished_chain`) or a
    plain model reference. `in_progress` also takes the adapters an unfinished stage saved at its
    last checkpoint: the TUI's preview while a run trains."""
    from .. import models
    from . import adapters

    path = Path(target)
    if not is_run_dir(path):
        model, tokenizer, _, _ = models.load(target)
        return model, tokenizer
    parsed, stages = chain(path, until_stage) if in_progress else finished_chain(path, until_stage)[:2]
    model, tokenizer, _ = chain_base(parsed, stages)
    for i, stage in enumerate(stages):
        if in_progress and not (path / stage.name / "adapters.safetensors").exists():
            break  # a stage that has not saved yet (a finished stage's missing file is an error, below)
        if i:
            adapters.next_stage(model)  # earlier stages become part of the model (fused or stacked)
        if stage.kind == "reward":
            from ..methods.reward import attach_head

            attach_head(model)
        adapters.load(model, path / stage.name)
    return model, tokenizer
