"""Simple preference optimisation: DPO's sigmoid loss on length-normalised rewards, with a margin.

There is no reference model: the implicit reward is the policy's mean log-prob per token,
scaled by beta, so each step is one pass over the pair batch (Meng et al. 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..recipe import option
from .logprobs import chosen_nll, sequence_logps
from .pairs import PAIR_METRICS, ReferenceFree, pair_metrics


def simpo_loss(chosen: mx.array, rejected: mx.array, chosen_tokens: mx.array, rejected_tokens: mx.array,
               beta: float, gamma: float, sft_weight: float = 0.0) -> tuple[mx.array, dict]:
    """SimPO (Meng et al. 2024, eq. 6) from summed log-probs (B,) and response lengths (B,) of each pair:

        r(y|x) = beta / |y| * log pi(y|x)
        L = -log sigmoid(r(y_w|x) - r(y_l|x) - gamma)

    averaged over pairs, plus sft_weight times the chosen answers' NLL per token (CPO-SimPO's
    term; 0 is plain SimPO). At r_w = r_l the loss is log(1 + e^gamma). Returns (L, pair metrics).
    """
    rewards_chosen = beta * chosen / mx.maximum(chosen_tokens, 1)
    rewards_rejected = beta * rejected / mx.maximum(rejected_tokens, 1)
    total = -nn.log_sigmoid(rewards_chosen - rewards_rejected - gamma).mean()
    if sft_weight:
        total = total + sft_weight * chosen_nll(chosen, chosen_tokens)
    return total, pair_metrics(rewards_chosen, rewards_rejected, chosen, rejected)


def make_loss(stage):
    """The simpo loss for a recipe stage: batch inputs (2B, T), chosen rows first -> (L, B pairs, metrics)."""
    o = stage.options

    def loss(model, batch):
        logps, ntoks = sequence_logps(model, batch)
        B = logps.shape[0] // 2
        total, metrics = simpo_loss(logps[:B], logps[B:], ntoks[:B], ntoks[B:], o.beta, o.gamma, o.sft_weight)
        return total, mx.array(B, dtype=mx.float32), metrics

    return loss


@dataclass(frozen=True)
class Options:
    beta: float = option(2.0, min=0.0, doc="SimPO: scale of the length-normalised reward (the paper's 2.0 or 2.5)")
    gamma: float = option(0.6, min=0.0, doc="SimPO: the target reward margin (0.6 is 0.3 x beta 2.0; "
                                            "published 7-8B setups at beta 2.0 use gamma/beta 0.5-0.8)")
    sft_weight: float = option(0.0, min=0.0, doc="SimPO: weight of an NLL term on the chosen answers (CPO-SimPO)")


class SimPO(ReferenceFree):
    kind = "simpo"
    options = Options
    metrics = PAIR_METRICS
    heldout_rows = (("SimPO preference accuracy (mean log-prob per token of chosen > rejected)",
                     "preference_accuracy", "{:.1%}"),
                    ("SimPO reward margin (beta x mean log-prob per token, chosen - rejected)",
                     "reward_margin", "{:+.3f}"))

    def validate(self, stage, before, fail):
        super().validate(stage, before, fail)
        if stage.options.beta <= 0:
            raise fail("beta", f"beta = {stage.options.beta!r} must be greater than 0", "try beta = 2.0")

    def loss(self, stage):
        return make_loss(stage)


METHOD = SimPO()
