"""`localtune chat`: talk to a run's model or a plain model; `--compare` answers every prompt twice, with the
run's adapters off (base) and on (tuned), the same weights in memory, each side keeping its own history. A full
fine-tune has no adapters to switch off: its base is loaded beside it (two models in memory).

In a terminal it streams into a two-column view (rich Live); with stdin not a terminal it reads prompts, one
per line, and prints only the answers, so it can be scripted. The loop and the formats are in `chat_session`.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..errors import LocaltuneError
from . import cli

BASE_SIDE = {False: ("adapters off", "adapters on"), True: ("loaded beside it", "full fine-tune")}  # by two models
HELP = """commands: /reset (forget the conversation)  /system TEXT (new system prompt, and reset)  /quit  /help
multi-line: end a line with \\ to continue on the next one"""
ANSWER_INDENT = "  "  # continuation lines of a scripted answer without --compare: one answer, not several


@dataclass
class Conversation:
    """One side's history: the system prompt, then user / assistant turns."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)

    def messages(self, prompt: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": prompt}]

    def add(self, prompt: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


class Chatter:
    """A loaded model answering chats with its chat template; `adapters_enabled=False` answers as the model
    before the run's last stage: `before`, when given (loaded beside a full fine-tune), or else the same
    model with its last stage's adapters switched off (train.adapters.adapters_disabled: no second copy)."""

    def __init__(self, model, tokenizer, max_tokens: int, temp: float, before=None):
        from ..train.data import Encoder

        self.model, self.tokenizer, self.max_tokens, self.temp = model, tokenizer, max_tokens, temp
        self.before = before
        self.encoder = Encoder(tokenizer)

    @contextlib.contextmanager
    def inference(self):
        """Each model's frozen quantized layers dequantized once for generation (models.inference_weights)."""
        from ..models import inference_weights

        with contextlib.ExitStack() as stack:
            for model in (self.model, self.before):
                if model is not None:
                    stack.enter_context(inference_weights(model))
            yield self

    def stream(self, messages: list[dict], adapters_enabled: bool = True):
        """Yields the answer's text pieces as they are decoded."""
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        from ..train.adapters import adapters_disabled

        tokens = self.encoder.prompt_tokens(messages)
        model, off = self.model, contextlib.nullcontext()
        if not adapters_enabled:
            model, off = (self.before, off) if self.before is not None else (model, adapters_disabled(model))
        with off:
            for response in stream_generate(model, self.tokenizer, tokens, max_tokens=self.max_tokens,
                                            sampler=make_sampler(self.temp)):
                if response.text:
                    yield response.text


def read_prompts(lines, prompt=None):
    """Prompts from lines: a line ending in a backslash continues on the next one (joined by a newline).
    `prompt(first)` reads a line interactively (first: whether it starts a prompt); None: iterate `lines`."""
    it = iter(lines) if prompt is None else None
    parts: list[str] = []
    while True:
        try:
            line = next(it) if it is not None else prompt(not parts)
        except (StopIteration, EOFError):
            if parts:
                yield "\n".join(parts)
            return
        line = line.rstrip("\r\n")
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        text = "\n".join(parts)
        parts = []
        if text.strip():
            yield text


def load_chat(target: str, compare: bool, in_progress: bool):
    """(model, tokenizer, labels, before) for a target. Under `compare` it must be a run; `before` is the model
    before its last stage, loaded beside it when that stage has no adapters to switch off (a full fine-tune),
    else None."""
    from .. import loading
    from ..train.adapters import stage_layers

    t = loading.parse_target(target)
    if t.run is None and not Path(target).exists() and compare:
        raise LocaltuneError(f"{target}: no such run directory\n  fix: give a run directory (runs/NAME), "
                             "as `localtune runs` lists them")
    if compare and t.run is None:
        raise LocaltuneError(f"{target}: --compare needs a run directory (the base answer is the model before "
                             "its last stage), not a model\n  fix: `localtune chat RUN --compare`, or drop --compare")
    stages = []
    if t.run is not None:
        stages = loading.chain(t.run, t.stage)[1] if in_progress else loading.finished_chain(t.run, t.stage)[1]
        if in_progress:  # as load_for_inference: up to the first stage that has saved nothing yet
            saved = [(t.run / s.name / "adapters.safetensors").exists() for s in stages]
            stages = stages[: saved.index(False)] if False in saved else stages
        if compare and not stages:
            raise LocaltuneError(f"{t.run}: --compare needs a trained stage, and no stage has saved weights yet\n"
                                 "  fix: wait for the first checkpoint, or chat with the base model alone")
    model, tokenizer = loading.load(t, in_progress)
    if not getattr(tokenizer, "chat_template", None):
        raise LocaltuneError(f"{target}: the tokenizer has no chat template, so a conversation cannot be written\n"
                             '  fix: set [model] chat_template = "template.jinja" in the recipe, or chat with an '
                             "instruct model")
    before = None
    if compare and not stage_layers(model):  # a full fine-tune: nothing to switch off, so load what it started from
        before, _ = loading.load_before_last(t.run, stages)
    base = "base" if len(stages) <= 1 else f"before {stages[-1].name}"  # earlier stages stay in (fused/stacked)
    return model, tokenizer, (base, "tuned"), before


@cli.command()
@click.argument("target")
@click.option("--compare", is_flag=True,
              help="Answer as the base (the model before the run's last stage) and as the tuned model, side by side.")
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--temp", default=0.0, show_default=True, help="Sampling temperature (0: greedy, deterministic).")
@click.option("--system", default=None, help="A system prompt.")
@click.option("--json", "as_json", is_flag=True, help="Scripted: one JSON object per prompt.")
@click.option("--json-tokens", is_flag=True, help="Scripted: also one JSON line per streamed piece (the TUI reads it).")
@click.option("--in-progress", is_flag=True, help="Also use the adapters an unfinished stage saved at its last "
                                                  "checkpoint (a preview while a run trains).")
def chat(target, compare, max_tokens, temp, system, as_json, json_tokens, in_progress):
    """Chat with RUN (RUN/stage) or a MODEL, streaming; --compare shows base and tuned side by side.

    In a terminal: type a prompt and Enter; a line ending in \\ continues on the next line; /reset, /system TEXT,
    /help, /quit. Scripted (stdin not a terminal): one prompt per line (\\ at the end continues it), the same
    commands; each answer is printed alone (its continuation lines indented by 2 spaces), or under --compare as
    "base:  ..." / "tuned: ..." lines (continuation lines indented under the answer's first line). On a run of
    several stages the base is the model before the last stage, labelled so: "before dpo: ..." on an sft -> dpo
    run. --json prints {"prompt", "answer"}, or {"prompt", "base", "tuned", "labels"} under --compare: the
    exact answers, whatever their lines.
    """
    interactive = sys.stdin.isatty()
    if interactive and not (as_json or json_tokens):
        click.echo(f"loading {target}…", err=True)
    model, tokenizer, labels, before = load_chat(target, compare, in_progress)
    chatter = Chatter(model, tokenizer, max_tokens, temp, before)
    if interactive and not (as_json or json_tokens):
        from .chat_view import interactive_session

        interactive_session(chatter, target, compare, labels, system)
        return
    if json_tokens:
        click.echo(json.dumps({"ready": target, "labels": labels,  # loaded: the TUI takes prompts from now
                               "base_is": BASE_SIDE[chatter.before is not None][0]}))
    chat_session(chatter, read_prompts(sys.stdin), compare, system, "json-tokens" if json_tokens else
                 "json" if as_json else "text", click.echo, labels)


def chat_session(chatter: Chatter, prompts, compare: bool, system: str | None, fmt: str, echo,
                 labels=("base", "tuned")) -> None:
    """Scripted chat: each prompt (or command) from `prompts`, answers written with `echo` in `fmt`
    ("text", "json" or "json-tokens"); `labels` name the base and tuned sides (load_chat's)."""
    sides = ("base", "tuned") if compare else ("answer",)
    talks = {s: Conversation(system) for s in sides}
    prefixes = line_prefixes(labels) if compare else {"answer": ""}
    with chatter.inference():
        for prompt in prompts:
            command = command_of(prompt, talks)
            if command == "quit":
                return
            if command:
                if command != "done":
                    echo(command, err=True)  # unknown command: said on stderr, stdout stays answers only
                continue
            turn = {"prompt": prompt}
            for side in sides:
                turn[side] = scripted_answer(chatter, talks[side], prompt, side, fmt, echo, prefixes[side])
            if compare:
                turn["labels"] = list(labels)
            if fmt != "text":
                echo(json.dumps(turn, ensure_ascii=False))


def line_prefixes(labels) -> dict[str, str]:
    """Scripted --compare text: "base:  " / "tuned: ", or "before dpo: " / "tuned:      ", one width for both
    so the answers line up."""
    width = max(7, max(len(label) for label in labels) + 2)
    return {side: f"{label + ':':<{width}}" for side, label in zip(("base", "tuned"), labels)}


def indented(pieces, indent: str):
    """The streamed text with `indent` after each line break, so every continuation line is indented; line
    breaks at the very end are dropped (the answer's own line ends it)."""
    breaks = 0
    for piece in pieces:
        for i, part in enumerate(piece.split("\n")):
            breaks += i > 0
            if part:
                yield ("\n" + indent) * breaks + part
                breaks = 0


def scripted_answer(chatter, talk: Conversation, prompt: str, side: str, fmt: str, echo, prefix: str) -> str:
    pieces = []

    def streamed():
        for piece in chatter.stream(talk.messages(prompt), adapters_enabled=side != "base"):
            pieces.append(piece)
            if fmt == "json-tokens":
                echo(json.dumps({"side": side, "token": piece}, ensure_ascii=False))
            yield piece

    if fmt == "text":
        echo(prefix, nl=False)
        for text in indented(streamed(), " " * len(prefix) or ANSWER_INDENT):
            echo(text, nl=False)
        echo("")
    else:
        for _ in streamed():
            pass
    answer = "".join(pieces)
    talk.add(prompt, answer)
    return answer


def command_of(text: str, talks: dict) -> str | None:
    """Runs a /command on every side's conversation. None: `text` is a prompt; "done", "quit", or a
    message for the user (help, an unknown command)."""
    if not text.startswith("/"):
        return None
    name, _, arg = text.partition(" ")
    if name == "/quit":
        return "quit"
    if name in ("/reset", "/system"):
        for talk in talks.values():
            talk.turns.clear()
            if name == "/system":
                talk.system = arg.strip() or None
        return "done"
    if name == "/help":
        return HELP
    return f"unknown command {name!r}\n{HELP}"
