"""GRPO's arithmetic and its variants' (Dr. GRPO, BNPO, DAPO, GSPO), as small functions with the maths
in their docstrings. The loss works on flat scored positions (K,) with `rows` (K,) naming each
position's completion, as methods/logprobs.py gives them; per-completion values are (N,).

    Shao et al. 2024, DeepSeekMath (GRPO)            arXiv:2402.03300
    Liu et al. 2025, Understanding R1-Zero (Dr. GRPO) arXiv:2503.20783
    Yu et al. 2025, DAPO                              arXiv:2503.14476
    Zheng et al. 2025, GSPO                           arXiv:2507.18071
"""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

LOSS_TYPES = ("grpo", "dr_grpo", "bnpo", "dapo")


def group_advantages(rewards: np.ndarray, group: int, scale: bool = True, eps: float = 1e-4) -> np.ndarray:
    """Outcome advantages, one per completion; completions i*group .. i*group+group-1 share a prompt.

    GRPO (Shao et al. 2024, sec. 4.1.2):  A_i = (r_i - mean(r)) / (std(r) + eps)
    Dr. GRPO (Liu et al. 2025, eq. 3):    A_i = r_i - mean(r)      (no std: it favours easy and hard prompts)

    mean and std are over the completion's group; std is the population one (divides by G).
    """
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    a = r - r.mean(1, keepdims=True)
    if scale:
        a = a / (r.std(1, keepdims=True) + eps)
    return a.reshape(-1).astype(np.float32)


def zero_variance(rewards: np.ndarray, group: int) -> np.ndarray:
    """(N / group,) bool: groups whose rewards are all equal, so every advantage in them is 0."""
    r = np.asarray(rewards).reshape(-1, group)
    return np.all(r == r[:, :1], axis=1)


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L_max = max_new_tokens and
    L_cache = buffer, added to the reward:

        0                                  |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
        -1                                 |y| > L_max
    """
    y = np.asarray(lengths, np.float64)
    free = max_new_tokens - buffer
    out = np.where(y <= free, 0.0, (free - y) / max(buffer, 1))
    return np.where(y > max_new_tokens, -1.0, out).astype(np.float32)


def segment_sum(x: mx.array, rows: mx.array, n: int) -> mx.array:
    """(n,) sums of x (K,) by completion."""
    return mx.zeros((n,), x.dtype).at[rows].add(x)


def k3(logp: mx.array, ref_logp: mx.array) -> mx.array:
    """Per-token KL(pi || ref) estimate (Schulman 2020), >= 0: exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return mx.exp(d) - d - 1


def policy_loss(logp: mx.array, old_logp: mx.array, advantages: mx.array, mask: mx.array, rows: mx.array,
                n: int, *, loss_type: str = "grpo", epsilon: float = 0.2, epsilon_high: float | None = None,
                level: str = "token", beta: float = 0.0, ref_logp: mx.array | None = None,
                max_new_tokens: int = 1):
    """The clipped objective of GRPO and its variants, as a loss to minimise. Per scored token t of
    completion i (Shao et al. 2024, eq. 3; PPO's clip with DAPO's decoupled range, Yu et al. eq. 8):

        ratio_t = pi(y_t) / pi_old(y_t)
        l_t = -min(ratio_t * A_i, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * KL_t

    KL_t is k3 to the reference (`ref_logp`: this stage's adapters off). With level = "sequence"
    (GSPO, Zheng et al. 2025, eq. 7) every token of completion i uses the sequence ratio
    s_i = exp(mean_t log(pi / pi_old)). The losses differ in how l_t is averaged:

        grpo      mean_i [ sum_t l_t / |y_i| ]            each completion counts equally (eq. 3)
        bnpo      sum_{i,t} l_t / sum_i |y_i|             every token counts equally (this micro-batch)
        dapo      the same, over the whole optimizer step (the loop weights micro-batches by tokens)
        dr_grpo   sum_{i,t} l_t / (N * max_new_tokens)    a constant: no length bias (Liu et al. eq. 3)

    Returns (loss, {"clip_frac", "kl" (when beta > 0), "ratio"}); `mask` (K,) is 0 on padding and on
    filtered completions, whose tokens count nowhere.
    """
    high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = logp - old_logp
    if level == "sequence":
        per_row = segment_sum(log_ratio * mask, rows, n) / mx.maximum(segment_sum(mask, rows, n), 1)
        log_ratio = per_row[rows]
    ratio = mx.exp(log_ratio)
    a = advantages[rows]
    per_token = -mx.minimum(ratio * a, mx.clip(ratio, 1 - epsilon, 1 + high) * a)
    kl = None
    if beta:
        kl = k3(logp, ref_logp)
        per_token = per_token + beta * kl
    tokens = mx.maximum(mask.sum(), 1)
    if loss_type == "grpo":
        lengths = segment_sum(mask, rows, n)
        per_row = segment_sum(per_token * mask, rows, n) / mx.maximum(lengths, 1)
        loss = per_row.sum() / mx.maximum((lengths > 0).sum(), 1)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (n * max_new_tokens)
    else:
        loss = (per_token * mask).sum() / tokens
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + high) & (a > 0))
    metrics = {"clip_frac": (clipped * mask).sum() / tokens, "ratio": (ratio * mask).sum() / tokens}
    if kl is not None:
        metrics["kl"] = (kl * mask).sum() / tokens
    return loss, metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased pass@k from n samples of which c pass: 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
