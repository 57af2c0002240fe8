"""`localtune data preview`: a stage's rows as the model will see them, with the trained tokens marked,
token counts, truncation and the data lints. Only the tokenizer loads, never the weights."""
from __future__ import annotations

from dataclasses import dataclass, field

import click
import numpy as np

from . import data, lints

OPEN, CLOSE = "[[", "]]"  # around trained spans when the output is not a terminal


@dataclass
class Shown:
    """One previewed row: its pieces of text, each trained or not, and its counts."""

    title: str
    where: str
    pieces: list  # [(text, trained)]
    tokens: int
    trained: int
    full_tokens: int  # before the cut at max_seq_len


@dataclass
class Preview:
    stage: object
    detected: str
    source: str
    rows: int
    fmt: str
    folder: str
    shown: list = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)
    note: str = ""  # why the rows are not linted (pairs, prompts)

    @property
    def errors(self) -> int:
        return sum(f.level == "error" for f in self.findings)


def pieces(tokenizer, tokens: list[int], mask) -> list[tuple[str, bool]]:
    """The decoded text cut at trained / untrained boundaries; boundaries are decoded as prefixes of
    the whole so that a word split across a boundary reads as the model's text does."""
    bounds = [0] + [i for i in range(1, len(tokens)) if bool(mask[i]) != bool(mask[i - 1])] + [len(tokens)]
    texts, out = [tokenizer.decode(tokens[:b]) for b in bounds], []
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1]
        prefix_ok = texts[k + 1].startswith(texts[k])
        text = texts[k + 1][len(texts[k]):] if prefix_ok else tokenizer.decode(tokens[a:b])
        out.append((text, bool(mask[a])))
    return out


def _show(tokenizer, title: str, where: str, ex: data.Example, max_seq_len: int) -> Shown:
    tokens, mask = ex.tokens[:max_seq_len].tolist(), ex.loss_mask[:max_seq_len]
    return Shown(title, where, pieces(tokenizer, tokens, mask), len(tokens), int(mask.sum()), len(ex.tokens))


def _where(table, i: int, source: str) -> str:
    return table.where[i] if table is not None and i < len(table.where) else f"{source}: row {i + 1}"


def build(recipe, stage, n: int) -> Preview:
    """Read the stage's rows, load the tokenizer, encode and lint every row, keep the first n to show."""
    from .. import datasets, models

    table = datasets.read_stage(recipe, stage)
    rows, fmt = table.rows, table.fmt
    folder = models.resolve(recipe.resolve(recipe.model.path), recipe.model.revision)
    tokenizer = models.load_tokenizer(folder, recipe.chat_template())
    p = Preview(stage, table.detected, table.source.ref, len(rows), fmt, str(folder))
    enc = data.Encoder(tokenizer, stage.mask_prompt, stage.thinking)
    L = stage.max_seq_len
    if fmt in ("messages", "completion", "text") and not _samples(stage):
        ds = data.encode(rows, fmt, tokenizer, L, stage.mask_prompt, table.source.ref, stage.thinking,
                         where=table.where, strict=False)
        p.findings = lints.lint(ds, tokenizer, rows, fmt, L, stage.mask_prompt, stage.thinking)
        p.totals = {"tokens": ds.n_tokens, "trained": int(sum(e.loss_mask.sum() for e in ds.examples)),
                    "truncated": ds.truncated, "dropped": ds.dropped}
        for i, row in enumerate(rows[:n]):
            ex = data.encode_row(enc, row, fmt, 1 << 30, i, _where(table, i, p.source))
            p.shown.append(_show(tokenizer, f"row {i + 1}", _where(table, i, p.source), ex, L))
        return p
    p.note = _other_formats(p, enc, table, rows, "prompt" if _samples(stage) else fmt, n, L)
    return p


def _samples(stage) -> bool:
    """A stage that trains on its own samples (ppo, grpo): only the rows' prompts reach the model."""
    from .. import methods
    from ..methods.prompts import Sampling

    return isinstance(methods.of(stage), Sampling)


def _other_formats(p: Preview, enc, table, rows, fmt: str, n: int, L: int) -> str:
    """Pairs (chosen and rejected, each response trained) and prompts (nothing trained: the stage generates)."""
    from ..methods.pairs import response_example

    for i, row in enumerate(rows[:n]):
        where = _where(table, i, p.source)
        if fmt == "preference":
            for side in ("chosen", "rejected"):
                ex = response_example(enc, row["prompt"], row[side], where)
                p.shown.append(_show(enc.tokenizer, f"row {i + 1}, {side}", where, ex, L))
        elif fmt == "labelled":
            ex = response_example(enc, row["prompt"], row["completion"], where)
            p.shown.append(_show(enc.tokenizer, f"row {i + 1}, label {row['label']}", where, ex, L))
        else:
            from ..methods.prompts import prompt_of

            ids = enc.prompt_tokens(prompt_of(row), row.get("tools"))
            ex = data.Example(np.array(ids, np.int32), np.zeros(len(ids), bool))
            p.shown.append(_show(enc.tokenizer, f"row {i + 1}, prompt", where, ex, L))
    if fmt == "prompt":
        return "prompt rows: nothing is trained on them as written; the stage generates the answers"
    return f"{fmt} rows are shown, not linted: the lints cover rows trained as they are written (SFT)"


def lines(p: Preview, color: bool) -> list[str]:
    """The preview as text: trained spans in colour on a terminal, between [[ and ]] otherwise."""
    s = p.stage
    out = [f"[stages.{s.name}] ({s.kind}) data {p.source}: {lints.rows_n(p.rows)}, {p.detected}",
           f"tokenizer {p.folder} · max_seq_len {s.max_seq_len} · mask_prompt {str(s.mask_prompt).lower()} · "
           f"thinking {s.thinking}"]
    if t := p.totals:
        share = t["trained"] / t["tokens"] if t["tokens"] else 0.0
        out.append(f"tokens: {t['tokens']:,} in {lints.rows_n(p.rows - t['dropped'])}, {t['trained']:,} trained "
                   f"({share:.1%}) · {lints.rows_n(t['truncated'])} truncated · {lints.rows_n(t['dropped'])} with "
                   "nothing to train")
    for sh in p.shown:
        cut = f" · cut to {sh.tokens} of {sh.full_tokens} tokens" if sh.full_tokens > sh.tokens else ""
        out += ["", f"── {sh.title} · {sh.where} · {sh.tokens} tokens, {sh.trained} trained{cut} ──"]
        text = "".join(click.style(t, fg="green", bold=True) if color and on else
                       (f"{OPEN}{t}{CLOSE}" if on else t) for t, on in sh.pieces)
        out.append(text.rstrip("\n"))
    out.append("")
    if p.note:
        out.append(p.note)
        return out
    warns = len(p.findings) - p.errors
    out.append(f"lints: {p.errors} error{'s' * (p.errors != 1)}, {warns} warning{'s' * (warns != 1)}"
               + f" over all {lints.rows_n(p.rows)}" + ("" if p.findings else ": clean"))
    out += [f.line() for f in p.findings]
    return out


def stage_of(recipe, name: str | None):
    """The stage called `name`, or the first stage."""
    if name is None:
        return recipe.stages[0]
    for s in recipe.stages:
        if s.name == name:
            return s
    raise click.BadParameter(f"{recipe.source} has no stage called {name!r}; its stages: "
                             f"{', '.join(s.name for s in recipe.stages)}", param_hint="--stage")
