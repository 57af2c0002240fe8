"""The run directory: the contract between the trainer and every reader.

runs/<name>-<YYYYmmdd-HHMMSS>/ recipe.toml manifest.json status.json metrics.jsonl
report.md <stage>/adapters.safetensors <stage>/checkpoint/ .lock
The trainer writes, holding .lock (lock.py); the TUI, `status`, tests and benchmarks read, lock-free.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from ..errors import LocaltuneError
from . import lock
from .damage import DamagedFile, json_problem, read_text
from .files import atomic_write, disk_error  # noqa: F401  (public here: run.atomic_write)


def read_json(path: str | Path, default=None):
    """A JSON object, or `default` when the file is missing or damaged (tolerant readers: TUI, control)."""
    problem, value = json_problem(path)
    return default if problem else value


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


MANIFEST_FIX = ("manifest.json records the run's model, data hashes and finished stages: copy it back from "
                "another copy of this run; or start the run again with `localtune run RECIPE`")


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
    """All complete records of metrics.jsonl; a partially written last line (or a damaged one) is skipped."""
    records = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # not JSON, or not UTF-8
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


def is_run_dir(path: str | Path) -> bool:
    """A run directory, even one with a file missing."""
    return any((Path(path) / name).is_file() for name in ("recipe.toml", "manifest.json", "status.json"))


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
        run.update_manifest(recipe_sha256=sha256_text(recipe_text))  # readers check the copy against it
        return run

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / "recipe.toml").exists():
            if is_run_dir(path):  # a run that lost its recipe copy
                original = read_json(path / "manifest.json", {}).get("recipe") or "RECIPE"
                raise DamagedFile(path / "recipe.toml", "missing", "copy the recipe this run started from "
                                  f"back: `cp {original} {path / 'recipe.toml'}`")
            raise LocaltuneError(f"{path}: not a localtune run directory (no recipe.toml)\n"
                                 "  fix: pass a folder under runs/, e.g. `localtune status` lists them")
        return cls(path)

    # recipe.toml -------------------------------------------------------
    def recipe(self, base_dir: str | None = None):
        """The run's copy of its recipe, parsed; checked against the hash the run started with."""
        from .. import recipe as recipe_mod
        from ..errors import RecipeError

        path, manifest = self.path / "recipe.toml", self.manifest()
        original = manifest.get("recipe") or "RECIPE"
        fix = f"copy the recipe this run started from over it: `cp {original} {path}`"
        text = read_text(path, fix)
        expected = manifest.get("recipe_sha256")
        if expected and sha256_text(text) != expected:
            raise DamagedFile(path, f"not the recipe this run started with ({len(text.encode()):,} bytes whose "
                                    f"sha256 is not manifest.json's {expected[:12]}…): damaged or edited", fix)
        try:
            return recipe_mod.parse(text, str(path), base_dir or manifest.get("base_dir") or
                                    self.status().get("base_dir", "."))
        except RecipeError as e:
            first = e.message.split("\n")[0].replace(str(path), "recipe.toml")
            raise DamagedFile(path, f"does not parse ({first})", fix) from None

    # status.json -------------------------------------------------------
    def status(self) -> dict:
        """status.json; a damaged one reads {"state": "damaged", "damage": what is wrong}."""
        problem, status = json_problem(self.path / "status.json")
        if problem == "missing":
            return {}
        return {"state": "damaged", "damage": problem} if problem else status

    def set_status(self, **fields) -> None:
        old = self.status()  # a damaged status.json is replaced: it is the trainer's own scratch state
        status = {**(old if old.get("state") != "damaged" else {}), "pid": os.getpid(), **fields,
                  "updated": time.time()}
        atomic_write(self.path / "status.json", json.dumps(status, indent=1))

    # manifest.json -----------------------------------------------------
    def manifest(self) -> dict:
        """manifest.json; a damaged one (or a missing one once the run has a status) is a DamagedFile."""
        path = self.path / "manifest.json"
        problem, manifest = json_problem(path)
        if problem == "missing" and not (self.path / "status.json").exists():
            return {}  # a run being created
        if problem:
            raise DamagedFile(path, problem, MANIFEST_FIX)
        return manifest

    def update_manifest(self, **fields) -> None:
        atomic_write(self.path / "manifest.json", json.dumps({**self.manifest(), **fields}, indent=1))

    # metrics.jsonl -----------------------------------------------------
    def log(self, stage: str, step: int, kind: str, **values) -> dict:
        record = {"t": round(time.time(), 3), "stage": stage, "step": step, "kind": kind, **values}
        if self._metrics is None:
            path = self.path / "metrics.jsonl"
            torn = path.exists() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"
            self._metrics = open(path, "a", encoding="utf-8")
            if torn:  # a killed writer's half line stays alone on its line; ours start on the next
                self._metrics.write("\n")
        try:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        except OSError as e:
            raise disk_error(e, self.path / "metrics.jsonl") from e
        return record

    def warn(self, stage: str, step: int, message: str) -> dict:
        """A warning event that report.md lists too (it is kept in manifest.json)."""
        warnings = self.manifest().get("warnings", [])
        self.update_manifest(warnings=warnings + [{"stage": stage, "step": step, "message": message}])
        return self.log(stage, step, "event", event="warning", message=message)

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


def run_dirs(runs_dir: str | Path = "runs") -> list[Path]:
    return [p for p in Path(runs_dir).glob("*/") if is_run_dir(p)]


def newest_run(runs_dir: str | Path = "runs") -> Path | None:
    runs = run_dirs(runs_dir)
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


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
    """One row of `localtune runs`: name, state, stage, step/total, last loss, started, duration.

    A damaged status.json or manifest.json makes the state "damaged" (with "damage": the message),
    except that a finished run's status is not needed to know it is done.
    """
    run = Run(path)
    path, status, damage = run.path, run.status(), None
    try:
        manifest = run.manifest()
    except DamagedFile as e:
        manifest, damage = {}, e.message
    if status.get("state") == "damaged" or (not status and manifest.get("started")):
        status.setdefault("damage", "missing")
        if manifest.get("finished"):  # what status.json said at the end, from the manifest
            last = (manifest.get("stages_done") or [None])[-1]
            result = manifest.get("stage_results", {}).get(last, {})
            status = {"state": "done", "stage": last, "step": result.get("step"),
                      "steps_total": result.get("steps_total"), "updated": manifest["finished"]}
        else:
            damage = damage or DamagedFile(path / "status.json", status["damage"], "it is written again by "
                                           f"`localtune run --resume {path}`").message
    state = "damaged" if damage else effective_state(status, path)
    started = manifest.get("started") or path.stat().st_mtime
    if state in LIVE_STATES:
        end = now if now is not None else time.time()
    else:
        end = manifest.get("finished") or status.get("updated") or started
    train = last_record(path / "metrics.jsonl", "train")
    return {"name": path.name, "path": str(path), "state": state, "stage": status.get("stage"),
            "step": status.get("step"), "steps_total": status.get("steps_total"),
            "loss": train.get("loss") if train else None, "started": started, "duration": max(0.0, end - started),
            **({"error": status["error"]} if status.get("error") else {}), **({"damage": damage} if damage else {}),
            "trainer": trainer_of(path, status)}


def list_runs(runs_dir: str | Path = "runs", now: float | None = None) -> list[dict]:
    """Every run under runs_dir, newest first."""
    rows = [summary(p, now) for p in run_dirs(runs_dir)]
    return sorted(rows, key=lambda r: r["started"], reverse=True)
