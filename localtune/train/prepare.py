"""Strict at the door: every stage's data read, checked and encoded, and the recipe checked
against the model's family and the golden sets, before any weights load."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import datasets, methods
from ..datasets import sha256  # noqa: F401 - the file hash the pipeline records
from ..errors import DataError, RecipeError
from ..models import families
from ..recipe import Recipe, Stage
from . import data, distributed

WANT = {"preference": '{"prompt", "chosen", "rejected"}', "prompt": '{"prompt"}', "messages": '{"messages"}',
        "completion": '{"prompt", "completion"}', "text": '{"text"}',
        "labelled": '{"prompt", "completion", "label"}'}
GENERAL = Path(__file__).parent.parent / "resources" / "general.jsonl"  # the bundled general-ability texts


@dataclasses.dataclass
class Prepared:
    """Everything checked before any weights load: the model folder, tokenizer and encoded data."""

    folder: Path
    tokenizer: object
    train: dict  # stage name -> what the stage's method encoded (a data.Dataset, mostly)
    valid: dict  # stage name -> the same, or None
    eval_rows: list | None
    contamination: dict | None = None  # the firewall's report, when there is a golden set
    general: list | None = None  # general-ability texts (the forgetting check)
    detected: dict = dataclasses.field(default_factory=dict)  # stage name -> the data format found, in words
    lints: dict = dataclasses.field(default_factory=dict)  # stage name -> data-lint warnings (dicts)
    few_shot: dict | None = None  # the prompting baseline's examples (integrity/few_shot.py plan)


def batches(stage: Stage, dataset, collate=None) -> data.Batches:
    """A stage's resumable batch iterator over its dataset (this rank's shard)."""
    return data.Batches(dataset, stage.batch_size, stage.seed, stage.group_by_length, stage.packing,
                        stage.max_seq_len, collate=collate, shard=distributed.shard())


def _read_stage(recipe: Recipe, s: Stage):
    method = methods.of(s)
    try:
        table = datasets.read_stage(recipe, s)
    except DataError as e:
        hint = method.data_hint(s)
        if hint is None or "expected" not in e.message:
            raise
        raise DataError(f"{e.message}\n  [stages.{s.name}] data: {hint}") from None
    rows, fmt, formats = table.rows, table.fmt, method.data_formats(s)
    if fmt not in formats:
        hint = {"preference": ', or set kind = "dpo" for preference pairs',
                "labelled": ', or set kind = "kto" for rows with a true/false "label" (thumbs up or down)',
                "prompt": ' (prompts alone are for kind = "distill" with mode = "sequence", or "ppo")'}.get(fmt, "")
        if fmt == "prompt" and (answers := sorted(set(rows[0]) - {"prompt"})):
            hint += (f"; or, if a column holds the answers, map it: columns = {{ completion = \"{answers[0]}\" }} "
                     f"(the rows have {', '.join(sorted(rows[0]))})")
        if own := method.data_hint(s):
            hint += f"\n  [stages.{s.name}] data: {own}"
        first = table.where[0] if table.where else table.source.ref  # the file and line of the first such row
        raise RecipeError(f"{first}: {method.describe(s)} needs "
                          f"{' or '.join(WANT[f] for f in formats)} rows, but this data has {WANT[fmt]} rows "
                          f"({table.detected})\n  fix: point [stages.{s.name}] data at the right data{hint}")
    valid = None
    if s.valid:
        vtable = datasets.read_stage(recipe, s, valid=True)
        valid, vfmt = vtable.rows, vtable.fmt
        if vfmt != fmt:
            raise RecipeError(f"{vtable.source.ref}: validation rows are {vfmt!r} but training rows are {fmt!r}")
    where = table.where
    if not s.valid and s.valid_fraction:
        pairs, valid_pairs = data.split(list(zip(rows, where)), s.valid_fraction, s.seed)
        rows, where, valid = [r for r, _ in pairs], [w for _, w in pairs], [r for r, _ in valid_pairs]
    return rows, valid, fmt, table.detected, where


def _check_model(recipe: Recipe, folder: Path) -> None:
    """The support matrix, before any weights load; DoRA cannot follow a stage on a quantized base."""
    from .. import models

    config = models.read_config(folder)
    quantized = recipe.model.quantize is not None or "quantization" in config  # QLoRA, also on a quantized GGUF
    for s in recipe.stages:
        for capability in families.stage_capabilities(s, quantized, methods.of(s).capability):
            families.require_known(config.get("model_type"), capability, f"{recipe.source}: [stages.{s.name}]")
    if quantized:
        for s in recipe.stages[1:]:
            if s.adapter.type == "dora":  # the earlier stages' adapters stay unfused (adapters.next_stage)
                raise RecipeError(f"{recipe.source}: [stages.{s.name}.adapter] type = \"dora\" cannot follow an "
                                  "earlier stage on a quantized base: DoRA rescales the weight it wraps, and here "
                                  "that weight is the 4-bit base plus the earlier, unfused adapters\n"
                                  '  fix: use type = "lora" for this stage, or a float base')


def prepare(recipe: Recipe) -> Prepared:
    """Strict at the door: read, validate and tokenize every input before the model's weights load."""
    from .. import models

    raw = {s.name: _read_stage(recipe, s) for s in recipe.stages}
    alone = [s for s in recipe.stages if methods.of(s).one_process]
    if distributed.size() > 1 and alone:
        s = alone[0]
        raise RecipeError(f"{recipe.source}: [stages.{s.name}] is a {s.kind} stage, and {s.kind} stages run in one "
                          f"process for now (this launch has {distributed.size()}): {methods.of(s).one_process}\n"
                          "  fix: run this recipe without mlx.launch")
    eval_rows, golden_fmt = None, None
    if recipe.eval.data:
        want = golden_formats(recipe.eval.metric)
        table = datasets.read(datasets.eval_spec(recipe), want)
        eval_rows, golden_fmt = table.rows, table.fmt
        if golden_fmt not in want:
            raise RecipeError(f"{recipe.eval.data}: [eval] metric = {recipe.eval.metric!r} needs "
                              f"{' or '.join(WANT[f] for f in want)} rows, but this file has {WANT[golden_fmt]} rows\n"
                              "  fix: point [eval] data at the golden set, or choose another metric")
        if recipe.eval.metric == "tool_call":
            from ..integrity.tool_calls import check_golden

            check_golden(eval_rows, recipe.resolve(recipe.eval.data))
    template = recipe.chat_template()
    folder = models.resolve(recipe.resolve(recipe.model.path), recipe.model.revision)
    _check_model(recipe, folder)
    contamination = firewall(recipe)
    tokenizer = models.load_tokenizer(folder, template)
    for s in recipe.stages:
        methods.of(s).check(recipe, s, tokenizer, folder)
    train, valid, data_lints = {}, {}, {}
    for s in recipe.stages:
        rows, valid_rows, fmt, _, where = raw[s.name]
        method = methods.of(s)
        train[s.name] = method.encode(s, rows, fmt, tokenizer, recipe.resolve(s.data))
        if isinstance(train[s.name], data.Dataset) and train[s.name].where is None:
            train[s.name].where = where  # lints and errors name file:line (or the Parquet row)
        valid[s.name] = method.encode(s, valid_rows, fmt, tokenizer, s.valid or "valid split") if valid_rows else None
        if isinstance(train[s.name], data.Dataset):
            if found := lint_stage(s, train[s.name], rows, fmt, tokenizer):
                data_lints[s.name] = found
            batches(s, train[s.name])  # batching errors (a batch larger than the data, ...) now, not mid-run
    return Prepared(folder, tokenizer, train, valid, eval_rows, contamination, general=general_texts(recipe),
                    detected={name: r[3] for name, r in raw.items()}, lints=data_lints,
                    few_shot=few_shot_plan(recipe, raw, eval_rows, golden_fmt, tokenizer, folder))


