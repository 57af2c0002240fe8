"""Preference pairs: {"prompt", "chosen", "rejected"} rows encoded as two responses to one prompt,
and batched with the chosen rows first (the data of DPO, the reward model and the preference methods);
the metrics every pair method logs, and what the reference-free ones (ORPO, SimPO) share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from ..train import data
from ..train.metrics import Metric
from .base import Method

# ---------------------------------------------------------------------------------------------
# Data: {"prompt", "chosen", "rejected"}, each response a string or a list of messages.


@dataclass
class Pair:
    id: int
    chosen: data.Example
    rejected: data.Example
    margin: float = 0.0  # reward stages: how much better chosen must score (an optional "margin" column)

    @property
    def tokens(self):  # what length grouping sorts by
        return self.chosen.tokens if len(self.chosen.tokens) >= len(self.rejected.tokens) else self.rejected.tokens


@dataclass
class PairSet(data.Dataset):
    identical: int = 0  # pairs skipped because chosen == rejected


def _messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def response_example(enc: data.Encoder, prompt, response, where: str) -> data.Example:
    """Tokens of prompt + response; the loss mask covers the response only."""
    if not enc.has_template:
        if not (isinstance(prompt, str) and isinstance(response, str)):
            raise DataError(f"{where}: message lists need a chat template, and this tokenizer has none\n"
                            "  fix: write prompt, chosen and rejected as strings")
        return enc.completion(prompt, response)
    head = _messages(prompt, "user")
    tokens = enc.template(head + _messages(response, "assistant"))
    prefix = enc.template(head, add_generation_prompt=True)
    if tokens[: len(prefix)] != prefix:  # a template that rewrites the prompt: mask its assistant turns
        return enc.messages(head + _messages(response, "assistant"))
    mask = np.zeros(len(tokens), bool)
    mask[len(prefix):] = True
    return data.Example(np.array(tokens, np.int32), mask)


def encode_pairs(rows: list[dict], tokenizer, max_seq_len: int, source: str = "") -> PairSet:
    """Preference rows -> pairs; identical chosen/rejected are counted and skipped, never trained on."""
    enc = data.Encoder(tokenizer, mask_prompt=True)
    pairs, truncated, dropped, identical = [], 0, 0, 0
    for n, row in enumerate(rows, 1):
        where = f"{source}: row {n}"
        chosen = response_example(enc, row["prompt"], row["chosen"], where)
        rejected = response_example(enc, row["prompt"], row["rejected"], where)
        if np.array_equal(chosen.tokens, rejected.tokens):
            identical += 1
            continue
        cut = []
        for ex in (chosen, rejected):
            if len(ex.tokens) > max_seq_len:
                ex = data.Example(ex.tokens[:max_seq_len], ex.loss_mask[:max_seq_len])
            cut.append(ex)
        if any(len(a.tokens) < len(b.tokens) for a, b in zip(cut, (chosen, rejected))):
            truncated += 1
        if not all(ex.loss_mask[1:].any() for ex in cut):
            dropped += 1
            continue
        pairs.append(Pair(len(pairs), *cut, float(row.get("margin", 0.0))))
    if not pairs:
        raise DataError(f"{source}: no usable pairs ({identical} identical, {dropped} with no response left at "
                        f"max_seq_len={max_seq_len})\n  fix: check chosen/rejected differ, or raise max_seq_len")
    return PairSet(pairs, truncated, dropped, source, identical)


def collate_pairs(pairs: list[Pair]) -> data.Batch:
    """One batch for one forward pass: rows 0..B-1 are the chosen responses, B..2B-1 the rejected.

    When each pair's two rows start with the same prompt, the extras also hold the shared
    layout (see shared_logps): prompts (B, P) once, left-padded, and responses (2B, R).
    """
    batch = data.collate_examples([p.chosen for p in pairs] + [p.rejected for p in pairs])
    batch.extras["pair_ids"] = np.array([p.id for p in pairs], np.int32)
    batch.pairs = len(pairs)
    starts = [int(np.argmax(p.chosen.loss_mask)) for p in pairs]
    if all(n > 0 and np.array_equal(p.chosen.tokens[:n], p.rejected.tokens[:n]) and not p.rejected.loss_mask[:n].any()
           for p, n in zip(pairs, starts)):
        batch.extras.update(_shared_layout(pairs, starts))
    return batch


def _shared_layout(pairs: list[Pair], starts: list[int], multiple: int = 8) -> dict:
    B = len(pairs)
    P = -(-max(starts) // multiple) * multiple
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    R = -(-max(len(ex.tokens) - n for ex, n in zip(rows, starts * 2)) // multiple) * multiple
    prompt, real = np.zeros((B, P), np.int32), np.zeros((B, P), bool)
    response, mask = np.zeros((2 * B, R), np.int32), np.zeros((2 * B, R), np.float32)
    for i, (p, n) in enumerate(zip(pairs, starts)):
        prompt[i, P - n:], real[i, P - n:] = p.chosen.tokens[:n], True
    for r, (ex, n) in enumerate(zip(rows, starts * 2)):
        k = len(ex.tokens) - n
        response[r, :k], mask[r, :k] = ex.tokens[n:], ex.loss_mask[n:]
    return {"prompt": prompt, "prompt_real": real, "response": response, "response_mask": mask}


# ---------------------------------------------------------------------------------------------
# Metrics of a batch of pairs, and the methods that learn from pairs without a reference.

PAIR_METRICS = (Metric("pairs_per_sec", "pairs/s", "{:,.1f}"),
                Metric("reward_margin", "reward margin", "{:+.3f}"),
                Metric("preference_accuracy", "pref. accuracy", "{:.1%}"),
                Metric("rewards_chosen", "reward chosen", "{:+.3f}"),
                Metric("rewards_rejected", "reward rejected", "{:+.3f}"),
                Metric("logps_chosen", "logp chosen", "{:.2f}"),
                Metric("logps_rejected", "logp rejected", "{:.2f}"))


def pair_metrics(rewards_chosen, rewards_rejected, chosen, rejected) -> dict:
    """Means over the B pairs: each method's implicit rewards (B,) of both answers, their margin and how
    often chosen's is higher, and the summed log-probs (B,) of the answers under the model."""
    import mlx.core as mx

    return {"rewards_chosen": rewards_chosen.mean(), "rewards_rejected": rewards_rejected.mean(),
            "reward_margin": (rewards_chosen - rewards_rejected).mean(),
            "preference_accuracy": (rewards_chosen > rewards_rejected).astype(mx.float32).mean(),
            "logps_chosen": chosen.mean(), "logps_rejected": rejected.mean(),
            # does the model itself give chosen the higher likelihood?
            "policy_prefers_chosen": (chosen > rejected).astype(mx.float32).mean()}


