"""Reward model: the model plus LoRA plus a scalar head, trained on preference pairs.

r(x, y) = w . h(x, y) + b, where h is the final hidden state (after the last norm) at the last
non-pad token of prompt + response. The stage is a branch: when it ends, its adapters and head
come off the model, and the chain goes on from the model as the stage found it. A later stage
(PPO) or `localtune score` loads it by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..recipe import option
from ..train import data
from ..train.metrics import Metric
from .base import Method
from .pairs import collate_pairs


def attach_head(model) -> nn.Module:
    """A trainable scalar head on the model (saved with the adapters as reward_head.*)."""
    hidden = model.model.norm.weight.shape[0]
    head = nn.Linear(hidden, 1)
    head.weight = mx.zeros_like(head.weight)  # every reward starts at 0: the loss starts at log 2
    head.bias = mx.zeros_like(head.bias)
    model.reward_head = head
    return head


def rewards(model, tokens: mx.array, real: mx.array, head: nn.Module | None = None) -> mx.array:
    """(R,) scalar rewards: the head (model.reward_head unless given) on the hidden state of each
    row's last real token (R, T)."""
    hidden = model.model(tokens)  # (R, T, H)
    last = real.astype(mx.int32).sum(-1) - 1
    h = mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return (model.reward_head if head is None else head)(h.astype(mx.float32))[:, 0]


def collate(pairs) -> data.Batch:
    """Pairs as whole sequences (chosen rows, then rejected), their real-token masks, and margins."""
    batch = collate_pairs(pairs)
    tokens, real = whole([p.chosen for p in pairs] + [p.rejected for p in pairs])
    batch.extras = {"tokens": tokens, "real": real, "margin": np.array([p.margin for p in pairs], np.float32)}
    return batch


def whole(examples) -> tuple[np.ndarray, np.ndarray]:
    """(R, T) token ids of whole examples, right-padded, and where they are real."""
    width = -(-max(len(e.tokens) for e in examples) // 8) * 8
    tokens, real = np.zeros((len(examples), width), np.int32), np.zeros((len(examples), width), bool)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)], real[i, : len(e.tokens)] = e.tokens, True
    return tokens, real


def make_loss(centering: float = 0.0):
    def loss(model, batch):
        """Bradley-Terry (Ouyang et al. 2022), with an optional margin m per pair and reward
        centring (Eisenstein et al. 2023):

            d = r(x, y_w) - r(x, y_l)
            L = mean[ -log sigmoid(d - m) ] + c * mean[ (r(x, y_w) + r(x, y_l))^2 ]

        returns (L, pairs, {accuracy: share of d > 0, margin: mean d}).
        """
        r = rewards(model, batch["tokens"], batch["real"])
        B = r.shape[0] // 2
        d = r[:B] - r[B:]
        value = nn.softplus(batch["margin"] - d).mean()  # -log sigmoid(z) = softplus(-z)
        if centering:
            value = value + centering * ((r[:B] + r[B:]) ** 2).mean()
        return value, mx.array(B, mx.float32), {"accuracy": (d > 0).astype(mx.float32).mean(), "margin": d.mean()}

    return loss


def score(model, examples: list, batch_size: int = 16) -> list[float]:
    """r(x, y) for each encoded prompt + response, in order (no gradients)."""
    out = []
    model.eval()
    for i in range(0, len(examples), batch_size):
        tokens, real = whole(examples[i:i + batch_size])
        out += np.array(rewards(model, mx.array(tokens), mx.array(real))).tolist()
    return out


def margins(model, pairs, batch_size: int = 16) -> np.ndarray:
    """d = r(chosen) - r(rejected) for every pair, in order (no gradients)."""
    out = []
    model.eval()
    for i in range(0, len(pairs), batch_size):
        b = collate(pairs[i:i + batch_size])
        r = rewards(model, mx.array(b.extras["tokens"]), mx.array(b.extras["real"]))
        B = r.shape[0] // 2
        out.append(np.array(r[:B] - r[B:]))
    return np.concatenate(out)


def margin_summary(d: np.ndarray) -> dict:
    """Held-out pair accuracy and the reward-margin distribution."""
    q = np.quantile(d, [0.1, 0.5, 0.9])
    return {"pair_accuracy": float((d > 0).mean()), "margin_mean": float(d.mean()), "margin_std": float(d.std()),
            "margin_p10": float(q[0]), "margin_p50": float(q[1]), "margin_p90": float(q[2]), "pairs": int(len(d))}


@dataclass(frozen=True)
class Options:
    reward_centering: float = option(0.0, min=0.0, doc="reward: weight of the (r_w + r_l)^2 centring term")


class Reward(Method):
    kind = "reward"
    options = Options
    formats = ("preference",)
    pairs = True
    lm_head = False
    branch = True
    scores = True
    capability = "ppo"
    collate = staticmethod(collate)
    metrics = (Metric("accuracy", "pair accuracy", "{:.1%}"), Metric("margin", "reward margin", "{:+.3f}"))

    def validate(self, stage, before, fail):
        if stage.adapter.type == "full":
            raise fail("adapter.type", "a reward stage is a branch: its adapters come off when it ends, which full "
                       "fine-tuning cannot do", 'use type = "lora" or "dora"')

    def heads(self, model):
        attach_head(model)
        return {"reward_head": True}

    def load_heads(self, model):
        attach_head(model)

    def loss(self, stage):
        return make_loss(stage.options.reward_centering)

    def after(self, ctx, summary):
        """Held-out pair accuracy and margins; then the adapters and head come off (a branch)."""
        from ..train import adapters

        if ctx.valid:
            h = summary["heldout"] = margin_summary(margins(ctx.model, ctx.valid.examples))
            ctx.report(ctx.run.log(ctx.stage.name, ctx.steps, "event", event="info", message=(
                f"held-out pairs: accuracy {h['pair_accuracy']:.1%}, reward margin {h['margin_mean']:+.3f} "
                f"± {h['margin_std']:.3f} (p10 {h['margin_p10']:+.3f}, p90 {h['margin_p90']:+.3f})")))
        adapters.detach(ctx.model)

    def report(self, stage, result, run_path):
        h = result.get("heldout")
        if not h:
            return []
        return ["", f"## Reward model ({stage.name}, {h['pairs']} held-out pairs of "
                f"`{stage.valid or 'the valid split'}`)",
                "", "| pair accuracy | margin mean | std | p10 | median | p90 |", "|---|---|---|---|---|---|",
                f"| {h['pair_accuracy']:.1%} | {h['margin_mean']:+.3f} | {h['margin_std']:.3f} | "
                f"{h['margin_p10']:+.3f} | {h['margin_p50']:+.3f} | {h['margin_p90']:+.3f} |", "",
                f"The margin is r(chosen) - r(rejected). Score rows with `localtune score --reward "
                f"{run_path / stage.name} --data FILE.jsonl`."]


METHOD = Reward()
