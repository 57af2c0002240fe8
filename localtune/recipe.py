"""recipe.toml -> frozen dataclasses, validated before any model loads.

Every user-facing error names the file, the line, the key, what was expected
and, for unknown keys, the nearest known key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from . import methods
from .datasets.formats import check_columns
from .errors import RecipeError

RULE_KEYS = {"regex": ("pattern",), "json": ("keys",), "length": ("min", "max"), "contains": ("text",),
             "excludes": ("text",), "python": ("function",)}  # each rule kind's own keys
RULE_NEEDS = {  # the keys a rule kind needs (one of them), in words, and the fix
    "regex": (("pattern",), "pattern", "add pattern = '\\d{4}-\\d{2}-\\d{2}'"), "json": ((), "", ""),
    "length": (("min", "max"), "min, max or both (characters)", "add min = 1, max = 200"),
    "contains": (("text",), "text", 'add text = "..."'), "excludes": (("text",), "text", 'add text = "..."'),
    "python": (("function",), "function", 'add function = "rewards.py:exact_answer" (FILE.py:NAME, the file '
               "relative to the recipe)")}
RULE_KINDS = tuple(RULE_KEYS)


def option(default, *, min=None, max=None, choices=None, doc=""):
    """A recipe key: its default, bounds or choices, and a line of documentation."""
    meta = {"min": min, "max": max, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Quantize:
    bits: int = option(4, choices=(2, 3, 4, 6, 8))
    group_size: int = option(64, choices=(32, 64, 128))


@dataclass(frozen=True)
class ModelSpec:
    path: str = option("", doc="a local folder, a Hugging Face repo id, or a .gguf file")
    quantize: Union[Quantize, None] = option(None, doc="QLoRA: quantize the frozen base")
    revision: Union[str, None] = option(None)
    chat_template: Union[str, None] = option(None, doc="a Jinja chat template file used instead of the model's "
                                                       "(one that renders tools); runs, fuse and GGUF carry it")


@dataclass(frozen=True)
class Adapter:
    type: str = option("lora", choices=("lora", "dora", "full"))
    rank: int = option(8, min=1, max=1024)
    alpha: float = option(16.0, min=0.0)
    dropout: float = option(0.0, min=0.0, max=0.9)
    layers: int = option(-1, min=-1, doc="number of last transformer blocks to adapt; -1 = all")
    targets: Union[list, None] = option(None, doc="module names inside a block, e.g. self_attn.q_proj")


@dataclass(frozen=True)
class Stage:
    kind: str = option("sft", doc="the method: a kind in methods.REGISTRY (checked by _Builder.stage)")
    name: str = option("")
    data: str = option("", doc="a .jsonl/.json/.jsonl.gz/.csv/.parquet file, a folder of them, or hf:owner/name")
    split: Union[str, None] = option(None, doc="the split to read (hf: datasets and folders); default train")
    config: Union[str, None] = option(None, doc="the dataset config (hf: datasets with several)")
    revision: Union[str, None] = option(None, doc="hf: datasets: a branch, tag or commit")
    files: Union[str, None] = option(None, doc="a glob choosing the dataset's files, e.g. data/train-*.parquet")
    limit: int = option(0, min=0, doc="rows to read; 0 = all")
    shuffle_seed: Union[int, None] = option(None, doc="shuffle the rows with this seed before limit")
    columns: Union[dict, None] = option(None, doc='format columns -> the data\'s columns, e.g. { prompt = "question" }')
    valid: Union[str, None] = option(None)
    valid_split: Union[str, None] = option(None, doc="the split `valid` reads (hf: datasets and folders)")
    valid_fraction: float = option(0.0, min=0.0, max=0.5)
    adapter: Adapter = option(None)
    optimizer: str = option("adamw", choices=("adamw", "adam", "sgd"))
    learning_rate: float = option(1e-4, min=0.0, max=1.0)
    weight_decay: float = option(0.0, min=0.0)
    lr_schedule: str = option("cosine", choices=("cosine", "linear", "constant"))
    warmup_steps: int = option(0, min=0)
    min_lr_ratio: float = option(0.0, min=0.0, max=1.0)
    batch_size: int = option(4, min=1)
    grad_accum: int = option(1, min=1)
    grad_clip: float = option(1.0, min=0.0, doc="max global gradient norm; 0 disables")
    grad_checkpoint: bool = option(False)
    max_seq_len: int = option(512, min=1)
    steps: int = option(0, min=0, doc="optimizer steps; 0 = derive from epochs")
    epochs: float = option(0.0, min=0.0)
    mask_prompt: bool = option(True, doc="loss only on completion / assistant tokens")
    thinking: str = option("keep", choices=("keep", "strip"), doc="<think> blocks in assistant turns: trained "
                           '("keep") or removed before rendering ("strip"); templates get enable_thinking to match')
    group_by_length: bool = option(True)
    packing: bool = option(False)
    eval_every: int = option(50, min=0)
    eval_batches: int = option(8, min=1)
    save_every: int = option(50, min=1)
    report_every: int = option(10, min=1)
    seed: Union[int, None] = option(None)
    options: Any = field(default=None, metadata={"doc": "the method's own keys (methods/<kind>.py Options)"})


@dataclass(frozen=True)
class Rule:
    """A rule reward: 1 when the response passes, else 0, times weight; a python rule's function
    returns the reward itself, (prompt, completion, row) -> float."""

    kind: str = option("regex", choices=RULE_KINDS)
    pattern: Union[str, None] = option(None, doc="regex: the response (whitespace-normalised) must fully match")
    keys: Union[list, None] = option(None, doc="json: keys the response object must hold")
    min: Union[int, None] = option(None, min=0, doc="length: fewest characters")
    max: Union[int, None] = option(None, min=0, doc="length: most characters")
    text: Union[str, None] = option(None, doc="contains / excludes: the text (case-insensitive)")
    function: Union[str, None] = option(None, doc='python: "FILE.py:NAME", (prompt, completion, row) -> float')
    weight: float = option(1.0)


@dataclass(frozen=True)
class EvalSpec:
    data: Union[str, None] = option(None, doc="the golden set: a data file, folder or hf:owner/name")
    split: Union[str, None] = option(None, doc="the golden set's split (hf: datasets default to test)")
    config: Union[str, None] = option(None, doc="the golden set's config (hf: datasets with several)")
    metric: str = option("exact_match", choices=("exact_match", "contains", "regex", "json", "loglik", "preference",
                                                 "tool_call"), doc="tool_call: golden chats end with tool_calls")
    format: Union[str, None] = option(None, doc="regex a well-formed answer must fully match (reported too; "
                                              'the pattern of metric = "regex")')
    required_keys: Union[list, None] = option(None, doc='metric = "json": keys the answer object must hold')
    general: str = option("bundled", doc='general-ability text: "bundled", a JSONL file of {"text"} rows, or "none"')
    general_limit: int = option(130, min=1, doc="general-ability texts used (the first N)")
    max_general_nll_increase: Union[float, None] = option(None, min=0.0, doc="forgetting budget: relative increase "
                                                                          "of general NLL over the base")
    guard_every: int = option(50, min=1, doc="forgetting guard: steps between general-NLL checks")
    on_forgetting: str = option("warn", choices=("warn", "stop", "best"))
    max_tokens: int = option(32, min=1)
    limit: int = option(100, min=1)
    prompt_baseline: int = option(3, min=0, doc="try prompting first: before training, the base model on the golden "
                                                "set with this many training examples in its prompt; 0 = off")
    ngram: int = option(13, min=1, max=64, doc="contamination: words per n-gram for near duplicates")
    near_duplicate: float = option(0.5, min=0.01, max=1.0,
                                 doc="contamination: share of a golden row's n-grams that makes a near duplicate")
    max_contamination: float = option(0.0, min=0.0, max=1.0,
                                    doc="contamination: share of golden rows allowed to overlap training "
                                        "(above it the run is blocked; any overlap at or below it warns)")


@dataclass(frozen=True)
class Attest:
    source: str = option("", doc="the teacher reference or data path, as written in the recipe")
    reason: str = option("", doc="why you may use it anyway, e.g. a written agreement with the provider")


@dataclass(frozen=True)
class Provenance:
    attest: list = option([])


@dataclass(frozen=True)
class Recipe:
    name: str = option("")
    seed: int = option(0)
    runs_dir: str = option("runs")
    model: ModelSpec = option(None)
    stages: list = option([])
    eval: EvalSpec = option(None)
    provenance: Provenance = option(None)
    source: str = field(default="", compare=False)  # the recipe file, for error messages
    base_dir: str = field(default=".", compare=False)

    def resolve(self, p: str | None) -> str | None:
        """Paths in a recipe are relative to the recipe's folder, unless they exist from the cwd."""
        if p is None:
            return None
        if Path(p).is_absolute() or Path(p).exists():
            return p
        candidate = Path(self.base_dir) / p
        return str(candidate) if candidate.exists() else p

    def chat_template(self) -> str | None:
        """The text of [model] chat_template, checked as Jinja; in a run directory, the run's own copy."""
        from .models import read_chat_template

        if not (ref := self.model.chat_template if self.model else None):
            return None
        own = Path(self.source).parent / RUN_TEMPLATE  # when this recipe is a run's copy, the run's template
        path = own if own.is_file() and (own.parent / "manifest.json").is_file() else Path(self.resolve(ref))
        path = path if path.is_file() or path.is_absolute() else Path(self.base_dir) / ref  # named in the error
        return read_chat_template(path, f"{self.source}: [model] chat_template = {ref!r}")


