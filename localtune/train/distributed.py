"""Data-parallel training on MLX's distributed engine (`mx.distributed`, launched by `mlx.launch`).

Every rank runs the same recipe. Each reads its shard of every global batch
(`data.Batches(shard=...)`); the trainer weights each rank's gradient by its share of
the global tokens (or pairs) and sums them with `all_sum`, so N ranks take the
same step as one process with N times the batch. Only rank 0 writes the run
directory: the others write a private copy in a temp folder, which they receive from
rank 0 on `--resume`, and their losses and token counts are reduced into rank 0's
metrics.
"""
from __future__ import annotations

import atexit
import io
import shutil
import tarfile
import tempfile
from pathlib import Path

_group = {"g": None}


def group():
    """The world (size 1 without mlx.launch). Initialised once, before any collective."""
    if _group["g"] is None:
        import mlx.core as mx

        _group["g"] = mx.distributed.init()
    return _group["g"]


def size() -> int:
    return group().size()


def rank() -> int:
    return group().rank()


def is_main() -> bool:
    return rank() == 0


def shard() -> tuple[int, int]:
    return rank(), size()


def all_sum(values: list[float]) -> list[float]:
    """Sum a few host numbers over the ranks (one collective)."""
    import mlx.core as mx

    if size() == 1:
        return list(values)
    total = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=group())
    return total.tolist()


def sum_gradients(grads):
    """Sum gradient trees over the ranks, batched into few messages (mlx.nn.average_gradients)."""
    import mlx.nn as nn
    from mlx.utils import tree_map

    n = size()
    if n == 1:
        return grads
    # average_gradients divides by n; the trainer pre-weights each rank's gradient, so undo it
    return tree_map(lambda g: g * n, nn.average_gradients(grads, group=group()))


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (an all_sum where the others send zeros)."""
    import mlx.core as mx
    import numpy as np

    n = int(all_sum([len(payload) if is_main() else 0])[0])
    buf = np.frombuffer(payload, np.uint8) if is_main() else np.zeros(n, np.uint8)
    out = mx.distributed.all_sum(mx.array(buf), group=group())
    return bytes(np.array(out, copy=False))


REFUSED = b"refused"  # what rank 0 sends instead of the run when it cannot open it (never a tar file)


def mirror_run(open_main):
    """The run directory on every rank: rank 0 opens it (`open_main()`), the others receive a copy
    of it in a private temp folder (checkpoints included), deleted when they exit."""
    from ..errors import LocaltuneError
    from ..run import Run

    if size() == 1:
        return open_main()
    if is_main():
        try:
            run = open_main()
        except LocaltuneError:  # e.g. another trainer holds the run: the others stop too, quietly
            broadcast_bytes(REFUSED)
            raise
        blob = io.BytesIO()
        with tarfile.open(fileobj=blob, mode="w") as tar:
            tar.add(run.path, arcname=run.path.name)
        broadcast_bytes(blob.getvalue())
        return run
    folder = private_runs_dir()
    payload = broadcast_bytes(None)
    if payload == REFUSED:
        raise SystemExit(1)  # rank 0 has said why
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        names = tar.getnames()
        tar.extractall(folder, filter="data")
    return Run.open(Path(folder) / names[0].split("/")[0])


def private_runs_dir() -> str:
    """Where a rank other than 0 keeps its run directory: a temp folder removed at exit."""
    folder = tempfile.mkdtemp(prefix=f"localtune-rank{rank()}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
