"""Supervised fine-tuning: masked next-token cross-entropy."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

METRICS = ("loss", "tokens_per_sec", "lr")

# Architectures whose logits are exactly head(model.model(inputs)): no soft-capping or logit scaling.
_PLAIN_HEAD = ("llama", "mistral", "qwen2", "qwen3")


class _PackedMask:
    """Stands in for mlx-lm's per-layer KV cache to hand the model a block-diagonal mask.

    Packed examples must not attend to each other. RoPE makes attention depend only on
    relative position, so with this mask a packed example sees exactly what it would
    see alone (no position reset needed).
    """

    offset = 0

    def __init__(self, segments: mx.array):
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        T = segments.shape[1]
        causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
        self.mask = (same & causal)[:, None]  # (B, 1, T, T)

    def make_mask(self, N, return_array=False, window_size=None):
        if window_size is None:
            return self.mask
        idx = mx.arange(N)
        return self.mask & ((idx[:, None] - idx[None]) < window_size)

    def update_and_fetch(self, keys, values):
        return keys, values


def _cache(model, batch):
    return [_PackedMask(batch["segments"])] * len(model.layers) if "segments" in batch else None


def _head(model):
    """The output projection, when logits are exactly head(model.model(x)); else None."""
    if getattr(model, "model_type", None) not in _PLAIN_HEAD:
        return None
    if "lm_head" in model:
        return model.lm_head
    return model.model.embed_tokens.as_linear


def logits(model, batch) -> mx.array:
    """(B, T, V) logits for batch["inputs"] (B, T); packed rows get a block-diagonal mask."""
    return model(batch["inputs"], cache=_cache(model, batch))


def target_logits(model, batch) -> tuple[mx.array, mx.array, mx.array]:
    """Scored logits (K, V), targets (K,) and weights (K,).

    The vocabulary projection is a large share of a small model's compute, and with
    prompt masking most positions are never scored. When the batch carries
    `target_index` (K,), flat positions into (B*T) padded with weight-0 entries to a
    bucketed K, only those K hidden states go through the head; otherwise all B*T do.
    """
    head = _head(model)
    if "target_index" not in batch or head is None:
        scores = logits(model, batch)
        flat = scores.reshape(-1, scores.shape[-1])
        if "target_index" not in batch:
            return flat, batch["targets"].reshape(-1), batch["loss_mask"].reshape(-1)
        index = batch["target_index"]
        return flat[index], batch["targets"].reshape(-1)[index], batch["target_weight"]
    index = batch["target_index"]
    hidden = model.model(batch["inputs"], _cache(model, batch))  # (B, T, H)
    scores = head(hidden.reshape(-1, hidden.shape[-1])[index])
    return scores, batch["targets"].reshape(-1)[index], batch["target_weight"]


def loss(model, batch):
    """Mean cross-entropy over target tokens.

    L = -sum_k w_k * log p(y_k | x_{<k}) / sum_k w_k
    over the scored positions k (see target_logits) · returns (L, sum w, {}).
    """
    scores, targets, weight = target_logits(model, batch)
    ce = nn.losses.cross_entropy(scores.astype(mx.float32), targets)
    ntoks = weight.sum()
    return (ce * weight).sum() / mx.maximum(ntoks, 1), ntoks, {}
