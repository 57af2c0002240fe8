"""Odds ratio preference optimisation: SFT on the chosen answers and a preference penalty, in one stage.

There is no reference model, so no reference pass and no cache: each step is one pass over the
pair batch, the chosen rows' NLL plus lambda times the odds-ratio loss (Hong et al. 2024).
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..recipe import option
from ..train.metrics import Metric
from .logprobs import chosen_nll, sequence_logps
from .pairs import PAIR_METRICS, ReferenceFree, pair_metrics


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, each branch where it keeps its digits (Maechler 2012); x is capped just
    below 0, where the answer is -inf (a response the model is certain of has infinite odds)."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -0.6931471805599453, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def odds_ratio_loss(chosen: mx.array, rejected: mx.array, chosen_tokens: mx.array, rejected_tokens: mx.array,
                    odds_ratio_weight: float) -> tuple[mx.array, dict]:
    """ORPO (Hong et al. 2024, eq. 6-7) from summed log-probs (B,) and response lengths (B,) of each pair:

        L = L_SFT + lambda * L_OR,  L_OR = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
        odds(y|x) = P(y|x) / (1 - P(y|x)),  log P(y|x) = (1/|y|) sum_t log p(y_t | x, y_<t)

    P is the length-normalised (mean per-token) probability, as in the paper's reference code, so
    log odds = log P - log(1 - P). L_SFT is the chosen answers' NLL per token over the batch; L_OR
    is averaged over pairs. Rewards are lambda * log P (TRL's convention, so margins compare).
    Returns (L, metrics): nll, log_odds (mean log odds ratio), odds_ratio_loss (mean L_OR) and the
    pair metrics.
    """
    mean_chosen = chosen / mx.maximum(chosen_tokens, 1)
    mean_rejected = rejected / mx.maximum(rejected_tokens, 1)
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
    or_loss = -nn.log_sigmoid(log_odds).mean()  # once: a second, equal mean broke mx.compile (MLX 0.32.4)
    nll = chosen_nll(chosen, chosen_tokens)
    metrics = pair_metrics(odds_ratio_weight * mean_chosen, odds_ratio_weight * mean_rejected, chosen, rejected)
    metrics.update(nll=nll, log_odds=log_odds.mean(), odds_ratio_loss=or_loss)
    return nll + odds_ratio_weight * or_loss, metrics


def make_loss(stage):
    """The orpo loss for a recipe stage: batch inputs (2B, T), chosen rows first -> (L, B pairs, metrics)."""
    weight = stage.options.odds_ratio_weight

    def loss(model, batch):
        logps, ntoks = sequence_logps(model, batch)
        B = logps.shape[0] // 2
        total, metrics = odds_ratio_loss(logps[:B], logps[B:], ntoks[:B], ntoks[B:], weight)
        return total, mx.array(B, dtype=mx.float32), metrics

    return loss


@dataclass(frozen=True)
class Options:
    odds_ratio_weight: float = option(0.1, min=0.0, doc="ORPO: lambda, the odds-ratio loss's weight beside the "
                                                        "chosen answers' NLL (the paper's 0.1)")


class ORPO(ReferenceFree):
    kind = "orpo"
    options = Options
    metrics = (*PAIR_METRICS[:3], Metric("nll", "NLL chosen", "{:.4f}"),
               Metric("log_odds", "log odds ratio", "{:+.3f}"),
               Metric("odds_ratio_loss", "odds-ratio loss", "{:.4f}"), *PAIR_METRICS[3:])
    heldout_rows = (("ORPO preference accuracy (odds of chosen > odds of rejected)", "preference_accuracy", "{:.1%}"),
                    ("mean log odds ratio, chosen over rejected", "log_odds", "{:+.3f}"),
                    ("NLL of the chosen answers (per token)", "nll", "{:.4f}"))

    def describe(self, stage):
        return "an orpo stage"

    def validate(self, stage, before, fail):
        super().validate(stage, before, fail)
        if stage.options.odds_ratio_weight <= 0:  # no preference term left, and its rewards (lambda log P) all 0
            raise fail("odds_ratio_weight", f"odds_ratio_weight = {stage.options.odds_ratio_weight!r} must be greater "
                       "than 0 (with 0 an orpo stage is SFT on the chosen answers)",
                       'try odds_ratio_weight = 0.1 (the paper\'s), or kind = "sft" on the chosen answers')

    def loss(self, stage):
        return make_loss(stage)


METHOD = ORPO()
