"""Direct preference optimisation: learn from "chosen is better than rejected" pairs.

The reference model is the model as the stage found it: this stage's adapters switched off
(adapters.adapters_disabled), with earlier stages' adapters fused in (float base) or stacked
underneath (quantized base). Its log-probabilities come with each batch from a once-per-stage
cache, or the loss computes them in the same compiled step, so the loss is a few lines and the
training loop is the same as SFT's.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..recipe import option
from ..run.damage import DamagedFile, load_safetensors
from ..train import data
from ..train.adapters import adapters_disabled, save_arrays
from .base import Method
from .logprobs import check_shared_prompts, chosen_nll, sequence_logps
from .pairs import PAIR_METRICS, Pair, PairSet, collate_pairs, encode_pairs, pair_metrics  # noqa: F401  (Pair)

# ---------------------------------------------------------------------------------------------
# Log-probabilities of whole responses.


def reference_logps(model, batch) -> tuple[mx.array, mx.array]:
    """(chosen, rejected) summed log-probs under the reference: this stage's adapters off."""
    with adapters_disabled(model):
        logps, _ = sequence_logps(model, batch)
    B = logps.shape[0] // 2
    return mx.stop_gradient(logps[:B]), mx.stop_gradient(logps[B:])


def batch_references(model, batch) -> tuple[mx.array, mx.array]:
    """The reference log-probs of a batch's two halves: attached by `WithReference`, else a reference
    pass here, in the loss's own graph."""
    if "reference_chosen" in batch:
        return batch["reference_chosen"], batch["reference_rejected"]
    return reference_logps(model, batch)


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
    o = stage.options
    beta, kind, eps, sft_weight = o.beta, o.loss_type, o.label_smoothing, o.sft_weight

    def loss(model, batch):
        """Mean over pairs of the chosen loss of h, plus sft_weight * the chosen responses' NLL per token (RPO).

        batch: inputs (2B, T), chosen rows first · reference_chosen, reference_rejected (B,), from
        the batch iterator; without them the reference pass runs here, in the same graph.
        Returns (L, B, metrics): rewards are beta * (log pi - log ref) per response.
        """
        ref_chosen, ref_rejected = batch_references(model, batch)
        logps, ntoks = sequence_logps(model, batch)
        B = logps.shape[0] // 2
        chosen, rejected = logps[:B], logps[B:]
        chosen_ratio = chosen - ref_chosen
        rejected_ratio = rejected - ref_rejected
        h = chosen_ratio - rejected_ratio
        if kind == "sigmoid":
            losses = sigmoid_loss(h, beta, eps)
        elif kind == "ipo":
            losses = ipo_loss(h, beta)
        else:
            losses = hinge_loss(h, beta)
        total = losses.mean()
        if sft_weight:
            total = total + sft_weight * chosen_nll(chosen, ntoks[:B])
        metrics = pair_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen, rejected)
        # did the reference give chosen the higher likelihood? (the report's "before")
        metrics["reference_prefers_chosen"] = (ref_chosen > ref_rejected).astype(mx.float32).mean()
        return total, mx.array(B, dtype=mx.float32), metrics

    return loss


# ---------------------------------------------------------------------------------------------
# Batches that carry the reference's log-probs.


