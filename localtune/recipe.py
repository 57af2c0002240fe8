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

from .errors import RecipeError

STAGE_KINDS = ("sft", "dpo", "distill", "reward", "ppo")
PPO_KEYS = ("reward_model", "rules", "top_p", "ppo_epochs", "minibatch_size", "kl_coef", "kl_estimator",
            "target_kl", "kl_horizon", "gamma", "lam", "clip_range", "value_clip", "vf_coef", "whiten_advantages",
            "heldout_prompts", "dequantize_rollouts")
# the stage kinds each method-specific key applies to
KEY_KINDS = {**{k: ("reward",) for k in ("reward_centering",)},
             **{k: ("dpo",) for k in ("beta", "loss_type", "label_smoothing", "sft_weight", "reference")},
             **{k: ("distill",) for k in ("teacher", "student", "mode", "loss", "jsd_beta", "top_k")},
             **{k: ("distill", "ppo") for k in ("temperature", "max_new_tokens")},
             **{k: ("ppo",) for k in PPO_KEYS}}
RULE_KINDS = ("regex", "json", "length", "contains", "excludes")


def _opt(default, *, min=None, max=None, choices=None, doc=""):
    meta = {"min": min, "max": max, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Quantize:
    bits: int = _opt(4, choices=(2, 3, 4, 6, 8))
    group_size: int = _opt(64, choices=(32, 64, 128))


@dataclass(frozen=True)
class ModelSpec:
    path: str = _opt("", doc="a local folder, a Hugging Face repo id, or a .gguf file")
    quantize: Union[Quantize, None] = _opt(None, doc="QLoRA: quantize the frozen base")
    revision: Union[str, None] = _opt(None)


@dataclass(frozen=True)
class Adapter:
    type: str = _opt("lora", choices=("lora", "dora", "full"))
    rank: int = _opt(8, min=1, max=1024)
    alpha: float = _opt(16.0, min=0.0)
    dropout: float = _opt(0.0, min=0.0, max=0.9)
    layers: int = _opt(-1, min=-1, doc="number of last transformer blocks to adapt; -1 = all")
    targets: Union[list, None] = _opt(None, doc="module names inside a block, e.g. self_attn.q_proj")


@dataclass(frozen=True)
class Stage:
    kind: str = _opt("sft", choices=STAGE_KINDS)
    name: str = _opt("")
    data: str = _opt("")
    valid: Union[str, None] = _opt(None)
    valid_fraction: float = _opt(0.0, min=0.0, max=0.5)
    adapter: Adapter = _opt(None)
    optimizer: str = _opt("adamw", choices=("adamw", "adam", "sgd"))
    learning_rate: float = _opt(1e-4, min=0.0, max=1.0)
    weight_decay: float = _opt(0.0, min=0.0)
    lr_schedule: str = _opt("cosine", choices=("cosine", "linear", "constant"))
    warmup_steps: int = _opt(0, min=0)
    min_lr_ratio: float = _opt(0.0, min=0.0, max=1.0)
    batch_size: int = _opt(4, min=1)
    grad_accum: int = _opt(1, min=1)
    grad_clip: float = _opt(1.0, min=0.0, doc="max global gradient norm; 0 disables")
    grad_checkpoint: bool = _opt(False)
    max_seq_len: int = _opt(512, min=1)
    steps: int = _opt(0, min=0, doc="optimizer steps; 0 = derive from epochs")
    epochs: float = _opt(0.0, min=0.0)
    mask_prompt: bool = _opt(True, doc="loss only on completion / assistant tokens")
    group_by_length: bool = _opt(True)
    packing: bool = _opt(False)
    eval_every: int = _opt(50, min=0)
    eval_batches: int = _opt(8, min=1)
    save_every: int = _opt(50, min=1)
    report_every: int = _opt(10, min=1)
    seed: Union[int, None] = _opt(None)
    # dpo only
    beta: Union[float, None] = _opt(None, doc="DPO: strength of the pull towards the reference (required)")
    loss_type: str = _opt("sigmoid", choices=("sigmoid", "ipo", "hinge"))
    label_smoothing: float = _opt(0.0, min=0.0, max=0.49, doc="DPO: conservative DPO's label noise")
    sft_weight: float = _opt(0.0, min=0.0, doc="DPO: weight of an NLL term on the chosen responses (RPO)")
    reference: str = _opt("auto", choices=("auto", "precomputed", "live"),
                          doc="DPO: reference log-probs cached once per stage, or computed every step")
    # distill only
    teacher: Union[str, None] = _opt(None, doc="distill: a model reference, or the name of an earlier stage")
    student: Union[str, None] = _opt(None, doc="distill: a smaller model to train instead of the chain's model")
    mode: str = _opt("logits", choices=("logits", "sequence"))
    loss: str = _opt("forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    temperature: float = _opt(1.0, min=0.05, max=100.0)
    jsd_beta: float = _opt(0.5, min=0.0, max=1.0)
    top_k: int = _opt(64, min=1, doc="distill: teacher logits kept per position in the on-disk cache")
    max_new_tokens: int = _opt(64, min=1, doc="distill sequence mode: the teacher's answer length; ppo: the "
                                              "longest sampled response")
    # reward only
    reward_centering: float = _opt(0.0, min=0.0, doc="reward: weight of the (r_w + r_l)^2 centring term")
    # ppo only
    reward_model: Union[str, None] = _opt(None, doc="ppo: the name of an earlier reward stage, or RUN/stage")
    rules: Union[list, None] = _opt(None, doc="ppo: rule rewards, [[stages.rules]] tables")
    top_p: float = _opt(1.0, min=0.01, max=1.0, doc="ppo: nucleus sampling of rollouts")
    ppo_epochs: int = _opt(2, min=1, max=16, doc="ppo: passes over each rollout batch")
    minibatch_size: int = _opt(0, min=0, doc="ppo: rollouts per optimizer step; 0 = batch_size")
    kl_coef: float = _opt(0.05, min=0.0, doc="ppo: weight of the per-token KL penalty to the reference")
    kl_estimator: str = _opt("k1", choices=("k1", "k3"))
    target_kl: Union[float, None] = _opt(None, min=0.0, doc="ppo: KL per response (nats) that an adaptive "
                                                            "kl_coef steers towards; unset = fixed kl_coef")
    kl_horizon: int = _opt(10000, min=1, doc="ppo: adaptive KL's horizon (Ziegler et al. 2019)")
    gamma: float = _opt(1.0, min=0.0, max=1.0)
    lam: float = _opt(0.95, min=0.0, max=1.0)
    clip_range: float = _opt(0.2, min=0.0, max=1.0)
    value_clip: float = _opt(0.2, min=0.0)
    vf_coef: float = _opt(0.1, min=0.0, doc="ppo: weight of the value loss (the critic shares the policy trunk)")
    whiten_advantages: bool = _opt(True)
    heldout_prompts: int = _opt(64, min=1, doc="ppo: held-out prompts scored before and after the stage")
    dequantize_rollouts: bool = _opt(True, doc="ppo, QLoRA on CPU: sample from an fp32 copy of the base (about "
                                               "3x faster rollouts, 4 bytes per weight while sampling)")


@dataclass(frozen=True)
class Rule:
    """A rule reward: 1 when the response passes, else 0, times weight."""

    kind: str = _opt("regex", choices=RULE_KINDS)
    pattern: Union[str, None] = _opt(None, doc="regex: the response (whitespace-normalised) must fully match")
    keys: Union[list, None] = _opt(None, doc="json: keys the response object must hold")
    min: Union[int, None] = _opt(None, min=0, doc="length: fewest characters")
    max: Union[int, None] = _opt(None, min=0, doc="length: most characters")
    text: Union[str, None] = _opt(None, doc="contains / excludes: the text (case-insensitive)")
    weight: float = _opt(1.0)


@dataclass(frozen=True)
class EvalSpec:
    data: Union[str, None] = _opt(None, doc="held-out JSONL with prompt/completion or messages")
    metric: str = _opt("exact_match", choices=("exact_match", "contains", "regex", "json", "loglik", "preference"))
    format: Union[str, None] = _opt(None, doc="regex a well-formed answer must fully match (reported too; "
                                              'the pattern of metric = "regex")')
    required_keys: Union[list, None] = _opt(None, doc='metric = "json": keys the answer object must hold')
    general: str = _opt("bundled", doc='general-ability text: "bundled", a JSONL file of {"text"} rows, or "none"')
    general_limit: int = _opt(130, min=1, doc="general-ability texts used (the first N)")
    max_general_nll_increase: Union[float, None] = _opt(None, min=0.0, doc="forgetting budget: relative increase "
                                                                          "of general NLL over the base")
    guard_every: int = _opt(50, min=1, doc="forgetting guard: steps between general-NLL checks")
    on_forgetting: str = _opt("warn", choices=("warn", "stop", "best"))
    max_tokens: int = _opt(32, min=1)
    limit: int = _opt(100, min=1)
    ngram: int = _opt(13, min=1, max=64, doc="contamination: words per n-gram for near duplicates")
    near_duplicate: float = _opt(0.5, min=0.01, max=1.0,
                                 doc="contamination: share of a golden row's n-grams that makes a near duplicate")
    max_contamination: float = _opt(0.0, min=0.0, max=1.0,
                                    doc="contamination: share of golden rows allowed to overlap training "
                                        "(above it the run is blocked; any overlap at or below it warns)")


@dataclass(frozen=True)
class Attest:
    source: str = _opt("", doc="the teacher reference or data path, as written in the recipe")
    reason: str = _opt("", doc="why you may use it anyway, e.g. a written agreement with the provider")


@dataclass(frozen=True)
class Provenance:
    attest: list = _opt([])


@dataclass(frozen=True)
class Recipe:
    name: str = _opt("")
    seed: int = _opt(0)
    runs_dir: str = _opt("runs")
    model: ModelSpec = _opt(None)
    stages: list = _opt([])
    eval: EvalSpec = _opt(None)
    provenance: Provenance = _opt(None)
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


_NESTED = {"model": ModelSpec, "eval": EvalSpec, "adapter": Adapter, "quantize": Quantize,
           "provenance": Provenance}
_INTERNAL = {"source", "base_dir"}


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

    def build(self, cls, raw: Any, path: str):
        if not isinstance(raw, dict):
            raise self.fail(path, f"[{_display(path)}] must be a table, got {type(raw).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if cls is not Recipe or f.name not in _INTERNAL}
        hints = get_type_hints(cls)
        for key in raw:
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
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
        if name == "rules":
            if not isinstance(raw, list) or not raw:
                raise self.fail(path, "rules must be a non-empty list of tables: [[stages.rules]]",
                                '[[stages.rules]]\n  kind = "regex"\n  pattern = \'\\d{4}-\\d{2}-\\d{2}\'')
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
        need = {"regex": "pattern", "contains": "text", "excludes": "text"}.get(rule.kind)
        if need and not getattr(rule, need):
            raise self.fail(path, f'a "{rule.kind}" rule needs {need}',
                            "add pattern = '\\d{4}-\\d{2}-\\d{2}'" if need == "pattern" else 'add text = "..."')
        if rule.kind == "length" and rule.min is None and rule.max is None:
            raise self.fail(path, 'a "length" rule needs min, max or both (characters)', "add min = 1, max = 200")
        if rule.min is not None and rule.max is not None and rule.min > rule.max:
            raise self.fail(f"{path}.min", f"min = {rule.min} is greater than max = {rule.max}")
        if rule.pattern:
            try:
                re.compile(rule.pattern)
            except re.error as e:
                raise self.fail(f"{path}.pattern", f"pattern is not a valid regular expression: {e}",
                                "write it as a TOML literal string: pattern = '\\d{4}-\\d{2}'")
        for key in ("pattern", "keys", "min", "max", "text"):
            if key in raw and key not in {"regex": ("pattern",), "json": ("keys",), "length": ("min", "max"),
                                          "contains": ("text",), "excludes": ("text",)}[rule.kind]:
                raise self.fail(f"{path}.{key}", f'{key} does not apply to a "{rule.kind}" rule', f"remove {key}")
        return rule

    def stage(self, raw, path):
        if isinstance(raw, dict):
            kind = raw.get("kind")
            if kind is None:
                raise self.fail(path, f"[{_display(path)}] has no kind", f'add kind = "{STAGE_KINDS[0]}"')
            if kind not in STAGE_KINDS:
                close = difflib.get_close_matches(str(kind), STAGE_KINDS, n=1)
                hint = f' Did you mean "{close[0]}"?' if close else ""
                raise self.fail(f"{path}.kind", f'unknown stage kind "{kind}".{hint}',
                                f"use one of: {', '.join(STAGE_KINDS)}")
        stage = self.build(Stage, raw, path)
        if not stage.data:
            raise self.fail(path, f"[{_display(path)}] has no data file", 'add data = "train.jsonl"')
        if stage.adapter is None:
            stage = dataclasses.replace(stage, adapter=Adapter())
        return stage


def _check_dpo(builder: _Builder, s: Stage, raw: dict, path: str) -> None:
    if s.beta is None:
        raise builder.fail(path, f"[{_display(path)}] is a dpo stage and needs beta",
                           "add beta = 0.1 (larger keeps the model closer to its reference)")
    if s.beta <= 0:
        raise builder.fail(f"{path}.beta", f"beta = {s.beta!r} must be greater than 0", "try beta = 0.1")
    if s.adapter.type == "full":
        raise builder.fail(f"{path}.adapter.type", 'a dpo stage with adapter type "full" has no reference: the '
                           "reference is the model with this stage's adapters switched off",
                           'use type = "lora" or "dora"')
    if s.packing:
        raise builder.fail(f"{path}.packing", "packing is not available for dpo stages (pairs are batched together)",
                           "remove packing = true")


def _check_distill(builder: _Builder, s: Stage, names: list[str], path: str) -> None:
    name = names[-1]
    if s.teacher == name:
        raise builder.fail(f"{path}.teacher", f'stage "{name}" cannot be its own teacher')
    if s.teacher in names[:-1] and not s.student:
        raise builder.fail(f"{path}.teacher", f'teacher = "{s.teacher}" is the model this stage starts from: '
                           "distilling it into itself does nothing",
                           'add student = "models/smaller" (a smaller model that learns from it)')
    if s.loss == "jsd" and not 0 < s.jsd_beta < 1:
        raise builder.fail(f"{path}.jsd_beta", f"jsd_beta = {s.jsd_beta!r} must be strictly between 0 and 1 "
                           "(at 0 or 1 the divergence is zero)", 'use 0.5, or loss = "forward_kl" / "reverse_kl"')
    if s.packing:
        raise builder.fail(f"{path}.packing", "packing is not available for distill stages",
                           "remove packing = true")


def _check_ppo(builder: _Builder, s: Stage, before: list, names: list[str], path: str) -> None:
    if not s.reward_model and not s.rules:
        raise builder.fail(path, f"[{_display(path)}] is a ppo stage with neither reward_model nor rules: "
                           "nothing scores its rollouts",
                           'add reward_model = "reward" (an earlier reward stage), or a rule:\n'
                           '  [[stages.rules]]\n  kind = "regex"\n  pattern = \'\\d{4}-\\d{2}-\\d{2}\'')
    if s.adapter.type == "full":
        raise builder.fail(f"{path}.adapter.type", 'a ppo stage with adapter type "full" has no reference: the '
                           "reference is the model with this stage's adapters switched off",
                           'use type = "lora" or "dora"')
    if s.minibatch_size and (s.minibatch_size > s.batch_size or s.batch_size % s.minibatch_size):
        raise builder.fail(f"{path}.minibatch_size", f"minibatch_size = {s.minibatch_size} must divide "
                           f"batch_size = {s.batch_size} (the rollouts per batch)",
                           f"use minibatch_size = {s.batch_size // 2 or 1}")
    if s.packing:
        raise builder.fail(f"{path}.packing", "packing is not available for ppo stages", "remove packing = true")
    ref = s.reward_model
    if ref is None or "/" in ref or "\\" in ref or ref.endswith(".gguf"):
        return  # a path: checked when the run starts (it must exist and share the tokenizer)
    kinds = dict(zip(names, (x.kind for x in before)))
    if ref not in names[:-1]:
        close = difflib.get_close_matches(ref, [n for n in names[:-1] if kinds.get(n) == "reward"], n=1)
        raise builder.fail(f"{path}.reward_model", f'reward_model = "{ref}" is not an earlier stage of this recipe'
                           + (f'. Did you mean "{close[0]}"?' if close else ""),
                           "name an earlier kind = \"reward\" stage, or give a path RUN/stage")
    at = names.index(ref)
    if before[at].kind != "reward":
        raise builder.fail(f"{path}.reward_model", f'reward_model = "{ref}" is a {before[at].kind} stage, '
                           "not a reward stage", 'add a kind = "reward" stage and name it here')
    between = [x for x in before[at + 1:] if x.kind != "reward"]
    if between:
        raise builder.fail(f"{path}.reward_model", f'reward_model = "{ref}" was trained on a different base: '
                           f'stage "{between[0].name or between[0].kind}" changed the model after it, so its '
                           "scores would be read off weights it never saw",
                           f"move the reward stage to just before the {names[-1]} stage")


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
            raise builder.fail(f"stages[{i}].name", f'stage name "{name}" is used twice', "give each stage its own name")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise builder.fail(f"stages[{i}].name", f'stage name "{name}" must be letters, digits, - or _')
        names.append(name)
        if s.valid and s.valid_fraction:
            raise builder.fail(f"stages[{i}].valid_fraction", "set either valid or valid_fraction, not both")
        stage_raw = raw["stages"][i]
        if s.kind == "dpo":
            _check_dpo(builder, s, stage_raw, f"stages[{i}]")
        if s.kind == "distill" and not s.teacher:
            raise builder.fail(f"stages[{i}]", f"[{_display(f'stages[{i}]')}] is a distill stage and needs a teacher",
                               'add teacher = "models/small" (a model reference) or the name of an earlier stage')
        if s.kind == "distill":
            _check_distill(builder, s, names, f"stages[{i}]")
        if s.kind == "reward" and s.adapter.type == "full":
            raise builder.fail(f"stages[{i}].adapter.type", 'a reward stage is a branch: its adapters come off '
                               "when it ends, which full fine-tuning cannot do", 'use type = "lora" or "dora"')
        for key, kinds in KEY_KINDS.items():
            if key in stage_raw and s.kind not in kinds:
                which = " or ".join(f'kind = "{k}"' for k in kinds)
                raise builder.fail(f"stages[{i}].{key}", f"{key} only applies to {which} stages",
                                   f"remove {key}, or set kind = \"{kinds[0]}\"")
        if s.kind == "ppo":
            _check_ppo(builder, s, recipe.stages[:i], names, f"stages[{i}]")
        if s.steps == 0 and s.epochs == 0:
            raise builder.fail(f"stages[{i}]", f"[{_display(f'stages[{i}]')}] sets neither steps nor epochs",
                               "add steps = 100 (optimizer steps) or epochs = 1")
        stages.append(dataclasses.replace(s, name=name, seed=recipe.seed if s.seed is None else s.seed))
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
