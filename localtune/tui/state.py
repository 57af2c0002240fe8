"""What the TUI shows, read from a run directory: no Textual here, so it is easy to test."""
from __future__ import annotations

import json
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..run import Run, effective_state, read_json


class MetricsTail:
    """Reads metrics.jsonl incrementally: only new bytes, and an unfinished last line waits for its end."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < self.offset:  # replaced or truncated: start over
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()  # b"" when the chunk ended with a newline
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


@dataclass
class StageView:
    name: str
    kind: str
    train: list = field(default_factory=list)  # (step, loss)
    eval: list = field(default_factory=list)  # (step, loss)
    last: dict = field(default_factory=dict)  # the latest train record
    general: dict | None = None  # the latest forgetting-guard record (general NLL)
    steps_total: int | None = None
    step: int = 0


def _stages_from_recipe(path: Path) -> list[tuple[str, str]]:
    try:
        raw = tomllib.loads((path / "recipe.toml").read_text())
    except (OSError, ValueError):  # missing, not UTF-8, or not TOML: the manifest's stages are used
        return []
    stages = raw.get("stages", [])
    if isinstance(stages, dict):  # [stages.<name>] tables
        return [(name, s.get("kind", name)) for name, s in stages.items() if isinstance(s, dict)]
    return [(s.get("name", s.get("kind", "?")), s.get("kind", "?")) for s in stages if isinstance(s, dict)]


class RunState:
    """A run directory as the TUI sees it; `refresh()` reads what changed since the last call."""

    def __init__(self, path: str | Path, max_events: int = 200, max_samples: int = 20):
        self.path = Path(path)
        self.name = self.path.name
        self.tail = MetricsTail(self.path / "metrics.jsonl")
        self.status: dict = {}
        self.manifest: dict = {}
        self.state = "unknown"
        self.stages: dict[str, StageView] = {}
        self.events: deque = deque(maxlen=max_events)
        self.samples: deque = deque(maxlen=max_samples)
        self.deleted = False
        self._manifest_mtime = None
        for name, kind in _stages_from_recipe(self.path):
            self.stages[name] = StageView(name, kind)

    def refresh(self) -> bool:
        """Read new records and the status; returns whether anything changed."""
        if not self.path.exists():
            changed = not self.deleted
            self.deleted, self.state = True, "deleted"
            return changed
        changed = self._read_manifest()
        status = Run(self.path).status()
        if status.get("state") == "damaged" and self.manifest.get("finished"):
            status = {"state": "done"}  # a finished run does not need its status.json
        state = effective_state(status, self.path) if status else "starting"
        if status != self.status or state != self.state:
            self.status, self.state, changed = status, state, True
        records = self.tail.read()
        for record in records:
            self._add(record)
        return changed or bool(records)

    def _read_manifest(self) -> bool:
        try:
            mtime = (self.path / "manifest.json").stat().st_mtime_ns
        except OSError:
            return False
        if mtime == self._manifest_mtime:
            return False
        self._manifest_mtime = mtime
        self.manifest = read_json(self.path / "manifest.json", self.manifest)
        for s in self.manifest.get("stages", []):
            self.stages.setdefault(s["name"], StageView(s["name"], s["kind"])).kind = s["kind"]
        return True

    def _stage(self, name: str) -> StageView:
        if name not in self.stages:
            self.stages[name] = StageView(name, name)
        return self.stages[name]

    def _add(self, r: dict) -> None:
        kind, stage = r.get("kind"), r.get("stage")
        if kind == "train" and isinstance(r.get("loss"), (int, float)):
            view = self._stage(stage)
            view.train.append((r.get("step", 0), r["loss"]))
            view.last, view.step = r, r.get("step", 0)
            view.steps_total = r.get("steps_total", view.steps_total)
        elif kind == "eval" and isinstance(r.get("loss"), (int, float)):
            self._stage(stage).eval.append((r.get("step", 0), r["loss"]))
        elif kind == "guard" and isinstance(r.get("general_nll"), (int, float)):
            self._stage(stage).general = r
        elif kind == "event":
            self.events.append(r)
        elif kind == "sample":
            self.samples.append(r)

    # derived views ------------------------------------------------------
    def stage_names(self) -> list[str]:
        return list(self.stages)

    def current_stage(self) -> str | None:
        stage = self.status.get("stage")
        if stage in self.stages:
            return stage
        trained = [n for n, v in self.stages.items() if v.train]
        return trained[-1] if trained else next(iter(self.stages), None)

    def stage_state(self, name: str) -> str:
        """done, running, paused, failed, crashed, interrupted or pending."""
        if name in self.manifest.get("stages_done", []):
            return "done"
        if name == self.status.get("stage"):
            return self.state if self.state != "done" else "done"
        return "pending"

    def progress(self, name: str) -> tuple[int, int | None, float | None]:
        """(step, total, ETA seconds) of a stage."""
        view = self.stages.get(name)
        if view is None:
            return 0, None, None
        step, total = view.step, view.steps_total
        if self.status.get("stage") == name:  # whichever the trainer wrote last
            step = max(step, self.status.get("step") or 0)
            total = self.status.get("steps_total") or total
        result = self.manifest.get("stage_results", {}).get(name)
        if result:
            step, total = result.get("step", step), total or result.get("step")
        eta = view.last.get("eta_sec") if self.state in ("running", "paused") else None
        return step or 0, total, eta

    def stage_result(self, name: str) -> dict | None:
        return self.manifest.get("stage_results", {}).get(name)

    def task_metric(self) -> dict:
        return self.manifest.get("task", {})

    def memory_limit_gb(self) -> float | None:
        device = self.manifest.get("device", {})
        for key in ("memory_limit_gb", "memory_gb", "ram_gb"):
            if isinstance(device.get(key), (int, float)):
                return float(device[key])
        return None


def downsample(points: list[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    """At most n points: bucket means, so 100k records chart as fast as 100."""
    if len(points) <= n or n <= 0:
        return points
    out, size = [], len(points) / n
    for i in range(n):
        bucket = points[int(i * size): max(int((i + 1) * size), int(i * size) + 1)]
        out.append((bucket[-1][0], sum(y for _, y in bucket) / len(bucket)))
    return out
