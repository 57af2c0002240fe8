"""Kahneman-Tversky optimisation (KTO; Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization"): learn from unpaired completions marked desirable (thumbs up) or undesirable
(thumbs down), {"prompt", "completion", "label": true|false}, the data people collect from their apps.

As in DPO (dpo.py) the reference is the model as the stage found it, this stage's adapters switched
off, and its log-probabilities come with each batch from a no-gradient pass (dpo.WithReference).
A batch of B rows runs 2B sequences: each row as written, then each completion after the prompt of the
next row whose prompt differs (`partners`), the mismatched pairs the KL reference point is estimated from.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import DataError
from ..recipe import option
from ..train import data
from ..train.adapters import adapters_disabled
from ..train.metrics import Metric
from .base import Method
from .dpo import WithReference, batch_references, refuse_full, refuse_packing, sequence_logps
from .pairs import response_example

# ---------------------------------------------------------------------------------------------
# The loss.


def kl_reference_point(mismatched_logps: mx.array, mismatched_reference_logps: mx.array) -> mx.array:
    """z_ref = max(0, mean_i [log pi(y_i | x_(i+1)) - log pi_ref(y_i | x_(i+1))]), a scalar with no gradient.

    The batch estimate of KL(pi || pi_ref) of the paper (§4.1, below eq. 8): each completion y_i is
    scored after another row's prompt, so the estimate says how far the policy moved on text it was
    not trained on. Clamped at 0 (a KL is never negative) and detached: it sets the reference point,
    it is not trained. Inputs (B,).
    """
    return mx.stop_gradient(mx.maximum((mismatched_logps - mismatched_reference_logps).mean(), 0.0))


def kto_losses(log_ratios: mx.array, desirable: mx.array, z_ref: mx.array, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> mx.array:
    """Per-row KTO loss, eq. 8 of Ethayarajh et al. 2024: L_KTO = E_(x,y)[lambda_y - v(x, y)] with

        r(x, y) = log pi(y | x) - log pi_ref(y | x)
        v(x, y) = lambda_D * sigmoid(beta * (r - z_ref))   y desirable
                  lambda_U * sigmoid(beta * (z_ref - r))   y undesirable

    so L_i = lambda_D (1 - sigmoid(beta (r_i - z_ref))) or lambda_U (1 - sigmoid(beta (z_ref - r_i))).
    log_ratios r (B,) · desirable (B,) 1.0 or 0.0 · z_ref () from kl_reference_point. At r = z_ref = 0
    (policy = reference) every row's loss is lambda_y / 2.
    """
    gain = desirable_weight * (1 - mx.sigmoid(beta * (log_ratios - z_ref)))
    loss = undesirable_weight * (1 - mx.sigmoid(beta * (z_ref - log_ratios)))
    return mx.where(desirable > 0, gain, loss)


def masked_mean(x: mx.array, mask: mx.array) -> mx.array:
    """Mean of x over the rows where mask is 1 (0 when there are none)."""
    return (x * mask).sum() / mx.maximum(mask.sum(), 1)


def make_loss(stage):
    """The kto loss for a recipe stage (beta, desirable_weight, undesirable_weight)."""
    o = stage.options
    beta, weight_d, weight_u = o.beta, o.desirable_weight, o.undesirable_weight

    def loss(model, batch):
        """Mean over the B rows of kto_losses.

        batch: inputs (2B, T): rows 0..B-1 the completions after their own prompts, B..2B-1 after another
        row's prompt (`partners`) · desirable (B,) · reference_chosen / reference_rejected (B,): the reference's
        log-probs of those two halves (dpo.WithReference's names), else computed here in the same graph.
        Returns (L, B, metrics): rewards are beta * r per row.
        """
        reference, mismatched_reference = batch_references(model, batch)
        logps, _ = sequence_logps(model, batch)
        B = logps.shape[0] // 2
        desirable = batch["desirable"]
        undesirable = 1 - desirable
        z_ref = kl_reference_point(logps[B:], mismatched_reference)
        log_ratios = logps[:B] - reference
        total = kto_losses(log_ratios, desirable, z_ref, beta, weight_d, weight_u).mean()
        rewards = beta * log_ratios
        rewards_desirable, rewards_undesirable = masked_mean(rewards, desirable), masked_mean(rewards, undesirable)
        # a row is on its label's side when its log-ratio is above (desirable) or below (undesirable) z_ref
        sided = mx.where(desirable > 0, log_ratios > z_ref, log_ratios < z_ref).astype(mx.float32)
        metrics = {"rewards_desirable": rewards_desirable, "rewards_undesirable": rewards_undesirable,
                   "reward_margin": rewards_desirable - rewards_undesirable, "kl": z_ref,
                   "label_accuracy": sided.mean(), "desirable_share": desirable.mean(),
                   "logps_desirable": masked_mean(logps[:B], desirable),
                   "logps_undesirable": masked_mean(logps[:B], undesirable)}
        return total, mx.array(B, dtype=mx.float32), metrics

    return loss


# ---------------------------------------------------------------------------------------------
# Data: {"prompt", "completion", "label"} rows, each split into its prompt and completion tokens.


@dataclass
class Labelled:
    id: int
    prompt: np.ndarray  # (P,) int32: the prompt as the chat template renders it
    completion: np.ndarray  # (C,) int32
    completion_mask: np.ndarray  # (C,) bool: the completion's trained tokens
    desirable: bool
    max_len: int  # max_seq_len: rows are cut to it

    def row(self, prompt: np.ndarray) -> data.Example:
        """This completion after `prompt` (its own, or another row's for the KL estimate)."""
        tokens = np.concatenate([prompt, self.completion])[: self.max_len]
        mask = np.concatenate([np.zeros(len(prompt), bool), self.completion_mask])[: self.max_len]
        return data.Example(tokens, mask)

    @property
    def tokens(self):  # what length grouping sorts by
        return np.concatenate([self.prompt, self.completion])[: self.max_len]

    @property
    def loss_mask(self):
        return self.row(self.prompt).loss_mask


@dataclass
class LabelledSet(data.Dataset):
    desirable: int = 0  # rows labelled true


def encode_labelled(rows: list[dict], tokenizer, max_seq_len: int, source: str = "") -> LabelledSet:
    """Labelled rows -> Labelled examples; rows with no completion left at max_seq_len are counted and skipped."""
    enc = data.Encoder(tokenizer, mask_prompt=True)
    out, truncated, dropped = [], 0, 0
    for n, row in enumerate(rows, 1):
        ex = response_example(enc, row["prompt"], row["completion"], f"{source}: row {n}")
        start = int(np.argmax(ex.loss_mask))
        truncated += len(ex.tokens) > max_seq_len
        if not ex.loss_mask[1:max_seq_len].any():
            dropped += 1
            continue
        out.append(Labelled(len(out), ex.tokens[:start], ex.tokens[start:], ex.loss_mask[start:], bool(row["label"]),
                            max_seq_len))
    if not out:
        raise DataError(f"{source}: no usable rows ({dropped} with no completion left at max_seq_len={max_seq_len})"
                        "\n  fix: raise max_seq_len")
    return LabelledSet(out, truncated, dropped, source, desirable=sum(e.desirable for e in out))


def partners(examples: list[Labelled]) -> list[int]:
    """For each row, the next row (mod B) whose prompt differs: its prompt goes before this row's completion
    in the KL estimate. Length-sorted batches put a prompt's two rows side by side, and "next row" alone
    would then score a completion after its own prompt. A batch of one prompt has no other: itself."""
    B = len(examples)
    keys = [e.prompt.tobytes() for e in examples]
    return [next(((i + k) % B for k in range(1, B) if keys[(i + k) % B] != keys[i]), i) for i in range(B)]


def collate_labelled(examples: list[Labelled]) -> data.Batch:
    """2B rows: each completion after its own prompt, then completion i after another row's prompt
    (`partners`: the next one with a different prompt)."""
    B = len(examples)
    mismatched = [e.row(examples[j].prompt) for e, j in zip(examples, partners(examples))]
    batch = data.collate_examples([e.row(e.prompt) for e in examples] + mismatched)
    batch.extras["pair_ids"] = np.array([e.id for e in examples], np.int32)  # dpo.WithReference's protocol
    batch.extras["desirable"] = np.array([e.desirable for e in examples], np.float32)
    batch.units = B
    return batch


# ---------------------------------------------------------------------------------------------
# Held-out: rows of the same prompt with opposite labels are pairs.


def row_logps(model, examples: list[Labelled], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """log p(completion | its prompt) of each row under the policy and under the reference (adapters off)."""
    from ..train.trainer import to_mx

    policy, reference = [], []
    for start in range(0, len(examples), batch_size):
        b = to_mx(data.collate_examples([e.row(e.prompt) for e in examples[start:start + batch_size]]))
        p, _ = sequence_logps(model, b)
        with adapters_disabled(model):
            r, _ = sequence_logps(model, b)
        mx.eval(p, r)
        policy.append(np.array(p))
        reference.append(np.array(r))
    return np.concatenate(policy), np.concatenate(reference)


def heldout_pairs(examples: list[Labelled]) -> list[tuple[int, int]]:
    """(desirable row, undesirable row) of every two held-out rows with the same prompt and opposite labels."""
    by_prompt: dict[bytes, tuple[list, list]] = {}
    for i, e in enumerate(examples):
        by_prompt.setdefault(e.prompt.tobytes(), ([], []))[0 if e.desirable else 1].append(i)
    return [(d, u) for good, bad in by_prompt.values() for d in good for u in bad]


def heldout_scores(policy: np.ndarray, reference: np.ndarray, examples: list[Labelled], beta: float) -> dict:
    """The held-out preference accuracy: the share of same-prompt (desirable, undesirable) pairs whose
    implicit reward beta * r is higher for the desirable row (DPO's preference accuracy on the pairs
    the rows came from); also the model's own preference (higher log-likelihood) and the margin."""
    pairs = heldout_pairs(examples)
    rewards = beta * (policy - reference)
    desirable = np.array([e.desirable for e in examples])
    out = {"rows": len(examples), "pairs": len(pairs),
           "rewards_desirable": float(rewards[desirable].mean()) if desirable.any() else None,
           "rewards_undesirable": float(rewards[~desirable].mean()) if (~desirable).any() else None}
    if pairs:
        d, u = np.array(pairs).T
        out.update(preference_accuracy=float((rewards[d] > rewards[u]).mean()),
                   prefers_desirable=float((policy[d] > policy[u]).mean()),
                   reward_margin=float((rewards[d] - rewards[u]).mean()))
    return out


# ---------------------------------------------------------------------------------------------
# The method.


@dataclass(frozen=True)
class Options:
    beta: float = option(0.1, doc="KTO: strength of the pull towards the reference (the paper's default 0.1)")
    desirable_weight: float = option(1.0, min=0.0, doc="KTO: lambda_D, the weight of desirable rows' loss")
    undesirable_weight: float = option(1.0, min=0.0, doc="KTO: lambda_U, the weight of undesirable rows' loss")


class KTO(Method):
    kind = "kto"
    options = Options
    formats = ("labelled",)
    pairs = True  # two rows each in a batch: the row, and its completion after another prompt (the planner)
    capability = "dpo"  # the same passes: a policy and its reference, adapters off
    collate = staticmethod(collate_labelled)
    metrics = (Metric("reward_margin", "reward margin", "{:+.3f}"),
               Metric("label_accuracy", "label accuracy", "{:.1%}"),
               Metric("kl", "KL estimate", "{:.4f}"),
               Metric("rewards_desirable", "reward desirable", "{:+.3f}"),
               Metric("rewards_undesirable", "reward undesirable", "{:+.3f}"),
               Metric("logps_desirable", "logp desirable", "{:.2f}"),
               Metric("logps_undesirable", "logp undesirable", "{:.2f}"),
               Metric("desirable_share", "desirable share", "{:.1%}"))

    def data_hint(self, stage):
        return ('a kto stage reads unpaired rows {"prompt", "completion", "label": true|false}. To train on '
                'preference pairs, split each pair into two rows: {"prompt", "completion": chosen, "label": true} '
                'and {"prompt", "completion": rejected, "label": false}, as data/build_date_kto.py in the '
                'localtune repository does')

    def validate(self, stage, before, fail):
        o = stage.options
        if o.beta <= 0:
            raise fail("beta", f"beta = {o.beta!r} must be greater than 0", "try beta = 0.1")
        if o.desirable_weight == 0 and o.undesirable_weight == 0:
            raise fail("desirable_weight", "desirable_weight and undesirable_weight are both 0: nothing is trained",
                       "keep the defaults, 1.0 each")
        if stage.batch_size < 2:
            raise fail("batch_size", f"batch_size = {stage.batch_size}: a kto stage estimates its KL reference "
                       "point from each completion after another row's prompt in the batch, so it needs 2 rows "
                       "or more", "try batch_size = 8")
        refuse_full(self.kind, stage, fail)
        refuse_packing(self.kind, stage, fail, "(each row is also scored after another row's prompt)")

    def encode(self, stage, rows, fmt, tokenizer, source):
        return encode_labelled(rows, tokenizer, stage.max_seq_len, source)

    def plan_shapes(self, stage, dataset):
        """(2B rows, width, scored tokens) of each batch of an epoch, collated as training collates it."""
        from ..train import distributed

        batches = data.Batches(dataset, stage.batch_size, stage.seed or 0, stage.group_by_length, False,
                               stage.max_seq_len, collate=collate_labelled, shard=distributed.shard())
        out = []
        for item in batches.plan(0):
            b = collate_labelled([dataset.examples[i] for i in item])
            out.append((b.inputs.shape[0], b.inputs.shape[1], int(b.loss_mask.sum())))
        return out

    def plan_step_flops(self, stage, params, mean_width):
        """The reference's no-gradient forward pass over the step's 2B rows."""
        return 2 * params * 2 * stage.batch_size * mean_width * stage.grad_accum

    def setup(self, ctx):
        """(loss, batches carrying the reference's log-probs, fixed validation batches): the reference runs
        on each batch (no cache: the KL rows pair each completion with whichever prompt follows it)."""
        stage, train = ctx.stage, ctx.train
        n, d = len(train), train.desirable
        ctx.note(f"{d} desirable and {n - d} undesirable rows; weighted ratio "
                 f"{stage.options.desirable_weight * d / max(stage.options.undesirable_weight * (n - d), 1e-9):.2f} "
                 "(the paper suggests 1 to 4/3)")
        valid_batches = None
        if ctx.valid:
            live = WithReference(None, ctx.model, None)
            valid_batches = [live.attach(b) for b in data.eval_batches(ctx.valid, stage.batch_size,
                                                                        stage.eval_batches, collate_labelled)]
        return make_loss(stage), WithReference(ctx.batches, ctx.model, None), valid_batches

    def heldout(self, ctx, model):
        if not ctx.valid:
            return None
        examples = ctx.valid.examples
        policy, reference = row_logps(model, examples, max(ctx.stage.batch_size, 16))
        return heldout_scores(policy, reference, examples, ctx.stage.options.beta)

    def heldout_line(self, when, h):
        if not h.get("pairs"):
            return (f"held-out {when}: {h['rows']} rows, none sharing a prompt with a row of the other label: "
                    "no preference accuracy")
        return (f"held-out {when}: {h['pairs']} same-prompt pairs: preference accuracy (reward desirable > "
                f"undesirable) {h['preference_accuracy']:.1%}, likelihood prefers the desirable row "
                f"{h['prefers_desirable']:.1%}, reward margin {h['reward_margin']:+.3f}")

    def report(self, stage, r, run_path):
        before, after = r.get("heldout_before"), r.get("heldout_after")
        if not after:
            return []
        lines = ["", f"## Preferences ({stage.name}, KTO, {after['rows']} held-out rows of "
                 f"`{stage.valid or 'the valid split'}`)", ""]
        if after.get("pairs"):
            lines += [f"{after['pairs']} pairs: a desirable and an undesirable row of the same prompt.", "",
                      "| | before the stage | after |", "|---|---|---|",
                      f"| the model gives the desirable answer the higher likelihood | "
                      f"{before['prefers_desirable']:.1%} | {after['prefers_desirable']:.1%} |",
                      f"| KTO preference accuracy (reward desirable > reward undesirable) | — | "
                      f"{after['preference_accuracy']:.1%} |",
                      f"| KTO reward margin | 0 | {after['reward_margin']:+.3f} |"]
        else:
            lines += ["No held-out prompt has rows of both labels, so there is no preference accuracy."]
        if "kl" in r:
            lines += ["", f"Last training window: KL estimate z_ref {r['kl']:.4f}, reward desirable "
                      f"{r['rewards_desirable']:+.3f}, undesirable {r['rewards_undesirable']:+.3f}, rows on their "
                      f"label's side of z_ref {r['label_accuracy']:.1%}."]
        return lines


METHOD = KTO()
