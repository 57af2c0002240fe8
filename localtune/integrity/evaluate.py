"""Evaluation: task metrics on the golden set (greedy generation, or likelihoods), and general
ability as mean NLL per token on general text (the forgetting check)."""
from __future__ import annotations

import re
import unicodedata

from mlx_lm.generate import batch_generate

from ..models import inference_weights
from ..train.data import Encoder


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def prompt_and_answer(row: dict) -> tuple[str, str]:
    if "messages" in row:
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    return row["prompt"], row["completion"]


SHARED_PREFIX = 16  # prompts that share at least this many leading tokens prefill them once
PREFILL_TOKENS = 8192  # prompt tokens per prefill call (mlx-lm prefills 8 prompts a call: 1.3x the time on months)


def prefill_batch(prompts: list[list[int]]) -> int:
    """How many prompts to prefill together: all of a batch of short prompts (the bundled models' golden sets),
    never fewer than mlx-lm's 8 (a CPU materializes each call's attention scores, batch x T x T)."""
    return min(len(prompts), max(8, PREFILL_TOKENS // max(len(p) for p in prompts)))


def shared_prefix(ids: list[list[int]]) -> int:
    """How many leading tokens every prompt has in common, leaving each at least one of its own (the
    generator runs a prompt's last token itself)."""
    n = min(len(i) for i in ids) - 1
    first = ids[0]
    for other in ids[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _prefill(model, tokens: list[int], step: int = 2048):
    """A prompt cache holding `tokens`, or None when the model's cache cannot join a batch."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    if not all(hasattr(c, "merge") for c in cache):
        return None
    for i in range(0, len(tokens), step):
        model(mx.array(tokens[i:i + step])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def generate(model, tokenizer, prompts: list, max_tokens: int, batch_size: int = 32, tools=None) -> list[str]:
    """Greedy completions; a prompt is a string or a message list (`tools`: each prompt's tools, or None).

    Leading tokens every prompt shares (the few-shot examples of `[eval] prompt_baseline`, a system
    prompt) run once: their KV cache starts every prompt, which then prefills only its own tokens
    (SmolLM2, 3 examples before 100 date questions: see integrity/few_shot.py)."""
    enc = Encoder(tokenizer)
    ids = [enc.prompt_tokens(p, t) for p, t in zip(prompts, tools or [None] * len(prompts))]
    model.eval()
    out = []
    with inference_weights(model):
        n = shared_prefix(ids) if len(ids) > 1 else 0
        cache = _prefill(model, ids[0][:n]) if n >= SHARED_PREFIX else None
        if cache is not None:
            ids = [i[n:] for i in ids]
        for i in range(0, len(ids), batch_size):
            chunk = ids[i:i + batch_size]
            caches = [cache] * len(chunk) if cache is not None else None
            out += batch_generate(model, tokenizer, chunk, prompt_caches=caches, max_tokens=max_tokens,
                                  prefill_batch_size=prefill_batch(chunk)).texts
    return out


def score(metric: str, answer: str, reference: str, pattern: str | None = None, keys=()) -> bool:
    """One generated answer against its reference.

    exact_match: equal after NFKC and whitespace normalisation · contains: the normalised, case-folded
    reference occurs in the answer · regex: the normalised answer fully matches `pattern` ·
    json: the answer parses as a JSON object holding every key in `keys`.
    """
    if metric == "exact_match":
        return normalize(answer) == normalize(reference)
    if metric == "contains":
        return normalize(reference).casefold() in normalize(answer).casefold()
    if metric == "regex":
        return re.fullmatch(pattern, normalize(answer)) is not None
    if metric == "json":
        import json

        try:
            value = json.loads(answer.strip())
        except ValueError:
            return False
        return isinstance(value, dict) and all(k in value for k in keys)
    raise ValueError(metric)


def task(model, tokenizer, rows: list[dict], spec) -> dict:
    """The recipe's [eval] metric on the golden rows (spec: recipe.EvalSpec)."""
    if spec.metric == "loglik":
        return loglik(model, tokenizer, rows[: spec.limit])
    if spec.metric == "preference":
        return preference_accuracy(model, tokenizer, rows[: spec.limit])
    if spec.metric == "tool_call":
        return tool_call_accuracy(model, tokenizer, rows[: spec.limit], spec.max_tokens)
    return exact_match(model, tokenizer, rows, spec.max_tokens, spec.limit, spec.format, spec.metric,
                       tuple(spec.required_keys or ()))


def loglik(model, tokenizer, rows: list[dict]) -> dict:
    """Mean log-likelihood per token of the reference answers given their prompts (no generation):
    sum_rows sum_t log p(answer_t | prompt, answer_<t) / answer tokens."""
    import mlx.core as mx

    from ..methods.logprobs import target_logprobs
    from ..train.data import collate_examples, encode

    fmt = "messages" if "messages" in rows[0] else "completion"
    examples = encode(rows, fmt, tokenizer, 1 << 16).examples
    from .few_shot import CONTEXT

    enc = Encoder(tokenizer)
    for ex in examples:  # a few-shot row: its examples' answers are context, not scored (rows may be dropped)
        row = rows[ex.source_row]
        if row.get(CONTEXT):
            ex.loss_mask[: len(enc.template(row["messages"][: row[CONTEXT]], tools=row.get("tools")))] = False
    total, count, row_logp, row_tokens = 0.0, 0, [], []
    model.eval()
    with inference_weights(model):
        for i in range(0, len(examples), 16):
            b = collate_examples(examples[i:i + 16])
            logp, w = target_logprobs(model, {"inputs": mx.array(b.inputs), "targets": mx.array(b.targets),
                                              "loss_mask": mx.array(b.loss_mask)})
            total += (logp * w).sum().item()
            count += int(b.loss_mask.sum())
            rows_logp, rows_w = (logp * w).reshape(b.loss_mask.shape), w.reshape(b.loss_mask.shape)  # (B, T)
            row_logp += rows_logp.sum(axis=1).tolist()
            row_tokens += [int(t) for t in rows_w.sum(axis=1).tolist()]
    # per scored row: summed log-prob and answer tokens (few_shot.compare's paired noise margin)
    return {"metric": "loglik", "value": total / max(count, 1), "n": len(examples), "tokens": count,
            "row_logp": row_logp, "row_tokens": row_tokens, "samples": []}


def preference_accuracy(model, tokenizer, rows: list[dict]) -> dict:
    """Share of held-out pairs whose chosen response the model finds more likely than the rejected one
    (summed log-probs of the response tokens)."""
    import mlx.core as mx

    from ..methods.logprobs import sequence_logps
    from ..methods.pairs import collate_pairs, encode_pairs

    pairs = encode_pairs(rows, tokenizer, 1 << 16, "golden set").examples
    wins = 0
    model.eval()
    with inference_weights(model):
        from ..train.trainer import to_mx

        for i in range(0, len(pairs), 8):
            chunk = pairs[i:i + 8]
            logps, _ = sequence_logps(model, to_mx(collate_pairs(chunk)))
            wins += int(mx.sum(logps[: len(chunk)] > logps[len(chunk):]).item())
    return {"metric": "preference", "value": wins / max(len(pairs), 1), "n": len(pairs), "samples": []}


def exact_match(model, tokenizer, rows: list[dict], max_tokens: int, limit: int, format: str | None = None,
                metric: str = "exact_match", keys=()) -> dict:
    """Share of rows whose greedy answer equals the reference after whitespace/NFKC normalisation.

    With `format` (a regex), also the share of answers that are well-formed (fully match it).
    """
    rows = rows[:limit]
    pairs = [prompt_and_answer(r) for r in rows]
    answers = generate(model, tokenizer, [p for p, _ in pairs], max_tokens)
    hits = [score(metric, a, ref, format, keys) for a, (_, ref) in zip(answers, pairs)]
    samples = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "expected": ref, "got": a}
               for (p, ref), a in zip(pairs[:5], answers[:5])]
    result = {"metric": metric, "value": sum(hits) / len(hits), "n": len(hits), "hits": [int(h) for h in hits],
              "samples": samples}
    if format:
        pattern = re.compile(format)
        result["format"] = format
        result["well_formed"] = sum(bool(pattern.fullmatch(normalize(a))) for a in answers) / len(answers)
    return result


def tool_call_accuracy(model, tokenizer, rows: list[dict], max_tokens: int) -> dict:
    """Share of golden chats whose greedy answer calls the expected functions with the expected arguments
    (integrity/tool_calls.py); the shares that parse and that name the right functions come too."""
    from . import tool_calls

    tool_calls.check_golden(rows, "the golden set")
    prompts = [r["messages"][:-1] for r in rows]
    answers = generate(model, tokenizer, prompts, max_tokens, tools=[r.get("tools") for r in rows])
    scores = [tool_calls.score(a, r) for a, r in zip(answers, rows)]
    share = lambda k: sum(s[k] for s in scores) / max(len(scores), 1)  # noqa: E731
    samples = [{"prompt": p[-1]["content"], "expected": tool_calls.show(tool_calls.expected_calls(r)), "got": a}
               for p, r, a in zip(prompts[:5], rows[:5], answers[:5])]
    return {"metric": "tool_call", "value": share(2), "n": len(rows), "hits": [int(s[2]) for s in scores],
            "samples": samples,
            "secondary": {"parses": share(0), "right function": share(1)}}


def decode_speed(model, tokenizer, prompt, tokens: int = 64) -> float:
    """Greedy decoding tokens/s at batch 1 (a KV cache, no stop at EOS), after one warm-up run."""
    import time

    import mlx.core as mx
    from mlx_lm.generate import generate_step

    enc = Encoder(tokenizer)
    ids = mx.array(enc.prompt_tokens(prompt) if isinstance(prompt, str) else
                   enc.template(prompt, add_generation_prompt=True))
    model.eval()
    with inference_weights(model):
        for _ in generate_step(ids, model, max_tokens=4):
            pass
        t0 = time.perf_counter()
        for _ in generate_step(ids, model, max_tokens=tokens):
            pass
        return tokens / (time.perf_counter() - t0)


def general_nll(model, tokenizer, texts: list[str], max_seq_len: int = 256, batch_size: int = 8) -> dict:
    """Mean negative log-likelihood per token (nats) over plain texts, and its perplexity.

    NLL = -sum_t log p(x_t | x_<t) / T over every token after the first of each text (BOS first
    when the tokenizer has one), texts cut at max_seq_len tokens.
    """
    import math

    import mlx.core as mx
    import numpy as np

    from ..methods.logprobs import target_logprobs
    from ..train.data import Batch, Example, collate_examples

    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    examples = []
    for t in texts:
        ids = (bos + tokenizer.encode(t, add_special_tokens=False))[:max_seq_len]
        examples.append(Example(np.array(ids, np.int32), np.ones(len(ids), bool)))
    examples.sort(key=lambda e: len(e.tokens))
    total, count = 0.0, 0
    model.eval()
    with inference_weights(model):
        for i in range(0, len(examples), batch_size):
            b: Batch = collate_examples(examples[i:i + batch_size])
            logp, weight = target_logprobs(model, {k: mx.array(v) for k, v in (
                ("inputs", b.inputs), ("targets", b.targets), ("loss_mask", b.loss_mask))})
            total += -(logp * weight).sum().item()
            count += int(b.loss_mask.sum())
    nll = total / max(count, 1)
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": count, "texts": len(texts)}
