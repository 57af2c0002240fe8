"""Strict at the door: every stage's data read, checked and encoded, and the recipe checked
against the model's family and the golden sets, before any weights load."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from .. import methods
from ..errors import DataError, RecipeError
from ..models import families
from ..recipe import Recipe, Stage
from . import data, distributed

WANT = {"preference": '{"prompt", "chosen", "rejected"}', "prompt": '{"prompt"}', "messages": '{"messages"}',
        "completion": '{"prompt", "completion"}', "text": '{"text"}'}
GENERAL = Path(__file__).parent.parent / "resources" / "general.jsonl"  # the bundled general-ability texts


def sha256(path: str | Path) -> str:
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
    train: dict  # stage name -> what the stage's method encoded (a data.Dataset, mostly)
    valid: dict  # stage name -> the same, or None
    eval_rows: list | None
    contamination: dict | None = None  # the firewall's report, when there is a golden set
    general: list | None = None  # general-ability texts (the forgetting check)


def batches(stage: Stage, dataset, collate=None) -> data.Batches:
    """A stage's resumable batch iterator over its dataset (this rank's shard)."""
    return data.Batches(dataset, stage.batch_size, stage.seed, stage.group_by_length, stage.packing,
                        stage.max_seq_len, collate=collate, shard=distributed.shard())


def _read_stage(recipe: Recipe, s: Stage):
    method = methods.of(s)
    try:
        rows, fmt = data.read_jsonl(recipe.resolve(s.data))
    except DataError as e:
        hint = method.data_hint(s)
        if hint is None or "expected" not in e.message:
            raise
        raise DataError(f"{e.message}\n  [stages.{s.name}] data: {hint}") from None
    formats = method.data_formats(s)
    if fmt not in formats:
        hint = {"preference": ', or set kind = "dpo" for preference pairs',
                "prompt": ' (prompts alone are for kind = "distill" with mode = "sequence", or "ppo")'}.get(fmt, "")
        raise RecipeError(f"{recipe.resolve(s.data)}: {method.describe(s)} needs "
                          f"{' or '.join(WANT[f] for f in formats)} rows, but this file has {WANT[fmt]} rows\n"
                          f"  fix: point [stages.{s.name}] data at the right file{hint}")
    valid = None
    if s.valid:
        valid, vfmt = data.read_jsonl(recipe.resolve(s.valid))
        if vfmt != fmt:
            raise RecipeError(f"{s.valid}: validation rows are {vfmt!r} but training rows are {fmt!r}")
    elif s.valid_fraction:
        rows, valid = data.split(rows, s.valid_fraction, s.seed)
    return rows, valid, fmt


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
    eval_rows = None
    if recipe.eval.data:
        eval_rows, fmt = data.read_jsonl(recipe.resolve(recipe.eval.data))
        want = {"preference": ("preference",), "tool_call": ("messages",)}.get(recipe.eval.metric,
                                                                             ("completion", "messages"))
        if fmt not in want:
            raise RecipeError(f"{recipe.eval.data}: [eval] metric = {recipe.eval.metric!r} needs "
                              f"{' or '.join(WANT[f] for f in want)} rows, but this file has {WANT[fmt]} rows\n"
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
    train, valid = {}, {}
    for s in recipe.stages:
        rows, valid_rows, fmt = raw[s.name]
        method = methods.of(s)
        train[s.name] = method.encode(s, rows, fmt, tokenizer, recipe.resolve(s.data))
        valid[s.name] = method.encode(s, valid_rows, fmt, tokenizer, s.valid or "valid split") if valid_rows else None
        if isinstance(train[s.name], data.Dataset):
            batches(s, train[s.name])  # batching errors (a batch larger than the data, ...) now, not mid-run
    return Prepared(folder, tokenizer, train, valid, eval_rows, contamination, general_texts(recipe))


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
    golden = [recipe.resolve(spec.data)] if spec.data else []
    if spec.general != "none":  # trained-on general text would hide forgetting
        golden.append(GENERAL if spec.general == "bundled" else recipe.resolve(spec.general))
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
