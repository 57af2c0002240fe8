"""Screens: the runs list, the run view, and the quit and help dialogs (the chat screen: chat.py)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Input, Label, ProgressBar, Static

from ..run import LIVE_STATES, Run, list_runs, pid_alive
from .chat import ChatScreen
from .state import RunState
from .widgets import STATE_STYLE, EventLog, LossChart, ReportPanel, SamplePanel, StageChain, StatsPanel, duration


class RunScreen(Screen):
    """One run, live: stage chain, progress, loss chart, numbers, samples and events."""

    BINDINGS = [
        Binding("q", "quit_run", "quit/detach"),
        Binding("s", "checkpoint", "checkpoint"),
        Binding("p", "pause", "pause/resume"),
        Binding("g", "chat", "chat"),
        Binding("left", "stage(-1)", "stage", key_display="←"),
        Binding("right", "stage(1)", "stage", key_display="→"),
        Binding("r", "runs", "runs"),
        Binding("question_mark", "help", "help", key_display="?"),
    ]

    def __init__(self, path: str | Path):
        super().__init__()
        self.state = RunState(path)
        self.selected: str | None = None  # None follows the current stage
        self.stopping = False

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        yield StageChain(id="chain")
        with Horizontal(id="progress-row"):
            yield ProgressBar(total=None, show_eta=False, id="progress")
            yield Static(id="progress-label")
        with Horizontal(id="middle"):
            yield LossChart(id="chart")
            with Vertical(id="side"):
                yield StatsPanel(id="stats")
                yield ReportPanel(id="report")
        with Horizontal(id="bottom"):
            with VerticalScroll(id="samples-box"):
                yield SamplePanel(id="samples")
            with VerticalScroll(id="events-box"):
                yield EventLog(id="events")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#samples-box").border_title = "samples"
        self.query_one("#events-box").border_title = "events"
        self.query_one("#chart").border_title = "loss"
        self.poll()
        self.set_interval(self.app.poll_interval, self.poll)

    def poll(self) -> None:
        if self.state.refresh():
            self.redraw()
        if self.stopping and self.state.state not in LIVE_STATES:
            self.app.exit("stopped")

    def on_resize(self) -> None:
        self.set_class(self.size.width < 100, "narrow")

    @property
    def stage(self) -> str | None:
        return self.selected or self.state.current_stage()

    def redraw(self) -> None:
        st, stage = self.state, self.stage
        style = STATE_STYLE.get(st.state, "")
        title = Text.assemble(("localtune ", "bold"), (st.name, "bold"), "  ", (st.state, style))
        if st.deleted:
            title.append("  the run directory was deleted; showing what was read", style="red")
        self.query_one("#title", Static).update(title)
        self.query_one("#chain", StageChain).show(st, stage)
        step, total, eta = st.progress(stage) if stage else (0, None, None)
        bar = self.query_one("#progress", ProgressBar)
        bar.update(total=total or None, progress=step)
        label = f"step {step}/{total or '?'}"
        if eta is not None:
            label += f"  ETA {duration(eta)}"
        self.query_one("#progress-label", Static).update(label)
        view = st.stages.get(stage) if stage else None
        self.query_one("#chart", LossChart).show(view.train if view else [], view.eval if view else [])
        self.query_one("#stats", StatsPanel).show(st, stage)
        self.query_one("#report", ReportPanel).show(st)
        self.query_one("#samples", SamplePanel).show(st)
        self.query_one("#events", EventLog).show(st)
        self.query_one("#events-box", VerticalScroll).scroll_end(animate=False)

    # actions -------------------------------------------------------------
    def _live(self) -> bool:
        return self.state.state in LIVE_STATES

    def action_stage(self, delta: int) -> None:
        names = self.state.stage_names()
        if not names:
            return
        i = names.index(self.stage) if self.stage in names else 0
        self.selected = names[(i + delta) % len(names)]
        self.redraw()

    def action_checkpoint(self) -> None:
        if not self._live():
            self.notify("the run is not training", severity="warning")
            return
        Run(self.state.path).request(checkpoint=time.time())
        self.notify("checkpoint asked for: it is written after the current step")

    def action_pause(self) -> None:
        if not self._live():
            self.notify("the run is not training", severity="warning")
            return
        paused = self.state.state == "paused" or bool(Run(self.state.path).control().get("paused"))
        Run(self.state.path).request(paused=not paused)
        self.notify("resuming" if paused else "pausing after the current step")

    def action_chat(self) -> None:
        """Base and tuned side by side, answered by a `localtune chat` subprocess (the adapters saved so far)."""
        target = self.state.path / self.selected if self.selected else self.state.path
        self.app.push_screen(ChatScreen(target))

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    def action_runs(self) -> None:
        self.app.push_screen(RunsScreen(self.state.path.parent))

    def action_quit_run(self) -> None:
        if not self._live():
            self.app.exit("closed")
            return

        def chosen(choice: str | None) -> None:
            if choice == "detach":
                self.app.exit("detached")
            elif choice == "stop":
                self.stop()

        self.app.push_screen(QuitScreen(), chosen)

    def stop(self) -> None:
        """Ask the trainer to checkpoint and exit (SIGINT, as Ctrl-C would); leave once it has."""
        pid = self.state.status.get("pid")
        if not pid_alive(pid):
            self.app.exit("closed")
            return
        if self.state.state == "paused":
            Run(self.state.path).request(paused=False)
        os.kill(pid, signal.SIGINT)
        self.stopping = True
        self.notify("stopping: a checkpoint is written after the current step")


class QuitScreen(ModalScreen[str]):
    """Training is still running: stop it (checkpoint first), or leave it running in the background."""

    BINDINGS = [Binding("escape", "dismiss_cancel", "cancel"), Binding("s", "choose('stop')", "stop"),
                Binding("d", "choose('detach')", "detach")]

    def compose(self) -> ComposeResult:
        with Grid(id="dialog"):
            yield Label("Training is still running.", id="question")
            yield Button("Stop (checkpoint)", variant="error", id="stop")
            yield Button("Detach", variant="primary", id="detach")
            yield Button("Cancel", id="cancel")

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "cancel" else event.button.id)

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)

    def action_dismiss_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,question_mark,q", "app.pop_screen", "close")]

    TEXT = """[b]keys[/b]
  q      quit: asks to stop training (with a checkpoint) or detach
  s      write a checkpoint after the current step
  p      pause or resume training between steps
  g      chat: base and tuned side by side (the adapters saved so far)
  ← →    show another stage
  r      all runs
  ?      this help

