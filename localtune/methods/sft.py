"""Supervised fine-tuning: masked next-token cross-entropy."""
from __future__ import annotations

import mlx.core as mx

from .base import TEXT_FORMATS, Method
from .logprobs import target_logprobs


def loss(model, batch):
    """Mean cross-entropy over target tokens.

    L = -sum_k w_k * log p(y_k | x_{<k}) / sum_k w_k
    over the scored positions k (see logprobs.target_logprobs) · returns (L, sum w, {}).
    """
    logp, weight = target_logprobs(model, batch)
    ntoks = weight.sum()
    return -(logp * weight).sum() / mx.maximum(ntoks, 1), ntoks, {}



class SFT(Method):
    """Rows of text and the masked cross-entropy above: `Method`'s defaults do the rest."""

    kind = "sft"
    init_for = TEXT_FORMATS  # chat, instruction, prompt/completion and text rows

    def loss(self, stage):
        return loss


METHOD = SFT()
