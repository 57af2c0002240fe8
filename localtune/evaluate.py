"""Task evaluation: greedy generation on a held-out set, scored by exact match."""
from __future__ import annotations

import re
import unicodedata

from mlx_lm.generate import batch_generate

from .data import Encoder
from .models import inference_weights


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def prompt_and_answer(row: dict) -> tuple[str, str]:
    if "messages" in row:
        msgs = row["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    return row["prompt"], row["completion"]


def generate(model, tokenizer, prompts: list, max_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy completions; a prompt is a string or a message list."""
    enc = Encoder(tokenizer)
    ids = [enc.prompt_tokens(p) if isinstance(p, str) else enc.template(p, add_generation_prompt=True)
           for p in prompts]
    model.eval()
    out = []
    with inference_weights(model):
        for i in range(0, len(ids), batch_size):
            out += batch_generate(model, tokenizer, ids[i:i + batch_size], max_tokens=max_tokens).texts
    return out


def exact_match(model, tokenizer, rows: list[dict], max_tokens: int, limit: int, format: str | None = None) -> dict:
    """Share of rows whose greedy answer equals the reference after whitespace/NFKC normalisation.

    With `format` (a regex), also the share of answers that are well-formed (fully match it).
    """
    rows = rows[:limit]
    pairs = [prompt_and_answer(r) for r in rows]
    answers = generate(model, tokenizer, [p for p, _ in pairs], max_tokens)
    hits = [normalize(a) == normalize(ref) for a, (_, ref) in zip(answers, pairs)]
    samples = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "expected": ref, "got": a}
               for (p, ref), a in zip(pairs[:5], answers[:5])]
    result = {"metric": "exact_match", "value": sum(hits) / len(hits), "n": len(hits), "samples": samples}
    if format:
        pattern = re.compile(format)
        result["format"] = format
        result["well_formed"] = sum(bool(pattern.fullmatch(normalize(a))) for a in answers) / len(answers)
    return result


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
