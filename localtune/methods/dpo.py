"""Direct preference optimisation: learn from "chosen is better than rejected" pairs.

The reference model is the model as the stage found it: this stage's LoRA adapters switched
off (scale 0), with earlier stages' adapters fused in. Its log-probabilities come with each
batch (the batch iterator attaches them, from a once-per-stage cache or computed on the spot),
so the loss is a few lines and the training loop is the same as SFT's.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import data
from ..adapters import adapters_disabled, save_arrays
from ..errors import DataError
from .logprobs import target_logprobs

# ---------------------------------------------------------------------------------------------
# Data: {"prompt", "chosen", "rejected"}, each response a string or a list of messages.


@dataclass
class Pair:
    id: int
    chosen: data.Example
    rejected: data.Example

    @property
    def tokens(self):  # what length grouping sorts by
        return self.chosen.tokens if len(self.chosen.tokens) >= len(self.rejected.tokens) else self.rejected.tokens


@dataclass
class PairSet(data.Dataset):
    identical: int = 0  # pairs skipped because chosen == rejected


def _messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _response(enc: data.Encoder, prompt, response, where: str) -> data.Example:
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
        chosen = _response(enc, row["prompt"], row["chosen"], where)
        rejected = _response(enc, row["prompt"], row["rejected"], where)
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
        pairs.append(Pair(len(pairs), *cut))
    if not pairs:
        raise DataError(f"{source}: no usable pairs ({identical} identical, {dropped} with no response left at "
                        f"max_seq_len={max_seq_len})\n  fix: check chosen/rejected differ, or raise max_seq_len")
    return PairSet(pairs, truncated, dropped, source, identical)


def collate_pairs(pairs: list[Pair]) -> data.Batch:
    """One batch for one forward pass: rows 0..B-1 are the chosen responses, B..2B-1 the rejected."""
    batch = data._collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
    batch.extras["pair_ids"] = np.array([p.id for p in pairs], np.int32)
    batch.pairs = len(pairs)
    return batch


# ---------------------------------------------------------------------------------------------
# Log-probabilities of whole responses.


def sequence_logps(model, batch) -> tuple[mx.array, mx.array]:
    """Summed log p(response) per row (R,) and the number of response tokens per row (R,).

    log p(y | x) = sum_t mask_t * log p(y_t | x, y_<t) over the response tokens of each row.
    """
    R, T = batch["inputs"].shape
    logp, weight = target_logprobs(model, batch)  # (K,) flat positions
    rows = batch["target_index"] // T if "target_index" in batch else mx.arange(R * T) // T
    zeros = mx.zeros((R,), dtype=mx.float32)
    return zeros.at[rows].add(logp * weight), zeros.at[rows].add(weight)


def reference_logps(model, batch) -> tuple[mx.array, mx.array]:
    """(chosen, rejected) summed log-probs under the reference: this stage's adapters off."""
    with adapters_disabled(model):
        logps, _ = sequence_logps(model, batch)
    B = logps.shape[0] // 2
    return mx.stop_gradient(logps[:B]), mx.stop_gradient(logps[B:])


# ---------------------------------------------------------------------------------------------
# Losses: each takes h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) per pair.


def sigmoid_loss(h: mx.array, beta: float, label_smoothing: float = 0.0) -> mx.array:
    """DPO (Rafailov et al. 2023), with conservative DPO's label noise eps:

    L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h).
    At h = 0 (policy = reference) L = log 2.
    """
    return -(1 - label_smoothing) * nn.log_sigmoid(beta * h) - label_smoothing * nn.log_sigmoid(-beta * h)


