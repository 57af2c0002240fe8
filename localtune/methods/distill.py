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

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import mlx.core as mx
import numpy as np

from .. import device
from ..errors import LocaltuneError
from ..recipe import option
from ..run.damage import DamagedFile, load_safetensors
from ..train import data
from ..train.adapters import save_arrays
from ..train.metrics import Metric
from .base import TEXT_FORMATS, Method
from .logprobs import logits as model_logits

CACHE_BATCH = 32  # examples per teacher pass

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


# ---------------------------------------------------------------------------------------------
# The teacher's top-k cache


class TeacherCache:
    """Top-k teacher log-probs at every target position of a dataset, in one file.

    values/indices (N, k) for the N target positions of all examples in order; offsets (E + 1,)
    where example e's rows start. Written once (temp file + rename); a stage that resumes
    reuses it when the data, teacher, k and temperature are the same.
    """

    def __init__(self, values: np.ndarray, indices: np.ndarray, offsets: np.ndarray):
        self.values, self.indices, self.offsets = values, indices, offsets

    @staticmethod
    def key(dataset: data.Dataset, teacher: str, k: int, temperature: float) -> str:
        h = hashlib.sha256(f"{teacher}|{k}|{temperature}".encode())
        for e in dataset.examples:
            h.update(np.asarray(e.tokens, np.int32).tobytes())
            h.update(np.asarray(e.loss_mask, np.bool_).tobytes())
        return h.hexdigest()

    @classmethod
    def build(cls, teacher_model, dataset: data.Dataset, k: int, temperature: float) -> "TeacherCache":
        """One teacher pass over the dataset, length-sorted to cut padding; only target rows are kept."""
        examples = dataset.examples
        rows_of: list = [None] * len(examples)
        teacher_model.eval()
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
        for start in range(0, len(order), CACHE_BATCH):
            ids = order[start:start + CACHE_BATCH]
            batch = data.collate_examples([examples[i] for i in ids])
            flat = np.flatnonzero(batch.loss_mask.reshape(-1))
            scores = teacher_model(mx.array(batch.inputs)).astype(mx.float32)
            scores = scores.reshape(-1, scores.shape[-1])[mx.array(flat)] / temperature
            logp = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
            top = mx.argpartition(-logp, kth=k - 1, axis=-1)[:, :k]
            picked = mx.take_along_axis(logp, top, axis=-1)
            mx.eval(top, picked)
            top, picked = np.array(top), np.array(picked)
            row_of_flat = flat // batch.loss_mask.shape[1]
            for b, i in enumerate(ids):
                sel = row_of_flat == b
                rows_of[i] = (picked[sel], top[sel])
        offsets = np.cumsum([0] + [len(r[0]) for r in rows_of])
        return cls(np.concatenate([r[0] for r in rows_of]).astype(np.float32),
                   np.concatenate([r[1] for r in rows_of]).astype(np.int32), offsets.astype(np.int64))

    def save(self, path: Path, key: str) -> None:
        save_arrays(path, {"values": mx.array(self.values), "indices": mx.array(self.indices),
                           "offsets": mx.array(self.offsets.astype(np.int32))}, {"key": key})

    @classmethod
    def load(cls, path: Path, key: str) -> tuple["TeacherCache | None", str | None]:
        """(the cache saved for `key`, or None; what was wrong with a damaged file, which is never trusted)."""
        if not path.exists():
            return None, None
        try:
            arrays, meta = load_safetensors(path, "", metadata=True)
            if meta.get("key") != key:
                return None, None
            cache = cls(np.array(arrays["values"]), np.array(arrays["indices"]), np.array(arrays["offsets"], np.int64))
        except DamagedFile as e:
            return None, e.problem
        except KeyError as e:
            return None, f"not a teacher cache (no {e} array)"
        if cache.values.shape != cache.indices.shape or cache.offsets[-1:].tolist() != [len(cache.values)]:
            return None, f"inconsistent arrays (values {cache.values.shape}, indices {cache.indices.shape})"
        return cache, None

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes + self.offsets.nbytes

    def collate(self, ids_of):
        """A collate function: the usual batch plus this cache's rows at its target positions."""
        def collate(examples):
            batch = data.collate_examples(examples)
            B, T = batch.loss_mask.shape
            k = self.values.shape[1]
            logp = np.zeros((B, T, k), np.float32)
            ids = np.zeros((B, T, k), np.int32)
            for b, e in enumerate(examples):
                rows = np.flatnonzero(batch.loss_mask[b])
                start, end = self.offsets[ids_of(e)], self.offsets[ids_of(e) + 1]
                if end - start != len(rows):
                    raise LocaltuneError("the teacher cache does not match the data (stale cache?); "
                                         "delete teacher_cache.safetensors in the stage folder")
                logp[b, rows], ids[b, rows] = self.values[start:end], self.indices[start:end]
            batch.extras.update(teacher_logp=logp, teacher_ids=ids)
            return batch

        return collate


