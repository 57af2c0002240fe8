"""Teacher -> student distillation.

`logits` mode: the student matches the teacher's next-token distribution at every target
position. The teacher runs once, before the student loads, and its top-k log-probabilities
(at the stage's temperature) go to an on-disk cache; each batch carries its rows, so the teacher
and the student are never in memory together and the loss is a few lines.

`sequence` mode lives in the pipeline: the teacher answers the prompts, the answers are saved
with their generator, and the student learns them with the SFT loss.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import device
from ..errors import LocaltuneError
from ..run.damage import DamagedFile, load_safetensors
from ..train import data
from ..train.adapters import save_arrays
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
    T, kind, beta = stage.temperature, stage.loss, stage.jsd_beta

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
            batch = data._collate([examples[i] for i in ids])
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
            batch = data._collate(examples)
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


def setup(model, stage, batches, valid, steps, stage_dir, note):
    """(loss, batches carrying the teacher's rows, fixed validation batches) for the one loop.
    Sequence mode trains on the teacher's answers with the SFT loss."""
    from . import sft

    if stage.mode == "sequence":
        return sft.setup(model, stage, batches, valid, steps, stage_dir, note)

    def with_teacher(dataset):
        ids = {id(e): i for i, e in enumerate(dataset.examples)}
        return dataset.teacher_cache.collate(lambda e: ids[id(e)])

    batches.collate = with_teacher(batches.dataset)
    valid_batches = data.eval_batches(valid, stage.batch_size, stage.eval_batches, with_teacher(valid)) \
        if valid else None
    return make_loss(stage), batches, valid_batches
