"""A stage's checkpoints: the newest and the one before it, each validated before a resume trusts it.

<stage>/checkpoint/state.safetensors     adapters + optimizer state; metadata: step, data cursor, fingerprint
<stage>/checkpoint/previous.safetensors  the checkpoint before it

Each is written atomically (temp file + rename), and the newest becomes `previous` only once a
new one is about to replace it. So a checkpoint damaged on disk (a truncated copy, a sync tool)
costs one checkpoint interval: `--resume` falls back to the previous one and says so.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mlx.utils import tree_flatten, tree_unflatten

from ..errors import TrainingError
from ..run.damage import load_safetensors, safetensors_problem
from .adapters import save_arrays, trainable_weights

NEWEST, PREVIOUS = "state.safetensors", "previous.safetensors"


def save(folder: Path, model, optimizer, step: int, batches, extra: dict) -> None:
    """One file: adapter + optimizer state + step + data cursor; the newest valid one is kept as previous."""
    arrays = {f"model.{k}": v for k, v in trainable_weights(model).items()}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    meta = {"step": step, "data": batches.state(), **extra}
    folder.mkdir(parents=True, exist_ok=True)
    newest = folder / NEWEST
    if newest.exists() and safetensors_problem(newest) is None:  # never rotate a damaged file over a good one
        os.replace(newest, folder / PREVIOUS)
    save_arrays(newest, arrays, {"localtune": json.dumps(meta)})


def _read(path: Path, model, optimizer, steps: int, fingerprint: str | None):
    """(arrays, meta) of a checkpoint this stage can resume from, or the reason it cannot."""
    try:
        arrays, metadata = load_safetensors(path, "", metadata=True)
        meta = json.loads(metadata["localtune"])
        step = meta["step"]
    except Exception as e:  # DamagedFile, or metadata that is not ours
        return None, getattr(e, "problem", None) or f"no readable checkpoint metadata ({e!r})"
    if not isinstance(step, int) or not 1 <= step <= steps:
        return None, f"its step {step!r} is not within this stage's 1..{steps}"
    if fingerprint and meta.get("fingerprint", fingerprint) != fingerprint:
        return None, "it was written for another recipe or data (its fingerprint is not this stage's)"
    expected = {f"model.{k}": v.shape for k, v in trainable_weights(model).items()}
    expected.update({f"optimizer.{k}": v.shape for k, v in tree_flatten(optimizer.state)})
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        return None, f"its arrays are not this stage's (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            return None, f"{name} has shape {tuple(arrays[name].shape)}, expected {tuple(shape)}"
    return (arrays, meta), None


def load(folder: Path, model, optimizer, batches, *, steps: int, fingerprint: str | None, warn) -> dict | None:
    """Restore the newest checkpoint that validates (else the previous one, with a warning).

    Returns its metadata, or None when the stage has no checkpoint. Raises TrainingError, naming
    each file and what is wrong with it, when checkpoints exist but none can be used.
    """
    problems = []
    for name in (NEWEST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        found, problem = _read(path, model, optimizer, steps, fingerprint)
        if found is None:
            problems.append(f"{path}: {problem}")
            continue
        arrays, meta = found
        model.load_weights([(k[6:], v) for k, v in arrays.items() if k.startswith("model.")], strict=False)
        optimizer.state = tree_unflatten([(k[10:], v) for k, v in arrays.items() if k.startswith("optimizer.")])
        try:
            batches.restore(meta["data"])
        except Exception as e:  # a cursor that does not fit this data; the previous checkpoint may
            problems.append(f"{path}: its data cursor does not fit this stage's data ({e!r})")
            continue
        if name == PREVIOUS:
            why = problems[-1] if problems else f"{folder / NEWEST}: missing"
            warn(f"{why}; resumed from the previous checkpoint (step {meta['step']}) instead")
        return meta
    if problems:
        raise TrainingError("no checkpoint of this stage can be used:\n  " + "\n  ".join(problems) +
                            f"\n  fix: copy the checkpoint back from another copy of the run, or train this stage "
                            f"again from its start: `rm -r {folder} && localtune run --resume {folder.parent.parent}`")
    return None


def step_of(folder: Path):
    """The newest checkpoint's step, for messages ("none yet" when there is none)."""
    for name in (NEWEST, PREVIOUS):
        try:
            _, metadata = load_safetensors(folder / name, "", metadata=True)
            return json.loads(metadata["localtune"])["step"]
        except Exception:
            continue
    return "none yet"
