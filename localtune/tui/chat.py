"""The chat screen: base and tuned answers side by side, as `localtune chat RUN --compare` shows them.

The model is not loaded in the TUI's process: `localtune chat RUN --compare --json-tokens` runs as a
subprocess (it loads once, then answers each prompt written to its stdin) and a thread worker streams its
JSON lines into the two columns, so the view stays responsive while it loads and generates. Closing the
screen never waits on the event loop: it ends the subprocess (SIGTERM while it loads or answers, else the
end of its input) and the worker thread reaps it; its stderr goes to a temporary file, so a child writing
many warnings cannot fill a pipe nobody reads and stall.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

SIDES = ("base", "tuned")
KILL_AFTER = 5.0  # seconds a closed screen's subprocess has to exit before SIGKILL


def chat_command(target: str | Path, max_tokens: int = 64) -> list[str]:
    """The subprocess: the run's adapters saved so far (--in-progress: a preview while it trains)."""
    return [sys.executable, "-m", "localtune.cli", "chat", str(target), "--compare", "--json-tokens",
            "--in-progress", "--max-tokens", str(max_tokens)]


class ChatScreen(Screen):
    """Prompt at the bottom; each column keeps its side's conversation. ctrl+r resets both."""

    BINDINGS = [Binding("escape", "close", "close"), Binding("ctrl+r", "reset", "reset")]

    def __init__(self, target: str | Path, command: list[str] | None = None):
        super().__init__()
        self.target = str(target)
        self.command = command or chat_command(target)
        self.proc: subprocess.Popen | None = None
        self.turns: dict[str, list[list[str]]] = {s: [] for s in SIDES}  # [[prompt, answer so far], ...]
        self.busy = True  # until the model has loaded (the subprocess answers nothing before)
        self.exit_code: int | None = None
        self.labels = dict(zip(SIDES, SIDES))  # the `ready` event's labels replace these ("before dpo", ...)
        self.base_is = "adapters off"  # or "loaded beside it" (a full fine-tune), from the `ready` event
        self.closed = False  # closing or closed: the worker's late callbacks do nothing (is_mounted stays True)
        self.lock = threading.Lock()  # the subprocess starts, or the screen closes, not both at once

    def compose(self) -> ComposeResult:
        yield Static(self.title_text(), id="chat-title")
        with Horizontal(id="chat-columns"):
            for side in SIDES:
                with VerticalScroll(id=f"{side}-box", classes="chat-box"):
                    yield Static(id=f"{side}-answers")
        yield Input(placeholder="a prompt, then Enter  (/reset, /system TEXT)", id="chat-prompt")
        yield Static(Text("loading the model…", style="dim"), id="chat-status")
        yield Footer()

    def title_text(self) -> Text:
        base, tuned = self.labels.values()
        return Text.assemble(("chat ", "bold"), self.target, (f"  {base} ({self.base_is}) | {tuned}", "dim"))

    def on_mount(self) -> None:
        self.show_labels()
        self.query_one(Input).focus()
        self.converse()

    def show_labels(self) -> None:
        for side in SIDES:
            self.query_one(f"#{side}-box").border_title = self.labels[side]
        self.query_one("#chat-title", Static).update(self.title_text())

    @work(thread=True, exclusive=True, group="chat")
    def converse(self) -> None:
        """Runs the subprocess and hands each of its output lines to the screen, until it exits; then reaps it."""
        with tempfile.TemporaryFile("w+") as errors:
            try:
                with self.lock:
                    if self.closed:  # closed before the subprocess started
                        return
                    self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=errors, text=True, bufsize=1)
            except OSError as e:
                self.deliver(self.ended, -1, str(e))
                return
            for line in self.proc.stdout:
                self.deliver(self.received, line)
            code = self.proc.wait()  # after a close: within KILL_AFTER seconds (see on_unmount)
            for pipe in (self.proc.stdout, self.proc.stdin):
                with contextlib.suppress(OSError):
                    pipe.close()
            errors.seek(0)
            self.deliver(self.ended, code, "".join(deque(errors, maxlen=20)))

    def gone(self) -> bool:
        """Closing, closed, or the app exiting: the screen's widgets may be removed already."""
        return self.closed or not self.is_attached

    def deliver(self, callback, *args) -> None:
        """Calls `callback` on the event loop, unless the screen has closed (the app may be gone too)."""
        if not self.gone():
            with contextlib.suppress(RuntimeError):  # the app stopped meanwhile
                self.app.call_from_thread(callback, *args)

    def received(self, line: str) -> None:
        if self.gone():
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        if "ready" in event:  # the model has loaded
            self.busy = False
            if len(event.get("labels") or ()) == 2:
                self.labels = dict(zip(SIDES, event["labels"]))
                self.base_is = event.get("base_is") or self.base_is
                self.show_labels()
            self.status("ready", "green")
        elif "token" in event and self.turns[event["side"]]:
            self.turns[event["side"]][-1][1] += event["token"]
            self.redraw(event["side"])
        elif "prompt" in event:  # the turn is over: both answers are in
            self.busy = False
            self.status("ready", "green")

    def ended(self, code: int, error: str) -> None:
        if self.gone():
            return
        self.exit_code, self.busy = code, True
        last = [line for line in (error or "").strip().splitlines() if line.strip()]
        why = "\n".join(last[-3:]) if code else "the chat process ended"
        self.status(f"{why}" + (f" (exit code {code})" if code else ""), "red" if code else "dim")

    def status(self, message: str, style: str) -> None:
        self.query_one("#chat-status", Static).update(Text(message, style=style))

    def redraw(self, side: str) -> None:
        text = Text()
        for prompt, answer in self.turns[side]:
            text.append(f"you: {prompt}\n", style="bold")
            text.append((answer or "…") + "\n\n")
        self.query_one(f"#{side}-answers", Static).update(text)
        self.query_one(f"#{side}-box", VerticalScroll).scroll_end(animate=False)

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError):  # the subprocess died: `ended` will say why
            self.proc.stdin.write(line.rstrip("\\") + "\n")  # a trailing \ would continue the prompt
            self.proc.stdin.flush()

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.busy or self.proc is None:
            self.notify("wait: " + ("the chat process has ended" if self.exit_code is not None
                                    else "the model is loading or answering"), severity="warning")
            return
        event.input.value = ""
        if prompt.split()[0] in ("/reset", "/system"):
            self.send(prompt)
            self.clear(prompt)
            return
        if prompt.startswith("/"):  # /help, /quit: nothing would answer them here
            self.notify("commands here: /reset, /system TEXT; escape closes the chat", severity="warning")
            return
        for side in SIDES:
            self.turns[side].append([prompt, ""])
            self.redraw(side)
        self.busy = True
        self.status("answering…", "yellow")
        self.send(prompt)

    def clear(self, why: str) -> None:
        for side in SIDES:
            self.turns[side].clear()
            self.redraw(side)
        self.status(f"{why}: conversation reset", "dim")

    def action_reset(self) -> None:
        if not self.busy and self.proc is not None:
            self.send("/reset")
            self.clear("/reset")

    def action_close(self) -> None:
        self.closed = True  # its widgets go before on_unmount runs: late callbacks must stop now
        self.app.pop_screen()

    def on_unmount(self) -> None:
        """Ends the subprocess without waiting for it here: the worker thread reaps it."""
        with self.lock:
            self.closed, proc = True, self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.busy:  # loading or answering: it would not read its input before it is done
            proc.terminate()
        else:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the chat ends at the end of its input
        killer = threading.Timer(KILL_AFTER, lambda: proc.poll() is None and proc.kill())
        killer.daemon = True
        killer.start()