def check_tokenizers(teacher_tok, student_tok, teacher: str, student: str) -> None:
    """Logits mode compares distributions token by token: the vocabularies must be the same."""
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    if a != b:
        only = sorted(set(a) ^ set(b))[:3]
        moved = [t for t in set(a) & set(b) if a[t] != b[t]][:3]
        raise LocaltuneError(f"distill: the teacher's tokenizer ({teacher}, {len(a)} tokens) and the student's "
                             f"({student}, {len(b)} tokens) differ"
                             + (f"; tokens in one only: {only}" if only else "")
                             + (f"; tokens with other ids: {moved}" if moved else "")
                             + '\n  fix: set mode = "sequence" (the student learns the teacher\'s answers as '
                               "text), or pick a teacher from the student's family")


def cache_summary(cache: TeacherCache, vocab: int, seconds: float, examples: int) -> str:
    full = cache.values.shape[0] * vocab * 4
    return (f"teacher top-{cache.values.shape[1]} log-probs of {cache.values.shape[0]:,} target positions "
            f"({examples} examples) cached in {seconds:.1f}s: {cache.nbytes / 2**20:.1f} MiB on disk, "
            f"vs {full / 2**20:.0f} MiB for full logits")


def write_generated(path: Path, rows: list[dict]) -> None:
    """The teacher's answers with per-record provenance, as JSONL (temp file + rename)."""
    from ..run import atomic_write

    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_generated(path: Path, n: int, note):
    """A distill stage's saved teacher answers when complete; damaged ones are answered again."""
    if not path.exists():
        return None
    try:
        rows, fmt = data.read_jsonl(path)
    except LocaltuneError as e:
        problem = e.message.split("\n")[0]
    else:
        if len(rows) == n:
            return rows, fmt
        problem = f"{path}: {len(rows)} answers for {n} prompts"
    note(f"{problem}; the teacher answers again", warning=True)
    return None


def teacher_cache(ctx, teacher, teacher_tok, teacher_id: str) -> None:
    """Logits mode: the teacher's top-k cache of each set, reused from the stage folder when it matches."""
    o, note = ctx.stage.options, ctx.note
    for ds, name in ((ctx.train, "teacher_cache"), (ctx.valid, "teacher_valid_cache")):
        if ds is None:
            continue
        key = TeacherCache.key(ds, teacher_id, o.top_k, o.temperature)
        path = ctx.stage_dir / f"{name}.safetensors"
        cache, damage = TeacherCache.load(path, key)
        if damage:
            note(f"{path}: {damage}; the teacher cache is built again", warning=True)
        if cache is None:
            t0 = time.perf_counter()
            cache = TeacherCache.build(teacher, ds, o.top_k, o.temperature)
            ctx.stage_dir.mkdir(parents=True, exist_ok=True)
            cache.save(path, key)
            note(cache_summary(cache, len(teacher_tok.get_vocab()), time.perf_counter() - t0, len(ds)))
        else:
            note(f"teacher cache reused from {path}")
        ds.teacher_cache = cache


def teacher_answers(ctx, teacher, teacher_tok, teacher_id: str) -> list:
    """Sequence mode: the teacher's answers to each set's prompts (train, valid), saved as JSONL."""
    from ..integrity import evaluate

    sets = []
    for part, name in ((ctx.train, "generated"), (ctx.valid, "generated_valid")):
        if part is None:
            sets.append(None)
            continue
        rows, fmt = part
        path = ctx.stage_dir / f"{name}.jsonl"
        answered = read_generated(path, len(rows), ctx.note)
        if answered is None:
            t0 = time.perf_counter()
            prompts = [r["prompt"] if "prompt" in r else evaluate.prompt_and_answer(r)[0] for r in rows]
            answers = evaluate.generate(teacher, teacher_tok, prompts, ctx.stage.options.max_new_tokens)
            ctx.stage_dir.mkdir(parents=True, exist_ok=True)
            write_generated(path, [
                ({"messages": p + [{"role": "assistant", "content": a}]} if isinstance(p, list) else
                 {"prompt": p, "completion": a}) | {"generator": teacher_id, "source": "localtune distill"}
                for p, a in zip(prompts, answers)])
            ctx.note(f"the teacher answered {len(rows)} prompts in {time.perf_counter() - t0:.1f}s: {path}")
            answered = data.read_jsonl(path)
        sets.append(answered)
    return sets


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
            return super().setup(ctx)

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