class ReferenceFree(Method):
    """A pair method with no reference model: its loss reads the policy's log-probs alone, so any
    adapter type (full too) works. Held-out pairs are scored with the same loss before and after the
    stage; `heldout_rows` are the (label, metric) rows its report.md section shows."""

    formats = ("preference",)
    pairs = True
    shared_prompts = True  # the planner: a batch whose pairs share their prompt runs it once
    capability = "dpo"  # the support-matrix column of methods that score pairs' log-probs
    collate = staticmethod(collate_pairs)
    heldout_rows: tuple = ()

    def validate(self, stage, before, fail):
        from .dpo import refuse_packing

        refuse_packing(self.kind, stage, fail, "(pairs are batched together)")

    def setup(self, ctx):
        from .logprobs import check_shared_prompts

        check_shared_prompts(ctx.model, ctx.batches, ctx.note)
        return super().setup(ctx)

    def heldout(self, ctx, model):
        return ctx.evaluate(model) if ctx.evaluate else None

    def heldout_line(self, when, h):
        return (f"held-out pairs {when} the stage: {self.kind} preference accuracy {h['preference_accuracy']:.1%}, "
                f"chosen answer more likely {h['policy_prefers_chosen']:.1%}")

    def report(self, stage, r, run_path):
        if "heldout_before" not in r:
            return []
        before, after = r["heldout_before"], r["heldout_after"]
        rows = (("the model gives the chosen answer the higher likelihood", "policy_prefers_chosen", "{:.1%}"),
                *self.heldout_rows)
        return ["", f"## Preferences ({stage.name}, held-out pairs of `{stage.valid or 'the valid split'}`)", "",
                "| | before the stage | after |", "|---|---|---|",
                *(f"| {label} | {fmt.format(before[key])} | {fmt.format(after[key])} |" for label, key, fmt in rows)]
