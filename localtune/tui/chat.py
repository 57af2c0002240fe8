"""The chat screen: base and tuned answers side by side, as `localtune chat RUN --compare` shows them.

The model is not loaded in the TUI's process: `localtune chat RUN --compare --json-tokens` runs as a
subprocess (it loads once, then answers each prompt written to its stdin) and a thread worker streams its
JSON lines into the two columns, so the view stays responsive while it loads and generates.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

SIDES = ("base", "tuned")


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

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("chat ", "bold"), self.target, ("  base (adapters off) | tuned", "dim")),
                     id="chat-title")
        with Horizontal(id="chat-columns"):
            for side in SIDES:
                with VerticalScroll(id=f"{side}-box", classes="chat-box"):
                    yield Static(id=f"{side}-answers")
        yield Input(placeholder="a prompt, then Enter  (/reset, /system TEXT)", id="chat-prompt")
        yield Static(Text("loading the model…", style="dim"), id="chat-status")
        yield Footer()

    def on_mount(self) -> None:
        for side in SIDES:
            self.query_one(f"#{side}-box").border_title = side
        self.query_one(Input).focus()
        self.converse()

    @work(thread=True, exclusive=True, group="chat")
    def converse(self) -> None:
        """Runs the subprocess and hands each of its output lines to the screen, until it exits."""
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, bufsize=1)
        except OSError as e:
            self.app.call_from_thread(self.ended, -1, str(e))
            return
        for line in self.proc.stdout:
            self.app.call_from_thread(self.received, line)
        error = self.proc.stderr.read()
        self.app.call_from_thread(self.ended, self.proc.wait(), error)

    def received(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if "ready" in event:  # the model has loaded
            self.busy = False
            self.status("ready", "green")
        elif "token" in event and self.turns[event["side"]]:
            self.turns[event["side"]][-1][1] += event["token"]
            self.redraw(event["side"])
        elif "prompt" in event:  # the turn is over: both answers are in
            self.busy = False
            self.status("ready", "green")

    def ended(self, code: int, error: str) -> None:
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
        self.app.pop_screen()

    def on_unmount(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # the chat ends at the end of its input
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