def few_shot_plan(recipe: Recipe, raw: dict, eval_rows, fmt, tokenizer, folder: Path) -> dict | None:
    """The examples for [eval] prompt_baseline, chosen before any weights load (integrity/few_shot.py)."""
    from .. import models
    from ..integrity import few_shot

    if not eval_rows:
        return None
    stages = [(s.name, raw[s.name][0], raw[s.name][2], s.max_seq_len) for s in recipe.stages]
    context = models.read_config(folder).get("max_position_embeddings")
    return few_shot.plan(eval_rows, fmt, stages, recipe.eval, recipe.seed, tokenizer, context)


def golden_formats(metric: str) -> tuple:
    """The row formats a golden set may have for an [eval] metric."""
    return {"preference": ("preference",), "tool_call": ("messages",)}.get(metric, ("completion", "messages"))


def lint_stage(s: Stage, dataset: data.Dataset, rows: list, fmt: str, tokenizer) -> list[dict]:
    """The data lints on a stage's encoded rows: an error stops the run here, warnings go to the report."""
    from . import lints

    if not lints.applies(dataset, fmt):
        return []
    found = lints.lint(dataset, tokenizer, rows, fmt, s.max_seq_len, s.mask_prompt, s.thinking)
    errors = [f for f in found if f.level == "error"]
    if errors:
        more = f"\n  ({len(errors) - 1} more: `localtune data preview` lists them)" if len(errors) > 1 else ""
        raise DataError(f"[stages.{s.name}] data lint {errors[0].line()}{more}")
    return [f.to_dict() for f in found]


def general_texts(recipe: Recipe) -> list[str] | None:
    """The general-ability texts: the bundled set, a JSONL file of {"text"} rows, or none."""
    spec = recipe.eval
    if spec.general == "none":
        return None
    path = GENERAL if spec.general == "bundled" else Path(recipe.resolve(spec.general))
    rows, fmt = data.read_jsonl(path)
    if fmt != "text":
        raise RecipeError(f"{path}: [eval] general needs {{\"text\"}} rows (plain general text), got {WANT[fmt]} rows")
    return [r["text"] for r in rows[: spec.general_limit]]


def firewall(recipe: Recipe) -> dict | None:
    """Every stage's training data against the golden set: blocked above max_contamination."""
    from ..integrity import contamination as cont

    spec = recipe.eval
    golden = [datasets.eval_spec(recipe)] if spec.data else []
    if spec.general != "none":  # trained-on general text would hide forgetting
        golden.append(GENERAL if spec.general == "bundled" else recipe.resolve(spec.general))
    if not golden:
        return None
    report = cont.check_files([datasets.spec_of(recipe, s) for s in recipe.stages], golden, spec.ngram,
                              spec.near_duplicate)
    if report.share > spec.max_contamination:
        raise cont.Contaminated(
            f"{recipe.source}: training data overlaps the golden set ([eval] data) or the general-ability "
            "texts ([eval] general); the scores would mean nothing\n" + "\n".join(report.lines()) +
            "\n  fix: remove those rows from the training data (or the golden set), or make a clean split with "
            "`localtune data split FILE --test 0.1 --out DIR`; [eval] max_contamination = "
            f"{spec.max_contamination} allows {spec.max_contamination:.1%} of golden rows")
    return report.to_dict()