RUN_TEMPLATE = "chat_template.jinja"  # a run directory's copy of [model] chat_template, beside recipe.toml
_NESTED = {"model": ModelSpec, "eval": EvalSpec, "adapter": Adapter, "quantize": Quantize, "provenance": Provenance}
_INTERNAL = {Recipe: ("source", "base_dir"), Stage: ("options",)}


class _Lines:
    """Finds the line of a key in TOML source, for errors (tomllib gives no positions)."""

    header = re.compile(r"^\s*\[(\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")
    assign = re.compile(r"^\s*([A-Za-z0-9_\"'.-]+)\s*=")

    def __init__(self, text: str):
        self.where: dict[str, int] = {}
        table, counts = "", {}
        for n, line in enumerate(text.splitlines(), 1):
            if m := self.header.match(line):
                name = m.group(2).replace('"', "").replace("'", "")
                if m.group(1):  # [[array]], or [[stages.rules]] inside the last [[stages]]
                    head, _, rest = name.partition(".")
                    if head in counts and rest:
                        name = f"{head}[{counts[head]}].{rest}"
                    counts[name] = counts.get(name, -1) + 1
                    table = f"{name}[{counts[name]}]"
                else:
                    head, _, rest = name.partition(".")
                    table = f"{head}[{counts[head]}].{rest}" if head in counts and rest else name
                self.where.setdefault(table, n)
                continue
            if m := self.assign.match(line):
                key = m.group(1).replace('"', "").replace("'", "")
                path = f"{table}.{key}" if table else key
                self.where.setdefault(path, n)
                for sub in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=", line[m.end():]):
                    self.where.setdefault(f"{path}.{sub}", n)  # inline tables

    def line(self, path: str) -> int | None:
        while path:
            if path in self.where:
                return self.where[path]
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return None


