"""Try prompting first: the base model on the golden set with k training examples in its prompt
([eval] prompt_baseline = k), measured before training, and whether the tune beats it by more than noise.

The examples are the same k for every golden row: a sample seeded by the recipe's seed from the training
rows of the first stage whose data has the golden set's shape, never a row that is also a golden row.
With a chat template they are earlier user/assistant turns; without one, prompt + completion texts,
one per line, before the golden prompt. k shrinks when the longest golden row would not fit the model's
context (or, when the model does not say, the stage's max_seq_len).
"""
from __future__ import annotations

import json
import math
import random

from .evaluate import normalize, prompt_and_answer

CONTEXT = "_context"  # a few-shot row's key: how many leading messages are context (not scored by loglik)
GENERATES = ("exact_match", "contains", "regex", "json", "tool_call")  # metrics that generate max_tokens


def _key(row: dict) -> str:
    """A row's prompt and answer as normalised text: what "the same row" means here."""
    prompt, answer = prompt_and_answer(row)
    text = prompt if isinstance(prompt, str) else " ".join(str(m.get("content") or "") for m in prompt)
    return normalize(f"{text}\n{json.dumps(answer) if not isinstance(answer, str) else answer}").casefold()


def choose(rows: list[dict], golden: list[dict], k: int, seed: int) -> list[dict]:
    """k training rows, sampled with `seed`, none equal to a golden row (prompt and answer)."""
    taken = {_key(g) for g in golden}
    candidates = [r for r in rows if _key(r) not in taken]
    return random.Random(seed).sample(candidates, min(k, len(candidates)))


def _turns(shot: dict) -> list[dict]:
    msgs = shot["messages"] if "messages" in shot else [{"role": "user", "content": shot["prompt"]},
                                                        {"role": "assistant", "content": shot["completion"]}]
    return [m for m in msgs if m["role"] != "system"]  # the golden row's own system turn stays first


def with_examples(row: dict, shots: list[dict], chat: bool) -> dict:
    """A golden row with the examples before its prompt (messages with a chat template, else text)."""
    if not chat:
        head = "".join(f"{s['prompt']}{s['completion']}\n" for s in shots)
        return {**row, "prompt": head + row["prompt"]}
    msgs = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]},
                                                      {"role": "assistant", "content": row["completion"]}]
    system = [m for m in msgs[:1] if m["role"] == "system"]
    context = system + [m for s in shots for m in _turns(s)]
    out = {"messages": context + msgs[len(system):], CONTEXT: len(context)}
    tools = list(row.get("tools") or [])
    names = {json.dumps(t, sort_keys=True) for t in tools}
    for s in shots:  # the examples' tools too, so that their calls make sense
        tools += [t for t in s.get("tools") or [] if json.dumps(t, sort_keys=True) not in names]
        names |= {json.dumps(t, sort_keys=True) for t in s.get("tools") or []}
    return out | ({"tools": tools} if tools else {})


def _length(enc, row: dict, generates: bool, max_tokens: int) -> int:
    """Tokens a row needs: its prompt and max_tokens when the metric generates, else the whole row."""
    if generates:
        prompt, _ = prompt_and_answer(row)
        return len(enc.prompt_tokens(prompt, row.get("tools"))) + max_tokens
    if "messages" in row:
        return len(enc.template(row["messages"], tools=row.get("tools")))
    return len(enc.completion(row["prompt"], row["completion"]).tokens)


