"""Models: the `models` group (import, check, list); `doctor` is in doctor.py."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import LocaltuneError
from . import cli


@cli.group()
def models():
    """Import and list models."""


@models.command("import")
@click.argument("gguf", type=click.Path(dir_okay=False))
def models_import(gguf):
    """Import a .gguf file into an MLX model folder (cached)."""
    from ..models.gguf_import import import_gguf

    if not Path(gguf).exists():
        raise LocaltuneError(f"{gguf}: no such file\n  fix: check the path of the .gguf file")
    click.echo(str(import_gguf(gguf)))


@models.command("check")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
def models_check(model, as_json):
    """The support-matrix row of MODEL (folder, repo id, .gguf, pkg:), read from its config alone."""
    from ..models import families, model_type_of

    model_type, where = model_type_of(model)
    family = families.family(model_type)
    row = family.support() if family else {cap: "not a supported family" for cap in families.CAPABILITIES}
    if as_json:
        click.echo(json.dumps({"model": model, "model_type": model_type, "family": family.name if family else None,
                               "support": row}, indent=1))
        return
    names = [t for f in families.FAMILIES for t in f.model_types]
    click.echo(f"{model}: {model_type!r} from {where}: "
               + (f"family {family.name}" if family else
                  f"not supported; supported: {', '.join(names)}{families.nearest(model_type, names)}"))
    for cap, value in row.items():
        click.echo(f"  {families.CAPABILITIES[cap]:<34} {'yes' if value is True else 'no: ' + value}")
    if family is None:
        raise SystemExit(1)


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json):
    """List bundled and imported models."""
    from ..models.gguf_import import list_imported

    rows = list_imported()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no imported models yet; `localtune models import FILE.gguf` adds one")
    for r in rows:
        click.echo(f"{r['name']:<40} {r.get('license') or '-':<12} {r['path']}")
