"""Looking at runs: `watch`, `runs`, `status`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import LocaltuneError
from . import cli, format_duration
from .train import after_tui


@cli.command()
@click.argument("target", required=False)
@click.option("--runs-dir", default="runs", show_default=True)
@click.option("--all", "show_all", is_flag=True, help="Open the runs list instead of one run.")
def watch(target, runs_dir, show_all):
    """Watch a run in the TUI (default: the newest); it may be running or finished."""
    from ..run import Run, newest_run
    from ..tui.app import LocaltuneApp

    if show_all:
        LocaltuneApp(None, runs_dir).run()
        return
    path = Path(target) if target else newest_run(runs_dir)
    if path is None:
        raise LocaltuneError(f"{runs_dir}: no runs yet\n  fix: start one with `localtune run recipes/quickstart.toml`")
    run_ = Run.open(path)
    after_tui(run_, LocaltuneApp(path, runs_dir).run())


@cli.command()
@click.option("--runs-dir", default="runs", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def runs(runs_dir, as_json):
    """List runs: name, state, stage, step/total, last loss, started, duration, trainer (pid@host)."""
    import time

    from ..run import list_runs

    rows = list_runs(runs_dir)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo(f"no runs in {runs_dir}/ yet; start one with `localtune run recipes/quickstart.toml`")
        return
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'name':<{width}}  {'state':<11}  {'stage':<8}  {'step':>11}  {'loss':>7}  {'started':<16}  "
               f"{'duration':<9}  trainer")
    for r in rows:
        step = f"{r['step'] or 0}/{r['steps_total'] or '?'}" if r["step"] is not None else "-"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"]))
        click.echo(f"{r['name']:<{width}}  {r['state']:<11}  {r['stage'] or '-':<8}  {step:>11}  {loss:>7}  "
                   f"{started:<16}  {format_duration(r['duration']):<9}  {_trainer(r['trainer'])}")
    for r in rows:
        if r.get("damage"):
            click.echo(f"damaged: {r['damage']}", err=True)


def _trainer(who: dict | None) -> str:
    """pid@host of the process that holds a run, "-" when none does."""
    return f"{who.get('pid') or '?'}@{who.get('host') or '?'}" if who else "-"


@cli.command()
@click.argument("target", required=False)
@click.option("--runs-dir", default="runs", show_default=True)
def status(target, runs_dir):
    """Show a run's state (default: the newest run)."""
    from ..run import Run, newest_run, summary

    path = Path(target) if target else newest_run(runs_dir)
    if path is None:
        raise LocaltuneError(f"{runs_dir}: no runs yet\n  fix: start one with `localtune run recipes/quickstart.toml`")
    Run.open(path)
    row = summary(path)
    click.echo(f"{path}: {row['state']}  stage {row['stage'] or '—'}  step {row['step'] or 0}"
               + (f"/{row['steps_total']}" if row["steps_total"] else "")
               + (f"  loss {row['loss']:.4f}" if row["loss"] is not None else ""))
    if row.get("damage"):
        raise LocaltuneError(row["damage"])
    if who := row["trainer"]:
        click.echo(f"trained by pid {who.get('pid') or '?'} on {who.get('host') or '?'} (it holds the run; "
                   f"watch with `localtune watch {path}`)")
    if row.get("error"):
        click.echo(row["error"])