def fit(shots: list[dict], golden: list[dict], tokenizer, metric: str, max_tokens: int, budget: int) -> list[dict]:
    """The first examples that let the longest golden row fit in `budget` tokens (maybe none)."""
    from jinja2 import TemplateError

    from ..errors import DataError
    from ..train.data import Encoder

    enc, generates = Encoder(tokenizer), metric in GENERATES
    chat = enc.has_template
    longest = max(golden, key=lambda r: _length(enc, r, generates, max_tokens))
    try:
        while shots and _length(enc, with_examples(longest, shots, chat), generates, max_tokens) > budget:
            shots = shots[:-1]
    except (TemplateError, TypeError) as e:  # e.g. a template that wants strictly alternating roles
        row = golden.index(longest) + 1
        raise DataError(f"[eval] data, row {row}: the chat template cannot render it after {len(shots)} training "
                        f"examples (the few-shot baseline): {e}\n"
                        "  fix: set [eval] prompt_baseline = 0, or reshape the rows the way this model's template "
                        "expects") from None
    return shots


def same_shape(fmt: str, golden_fmt: str, chat: bool) -> bool:
    """Training rows that can stand before a golden prompt: the same format, or, with a chat template,
    prompt/completion and messages rows alike (a completion row is one user turn and one answer)."""
    chats = ("completion", "messages")
    return fmt == golden_fmt or (chat and fmt in chats and golden_fmt in chats)


def plan(golden: list[dict], golden_fmt: str, stages: list[tuple], spec, seed: int, tokenizer,
         context: int | None) -> dict | None:
    """The few-shot baseline to measure: {"asked", "k", "stage", "budget", "examples", "note"}, or None when
    [eval] prompt_baseline = 0. stages: (name, rows, format, max_seq_len) of each stage, in order."""
    asked = spec.prompt_baseline
    if not asked:
        return None
    golden = golden[: spec.limit]
    out = {"asked": asked, "k": 0, "stage": None, "budget": None, "examples": [], "note": ""}
    if spec.metric == "preference":
        return out | {"applies": False,
                      "note": "not measured: metric \"preference\" compares the likelihoods of two answers; "
                              "examples in the prompt do not apply"}
    chat = getattr(tokenizer, "chat_template", None) is not None
    source = next(((name, rows, limit) for name, rows, fmt, limit in stages if same_shape(fmt, golden_fmt, chat)),
                  None)
    if source is None:
        return out | {"note": f"not measured: no stage's training data has the golden set's shape ({golden_fmt})"}
    name, rows, max_seq_len = source
    budget = context or max_seq_len
    candidates = choose(rows, golden, asked, seed)
    shots = fit(candidates, golden, tokenizer, spec.metric, spec.max_tokens, budget)
    note = "" if len(shots) == asked else (
        f"{len(shots)} of the {asked} examples asked for: [stages.{name}] has only {len(candidates)} rows that "
        "are not golden" if len(shots) == len(candidates) else
        f"{len(shots)} of the {asked} examples asked for: the longest golden row with {len(candidates)} would not "
        f"fit the {budget}-token {'context' if context else 'max_seq_len'}")
    return out | {"k": len(shots), "stage": name, "budget": budget, "examples": shots, "note": note,
                  "chat": chat}


def measure(model, tokenizer, golden: list[dict], few_shot: dict, spec) -> dict:
    """The [eval] metric on the golden rows, each with the planned examples before it."""
    from . import evaluate

    rows = [with_examples(r, few_shot["examples"], few_shot.get("chat", True)) for r in golden[: spec.limit]]
    result = evaluate.task(model, tokenizer, rows, spec)
    for sample, row in zip(result.get("samples", []), golden):  # show the golden prompt, not the examples
        prompt, _ = prompt_and_answer(row)
        sample["prompt"] = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return result | {"k": few_shot["k"], "asked": few_shot["asked"], "stage": few_shot["stage"],
                     "note": few_shot["note"]}


