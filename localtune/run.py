"""The run directory: the contract between the trainer and every reader.

runs/<name>-<YYYYmmdd-HHMMSS>/ recipe.toml manifest.json status.json metrics.jsonl
report.md <stage>/adapters.safetensors <stage>/checkpoint/ .lock
The trainer writes, holding .lock (lock.py); the TUI, `status`, tests and benchmarks read, lock-free.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from . import lock
from .errors import LocaltuneError, TrainingError


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write to a temp file beside `path`, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise disk_error(e, path) from e


def disk_error(e: OSError, path) -> LocaltuneError:
    if e.errno == errno.ENOSPC:
        return TrainingError(f"{path}: no space left on device; nothing partial was written.\n"
                             "  fix: free some disk space, then continue with `localtune run --resume RUN`")
    return TrainingError(f"{path}: cannot write: {e.strerror or e}")


def read_json(path: str | Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def pid_alive(pid) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LIVE_STATES = ("running", "paused")


def effective_state(status: dict, path: str | Path | None = None) -> str:
    """status.json's state, except that a live state whose trainer is gone reads "crashed": the run's
    lock is free (see lock.py), or, for a run without a lock file, its pid is not alive here."""
    state = status.get("state", "unknown")
    if state not in LIVE_STATES:
        return state
    alive = lock.locked(path) if path is not None else None
    if alive is None:
        alive = pid_alive(status.get("pid"))
    return state if alive else "crashed"


def trainer_of(path: str | Path, status: dict) -> dict | None:
    """{"pid", "host"} of the process training the run now, or None: the lock's holder, or for a
    run without a lock file, its status pid while that process is alive on this machine."""
    held = lock.locked(path)
    if held:
        info = lock.read_holder(path)
        return {"pid": info.get("pid"), "host": info.get("host")}
    if held is None and status.get("state") in LIVE_STATES and pid_alive(status.get("pid")):
        return {"pid": status["pid"], "host": socket.gethostname()}
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records of metrics.jsonl; a partially written last line is skipped."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return records


class Run:
    """A run directory. Create with `Run.create`, reopen with `Run.open` (for --resume)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._metrics = None

    @classmethod
    def create(cls, runs_dir: str | Path, name: str, recipe_text: str) -> "Run":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(runs_dir) / f"{name}-{stamp}"
        n = 1
        while path.exists():  # two runs in the same second
            n += 1
            path = Path(runs_dir) / f"{name}-{stamp}-{n}"
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise disk_error(e, path) from e
        run = cls(path)
        atomic_write(path / "recipe.toml", recipe_text)
        return run

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / "recipe.toml").exists():
            raise LocaltuneError(f"{path}: not a localtune run directory (no recipe.toml)\n"
                                 "  fix: pass a folder under runs/, e.g. `localtune status` lists them")
        return cls(path)

    # status.json -------------------------------------------------------
    def status(self) -> dict:
        return read_json(self.path / "status.json", {})

    def set_status(self, **fields) -> None:
        status = {**self.status(), "pid": os.getpid(), **fields, "updated": time.time()}
        atomic_write(self.path / "status.json", json.dumps(status, indent=1))

    # manifest.json -----------------------------------------------------
    def manifest(self) -> dict:
        return read_json(self.path / "manifest.json", {})

    def update_manifest(self, **fields) -> None:
        atomic_write(self.path / "manifest.json", json.dumps({**self.manifest(), **fields}, indent=1))

    # metrics.jsonl -----------------------------------------------------
    def log(self, stage: str, step: int, kind: str, **values) -> dict:
        record = {"t": round(time.time(), 3), "stage": stage, "step": step, "kind": kind, **values}
        if self._metrics is None:
            self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8")
        try:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        except OSError as e:
            raise disk_error(e, self.path / "metrics.jsonl") from e
        return record

    def metrics(self) -> list[dict]:
        return read_metrics(self.path / "metrics.jsonl")

    # control.json: requests from a watcher (pause, checkpoint now) ------
    def control(self) -> dict:
        return read_json(self.path / "control.json", {})

    def request(self, **fields) -> None:
        atomic_write(self.path / "control.json", json.dumps({**self.control(), **fields}))

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def newest_run(runs_dir: str | Path = "runs") -> Path | None:
    runs = [p for p in Path(runs_dir).glob("*/recipe.toml")]
    return max(runs, key=lambda p: p.stat().st_mtime).parent if runs else None


def last_record(path: str | Path, kind: str, tail_bytes: int = 1 << 16) -> dict | None:
    """The last complete `kind` record of a metrics.jsonl, reading only its tail."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().split(b"\n")
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") == kind:
            return record
    return None


def summary(path: str | Path, now: float | None = None) -> dict:
    """One row of `localtune runs`: name, state, stage, step/total, last loss, started, duration, trainer."""
    path = Path(path)
    status, manifest = read_json(path / "status.json", {}), read_json(path / "manifest.json", {})
    state = effective_state(status, path)
    started = manifest.get("started") or (path / "recipe.toml").stat().st_mtime
    if state in LIVE_STATES:
        end = now if now is not None else time.time()
    else:
        end = manifest.get("finished") or status.get("updated") or started
    train = last_record(path / "metrics.jsonl", "train")
    return {"name": path.name, "path": str(path), "state": state, "stage": status.get("stage"),
            "step": status.get("step"), "steps_total": status.get("steps_total"),
            "loss": train.get("loss") if train else None, "started": started, "duration": max(0.0, end - started),
            "trainer": trainer_of(path, status)}


def list_runs(runs_dir: str | Path = "runs", now: float | None = None) -> list[dict]:
    """Every run under runs_dir, newest first."""
    rows = [summary(p.parent, now) for p in Path(runs_dir).glob("*/recipe.toml")]
    return sorted(rows, key=lambda r: r["started"], reverse=True)