class ReferenceCache:
    """Reference log-probs per pair, computed in no-gradient passes of `batch_size` pairs.

    A pass is cheaper per pair than a reference forward inside each training step (a larger
    batch, rows sorted by length, no graph kept for the backward pass). `fill(ids)` computes
    the missing ones among `ids`; no pair is computed twice. The file in the stage folder records
    a fingerprint of the pairs: a resumed run reuses it, changed data does not.
    """

    def __init__(self, model, pairs: PairSet, path: Path, batch_size: int):
        self.model, self.pairs, self.path, self.batch_size = model, pairs, Path(path), batch_size
        n = len(pairs)
        self.chosen, self.rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self.known = np.zeros(n, bool)
        self.lengths = np.array([len(p.chosen.tokens) + len(p.rejected.tokens) for p in pairs.examples])
        self.key, self.passes, self.dirty = self.fingerprint(pairs), 0, False
        self.damage = None  # what was wrong with a cache file that was found and not trusted
        if self.path.exists():
            try:
                arrays, meta = load_safetensors(self.path, "", metadata=True)
                if json.loads(meta.get("localtune", "{}")).get("fingerprint") == self.key:
                    chosen, rejected = np.array(arrays["chosen"]), np.array(arrays["rejected"])
                    known = np.array(arrays["known"]).astype(bool) if "known" in arrays else ~self.known
                    if not chosen.shape == rejected.shape == known.shape == (n,):
                        raise ValueError(f"arrays of {chosen.shape} for {n} pairs")
                    self.chosen, self.rejected, self.known = chosen, rejected, known
            except (DamagedFile, KeyError, ValueError) as e:  # computed again, never trusted
                self.damage = f"{self.path}: {getattr(e, 'problem', None) or repr(e)}"

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
        """Every pair, shortest first, saved."""
        cache = cls(model, pairs, path, batch_size)
        cache.fill()
        return cache

    def fill(self, ids=None) -> None:
        """Compute the missing pairs among `ids` (default: all, shortest first), in passes."""
        from ..train.trainer import to_mx

        if ids is None:
            ids = np.argsort(self.lengths, kind="stable")
        missing = [i for i in dict.fromkeys(int(i) for i in ids) if not self.known[i]]
        for start in range(0, len(missing), self.batch_size):
            chunk = sorted(missing[start:start + self.batch_size], key=lambda i: self.lengths[i])
            c, r = reference_logps(self.model, to_mx(collate_pairs([self.pairs.examples[i] for i in chunk])))
            mx.eval(c, r)
            self.chosen[chunk], self.rejected[chunk], self.known[chunk] = np.array(c), np.array(r), True
            self.passes, self.dirty = self.passes + 1, True
        if self.dirty and self.known.all():
            self.save()

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_arrays(self.path, {"chosen": mx.array(self.chosen), "rejected": mx.array(self.rejected),
                                    "known": mx.array(self.known.astype(np.uint8))},
                        {"localtune": json.dumps({"fingerprint": self.key, "pairs": len(self.known)})})
            self.dirty = False


class WithReference:
    """Wraps pair batches and attaches reference_chosen / reference_rejected (B,) to each.

    From the cache when there is one. A batch with pairs not in it yet triggers one full pass:
    this batch's missing pairs and those of the batches that follow, up to `total` batches
    served, so nothing is computed that training will not use. Without a cache: computed now.
    """

    def __init__(self, batches, model, cache: ReferenceCache | None, total: int | None = None):
        self.batches, self.model, self.cache, self.total = batches, model, cache, total

    def __iter__(self):
        return self

    def __next__(self) -> data.Batch:
        return self.attach(next(self.batches))

    def attach(self, batch: data.Batch) -> data.Batch:
        ids = batch.extras["pair_ids"]
        if self.cache is not None:
            missing = [int(i) for i in ids if not self.cache.known[i]]
            if missing:
                self.cache.fill(missing + self._ahead(self.cache.batch_size - len(missing)))
            chosen, rejected = self.cache.chosen[ids], self.cache.rejected[ids]
        else:
            from ..train.trainer import to_mx

            c, r = reference_logps(self.model, to_mx(batch))
            mx.eval(c, r)
            chosen, rejected = np.array(c), np.array(r)
        batch.extras["reference_chosen"], batch.extras["reference_rejected"] = chosen, rejected
        return batch

    def _ahead(self, room: int) -> list[int]:
        """Up to `room` missing pairs of the batches training will serve next."""
        if self.batches is None or room <= 0:
            return []
        left = self.total - self.batches.served if self.total is not None else self.batches.batches_per_epoch
        out = []
        for ids in itertools.islice(self.batches.upcoming(), max(0, left)):
            out += [i for i in ids if not self.cache.known[i] and i not in out]
            if len(out) >= room:
                break
        return out[:room]

    # the trainer's cursor protocol: a checkpoint also keeps the reference passes done so far
    def state(self):
        if self.cache is not None:
            self.cache.save()
        return self.batches.state()

    def restore(self, state):
        self.batches.restore(state)

    @property
    def batches_per_epoch(self):
        return self.batches.batches_per_epoch


# Pairs per reference pass: no gradients are kept, and on CPU each pass pays a fixed cost to
# dequantize a quantized base, so larger passes are much cheaper per pair.
CACHE_BATCH = 32


collate = collate_pairs


@dataclass(frozen=True)
class Options:
    beta: Union[float, None] = option(None, doc="DPO: strength of the pull towards the reference (required)")
    loss_type: str = option("sigmoid", choices=("sigmoid", "ipo", "hinge"))
    label_smoothing: float = option(0.0, min=0.0, max=0.49, doc="DPO: conservative DPO's label noise")
    sft_weight: float = option(0.0, min=0.0, doc="DPO: weight of an NLL term on the chosen responses (RPO)")
    reference: str = option("auto", choices=("auto", "precomputed", "live"),
                            doc="DPO: reference log-probs cached once per stage, or computed every step")