def compare(baseline: dict, tuned: dict, sigmas: float = 2.0) -> dict:
    """Does the tune beat the few-shot baseline by more than the noise? Both are scored on the same golden rows,
    so the margin is paired: `sigmas` standard errors of the per-row differences.

    share metrics: d_i = hit_i(tuned) - hit_i(baseline); difference = mean(d), se = sd(d) / sqrt(n).
    loglik (a token-weighted mean): d_i = L_i(tuned) - L_i(baseline), row i's summed log-prob over its w_i answer
    tokens; difference = sum(d) / sum(w), se = sqrt(sum((d_i - difference * w_i)^2) * n / (n - 1)) / sum(w)
    (the ratio estimator's linearisation). Rows missing on either side fall back to the two unpaired errors.
    """
    difference = tuned["value"] - baseline["value"]
    paired = _paired(baseline, tuned)
    if paired is not None:
        difference, se = paired
    else:
        se = math.sqrt(_unpaired_se(baseline) ** 2 + _unpaired_se(tuned) ** 2)
    verdict = "tune wins" if difference > sigmas * se else ("prompting wins" if -difference > sigmas * se
                                                             else "within noise")
    return {"difference": difference, "se": se, "sigmas": sigmas, "verdict": verdict, "paired": paired is not None}


def _paired(baseline: dict, tuned: dict) -> tuple[float, float] | None:
    if baseline["metric"] == "loglik":
        b, t, w = baseline.get("row_logp"), tuned.get("row_logp"), tuned.get("row_tokens")
        if not b or not t or len(b) != len(t) or w != baseline.get("row_tokens"):
            return None
        d, total = [y - x for x, y in zip(b, t)], sum(w)
        difference = sum(d) / max(total, 1)
        n = len(d)
        spread = sum((di - difference * wi) ** 2 for di, wi in zip(d, w)) * n / max(n - 1, 1)
        return difference, math.sqrt(spread) / max(total, 1)
    b, t = baseline.get("hits"), tuned.get("hits")
    if not b or not t or len(b) != len(t):
        return None
    d = [y - x for x, y in zip(b, t)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(n - 1, 1))
    return mean, sd / math.sqrt(n)


def _unpaired_se(result: dict) -> float:
    """sqrt(p (1 - p) / n) for a share; for log-likelihood, the spread of per-row means over sqrt(n)."""
    n = max(result["n"], 1)
    if result["metric"] == "loglik":
        means = [x / max(w, 1) for x, w in zip(result.get("row_logp", []), result.get("row_tokens", []))]
        if len(means) < 2:
            return 0.0
        mean = sum(means) / len(means)
        return math.sqrt(sum((x - mean) ** 2 for x in means) / (len(means) - 1)) / math.sqrt(len(means))
    p = result["value"]
    return math.sqrt(p * (1 - p) / n)


def show(result: dict) -> str:
    if result["metric"] == "loglik":
        return f"{result['value']:.3f} nats/token"
    return f"{result['value']:.1%}"


def sentence(baseline: dict, tuned: dict, decision: dict) -> str:
    """The verdict in words, with both numbers."""
    loglik = baseline["metric"] == "loglik"
    margin = (f"{decision['sigmas'] * decision['se']:.3f} nats/token" if loglik
              else f"{decision['sigmas'] * decision['se'] * 100:.1f} points")
    shots = f"{baseline['k']} example{'s' if baseline['k'] != 1 else ''}"
    head = f"Prompting with {shots} scores {show(baseline)}; the tune scores {show(tuned)}"
    if decision["verdict"] == "tune wins":
        return f"{head}: the tune wins by more than the noise ({decision['sigmas']:g} s.e. = {margin})."
    if decision["verdict"] == "prompting wins":
        return f"{head}: prompting does better, by more than the noise ({decision['sigmas']:g} s.e. = {margin}). " \
               "Try prompting first."
    if not loglik and baseline["value"] == tuned["value"] == 0:  # no advice to give between two zeros
        return f"{head}: neither does the task yet. Try more data or steps, or a larger model."
    if decision["se"] == 0 and decision["difference"] == 0:  # paired, and every row scored alike
        return f"{head}: the same on every golden row. Try prompting first."
    return f"{head}: within noise ({decision['sigmas']:g} s.e. = {margin}). Try prompting first."