def _display(path: str) -> str:
    return re.sub(r"\[(\d+)\]", lambda m: f"[{int(m.group(1)) + 1}]", path)


class _Builder:
    def __init__(self, source: str, text: str):
        self.source, self.lines = source, _Lines(text)

    def fail(self, path: str, message: str, fix: str = "") -> RecipeError:
        line = self.lines.line(path)
        where = f"{self.source}:{line}" if line else self.source
        return RecipeError(f"{where}: {message}" + (f"\n  fix: {fix}" if fix else ""))

    def build(self, cls, raw: Any, path: str, also: tuple = ()):
        """`cls` from a TOML table; `also`: other keys the table may hold (for \"Did you mean\")."""
        if not isinstance(raw, dict):
            raise self.fail(path, f"[{_display(path)}] must be a table, got {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _INTERNAL.get(cls, ())}
        hints = get_type_hints(cls)
        for key in raw:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields) + list(also), n=1, cutoff=0.6)
                where = f" in [{_display(path)}]" if path else ""
                hint = f' Did you mean "{close[0]}"?' if close else ""
                raise self.fail(
                    f"{path}.{key}" if path else key,
                    f'unknown key "{key}"{where}.{hint}',
                    "" if close else f"known keys: {', '.join(sorted(fields))}",
                )
        values = {}
        for name, f in fields.items():
            key_path = f"{path}.{name}" if path else name
            if name not in raw:
                continue
            values[name] = self.value(name, hints[name], raw[name], key_path, f.metadata)
        return cls(**values)

    def value(self, name, hint, raw, path, meta):
        if name in _NESTED:
            return self.build(_NESTED[name], raw, path)
        if name == "attest":
            if not isinstance(raw, list):
                raise self.fail(path, "provenance.attest must be a list of tables: [[provenance.attest]]")
            out = []
            for i, a in enumerate(raw):
                entry = self.build(Attest, a, f"{path}[{i}]")
                for key in ("source", "reason"):
                    if not getattr(entry, key).strip():
                        raise self.fail(f"{path}[{i}]", f"[[provenance.attest]] #{i + 1} has no {key}",
                                        'give both: source = "gpt-4o" (as the recipe names it) and reason = '
                                        '"written agreement with the provider, ref. 2026-114"')
                out.append(entry)
            return out
        if name in ("rules", "rewards"):
            if not isinstance(raw, list) or not raw:
                raise self.fail(path, f"{name} must be a non-empty list of tables: [[stages.{name}]]",
                                f'[[stages.{name}]]\n  kind = "regex"\n  pattern = \'\\d{{4}}-\\d{{2}}-\\d{{2}}\'')
            return [self.rule(r, f"{path}[{i}]") for i, r in enumerate(raw)]
        if name == "stages":
            if not isinstance(raw, list) or not raw:
                raise self.fail(path, "a recipe needs at least one [[stages]] table",
                                'add:\n  [[stages]]\n  kind = "sft"\n  data = "train.jsonl"')
            return [self.stage(s, f"stages[{i}]") for i, s in enumerate(raw)]
        types = tuple(t for t in get_args(hint) if t is not type(None)) if get_origin(hint) is Union else (hint,)
        ok = any(
            (t is float and isinstance(raw, (int, float)) and not isinstance(raw, bool))
            or (t is int and isinstance(raw, int) and not isinstance(raw, bool))
            or (t not in (int, float) and isinstance(raw, t))
            for t in types
        )
        if not ok:
            want = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                                list: "a list"}.get(t, t.__name__) for t in types)
            raise self.fail(path, f"{_display(path)} must be {want}, got {raw!r}")
        if float in types and isinstance(raw, int):
            raw = float(raw)
        if meta.get("choices") and raw not in meta["choices"]:
            close = difflib.get_close_matches(str(raw), [str(c) for c in meta["choices"]], n=1)
            hint_ = f' Did you mean "{close[0]}"?' if close else ""
            raise self.fail(path, f"{_display(path)} = {raw!r} is not one of "
                                  f"{', '.join(map(repr, meta['choices']))}.{hint_}")
        if meta.get("min") is not None and raw < meta["min"]:
            raise self.fail(path, f"{_display(path)} = {raw!r} is too small: expected at least {meta['min']}")
        if meta.get("max") is not None and raw > meta["max"]:
            raise self.fail(path, f"{_display(path)} = {raw!r} is too large: expected at most {meta['max']}")
        return raw

    def rule(self, raw, path):
        rule = self.build(Rule, raw, path)
        need, what, fix = RULE_NEEDS[rule.kind]
        if need and all(getattr(rule, k) in (None, "") for k in need):
            raise self.fail(path, f'a "{rule.kind}" rule needs {what}', fix)
        if rule.min is not None and rule.max is not None and rule.min > rule.max:
            raise self.fail(f"{path}.min", f"min = {rule.min} is greater than max = {rule.max}")
        if rule.pattern:
            try:
                re.compile(rule.pattern)
            except re.error as e:
                raise self.fail(f"{path}.pattern", f"pattern is not a valid regular expression: {e}",
                                "write it as a TOML literal string: pattern = '\\d{4}-\\d{2}'")
        if rule.function and not re.fullmatch(r"[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*", rule.function):
            raise self.fail(f"{path}.function", f"function = {rule.function!r} is not FILE.py:NAME",
                            'write function = "rewards.py:exact_answer" (the file relative to the recipe)')
        for key in ("pattern", "keys", "min", "max", "text", "function"):
            if key in raw and key not in RULE_KEYS[rule.kind]:
                raise self.fail(f"{path}.{key}", f'{key} does not apply to a "{rule.kind}" rule', f"remove {key}")
        return rule

    def stage(self, raw, path):
        if not isinstance(raw, dict):
            return self.build(Stage, raw, path)  # the "must be a table" error
        kind, kinds = raw.get("kind"), methods.kinds()
        if kind is None:
            raise self.fail(path, f"[{_display(path)}] has no kind", f'add kind = "{kinds[0]}"')
        if kind not in kinds:
            close = difflib.get_close_matches(str(kind), kinds, n=1)
            hint = f' Did you mean "{close[0]}"?' if close else ""
            raise self.fail(f"{path}.kind", f'unknown stage kind "{kind}".{hint}',
                            f"use one of: {', '.join(kinds)}")
        method = methods.get(kind)
        own = {f.name for f in dataclasses.fields(method.options)} if method.options else set()
        others = methods.key_kinds()
        stage = self.build(Stage, {k: v for k, v in raw.items() if k not in own | set(others)}, path, tuple(own))
        for key in raw:
            if key in others and key not in own:
                which = " or ".join(f'kind = "{k}"' for k in others[key])
                raise self.fail(f"{path}.{key}", f"{key} only applies to {which} stages",
                                f"remove {key}, or set kind = \"{others[key][0]}\"")
        options = self.build(method.options, {k: raw[k] for k in raw if k in own}, path) if method.options else None
        if not stage.data:
            raise self.fail(path, f"[{_display(path)}] has no data file", 'add data = "train.jsonl"')
        if problem := check_columns(stage.columns):
            raise self.fail(f"{path}.columns", *problem)
        return dataclasses.replace(stage, adapter=stage.adapter or Adapter(), options=options)


