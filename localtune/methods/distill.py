"""Teacher -> student distillation.

`logits` mode: the student matches the teacher's next-token distribution at every target
position. The teacher runs once, before the student loads, and its top-k log-probabilities
(at the stage's temperature) go to an on-disk cache; each batch carries its rows, so the teacher
and the student are never in memory together and the loss is a few lines.

`sequence` mode: the teacher answers the prompts, the answers are saved with their generator,
and the student learns them with the SFT loss.

Both run the teacher in `before`, and a `student` restarts the chain from a smaller model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import mlx.core as mx
import numpy as np

from .. import device
from ..recipe import option
from ..train import data
from ..train.metrics import Metric
from .base import TEXT_FORMATS, Method
from .logprobs import logits as model_logits
from .teacher import check_tokenizers, teacher_answers, teacher_cache

# ---------------------------------------------------------------------------------------------
# Divergences


def teacher_logprobs(values: mx.array, indices: mx.array, vocab: int) -> mx.array:
    """Full (K, V) teacher log-probs from its top-k (K, k): the rest of the mass, 1 - sum p_k,
    is spread evenly over the other V - k tokens (the cache keeps only the top k)."""
    k = values.shape[-1]
    tail = mx.maximum(1.0 - mx.exp(values).sum(-1, keepdims=True), 1e-12) / max(vocab - k, 1)
    full = mx.broadcast_to(mx.log(tail), (*values.shape[:-1], vocab))
    return mx.put_along_axis(full, indices, values, axis=-1)


def divergence(student: mx.array, teacher: mx.array, loss: str, beta: float = 0.5) -> mx.array:
    """Per-position divergence between teacher p and student q, both given as log-probs (K, V).

    forward_kl:  KL(p || q) = sum_v p_v (log p_v - log q_v)   (mean-seeking; classic KD)
    reverse_kl:  KL(q || p) = sum_v q_v (log q_v - log p_v)   (mode-seeking)
    jsd:         JSD_b(p, q) = b KL(p || m) + (1 - b) KL(q || m),  m = b p + (1 - b) q
                 (GKD's generalised Jensen-Shannon; b = 0.5 is the symmetric JSD)
    """
    p, q = mx.exp(teacher), mx.exp(student)
    if loss == "forward_kl":
        return (p * (teacher - student)).sum(-1)
    if loss == "reverse_kl":
        return (q * (student - teacher)).sum(-1)
    log_m = mx.logaddexp(teacher + np.log(beta), student + np.log(1 - beta))
    return beta * (p * (teacher - log_m)).sum(-1) + (1 - beta) * (q * (student - log_m)).sum(-1)


def device_divergence(student_logits: mx.array, teacher: mx.array, loss: str, beta: float) -> mx.array:
    """`divergence`, through mlx-lm's fused Metal kernels where the device policy takes them and they
    apply (forward KL, JSD 0.5); elsewhere the plain form, which gives equal numbers."""
    from mlx_lm.tuner.losses import js_div_loss, kl_div_loss

    fused = device.policy().fused_kernels
    if fused and loss == "forward_kl":
        return kl_div_loss(student_logits, teacher)
    if fused and loss == "jsd" and beta == 0.5:
        return js_div_loss(student_logits, teacher)
    student = student_logits - mx.logsumexp(student_logits, axis=-1, keepdims=True)
    return divergence(student, teacher, loss, beta)


def make_loss(stage):
    o = stage.options
    T, kind, beta = o.temperature, o.loss, o.jsd_beta

    def loss(model, batch):
        """Mean divergence over target positions, times T^2 (Hinton et al.: keeps the gradient's
        scale when T changes) · returns (L, tokens, {"kl" or "jsd": the mean divergence})."""
        scores = model_logits(model, batch).astype(mx.float32)
        vocab = scores.shape[-1]
        scores = scores.reshape(-1, vocab)
        values = batch["teacher_logp"].reshape(-1, batch["teacher_logp"].shape[-1])
        indices = batch["teacher_ids"].reshape(-1, values.shape[-1])
        weight = batch["loss_mask"].reshape(-1)
        if "target_index" in batch:
            index, weight = batch["target_index"], batch["target_weight"]
            scores, values, indices = scores[index], values[index], indices[index]
        d = device_divergence(scores / T, teacher_logprobs(values, indices, vocab), kind, beta)
        ntoks = weight.sum()
        mean = (d * weight).sum() / mx.maximum(ntoks, 1)
        return mean * T * T, ntoks, {"jsd" if kind == "jsd" else "kl": mean}

    return loss


@dataclass(frozen=True)
class Options:
    teacher: Union[str, None] = option(None, doc="distill: a model reference, or the name of an earlier stage")
    student: Union[str, None] = option(None, doc="distill: a smaller model to train instead of the chain's model")
    mode: str = option("logits", choices=("logits", "sequence"))
    loss: str = option("forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    temperature: float = option(1.0, min=0.05, max=100.0)
    jsd_beta: float = option(0.5, min=0.0, max=1.0)
    top_k: int = option(64, min=1, doc="distill: teacher logits kept per position in the on-disk cache")
    max_new_tokens: int = option(64, min=1, doc="distill sequence mode: the teacher's answer length")


class Distill(Method):
    kind = "distill"
    options = Options
    capability = "distill"
    metrics = (Metric("kl", "KL to teacher"), Metric("jsd", "JSD to teacher"),
               Metric("task_ratio", "student/teacher task", "{:.1%}"))

    def validate(self, stage, before, fail):
        o, names = stage.options, [s.name for s in before]
        if not o.teacher:
            raise fail("", f"{fail.table} is a distill stage and needs a teacher",
                       'add teacher = "models/small" (a model reference) or the name of an earlier stage')
        if o.teacher == stage.name:
            raise fail("teacher", f'stage "{stage.name}" cannot be its own teacher')
        if o.teacher in names and not o.student:
            raise fail("teacher", f'teacher = "{o.teacher}" is the model this stage starts from: distilling it into '
                       "itself does nothing", 'add student = "models/smaller" (a smaller model that learns from it)')
        if o.loss == "jsd" and not 0 < o.jsd_beta < 1:
            raise fail("jsd_beta", f"jsd_beta = {o.jsd_beta!r} must be strictly between 0 and 1 (at 0 or 1 the "
                       "divergence is zero)", 'use 0.5, or loss = "forward_kl" / "reverse_kl"')
        if stage.packing:
            raise fail("packing", "packing is not available for distill stages", "remove packing = true")

    def describe(self, stage):
        return "a distill stage" + (' with mode = "sequence"' if stage.options.mode == "sequence" else "")

    def data_formats(self, stage):
        return ("prompt", "messages", "completion") if stage.options.mode == "sequence" else TEXT_FORMATS

    def starts_from(self, stage):
        return stage.options.student

    def references(self, stage):
        return {"teacher": stage.options.teacher}

    def encode(self, stage, rows, fmt, tokenizer, source):
        if stage.options.mode == "sequence":
            return rows, fmt  # encoded once the teacher has answered (`before`)
        return super().encode(stage, rows, fmt, tokenizer, source)

    def check(self, recipe, stage, tokenizer, folder):
        """The teacher and student can be found, and in logits mode they share one vocabulary."""
        from .. import loading, models
        from ..run import is_run_dir

        o, names = stage.options, [x.name for x in recipe.stages]
        teacher_folder = loading.folder_of(recipe, o.teacher, f"[stages.{stage.name}] teacher") \
            if o.teacher not in names else None
        if teacher_folder and is_run_dir(recipe.resolve(o.teacher)):  # a run: all of it
            loading.require_finished(recipe, Path(recipe.resolve(o.teacher)), None,
                                     f"[stages.{stage.name}] teacher = {o.teacher!r}")
        student_folder = loading.folder_of(recipe, o.student, f"[stages.{stage.name}] student") if o.student else None
        if o.mode == "logits" and (teacher_folder or student_folder):
            teacher_tok = models.load_tokenizer(teacher_folder) if teacher_folder else tokenizer
            student_tok = models.load_tokenizer(student_folder) if student_folder else tokenizer
            check_tokenizers(teacher_tok, student_tok, o.teacher, o.student or recipe.model.path)

    def before(self, ctx):
        """Run the teacher once: its task metric and speed, then its top-k cache (logits mode) or its
        answers (sequence mode). Then the student, if any, takes its place."""
        from .. import loading
        from ..integrity import evaluate

        recipe, stage, o, task = ctx.recipe, ctx.stage, ctx.stage.options, ctx.task
        if o.teacher in [s.name for s in recipe.stages]:
            teacher, teacher_tok, teacher_id = ctx.model, ctx.tokenizer, f"{ctx.run.path.name}/{o.teacher}"
        else:
            teacher, teacher_tok = loading.load_teacher(recipe, o.teacher, f"[stages.{stage.name}] teacher")
            teacher_id = o.teacher
        if ctx.eval_rows and "teacher" not in task:
            # an earlier stage as the teacher was measured when it ended
            result = dict(task.get("stages", {}).get(o.teacher) or
                          evaluate.task(teacher, teacher_tok, ctx.eval_rows, recipe.eval))
            prompt = evaluate.prompt_and_answer(ctx.eval_rows[0])[0]
            result["tokens_per_sec"] = evaluate.decode_speed(teacher, teacher_tok, prompt)
            task["teacher"] = {**result, "model": teacher_id}
            ctx.log_task(f"of the teacher ({teacher_id})", result)
        if o.mode == "logits":
            teacher_cache(ctx, teacher, teacher_tok, teacher_id)
        else:
            ctx.train, ctx.valid = teacher_answers(ctx, teacher, teacher_tok, teacher_id)
        if o.student:
            del teacher
            ctx.model = None
            mx.clear_cache()
            ctx.model, ctx.tokenizer, _ = loading.chain_base(recipe, [stage])
            if ctx.eval_rows:
                result = evaluate.task(ctx.model, ctx.tokenizer, ctx.eval_rows, recipe.eval)
                task["student_before"] = {**result, "model": o.student}
                ctx.log_task(f"of the student ({o.student}) before training", result)
        if o.mode == "sequence":
            (rows, fmt), valid = ctx.train, ctx.valid
            ctx.train = data.encode(rows, fmt, ctx.tokenizer, stage.max_seq_len, stage.mask_prompt,
                                    str(ctx.stage_dir))
            ctx.valid = data.encode(valid[0], valid[1], ctx.tokenizer, stage.max_seq_len, stage.mask_prompt,
                                    "generated_valid") if valid else None

    def setup(self, ctx):
        """(loss, batches carrying the teacher's rows, fixed validation batches). Sequence mode trains
        on the teacher's answers with the SFT loss."""
        if ctx.stage.options.mode == "sequence":
            from . import sft

            return sft.METHOD.setup(ctx)

        def with_teacher(dataset):
            ids = {id(e): i for i, e in enumerate(dataset.examples)}
            return dataset.teacher_cache.collate(lambda e: ids[id(e)])

        stage, valid = ctx.stage, ctx.valid
        ctx.batches.collate = with_teacher(ctx.batches.dataset)
        valid_batches = data.eval_batches(valid, stage.batch_size, stage.eval_batches, with_teacher(valid)) \
            if valid else None
        return make_loss(stage), ctx.batches, valid_batches

    def heldout(self, ctx, model):
        """The divergence to the teacher on the validation batches."""
        return ctx.evaluate(model) if ctx.evaluate else None

    def report(self, stage, r, run_path):
        if "heldout_before" not in r:
            return []
        o = stage.options
        name = "JSD" if o.loss == "jsd" else "KL"
        return [f"\nHeld-out {name} to the teacher ({stage.name}, {o.loss}, T={o.temperature}): "
                f"{r['heldout_before'].get(name.lower(), float('nan')):.4f} before, "
                f"{r['heldout_after'].get(name.lower(), float('nan')):.4f} after."]

    not_calibrated = "distill stages are not calibrated: the formula's estimate"

    def plan_dataset(self, stage, dataset, tokenizer, note):
        """Sequence mode before the teacher answered: each prompt with max_new_tokens of answer."""
        if not isinstance(dataset, tuple):
            return dataset
        from ..integrity.evaluate import prompt_and_answer

        rows, _ = dataset
        n_new = stage.options.max_new_tokens
        note(f"{stage.name}: the teacher's answers are not written yet; planned on the prompts' length "
             f"plus max_new_tokens = {n_new}")
        enc = data.Encoder(tokenizer, stage.mask_prompt)
        examples = []
        for r in rows:
            prompt = r["prompt"] if "prompt" in r else prompt_and_answer(r)[0]
            tokens = enc.prompt_tokens(prompt) if isinstance(prompt, str) else enc.template(prompt, True)
            n = min(len(tokens) + n_new, stage.max_seq_len)
            mask = np.zeros(n, bool)
            mask[min(len(tokens), n - 1):] = True
            examples.append(data.Example(np.zeros(n, np.int32), mask))
        return data.Dataset(examples, source="prompts")

    def plan_extras(self, model, stage, dataset, dims, dtype_bytes):
        if stage.options.mode != "logits":
            return {}
        targets = sum(int(sum(e.loss_mask)) for e in dataset.examples)
        return {"teacher cache (host)": targets * stage.options.top_k * 8}


METHOD = Distill()
