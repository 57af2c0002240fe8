"""Writing a file so that no reader ever sees half of it: a temp file beside the target, renamed over it.

`atomic_path` is the one implementation, for writers that need a path (GGUFWriter, mx.save_safetensors,
llama.cpp's quantizer); `atomic_write` writes bytes or text through it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from ..errors import LocaltuneError, TrainingError


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp", shared: bool = False):
    """Yield a temp file's path beside `path` (same folder, so the rename is atomic); when the block
    ends it is fsynced and renamed onto `path`, and if the block raises it is removed.

    `shared`: give the file the umask's usual permissions (a GGUF, a Modelfile: files users hand on);
    otherwise it keeps mkstemp's private 0600. `suffix`: for writers that append their own extension.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if shared:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str, *, shared: bool = False) -> None:
    """Write `data` to `path` atomically (see atomic_path); a failed write raises disk_error's message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    try:
        with atomic_path(path, shared=shared) as tmp:
            tmp.write_bytes(raw)
    except OSError as e:
        raise disk_error(e, path) from e


def disk_error(e: OSError, path) -> LocaltuneError:
    if e.errno == errno.ENOSPC:
        from . import is_run_dir

        run = next((p for p in Path(path).parents if is_run_dir(p)), None)
        where = "the last checkpoint is kept" if run else "nothing partial was written"
        return TrainingError(f"{path}: no space left on device; {where}.\n"
                             f"  fix: free some disk space (`df -h {Path(path).parent}` shows it), then continue with "
                             f"`localtune run --resume {run or 'RUN'}`")
    return TrainingError(f"{path}: cannot write: {e.strerror or e}")