class StageFail:
    """The `fail` a method's validate gets: fail(key, message, fix) -> a RecipeError at the stage's key."""

    def __init__(self, builder: _Builder, path: str):
        self.builder, self.path, self.table = builder, path, f"[{_display(path)}]"

    def __call__(self, key: str, message: str, fix: str = "") -> RecipeError:
        return self.builder.fail(f"{self.path}.{key}" if key else self.path, message, fix)


def parse(text: str, source: str = "<recipe>", base_dir: str = ".") -> Recipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        where = f"{source}:{m.group(1)}" if m else source
        raise RecipeError(f"{where}: not valid TOML: {e}\n  fix: check quotes, brackets and '=' on that line")
    builder = _Builder(source, text)
    if "model" not in raw:
        raise builder.fail("", "no [model] table", 'add:\n  [model]\n  path = "models/small"')
    recipe = builder.build(Recipe, raw, "")
    if not recipe.model.path:
        raise builder.fail("model", "[model] has no path",
                           'set path = "models/small", a Hugging Face repo id, or a .gguf file')
    if recipe.eval is None:
        recipe = dataclasses.replace(recipe, eval=EvalSpec())
    if recipe.provenance is None:
        recipe = dataclasses.replace(recipe, provenance=Provenance())
    if recipe.eval.metric == "regex" and not recipe.eval.format:
        raise builder.fail("eval.metric", 'metric = "regex" needs the pattern in [eval] format',
                           "add format = '\\d{4}-\\d{2}-\\d{2}' (a TOML literal string)")
    if recipe.eval.metric == "json" and not recipe.eval.required_keys:
        raise builder.fail("eval.metric", 'metric = "json" needs required_keys', 'add required_keys = ["name"]')
    if recipe.eval.format:
        try:
            re.compile(recipe.eval.format)
        except re.error as e:
            raise builder.fail("eval.format", f"eval.format is not a valid regular expression: {e}",
                               "write it as a TOML literal string: format = '\\d{4}-\\d{2}'")
    names = []
    stages = []
    for i, s in enumerate(recipe.stages):
        name = s.name or (s.kind if s.kind not in names else f"{s.kind}{i + 1}")
        if name in names:
            raise builder.fail(f"stages[{i}].name", f'stage name "{name}" is used twice',
                               "give each stage its own name")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise builder.fail(f"stages[{i}].name", f'stage name "{name}" must be letters, digits, - or _')
        names.append(name)
        if s.valid and s.valid_fraction:
            raise builder.fail(f"stages[{i}].valid_fraction", "set either valid or valid_fraction, not both")
        s = dataclasses.replace(s, name=name, seed=recipe.seed if s.seed is None else s.seed)
        methods.get(s.kind).validate(s, stages, StageFail(builder, f"stages[{i}]"))
        if s.steps == 0 and s.epochs == 0:
            raise builder.fail(f"stages[{i}]", f"[{_display(f'stages[{i}]')}] sets neither steps nor epochs",
                               "add steps = 100 (optimizer steps) or epochs = 1")
        stages.append(s)
    name = recipe.name or Path(source).stem
    return dataclasses.replace(recipe, stages=stages, name=name, source=source, base_dir=base_dir)


def load(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file\n  fix: check the path; recipes/ has examples")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e}")
    return parse(text, str(path), str(path.parent))


def make_stage(kind: str = "sft", **keys) -> Stage:
    """A Stage from keys as a [[stages]] table holds them (flat: the method's own keys too), for code
    and tests that build stages without a recipe file. Nothing is validated."""
    method = methods.get(kind)
    own = {f.name for f in dataclasses.fields(method.options)} if method.options else set()
    options = method.options(**{k: keys.pop(k) for k in list(keys) if k in own}) if method.options else None
    return Stage(kind=kind, options=options, **{"adapter": Adapter(), **keys})
