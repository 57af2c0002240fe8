"""The teacher's side of distillation: its top-k log-probabilities cached on disk (logits mode),
its answers saved with their generator (sequence mode), and the check that a teacher and a student
share one vocabulary."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import LocaltuneError
from ..run.damage import DamagedFile, load_safetensors
from ..train import data
from ..train.adapters import save_arrays

CACHE_BATCH = 32  # examples per teacher pass

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


