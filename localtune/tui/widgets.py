"""The run view's widgets. Each renders from a RunState; none reads files itself."""
from __future__ import annotations

import math
import time

from rich.text import Text
from textual.widget import Widget
from textual.widgets import Static

from ..train import metrics
from .state import RunState, downsample

STATE_STYLE = {"done": "green", "running": "cyan", "paused": "yellow", "failed": "red", "crashed": "red",
               "interrupted": "yellow", "pending": "dim", "deleted": "red", "starting": "cyan"}
STATE_MARK = {"done": "✓", "running": "●", "paused": "‖", "failed": "✗", "crashed": "✗", "interrupted": "■",
              "pending": "○", "starting": "…"}


def duration(sec) -> str:
    if sec is None or not math.isfinite(sec):
        return "—"
    sec = int(sec)
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


# Braille: each cell holds a 2 x 4 grid of dots; bit for (column, row) within the cell.
_DOT = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


def braille_plot(series: list[tuple[list, str, bool]], width: int, height: int) -> Text:
    """Plot (points, style, joined) series into width x height cells with a y axis on the left.

    points are (x, y); joined series are drawn as lines, the others as dots.
    """
    label_w = 8
    cols, rows = max(1, width - label_w), max(1, height - 1)
    all_points = [p for pts, _, _ in series for p in pts]
    if not all_points:
        return Text("waiting for the first report…", style="dim")
    xs, ys = [p[0] for p in all_points], [p[1] for p in all_points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x1 = x0 + 1
    W, H = cols * 2, rows * 4
    cells = [[0] * cols for _ in range(rows)]
    styles = [[""] * cols for _ in range(rows)]

    def dot(px, py, style):
        if 0 <= px < W and 0 <= py < H:
            r, c = py // 4, px // 2
            cells[r][c] |= _DOT[px % 2][py % 4]
            styles[r][c] = style

    for points, style, joined in series:
        scaled = [(round((x - x0) / (x1 - x0) * (W - 1)), round((y1 - y) / (y1 - y0) * (H - 1)))
                  for x, y in downsample(points, W)]
        for i, (px, py) in enumerate(scaled):
            dot(px, py, style)
            if joined and i:
                qx, qy = scaled[i - 1]
                n = max(abs(px - qx), abs(py - qy))
                for k in range(1, n):
                    dot(round(qx + (px - qx) * k / n), round(qy + (py - qy) * k / n), style)
    text = Text()
    for r in range(rows):
        label = f"{y1:.3g}" if r == 0 else f"{y0:.3g}" if r == rows - 1 else ""
        text.append(f"{label:>{label_w - 1}} ", style="dim")
        for c in range(cols):
            text.append(chr(0x2800 + cells[r][c]) if cells[r][c] else " ", style=styles[r][c])
        text.append("\n")
    left, right = f"step {x0:g}", f"{x1:g}"
    text.append(" " * label_w + left + " " * max(1, cols - len(left) - len(right)) + right, style="dim")
    return text


class LossChart(Widget):
    """Train loss (line) and eval loss (dots) of one stage, downsampled to the widget's width."""

    DEFAULT_CSS = "LossChart { height: 1fr; min-height: 6; }"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.train, self.eval = [], []

    def show(self, train: list, eval_points: list) -> None:
        self.train, self.eval = train, eval_points
        self.refresh()

    def render(self):
        legend = Text.assemble(("── train", "cyan"), "  ", ("•• eval", "yellow"))
        plot = braille_plot([(self.train, "cyan", True), (self.eval, "yellow", False)],
                            self.size.width, max(2, self.size.height - 1))
        return Text.assemble(legend, "\n", plot)


class StageChain(Static):
    """sft ✓ → dpo ● → export ○, with the selected stage underlined."""

    def show(self, state: RunState, selected: str | None) -> None:
        text = Text()
        for i, name in enumerate(state.stage_names()):
            if i:
                text.append(" → ", style="dim")
            st = state.stage_state(name)
            style = STATE_STYLE.get(st, "")
            if name == selected:
                style += " bold underline"
            text.append(f"{STATE_MARK.get(st, '?')} {name}", style=style)
        self.update(text)


class StatsPanel(Static):
    """The numbers every stage has (loss, lr, tokens/s, memory), then the method's own."""

    def show(self, state: RunState, stage: str | None) -> None:
        view = state.stages.get(stage) if stage else None
        text = Text()
        if view is None:
            self.update(Text("no stage yet", style="dim"))
            return
        last = view.last
        result = state.stage_result(stage)
        text.append(f"{stage}", style="bold")
        text.append(f" ({view.kind})\n", style="dim")
        for m in metrics.COMMON:
            if m.key in last:
                value = m.show(last[m.key])
                if m.key == "peak_memory_gb" and state.memory_limit_gb():
                    value += f" / {state.memory_limit_gb():.0f} GB"
                text.append(f"{m.label:>15} ", style="dim")
                text.append(value + "\n")
        if view.eval:
            text.append(f"{'eval loss':>15} ", style="dim")
            text.append(f"{view.eval[-1][1]:.4f}\n")
        if view.general:  # the forgetting guard's last check
            g = view.general
            budget = f" / {g['budget']:+.0%}" if "budget" in g else ""
            text.append(f"{'general NLL':>15} ", style="dim")
            text.append(f"{g['general_nll']:.4f} ({g['general_nll_increase']:+.1%}{budget})\n",
                        style="" if g.get("within_budget", True) else "bold red")
        method = metrics.method_metrics(view.kind, last)
        if method:
            text.append(f"\n{view.kind}\n", style="bold")
            for m, value in method:
                text.append(f"{m.label:>15} ", style="dim")
                text.append(m.show(value) + "\n")
        if result:
            text.append("\nstage done", style="bold green")
            if result.get("train_time_sec") is not None:
                text.append(f" in {duration(result['train_time_sec'])}")
            text.append("\n")
        self.update(text)


class ReportPanel(Static):
    """The run's report once it has one: task metric before and after, and the failure if any."""

    def show(self, state: RunState) -> None:
        task = state.task_metric()
        text = Text()
        if task.get("before") or task.get("after"):
            first = task.get("before") or task.get("after")
            text.append(f"task metric: {first['metric'].replace('_', ' ')} of {first['n']}\n", style="bold")
            for when in ("before", "few_shot", "after"):
                r = task.get(when)
                if r and "value" in r:
                    label = f"{r['k']}-shot" if when == "few_shot" else when  # the base, k examples in its prompt
                    text.append(f"{label:>7} ", style="dim")
                    loglik = r["metric"] == "loglik"  # nats per answer token, not a share
                    text.append(f"{r['value']:6.3f} nats/token" if loglik else f"{r['value']:6.1%}")
                    if "well_formed" in r:
                        text.append(f"  well-formed {r['well_formed']:.0%}", style="dim")
                    for key, value in r.get("secondary", {}).items():
                        text.append(f"  {key} {value:.0%}", style="dim")
                    text.append("\n")
            if verdict := task.get("few_shot", {}).get("against_tune"):
                style = "green" if verdict["verdict"] == "tune wins" else "yellow"
                text.append(verdict["sentence"] + "\n", style=style)
        if state.status.get("error"):
            text.append("error\n", style="bold red")
            text.append(state.status["error"] + "\n")
        if state.state == "crashed":
            text.append("the training process is gone without a final status (crashed or killed).\n", style="red")
            text.append(f"continue with: localtune run --resume {state.path}\n")
        if state.state == "interrupted":
            text.append(f"stopped; continue with: localtune run --resume {state.path}\n", style="yellow")
        if (state.path / "report.md").exists() and state.state == "done":
            text.append("report.md is in the run directory\n", style="dim")
        self.display = bool(text.plain)
        self.update(text)


class EventLog(Static):
    """Checkpoints, warnings, task metrics, stops: the latest at the bottom."""

    def show(self, state: RunState, lines: int = 50) -> None:
        text = Text()
        for e in list(state.events)[-lines:]:
            kind = e.get("event", "")
            style = "yellow" if kind == "warning" else "red" if kind in ("failed", "nan", "error") else ""
            stamp = time.strftime("%H:%M:%S", time.localtime(e.get("t", 0)))
            text.append(f"{stamp} ", style="dim")
            text.append(f"{e.get('stage', '')}: ", style="dim")
            text.append(str(e.get("message") or kind) + "\n", style=style)
        self.update(text if text.plain else Text("no events yet", style="dim"))


class SamplePanel(Static):
    """The latest sample generations (or rollouts): prompt, expected, got."""

    def show(self, state: RunState, count: int = 3) -> None:
        text = Text()
        for s in list(state.samples)[-count:]:
            when = f"[{s['when']}] " if s.get("when") else ""
            text.append(f"{when}", style="dim")
            text.append(f"{_one_line(s.get('prompt', ''))}\n")
            if "expected" in s:
                text.append("  expected ", style="dim")
                text.append(_one_line(s["expected"]) + "\n")
            text.append("       got ", style="dim")
            text.append(_one_line(s.get("got", s.get("completion", ""))) + "\n",
                        style="green" if s.get("got") == s.get("expected") else "")
            if isinstance(s.get("reward"), (int, float)):  # a ppo rollout
                text.append("    reward ", style="dim")
                text.append(f"{s['reward']:+.3f}\n")
        self.update(text if text.plain else Text("no samples yet", style="dim"))


def _one_line(value, limit: int = 120) -> str:
    s = " ".join(str(value).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"
