"""One trainer per run directory: an exclusive `flock` on RUN/.lock.

The kernel drops the lock when the last descriptor of its open file description closes, so a
process that dies in any way (kill -9 included) never leaves a run blocked: no stale pid files.
The holder writes {"pid", "host", "since"} into the lock file so a refused trainer, `status` and
`runs` can say who it is. Readers never need the lock; `holder` only probes it.

A lock belongs to the open file description, not the process: a child given the descriptor
(`pass_fds`) holds the same lock, which is how the TUI hands a run to its training process
without a gap. So `release` only closes the descriptor; `LOCK_UN` would unlock the child too.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import LocaltuneError

LOCK_NAME = ".lock"
RETRY_SECONDS = 2.0  # how long a trainer retries before refusing (see `locked` for why it retries)


class RunBusy(LocaltuneError):
    """Another live process trains this run directory."""

    exit_code = 1


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


class RunLock:
    """The exclusive lock of one run directory, held while this object's descriptor is open."""

    def __init__(self, fd: int, run_dir: Path):
        self.fd, self.run_dir = fd, run_dir

    def fileno(self) -> int:
        return self.fd

    def write_holder(self) -> None:
        """Record who trains the run (in place: a lock file must never be replaced by a rename)."""
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, info.encode() + b"\n", 0)

    def release(self) -> None:
        """Close this descriptor: the lock ends once no process holds a descriptor of it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            _HELD.pop(self.run_dir, None)


_HELD: dict[Path, RunLock] = {}  # this process's locks: a second flock of ours would refuse ourselves


def held(run_dir: str | Path) -> RunLock | None:
    """The lock this process holds on the run, if any."""
    return _HELD.get(Path(run_dir).resolve())


def acquire(run_dir: str | Path, retry: float = RETRY_SECONDS) -> RunLock:
    """Take the run's lock before writing anything in it; RunBusy names the holder when another
    live process has it."""
    run_dir, key = Path(run_dir), Path(run_dir).resolve()
    if key in _HELD:
        return _HELD[key]
    try:
        fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise LocaltuneError(f"{lock_path(run_dir)}: cannot open the run's lock file: {e.strerror or e}\n"
                             "  fix: check that the run directory is yours and writable") from e
    deadline = time.monotonic() + retry
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise busy(run_dir) from None
                raise LocaltuneError(f"{lock_path(run_dir)}: cannot lock the run: {e.strerror or e}") from e
            time.sleep(0.02)
    return _hold(fd, key)


def _hold(fd: int, key: Path) -> RunLock:
    lock = _HELD[key] = RunLock(fd, key)
    lock.write_holder()
    return lock


def adopt(fd: int, run_dir: str | Path) -> RunLock:
    """The lock a parent handed over with `pass_fds` (see the module docstring). Re-locking the
    same open file description succeeds at once; if the descriptor is not the run's lock file,
    or another process holds the run, this fails instead of training unlocked."""
    run_dir = Path(run_dir)
    try:
        mine, theirs = os.fstat(fd), os.stat(lock_path(run_dir))
        same = (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)
    except OSError:
        same = False
    if not same:
        raise LocaltuneError(f"{run_dir}: descriptor {fd} is not this run's lock file ({LOCK_NAME})")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise busy(run_dir) from None
    return _hold(fd, run_dir.resolve())


def busy(run_dir: Path) -> RunBusy:
    info = read_holder(run_dir)
    who = describe(info) if info.get("pid") else "another process (its pid is not recorded yet)"
    kill = f"`kill -INT {info['pid']}`" if info.get("pid") else "Ctrl-C in its terminal"
    return RunBusy(f"{run_dir}: this run is being trained by {who}; a second trainer would interleave its "
                   "checkpoints and metrics with it. Nothing was written.\n"
                   f"  watch it with: localtune watch {run_dir}\n"
                   f"  fix: let it finish, or stop it ({kill}"
                   + (f" on {info['host']}" if info.get("host") else "")
                   + f", which checkpoints), then `localtune run --resume {run_dir}`")


def describe(info: dict) -> str:
    """"pid 4242 on mac-mini since 2025-11-29 07:06" for a holder record."""
    since = f" since {time.strftime('%Y-%m-%d %H:%M', time.localtime(info['since']))}" \
        if isinstance(info.get("since"), (int, float)) else ""
    return f"pid {info.get('pid') or '?'} on {info.get('host') or '?'}{since}"


def read_holder(run_dir: str | Path) -> dict:
    """The holder record in the lock file ({} if missing or being rewritten)."""
    for _ in range(3):  # the holder truncates, then writes: a reader can land in between
        try:
            info = json.loads(lock_path(run_dir).read_text())
            if isinstance(info, dict):
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return {}


def locked(run_dir: str | Path) -> bool | None:
    """Whether a live process holds the run's lock; None when the run has no lock file (a run made
    before localtune locked runs) or it cannot be read.

    Lock-free for the trainer: the probe is a shared lock, non-blocking, dropped at once. It can
    only collide with a trainer calling `acquire` in the same microseconds, and `acquire` retries
    for RETRY_SECONDS before it refuses, so a probe never makes a trainer fail."""
    try:
        fd = os.open(lock_path(run_dir), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return True if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)  # closing drops the shared lock if it was taken


def holder(run_dir: str | Path) -> dict | None:
    """{"pid", "host", "since"} of the process that trains the run now, or None."""
    if not locked(run_dir):
        return None
    return read_holder(run_dir) or {"pid": None, "host": None}
