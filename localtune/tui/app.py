"""The Textual app: a run view, or the runs list."""
from __future__ import annotations

import time
from pathlib import Path

from textual.app import App
from textual.binding import Binding

from .screens import RunScreen, RunsScreen


class LocaltuneApp(App):
    """`run` opens that run's view; without it, the runs list of `runs_dir`.

    app.run() returns how the user left: "closed", "detached" or "stopped".
    """

    CSS_PATH = "localtune.tcss"
    TITLE = "localtune"
    BINDINGS = [Binding("ctrl+c", "quit_run", "quit", show=False, priority=True)]

    def __init__(self, run: str | Path | None = None, runs_dir: str | Path = "runs", poll_interval: float = 0.5,
                 clock=time.time):
        super().__init__()
        self.run_path, self.runs_dir = run, runs_dir
        self.poll_interval, self.clock = poll_interval, clock

    def on_mount(self) -> None:
        if self.run_path is None:
            self.push_screen(RunsScreen(self.runs_dir))
        else:
            self.push_screen(RunScreen(self.run_path))

    def action_quit_run(self) -> None:
        if isinstance(self.screen, RunScreen):
            self.screen.action_quit_run()
        else:
            self.exit("closed")