Training runs in its own process and writes the run directory;
this view only reads it. Reattach with `localtune watch RUN`."""

    def compose(self) -> ComposeResult:
        yield Static(self.TEXT, id="help")


class RunsScreen(Screen):
    """Every run under a folder; Enter opens one, the filter narrows by state or name."""

    BINDINGS = [Binding("escape", "back", "back"), Binding("q", "app.quit", "quit")]
    COLUMNS = ("name", "state", "stage", "step", "loss", "started", "duration")

    def __init__(self, runs_dir: str | Path):
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.rows: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter: a state (running, done, failed, crashed…) or part of a name", id="filter")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*self.COLUMNS)
        self.reload()
        self.set_interval(max(2.0, self.app.poll_interval), self.reload)
        self.query_one(DataTable).focus()

    def reload(self) -> None:
        self.rows = list_runs(self.runs_dir, now=self.app.clock())
        self.show()

    @on(Input.Changed)
    def show(self) -> None:
        table = self.query_one(DataTable)
        wanted = self.query_one("#filter", Input).value.strip().lower()
        table.clear()
        for r in self.rows:
            if wanted and wanted not in r["state"] and wanted not in r["name"].lower():
                continue
            step = f"{r['step'] or 0}/{r['steps_total'] or '?'}" if r["step"] is not None else "—"
            table.add_row(r["name"], Text(r["state"], style=STATE_STYLE.get(r["state"], "")), r["stage"] or "—",
                          step, f"{r['loss']:.4f}" if r["loss"] is not None else "—",
                          time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"])),
                          duration(r["duration"]), key=r["path"])

    @on(DataTable.RowSelected)
    def open_run(self, event: DataTable.RowSelected) -> None:
        self.app.push_screen(RunScreen(event.row_key.value))

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
