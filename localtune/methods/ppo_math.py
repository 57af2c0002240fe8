"""PPO's arithmetic, as small functions with the maths in their docstrings.

Shapes: (B, T) per-token arrays over a rollout batch, with `mask` (B, T) = 1 on response tokens.
These are the pieces the `ppo` stage is built from; the stage itself (rollouts inside the batch
iterator, the policy/value/reference sharing one base) is not wired in this version.
"""
from __future__ import annotations

import mlx.core as mx


def kl_penalty(logp: mx.array, ref_logp: mx.array, estimator: str = "k1") -> mx.array:
    """Per-token KL(pi || ref) estimate from log-probs of the sampled tokens (Schulman 2020):

    k1 = log pi - log ref                     (unbiased, can be negative)
    k3 = (r - 1) - log r,  r = ref / pi       (unbiased, always >= 0, lower variance)
    """
    if estimator == "k1":
        return logp - ref_logp
    log_r = ref_logp - logp
    return mx.exp(log_r) - 1 - log_r


def token_rewards(score: mx.array, kl: mx.array, mask: mx.array, kl_coef: float) -> mx.array:
    """r_t = -beta * KL_t on every response token, plus the sequence's score on its last one."""
    last = mx.cumsum(mask[:, ::-1], axis=1)[:, ::-1] == 1  # the last response token of each row
    last = last & (mask > 0)
    return (-kl_coef * kl + mx.where(last, score[:, None], 0.0)) * mask


def gae(rewards: mx.array, values: mx.array, mask: mx.array, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016), right to left:

    delta_t = r_t + gamma * V_{t+1} - V_t        (V_{t+1} = 0 after the last response token)
    A_t     = delta_t + gamma * lam * A_{t+1}
    returns_t = A_t + V_t
    Returns (advantages, returns), zero outside the mask.
    """
    B, T = rewards.shape
    adv, next_adv, next_value = [], mx.zeros((B,)), mx.zeros((B,))
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value * m - values[:, t]
        a = (delta + gamma * lam * next_adv) * m
        adv.append(a)
        next_adv = mx.where(m > 0, a, next_adv)
        next_value = mx.where(m > 0, values[:, t], next_value)
    advantages = mx.stack(adv[::-1], axis=1)
    return advantages, (advantages + values) * mask


def whiten(x: mx.array, mask: mx.array, shift_mean: bool = True) -> mx.array:
    """(x - mean) / std over the masked entries (the mean is kept when shift_mean is False)."""
    n = mx.maximum(mask.sum(), 1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    out = (x - mean) * mx.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def policy_loss(logp: mx.array, old_logp: mx.array, advantages: mx.array, mask: mx.array, clip: float = 0.2):
    """Clipped surrogate (Schulman et al. 2017), per token, averaged over the mask:

    ratio = exp(log pi - log pi_old)
    L = mean[ max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ]
    Returns (L, clip fraction, approx KL = mean[(ratio - 1) - log ratio]).
    """
    n = mx.maximum(mask.sum(), 1)
    log_ratio = logp - old_logp
    ratio = mx.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * mx.clip(ratio, 1 - clip, 1 + clip)
    loss = (mx.maximum(unclipped, clipped) * mask).sum() / n
    clipfrac = ((clipped > unclipped).astype(mx.float32) * mask).sum() / n
    approx_kl = (((ratio - 1) - log_ratio) * mask).sum() / n
    return loss, clipfrac, approx_kl


def value_loss(values: mx.array, old_values: mx.array, returns: mx.array, mask: mx.array, clip: float = 0.2):
    """Clipped value loss: 0.5 * mean[ max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) ].
    Returns (loss, share of tokens where the clipped term won)."""
    n = mx.maximum(mask.sum(), 1)
    clipped_v = old_values + mx.clip(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (clipped_v - returns) ** 2
    return 0.5 * (mx.maximum(a, b) * mask).sum() / n, ((b > a).astype(mx.float32) * mask).sum() / n


def explained_variance(values: mx.array, returns: mx.array, mask: mx.array) -> mx.array:
    """1 - Var[R - V] / Var[R] over the mask: 1 is a perfect critic, 0 no better than the mean."""
    n = mx.maximum(mask.sum(), 1)

    def var(x):
        mean = (x * mask).sum() / n
        return (((x - mean) * mask) ** 2).sum() / n

    return 1 - var(returns - values) / mx.maximum(var(returns), 1e-8)


class AdaptiveKL:
    """Ziegler et al. (2019): beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) * n / horizon)."""

    def __init__(self, beta: float, target: float | None, horizon: int = 10_000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target:
            error = max(-0.2, min(0.2, (kl - self.target) / self.target))
            self.beta *= 1 + error * n / self.horizon
        return self.beta
