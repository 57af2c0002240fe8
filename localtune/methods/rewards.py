"""Rewards for sampled responses: rules declared in the recipe (checks, or the user's own Python
functions) and/or a trained reward model (a reward stage of this run, kept aside and swapped in to
score, or of another run)."""
from __future__ import annotations

import difflib
import importlib.util
import json
import math
import re
import sys
import traceback
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import RecipeError, TrainingError
from ..integrity.evaluate import normalize
from ..run.damage import load_safetensors
from ..train import data
from ..train.adapters import adapters_disabled, swapped


def passes(rule, text: str) -> bool:
    """Whether a response passes one rule (recipe.Rule). Text is whitespace-normalised first.

    regex: fully matches `pattern` · json: parses (as an object holding `keys`, when given) ·
    length: min <= characters <= max · contains / excludes: `text`, case-insensitive.
    """
    t = normalize(text)
    if rule.kind == "regex":
        return re.fullmatch(rule.pattern, t) is not None
    if rule.kind == "json":
        try:
            value = json.loads(t)
        except ValueError:
            return False
        return not rule.keys or (isinstance(value, dict) and all(k in value for k in rule.keys))
    if rule.kind == "length":
        return (rule.min is None or len(t) >= rule.min) and (rule.max is None or len(t) <= rule.max)
    found = rule.text.casefold() in t.casefold()
    return found if rule.kind == "contains" else not found


