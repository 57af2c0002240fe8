"""Checking what trains a model: the `data` group (check, split) and the `license` gate."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import LocaltuneError
from . import cli


@cli.group(name="data")
def data_():
    """Check training data against a golden set, and split data cleanly."""


@data_.command("check")
@click.argument("train", nargs=-1, required=True, type=click.Path())
@click.option("--against", "golden", multiple=True, required=True, type=click.Path(),
              help="The golden (test) set: a data file, folder or hf:owner/name. Repeatable.")
@click.option("--ngram", default=13, show_default=True, help="Words per n-gram for near duplicates.")
@click.option("--near", default=0.5, show_default=True,
              help="Share of a golden row's n-grams that makes a near duplicate.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report, every overlap, as JSON.")
@click.pass_context
def data_check(ctx, train, golden, ngram, near, as_json):
    """Exact and near duplicates between TRAIN and the golden set. Exit 0 clean, 1 overlap.

    TRAIN and --against: data files in any format localtune reads, folders, or hf:owner/name ids."""
    from ..integrity.contamination import check_files

    report = check_files(train, golden, ngram, near)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else "\n".join(report.lines()))
    ctx.exit(1 if report.overlaps else 0)


@data_.command("split")
@click.argument("path")
@click.option("--test", "fraction", default=0.1, show_default=True, help="Share of rows for the test side.")
@click.option("--seed", default=0, show_default=True)
@click.option("--ngram", default=13, show_default=True)
@click.option("--near", default=0.5, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for train.jsonl and test.jsonl.")
def data_split(path, fraction, seed, ngram, near, out):
    """Split PATH into train and test with no exact or near duplicate across them.

    PATH: a data file in any format localtune reads, a folder, or hf:owner/name. The two sides are
    written as JSON Lines in localtune's canonical format (messages, prompt/completion, ...)."""
    from ..integrity.contamination import clean_split
    from ..run import atomic_write

    if not 0 < fraction < 1:
        raise click.BadParameter(f"{fraction} must be between 0 and 1", param_hint="--test")
    out = Path(out)
    if any((out / f).exists() for f in ("train.jsonl", "test.jsonl")):
        raise LocaltuneError(f"{out}: already holds train.jsonl or test.jsonl\n  fix: choose a new folder")
    from ..integrity.contamination import read_rows

    train, test, moved = clean_split(read_rows(path), fraction, seed, ngram, near)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for _, r in rows)  # dates as text
        atomic_write(out / f"{name}.jsonl", text)
    click.echo(f"{out / 'train.jsonl'}: {len(train)} rows · {out / 'test.jsonl'}: {len(test)} rows"
               + (f" ({moved} rows that duplicate a test row moved to the test side)" if moved else ""))


@data_.command("preview")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--stage", "stage_name", default=None, help="The stage whose data to show (default: the first).")
@click.option("-n", "n", default=3, show_default=True, type=click.IntRange(min=0), help="Rows to show.")
@click.pass_context
def data_preview(ctx, recipe, stage_name, n):
    """A stage's rows as the model will see them: the rendered text with the trained tokens marked
    (colour on a terminal, [[...]] otherwise), token counts, truncation, and the data lints over every
    row. Loads the tokenizer only. Exit 0 clean or warnings, 1 when a lint error fires."""
    import sys

    from .. import recipe as recipe_mod
    from ..train import preview

    parsed = recipe_mod.load(recipe)
    p = preview.build(parsed, preview.stage_of(parsed, stage_name), n)
    click.echo("\n".join(preview.lines(p, color=sys.stdout.isatty())))
    ctx.exit(1 if p.errors else 0)


@cli.group(name="license")
def license_():
    """The license and provenance gate, on its own."""


@license_.command("check")
@click.option("--teacher", "teachers", multiple=True, metavar="REF",
              help="A teacher: folder, .gguf, repo id or bare model name (gpt-4o). Repeatable.")
@click.option("--data", "datasets", multiple=True, type=click.Path(), metavar="PATH",
              help="A data file, a folder of them (with its dataset card), or hf:owner/name. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help='Print {"verdict": ..., "findings": [...]}.')
@click.pass_context
def license_check(ctx, teachers, datasets, as_json):
    """May these teachers and datasets train a model? Exit 0 allow or warn, 3 block."""
    from ..integrity import provenance

    if not teachers and not datasets:
        raise click.UsageError("give at least one --teacher REF or --data PATH")
    report = provenance.Report([provenance.check_teacher(t) for t in teachers]
                               + [provenance.check_data(d) for d in datasets])
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        click.echo("\n".join(report.lines()))
        click.echo(f"verdict: {report.verdict}")
    ctx.exit(3 if report.verdict == "block" else 0)
