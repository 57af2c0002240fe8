"""Supervised fine-tuning: masked next-token cross-entropy."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

METRICS = ("loss", "tokens_per_sec", "lr")


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


def logits(model, batch) -> mx.array:
    """(B, T, V) logits for batch["inputs"] (B, T); packed rows get a block-diagonal mask."""
    if "segments" in batch:
        return model(batch["inputs"], cache=[_PackedMask(batch["segments"])] * len(model.layers))
    return model(batch["inputs"])


def loss(model, batch):
    """Mean cross-entropy over target tokens.

    L = -sum_{b,t} m[b,t] * log p(y[b,t] | x[b,:t+1]) / sum m
    inputs, targets (B, T) int32 · loss_mask m (B, T). Returns (L, sum m, {}).
    """
    ce = nn.losses.cross_entropy(logits(model, batch).astype(mx.float32), batch["targets"])
    mask = batch["loss_mask"]
    ntoks = mask.sum()
    return (ce * mask).sum() / mx.maximum(ntoks, 1), ntoks, {}