def load_function(recipe, rule, where: str):
    """The callable a python rule names ("FILE.py:NAME", the file relative to the recipe), imported once."""
    file, name = rule.function.rsplit(":", 1)
    path = Path(recipe.resolve(file))
    key = f"{where} function = {rule.function!r}"
    if not path.is_file():
        raise RecipeError(f"{key}: no such file {path}\n  fix: give the file's path relative to the recipe "
                          f"({recipe.source}), e.g. function = \"rewards.py:{name}\"")
    spec = importlib.util.spec_from_file_location(f"localtune_rewards.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))  # its own helper modules beside it import as with `python`
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error is theirs to see, with its line
        tb = traceback.extract_tb(e.__traceback__)[-1]
        raise RecipeError(f"{key}: importing {path} failed at line {tb.lineno}: {type(e).__name__}: {e}\n"
                          f"  fix: check that `python {path}` runs") from None
    finally:
        sys.path.remove(str(path.parent.resolve()))
    fn = getattr(module, name, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        raise RecipeError(f"{key}: {path} has no function {name!r}"
                          + (f'. Did you mean "{close[0]}"?' if close else "")
                          + f"\n  fix: define def {name}(prompt, completion, row) -> float in {path.name}"
                          + (f" (it has: {', '.join(names)})" if names else ""))
    return fn


def call_function(rule, fn, prompt, text: str, row: dict | None, where: str) -> float:
    """A python rule's reward for one response; anything but a finite number stops the stage."""
    try:
        value = fn(prompt, text, row if row is not None else {})
    except Exception as e:
        raise TrainingError(f"reward function {rule.function} raised {type(e).__name__}: {e}\n  on {where}, "
                            f"completion {text[:80]!r}\n  fix: make it return a number for every completion "
                            "(0.0 for one it cannot judge)") from None
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise TrainingError(f"reward function {rule.function} returned {value!r} ({type(value).__name__}) on "
                            f"{where}, completion {text[:80]!r}; expected a finite number\n"
                            "  fix: return a float, e.g. 1.0 for a correct answer and 0.0 otherwise")
    return float(value)


def load_functions(recipe, stage, rules) -> dict:
    """{rule index: callable} for the python rules of a stage (imported at the gate, before weights)."""
    return {i: load_function(recipe, r, f"{recipe.source}: [stages.{stage.name}]")
            for i, r in enumerate(rules or ()) if r.kind == "python"}


def files(rules) -> tuple:
    """The files of a stage's python rules, as the recipe names them."""
    return tuple(r.function.rsplit(":", 1)[0] for r in rules or () if r.kind == "python")


class Reward:
    """score(x, y) = r(x, y) of a reward model (when there is one) + sum_i weight_i * rule_i(x, y),
    where a check rule gives 1 when y passes it and a python rule gives its function's value.

    The reward model is a reward stage's adapters and head on the policy's own base (`layers`,
    `head`), or a separate model with its own `reward_head` (`model`). `functions` are the python
    rules' callables by rule index.
    """

    def __init__(self, tokenizer, rules=(), layers=None, head=None, model=None, functions=None):
        self.enc, self.rules = data.Encoder(tokenizer, mask_prompt=True), list(rules or ())
        self.layers, self.head, self.model = layers, head, model
        self.functions = functions or {}

    @property
    def has_model(self) -> bool:
        return self.head is not None or self.model is not None

    def score(self, policy, prompts: list, texts: list[str]) -> tuple[np.ndarray, dict]:
        """__call__ for prompts.Prompt examples: their prompts, rows and where they came from."""
        return self(policy, [p.prompt for p in prompts], texts, [p.row for p in prompts], [p.where for p in prompts])

    def __call__(self, policy, prompts: list, texts: list[str], rows: list | None = None,
                 where: list | None = None) -> tuple[np.ndarray, dict]:
        """(scores (B,), {"model": r (B,), "rule1": value (B,), ...}); python rules read the rows,
        and `where` names each one in their errors."""
        from .pairs import response_example
        from .reward import rewards, whole

        total, parts = np.zeros(len(texts), np.float32), {}
        if self.has_model:  # encoded exactly as the reward stage's training pairs were
            tokens, real = whole([response_example(self.enc, p, t, "rollout") for p, t in zip(prompts, texts)])
            tokens, real = mx.array(tokens), mx.array(real)
            if self.model is not None:
                r = rewards(self.model, tokens, real)
            else:  # the policy's own adapters off, the reward stage's in: the reward model on the shared base
                with adapters_disabled(policy), swapped(policy, self.layers):
                    r = rewards(policy, tokens, real, self.head)
            parts["model"] = np.array(r.astype(mx.float32))
            total += parts["model"]
        rows, where = rows or [None] * len(texts), where or ["a sampled response"] * len(texts)
        for i, rule in enumerate(self.rules):
            if rule.kind == "python":
                fn = self.functions[i]
                values = [call_function(rule, fn, p, t, r, w) for p, t, r, w in zip(prompts, texts, rows, where)]
            else:
                values = [passes(rule, t) for t in texts]
            parts[f"rule{i + 1}"] = np.array(values, np.float32)
            total += rule.weight * parts[f"rule{i + 1}"]
        return total, parts


def load_reward_head(folder: Path, hidden: int) -> nn.Linear:
    weights = load_safetensors(Path(folder) / "adapters.safetensors",
                               f"copy {folder} back from another copy of the run, or train the reward stage again")
    head = nn.Linear(hidden, 1)
    head.load_weights([(k.removeprefix("reward_head."), v) for k, v in weights.items() if k.startswith("reward_head.")])
    head.freeze()
    return head


def build(ctx, reward_model: str | None, rules) -> Reward:
    """A stage's reward: an earlier reward stage on this model's own base (its adapters kept aside,
    swapped in to score), a reward stage of another run (its own copy), and/or rules."""
    from .. import loading
    from ..train import adapters

    model, tokenizer, recipe = ctx.model, ctx.tokenizer, ctx.recipe
    functions = load_functions(recipe, ctx.stage, rules)
    if reward_model is None:
        return Reward(tokenizer, rules, functions=functions)
    if ctx.planning:  # no reward stage exists yet: timed as the base plus a head (its LoRA costs little)
        return Reward(tokenizer, rules, {}, nn.Linear(model.model.norm.weight.shape[0], 1), functions=functions)
    if reward_model in [s.name for s in recipe.stages]:
        folder = ctx.run.stage_dir(reward_model)
        layers, _ = adapters.side_adapters(model, folder)
        return Reward(tokenizer, rules, layers, load_reward_head(folder, model.model.norm.weight.shape[0]),
                      functions=functions)
    path = Path(recipe.resolve(reward_model))
    separate, _ = loading.load_for_inference(str(path.parent), path.name)
    separate.freeze()
    return Reward(tokenizer, rules, model=separate, functions=functions)


def check(recipe, stage, rules, tokenizer, folder: Path) -> None:
    """Gate-time checks of a stage's reward: its python rules import and name functions, and a reward
    model given as a path is a finished reward stage on this base."""
    load_functions(recipe, stage, rules)
    ref = stage.options.reward_model
    if ref and ref not in [x.name for x in recipe.stages]:
        check_reward_model(recipe, stage, ref, tokenizer, folder)


def check_reward_model(recipe, stage, ref: str, tokenizer, folder: Path) -> None:
    """A reward model given as RUN/stage: a finished reward stage of a run on the same base and tokenizer."""
    from .. import loading, models
    from ..run import is_run_dir
    from ..run.damage import read_json

    key = f"{recipe.source}: [stages.{stage.name}] reward_model = {ref!r}"
    path = Path(recipe.resolve(ref))
    config = path / "adapter_config.json"
    if not (config.exists() and is_run_dir(path.parent)):
        raise RecipeError(f"{key}: not a reward stage of a run (expected RUN/stage holding adapter_config.json)\n"
                          '  fix: name an earlier kind = "reward" stage of this recipe, or give runs/NAME/STAGE')
    if not read_json(config, f"copy {path} back from another copy of that run").get("reward_head"):
        raise RecipeError(f"{key}: {path.name} is not a reward stage (its adapters have no reward head)\n"
                          "  fix: point at the run's kind = \"reward\" stage")
    theirs = loading.folder_of(recipe, str(path.parent), "reward_model")
    if models.load_tokenizer(theirs).get_vocab() != tokenizer.get_vocab():
        raise RecipeError(f"{key}: the reward model's tokenizer ({theirs}) is not this run's ({folder}); it would "
                          "read other token ids\n  fix: train the reward stage on this recipe's base model")
    if Path(theirs).resolve() != Path(folder).resolve():
        raise RecipeError(f"{key}: the reward model was trained on a different base ({theirs}, not {folder})\n"
                          "  fix: train the reward stage on this recipe's base model, in this recipe or another run")
    loading.require_finished(recipe, path.parent, path.name, f"[stages.{stage.name}] reward_model = {ref!r}")


def describe(reward_model: str | None, rules) -> str:
    """The reward in words, for the report."""
    return " + ".join(([f"reward model `{reward_model}`"] if reward_model else []) +
                      [f"{x.weight:g} x {rule_name(x)}" for x in rules or ()])


def samples_table(before: list[dict], after: list[dict]) -> list[str]:
    """report.md's table of sampled answers to the same prompts before and after a stage."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")[:60]

    lines = ["", "Samples (the same prompts and seed before and after):", "",
             "| prompt | before | reward | after | reward |", "|---|---|---|---|---|"]
    for x, y in zip(before, after):
        lines.append(f"| {cell(x['prompt'])} | {cell(x['got'])} | {x['reward']:+.2f} | {cell(y['got'])} | "
                     f"{y['reward']:+.2f} |")
    return lines


def rule_name(rule) -> str:
    """A rule in a few words: `python rewards.py:exact`, `regex \\d+`, `length`."""
    detail = rule.function or rule.pattern or rule.text
    return f"{rule.kind} `{detail}`" if detail else rule.kind


def validate_reward_model(stage, before: list, fail) -> None:
    """reward_model names an earlier reward stage with nothing but reward stages after it."""
    from .. import methods

    ref, names = stage.options.reward_model, [x.name for x in before]
    if ref is None or "/" in ref or "\\" in ref or ref.endswith(".gguf"):
        return  # a path: checked when the run starts (it must exist and share the tokenizer)
    scorers = [x.name for x in before if methods.of(x).scores]
    if ref not in names:
        close = difflib.get_close_matches(ref, scorers, n=1)
        raise fail("reward_model", f'reward_model = "{ref}" is not an earlier stage of this recipe'
                   + (f'. Did you mean "{close[0]}"?' if close else ""),
                   "name an earlier kind = \"reward\" stage, or give a path RUN/stage")
    at = names.index(ref)
    if ref not in scorers:
        raise fail("reward_model", f'reward_model = "{ref}" is a {before[at].kind} stage, not a reward stage',
                   'add a kind = "reward" stage and name it here')
    between = [x for x in before[at + 1:] if not methods.of(x).branch]
    if between:
        raise fail("reward_model", f'reward_model = "{ref}" was trained on a different base: stage '
                   f'"{between[0].name}" changed the model after it, so its scores would be read off weights it '
                   f"never saw", f"move the reward stage to just before the {stage.name} stage")