class DPO(Method):
    kind = "dpo"
    options = Options
    formats = ("preference",)
    init_for = ("preference",)
    init_lr_factor = 0.2  # the shipped DPO recipes step a fifth as far as SFT
    pairs = True
    shared_prompts = True  # the planner: a batch whose pairs share their prompt runs it once
    capability = "dpo"
    collate = staticmethod(collate_pairs)
    metrics = PAIR_METRICS

    def init_lines(self, draft):
        return ["# No SFT stage first: the pairs are the only data. sft_weight (RPO) trains the chosen answers'",
                "# likelihood in the same stage, which keeps DPO from lowering both answers at once.",
                "beta = 0.1", "sft_weight = 1.0"]

    def validate(self, stage, before, fail):
        o = stage.options
        if o.beta is None:
            raise fail("", f"{fail.table} is a dpo stage and needs beta",
                       "add beta = 0.1 (larger keeps the model closer to its reference)")
        if o.beta <= 0:
            raise fail("beta", f"beta = {o.beta!r} must be greater than 0", "try beta = 0.1")
        refuse_full(self.kind, stage, fail)
        refuse_packing(self.kind, stage, fail, "(pairs are batched together)")

    def setup(self, ctx):
        """(loss, batches carrying reference log-probs, fixed validation batches).

        reference = "auto" fills the cache as training reaches pairs, a pass at a time;
        "precomputed" fills it all first; "live" runs the reference on every batch, nothing kept.
        """
        import time

        model, stage, batches, note = ctx.model, ctx.stage, ctx.batches, ctx.note
        check_shared_prompts(model, batches, note)
        cache = None
        if stage.options.reference != "live":
            cache = ReferenceCache(model, batches.dataset, Path(ctx.stage_dir) / "reference_logps.safetensors",
                                   max(stage.batch_size, CACHE_BATCH))
            known = int(cache.known.sum())
            if cache.damage:
                note(f"{cache.damage}; the reference log-probs are computed again", warning=True)
            if known:
                note(f"reference log-probs of {known} of {len(cache.known)} pairs reused from the stage folder")
            if stage.options.reference == "precomputed":
                t = time.perf_counter()
                cache.fill()
                note(f"reference log-probs of {len(batches.dataset)} pairs ready in {time.perf_counter() - t:.1f}s "
                     "(cached in the stage folder)")
        valid_batches = None
        if ctx.valid:
            live = WithReference(None, model, None)
            valid_batches = [live.attach(b) for b in data.eval_batches(ctx.valid, stage.batch_size,
                                                                        stage.eval_batches, collate_pairs)]
        # live: a separate no-gradient pass per batch; inside the step's graph it ran no faster and
        # held its activations alongside the policy's (+4% peak on the small model, +15% on SmolLM2)
        return make_loss(stage), WithReference(batches, model, cache, ctx.steps * stage.grad_accum), valid_batches

    def report(self, stage, r, run_path):
        if "eval_policy_prefers_chosen" not in r:
            return []
        return ["", f"## Preferences ({stage.name}, held-out pairs of `{stage.valid or 'the valid split'}`)", "",
                "| | before the stage | after |", "|---|---|---|",
                f"| the model gives the chosen answer the higher likelihood | "
                f"{r['eval_reference_prefers_chosen']:.1%} | {r['eval_policy_prefers_chosen']:.1%} |",
                f"| DPO preference accuracy (reward chosen > reward rejected) | — | "
                f"{r['eval_preference_accuracy']:.1%} |",
                f"| DPO reward margin | 0 | {r['eval_reward_margin']:+.3f} |"]

    def plan_calibrate(self, model, stage, rows, folder, examples):
        """The reference pass, timed on the rows: inside the steps ("auto"), or once before them."""
        reference = stage.options.reference
        if reference == "live":
            return {}
        import time

        t = time.perf_counter()
        ReferenceCache(model, rows, folder / "reference.safetensors", len(rows)).fill()
        per_pair = (time.perf_counter() - t) / len(rows)
        if reference == "auto":
            return {"extra_step_sec": per_pair * stage.batch_size * stage.grad_accum}
        return {"before_steps_sec": per_pair * examples, "before_steps": "reference pass"}


def refuse_full(kind: str, stage, fail) -> None:
    """A method whose reference is "adapters off" cannot run on full fine-tuning."""
    if stage.adapter.type == "full":
        raise fail("adapter.type", f'a {kind} stage with adapter type "full" has no reference: the '
                   "reference is the model with this stage's adapters switched off", 'use type = "lora" or "dora"')


def refuse_packing(kind: str, stage, fail, why: str = "") -> None:
    if stage.packing:
        raise fail("packing", f"packing is not available for {kind} stages" + (f" {why}" if why else ""),
                   "remove packing = true")


METHOD = DPO()