def ipo_loss(h: mx.array, beta: float) -> mx.array:
    """IPO (Azar et al. 2023): L = (h - 1 / (2 * beta))^2, a squared loss that does not saturate."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: mx.array, beta: float) -> mx.array:
    """SLiC-style hinge: L = max(0, 1 - beta * h)."""
    return nn.relu(1 - beta * h)


def make_loss(stage):
    """The dpo loss for a recipe stage (beta, loss_type, label_smoothing, sft_weight)."""
    beta, kind, eps, sft_weight = stage.beta, stage.loss_type, stage.label_smoothing, stage.sft_weight

    def loss(model, batch):
        """Mean over pairs of the chosen loss of h, plus sft_weight * the chosen responses' NLL per token (RPO).

        batch: inputs (2B, T), chosen rows first · reference_chosen, reference_rejected (B,).
        Returns (L, B, metrics): rewards are beta * (log pi - log ref) per response.
        """
        logps, ntoks = sequence_logps(model, batch)
        B = logps.shape[0] // 2
        chosen, rejected = logps[:B], logps[B:]
        chosen_ratio = chosen - batch["reference_chosen"]
        rejected_ratio = rejected - batch["reference_rejected"]
        h = chosen_ratio - rejected_ratio
        if kind == "sigmoid":
            losses = sigmoid_loss(h, beta, eps)
        elif kind == "ipo":
            losses = ipo_loss(h, beta)
        else:
            losses = hinge_loss(h, beta)
        total = losses.mean()
        if sft_weight:
            total = total + sft_weight * (-chosen.sum() / mx.maximum(ntoks[:B].sum(), 1))
        rewards_chosen, rewards_rejected = beta * chosen_ratio, beta * rejected_ratio
        metrics = {"rewards_chosen": rewards_chosen.mean(), "rewards_rejected": rewards_rejected.mean(),
                   "reward_margin": (rewards_chosen - rewards_rejected).mean(),
                   "preference_accuracy": (rewards_chosen > rewards_rejected).astype(mx.float32).mean(),
                   "logps_chosen": chosen.mean(), "logps_rejected": rejected.mean(),
                   # does the model itself (and did the reference) give chosen the higher likelihood?
                   "policy_prefers_chosen": (chosen > rejected).astype(mx.float32).mean(),
                   "reference_prefers_chosen": (batch["reference_chosen"] > batch["reference_rejected"]
                                                ).astype(mx.float32).mean()}
        return total, mx.array(B, dtype=mx.float32), metrics

    return loss


# ---------------------------------------------------------------------------------------------
# Batches that carry the reference's log-probs.


class ReferenceCache:
    """Reference log-probs of every pair, computed in one pass and kept in the stage folder.

    The file records a fingerprint of the pairs, so a resumed run reuses it and changed data
    does not.
    """

    def __init__(self, chosen: np.ndarray, rejected: np.ndarray):
        self.chosen, self.rejected = chosen, rejected

    @staticmethod
    def fingerprint(pairs: PairSet) -> str:
        h = hashlib.sha256()
        for p in pairs.examples:
            for ex in (p.chosen, p.rejected):
                h.update(ex.tokens.tobytes())
                h.update(ex.loss_mask.tobytes())
        return h.hexdigest()

    @classmethod
    def build(cls, model, pairs: PairSet, path: Path, batch_size: int) -> "ReferenceCache":
        from ..trainer import _to_mx

        key = cls.fingerprint(pairs)
        if path.exists():
            arrays, meta = mx.load(str(path), return_metadata=True)
            if json.loads(meta.get("localtune", "{}")).get("fingerprint") == key:
                return cls(np.array(arrays["chosen"]), np.array(arrays["rejected"]))
        n = len(pairs)
        chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
        order = sorted(range(n), key=lambda i: len(pairs.examples[i].tokens))  # little padding
        for start in range(0, n, batch_size):
            group = [pairs.examples[i] for i in order[start:start + batch_size]]
            c, r = reference_logps(model, _to_mx(collate_pairs(group)))
            mx.eval(c, r)
            ids = [p.id for p in group]
            chosen[ids], rejected[ids] = np.array(c), np.array(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_arrays(path, {"chosen": mx.array(chosen), "rejected": mx.array(rejected)},
                    {"localtune": json.dumps({"fingerprint": key, "pairs": n})})
        return cls(chosen, rejected)


class WithReference:
    """Wraps pair batches and attaches reference_chosen / reference_rejected (B,) to each.

    From the cache when there is one; otherwise computed now, with this stage's adapters off.
    """

    def __init__(self, batches, model, cache: ReferenceCache | None):
        self.batches, self.model, self.cache = batches, model, cache

    def __iter__(self):
        return self

    def __next__(self) -> data.Batch:
        return self.attach(next(self.batches))

    def attach(self, batch: data.Batch) -> data.Batch:
        ids = batch.extras["pair_ids"]
        if self.cache is not None:
            chosen, rejected = self.cache.chosen[ids], self.cache.rejected[ids]
        else:
            from ..trainer import _to_mx

            c, r = reference_logps(self.model, _to_mx(batch))
            mx.eval(c, r)
            chosen, rejected = np.array(c), np.array(r)
        batch.extras["reference_chosen"], batch.extras["reference_rejected"] = chosen, rejected
        return batch

    # the trainer's cursor protocol
    def state(self):
        return self.batches.state()

    def restore(self, state):
        self.batches.restore(state)

    @property
    def batches_per_epoch(self):
        return self.batches.batches_per_epoch


# Pairs per forward pass when caching: no gradients are kept, and on CPU each pass pays a fixed
# cost to dequantize a quantized base, so larger batches make the one pass much cheaper.
CACHE_BATCH = 32


def use_cache(stage, n_pairs: int, steps: int) -> bool:
    """A cache costs one reference forward per pair; live costs one per pair per visit.

    "auto" caches when training visits at least as many pairs as there are.
    """
    if stage.reference != "auto":
        return stage.reference == "precomputed"
    return steps * stage.batch_size * stage.grad_accum >= n_pairs


collate = collate_pairs


def setup(model, stage, batches, valid, steps, stage_dir, note):
    """(loss, batches carrying reference log-probs, fixed validation batches) for the one loop."""
    import time

    cache = None
    if use_cache(stage, len(batches.dataset), steps):
        t = time.perf_counter()
        cache = ReferenceCache.build(model, batches.dataset, Path(stage_dir) / "reference_logps.safetensors",
                                     max(stage.batch_size, CACHE_BATCH))
        note(f"reference log-probs of {len(batches.dataset)} pairs ready in {time.perf_counter() - t:.1f}s "
             "(cached in the stage folder)")
    valid_batches = None
    if valid:
        live = WithReference(None, model, None)
        valid_batches = [live.attach(b) for b in data.eval_batches(valid, stage.batch_size, stage.eval_batches,
                                                                    collate_pairs)]
    return make_loss(stage), WithReference(batches, model, cache), valid_batches
