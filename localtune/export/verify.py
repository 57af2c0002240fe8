"""Verification: how far one model's next-token distributions are from another's, and llama.cpp
(llama-cpp-python) loading a GGUF file back and reproducing the MLX model's logits, tokens and greedy text.

f16 and q4_k_m are held to absolute limits (TOLERANCE); q8_0 and q4_0, which our own encoder writes,
to llama.cpp's own quantizer given the same f16 weights, with REFERENCE_SLACK. A GGUF LoRA adapter
(lora.py) is held to the two base models' distance with the same slack.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import LocaltuneError

# Prompts for the parity checks when a run has no held-out data of its own.
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "Date: 5 March 2021", "1, 2, 3, 5, 8, 13,"]


# ---------------------------------------------------------------------------------------------
# Parity: how far one model's next-token distributions are from another's.


@dataclass
class Parity:
    max_abs_logit: float
    mean_kl: float  # KL(reference || candidate), nats per position
    top1: float  # share of positions with the same argmax

    def row(self) -> str:
        return f"max |dlogit| {self.max_abs_logit:.4g} · mean KL {self.mean_kl:.3g} · top-1 {self.top1:.1%}"


def parity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Parity:
    """Compare per-prompt (T, V) logits position by position."""
    a = np.concatenate(reference).astype(np.float64)
    b = np.concatenate(candidate).astype(np.float64)
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return Parity(float(np.abs(a - b).max()), float(kl.mean()), float((a.argmax(-1) == b.argmax(-1)).mean()))


def mlx_logits(model, token_lists: list[list[int]]) -> list[np.ndarray]:
    out = []
    for tokens in token_lists:
        logits = model(mx.array(tokens)[None]).astype(mx.float32)
        out.append(np.array(logits[0]))
    return out


def prompt_tokens(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [list(tokenizer.encode(p)) for p in prompts]


# ---------------------------------------------------------------------------------------------
# Verify in llama.cpp

# f16 and q4_k_m (llama.cpp's own quantizer): absolute limits, llama.cpp vs the float MLX model,
# (max mean KL, min top-1 agreement). q8_0 and q4_0 (our encoder), and a LoRA adapter on its base:
# no further from MLX than a reference pair is (llama.cpp's own quantizer given the same f16 weights;
# the two bases without the adapter), by REFERENCE_SLACK: KL x 1.25 + 0.005, top-1 - 4 points.
TOLERANCE = {"f16": (1e-3, 0.98), "q4_k_m": (0.15, 0.80)}  # q4_k_m: gross errors only
REFERENCE_SLACK = (1.25, 0.005, 0.04)


def slack_limits(reference: Parity) -> tuple[float, float]:
    """(max mean KL, min top-1) for a candidate judged against `reference` with REFERENCE_SLACK."""
    factor, extra, points = REFERENCE_SLACK
    return reference.mean_kl * factor + extra, reference.top1 - points


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_greedy(llm, tokens: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy continuation, decoding one token at a time on its KV cache."""
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def greedy(next_logits, tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    for _ in range(n):
        out.append(int(np.argmax(next_logits(out)[-1])))
    return out[len(tokens):]


def open_llama(path, lora: Path | None = None):
    """llama.cpp on the GGUF at `path` (with a GGUF LoRA adapter, if given), keeping every position's logits."""
    from llama_cpp import Llama

    # an F32 KV cache: the default F16 one alone limits agreement to about 1e-3
    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, logits_all=True,
                 verbose=False, n_threads=os.cpu_count() or 2, type_k=0, type_v=0)


def reference_quantization(model, config, tokenizer_folder: Path, quant: str, tokens) -> Parity:
    """How far llama.cpp's own quantizer lands from the MLX model, from the same f16 weights."""
    import gguf

    from .gguf import llama_quantizer, write_gguf

    with tempfile.TemporaryDirectory() as tmp:
        f16, ref = Path(tmp) / "f16.gguf", Path(tmp) / f"{quant}.gguf"
        write_gguf(model, config, tokenizer_folder, f16, "f16", "reference")
        ftype = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
        llama_quantizer()(f16, ref, ftype)
        llm = open_llama(ref)
        return parity(mlx_logits(model, tokens), [llama_logits(llm, t) for t in tokens])


def verify_gguf(path: str | Path, model, tokenizer, quant: str, config: dict | None = None,
                tokenizer_folder: Path | None = None, n_generate: int = 16, report=print,
                original: Path | None = None) -> dict:
    """Load `path` in llama.cpp; compare tokens, logits and greedy text with the MLX model, and
    the tokens with llama.cpp's of `original` (the GGUF the base was imported from), if given.

    Prints a table; raises LocaltuneError when a check is beyond the type's tolerance.
    """
    from ..models.tokenizer_check import LlamaVocab, compare

    try:
        llm = open_llama(path)
    except ImportError:
        raise LocaltuneError("--verify needs llama-cpp-python\n  fix: pip install 'localtune[dev]'") from None
    tokenizer_check = compare(LlamaVocab.of(llm), tokenizer, original)
    tokens = prompt_tokens(tokenizer, PROMPTS)
    result = parity(mlx_logits(model, tokens), [llama_logits(llm, t) for t in tokens])
    same_text = 0
    for t in tokens:
        ours = greedy(lambda seq: np.array(model(mx.array(seq)[None])[0].astype(mx.float32)), t, n_generate)
        theirs = llama_greedy(llm, t, n_generate)
        same_text += ours == theirs
    if quant in TOLERANCE:
        max_kl, min_top1 = TOLERANCE[quant]
        against = "limit"
    else:
        ref = reference_quantization(model, config, tokenizer_folder, quant, tokens)
        max_kl, min_top1 = slack_limits(ref)
        against = f"limit (llama.cpp's own {quant}: KL {ref.mean_kl:.3g}, top-1 {ref.top1:.1%})"
    rows = [("mean KL (nats/token)", f"{result.mean_kl:.3g}", f"<= {max_kl:.3g}"),
            ("top-1 agreement", f"{result.top1:.1%}", f">= {min_top1:.1%}"),
            ("max logit difference", f"{result.max_abs_logit:.4g}", ""),
            (f"greedy {n_generate} tokens identical", f"{same_text}/{len(tokens)} prompts",
             "all" if quant == "f16" else ""),
            *tokenizer_check.rows]
    report(f"llama.cpp vs MLX, {quant}, {len(tokens)} prompts:")
    report(f"| check | llama.cpp | {against} |\n|---|---|---|")
    for row in rows:
        report("| " + " | ".join(row) + " |")
    problems = tokenizer_check.problems[:3]  # the first few say enough
    if result.mean_kl > max_kl or result.top1 < min_top1:
        problems.append(f"mean KL {result.mean_kl:.3g} / top-1 {result.top1:.1%} is beyond {quant}'s tolerance "
                        f"(KL <= {max_kl:.3g}, top-1 >= {min_top1:.1%})")
    if quant == "f16" and same_text < len(tokens):
        problems.append(f"greedy text differs on {len(tokens) - same_text} prompts (f16 must match)")
    if problems:
        raise LocaltuneError(f"{path}: llama.cpp does not reproduce the model (the file was removed):\n  "
                             + "\n  ".join(problems))
    return {"quant": quant, **result.__dict__, "greedy_identical": same_text, "prompts": len(tokens),
            "max_kl": max_kl, "min_top1": min_top1, "tokenizer": tokenizer_check.to_dict()}


