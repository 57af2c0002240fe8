"""`localtune chat` in a terminal: a banner, a prompt, and answers streamed live (rich). Under --compare the
two answers stream into one two-column table, base on the left, tuned on the right: the base answer is
written first, then the tuned one (one model in memory answers both, one after the other; two beside a full
fine-tune)."""
from __future__ import annotations

import contextlib

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .chat import BASE_SIDE, HELP, Chatter, Conversation, command_of, read_prompts


def banner(target: str, compare: bool, labels, system: str | None, two_models: bool = False) -> Text:
    text = Text.assemble(("localtune chat ", "bold"), target)
    if compare:
        how = BASE_SIDE[two_models]
        text.append(f"  —  {labels[0]} ({how[0]}) | {labels[1]} ({how[1]})", style="cyan")
    text.append("\n" + HELP, style="dim")
    if system:
        text.append(f"\nsystem: {system}", style="dim")
    return text


def side_by_side(labels, answers: list[str], width: int | None = None) -> Table:
    """The two answers in two equal columns, headed by their labels."""
    table = Table(expand=True, show_lines=False, width=width)
    for label, style in zip(labels, ("yellow", "green")):
        table.add_column(label, ratio=1, header_style=f"bold {style}", overflow="fold")
    table.add_row(*[Text(a) for a in answers])
    return table


def interactive_session(chatter: Chatter, target: str, compare: bool, labels, system: str | None,
                        console: Console | None = None, lines=None) -> None:
    """The terminal loop; `lines` (an iterable) replaces the keyboard in tests."""
    console = console or Console()
    sides = ("base", "tuned") if compare else ("answer",)
    talks = {s: Conversation(system) for s in sides}
    console.print(banner(target, compare, labels, system, chatter.before is not None))

    def ask(first: bool) -> str:
        return console.input("[bold]you>[/bold] " if first else "[dim]...>[/dim] ")

    with chatter.inference(), contextlib.suppress(KeyboardInterrupt):  # Ctrl-C leaves quietly
        for prompt in read_prompts(lines or [], None if lines is not None else ask):
            command = command_of(prompt, talks)
            if command == "quit":
                return
            if command:
                console.print("(conversation reset)" if command == "done" else command, style="dim")
                continue
            if compare:
                answer_both(chatter, talks, prompt, labels, console)
            else:
                answer_one(chatter, talks["answer"], prompt, console)


def answer_one(chatter: Chatter, talk: Conversation, prompt: str, console: Console) -> None:
    pieces = []
    for piece in chatter.stream(talk.messages(prompt)):
        pieces.append(piece)
        console.print(piece, end="", markup=False, highlight=False)
    console.print()
    talk.add(prompt, "".join(pieces))


def answer_both(chatter: Chatter, talks: dict, prompt: str, labels, console: Console) -> None:
    answers = ["", ""]
    with Live(side_by_side(labels, answers), console=console, refresh_per_second=12,
              vertical_overflow="visible") as live:
        for i, side in enumerate(("base", "tuned")):
            for piece in chatter.stream(talks[side].messages(prompt), adapters_enabled=side != "base"):
                answers[i] += piece
                live.update(side_by_side(labels, answers))
            talks[side].add(prompt, answers[i])
