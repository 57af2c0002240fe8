"""Choices `localtune init` makes from the data: the task metric, the sequence length, the epochs and
steps, the split sizes, and the share of memory a batch may take (init's planner loop, cli/init._fit, picks
the adapter and batch size against it). The stage kind is not chosen here: the methods say which data
they train on (Method.init_for, methods.for_init).

Each choice comes with its reason in words, which init writes as a comment beside the key.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

SHORT_ANSWER = 64  # characters: a one-line answer this short is compared whole (exact match)
SPECIAL = set(".^$*+?{}[]\\|()")  # regex metacharacters, escaped in a shape
MEMORY_SHARE = 0.6  # of the device's limit: the rest stays for the system and the evaluation's cache


@dataclass(frozen=True)
class Metric:
    metric: str  # an [eval] metric key (recipe.EvalSpec.metric)
    why: str
    format: str | None = None  # [eval] format: the shape every answer has, when they share one
    required_keys: tuple = ()


PREFERENCE = Metric("preference", "preference pairs: the share of golden pairs whose chosen answer the model "
                    "finds more likely")


def answers_of(rows: list[dict]) -> list[str]:
    """The reference answers of completion or messages rows (the last assistant turn)."""
    from ..integrity.evaluate import prompt_and_answer

    out = []
    for r in rows:
        answer = prompt_and_answer(r)[1]
        out.append(answer if isinstance(answer, str) else json.dumps(answer))
    return out


def shape(answer: str) -> str:
    """A regex for the answer's shape: runs of digits and of letters generalised, the rest literal."""
    out = []
    for m in re.finditer(r"\d+|[A-Za-z]+|\s+|.", answer.strip()):
        t = m.group()
        out.append(r"\d+" if t.isdigit() else "[A-Za-z]+" if t.isalpha() and t.isascii() else
                   r"\s+" if t.isspace() else "\\" + t if t in SPECIAL else t)
    return "".join(out)


def shared_format(answers: list[str]) -> str | None:
    """The one shape every answer has, when it says more than "a word" (digits or punctuation in it)."""
    shapes = {shape(a) for a in answers}
    if len(shapes) != 1:
        return None
    pattern = shapes.pop()
    return pattern if re.sub(r"\[A-Za-z\]\+|\\s\+", "", pattern) else None  # words alone say nothing


def _json_keys(answers: list[str]) -> tuple | None:
    keys = None
    for a in answers:
        try:
            value = json.loads(a.strip())
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        keys = set(value) if keys is None else keys & set(value)
    return tuple(sorted(keys or ()))


def choose_metric(answers: list[str]) -> Metric:
    """The task metric a golden set's answers call for: json, exact (+ format), regex, contains, loglik."""
    n = len(answers)
    if not n:
        return Metric("loglik", "no answers to compare")
    if (keys := _json_keys(answers)) is not None:
        return Metric("json", f"all {n} golden answers parse as JSON objects"
                      + (f" holding {', '.join(keys)}" if keys else ""), required_keys=keys)
    single = [a for a in answers if "\n" not in a.strip()]
    short = [a for a in single if len(a.strip()) <= SHORT_ANSWER]
    fmt = shared_format(answers)
    if len(short) == n:
        longest = max(len(a.strip()) for a in answers)
        why = f"all {n} golden answers are one line of at most {longest} characters"
        return Metric("exact_match", why + (", and share one format" if fmt else ""), fmt)
    if fmt:
        return Metric("regex", f"the {n} golden answers are longer than {SHORT_ANSWER} characters but share one "
                      "format: the answers' format is what can be checked", fmt)
    words = sorted(len(a.split()) for a in answers)
    if len(short) >= 0.8 * n and words[n // 2] <= 8:
        return Metric("contains", f"{len(short)} of {n} golden answers are short ({words[n // 2]} words, median) but "
                      "some are not: the reference must occur in the answer")
    return Metric("loglik", f"the golden answers are free-form (median {words[n // 2]} words): their likelihood "
                  "measures the tune where a string comparison would not")


def seq_len(lengths: list[int], context: int | None) -> tuple[int, str]:
    """max_seq_len: the 99th percentile of the examples' token lengths, rounded up to 32, capped by the
    model's context; a longest example within 25% of it is covered whole."""
    lengths = sorted(lengths)
    p99 = int(np.percentile(lengths, 99))
    longest = lengths[-1]
    want = longest if longest <= 1.25 * p99 else p99
    n = max(32, -(-want // 32) * 32)
    cap = ""
    if context and n > context:
        n, cap = context, f", capped by the model's context ({context})"
    over = sum(x > n for x in lengths)
    return n, (f"token lengths: median {lengths[len(lengths) // 2]}, 99th percentile {p99}, longest {longest}{cap}; "
               f"{over} of {len(lengths)} examples are longer and will be truncated")


def epochs_for(rows: int) -> tuple[int, str]:
    """More passes over small data, one over large: a few hundred rows need three to move the model,
    tens of thousands learn in one and a second pass mostly memorises."""
    if rows < 1000:
        return 3, f"{rows} training rows: 3 epochs (small data needs more than one pass)"
    if rows < 10000:
        return 2, f"{rows} training rows: 2 epochs"
    return 1, f"{rows} training rows: 1 epoch (large data; a second pass mostly memorises)"


def steps_for(rows: int, batch: int, epochs: int) -> tuple[int, int]:
    """(steps, eval_every): about five evaluations and checkpoints over the run."""
    steps = max(1, math.ceil(rows / batch) * epochs)
    return steps, max(1, steps // 5)


def split_sizes(n: int) -> tuple[int, int]:
    """(golden, valid) rows: 10% and 5% of the data, at least 5 and 2, at most 200 and 100."""
    return min(200, max(5, round(0.1 * n))), min(100, max(2, round(0.05 * n)))


MIN_TRAIN = 10
