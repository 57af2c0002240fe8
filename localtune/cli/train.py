"""Training: `run` (and --resume), `plan`, and the TUI's hidden `_train` child."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .. import device
from ..errors import LocaltuneError
from . import cli, progress_line


def _wants_tui(no_tui: bool) -> bool:
    return not no_tui and sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


@cli.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--resume", "resume", type=click.Path(file_okay=False), help="Continue this run directory.")
@click.option("--no-tui", is_flag=True, help="Plain progress lines instead of the terminal UI.")
@click.option("--runs-dir", default=None, help="Where run directories go (default: the recipe's runs_dir).")
@click.option("--force", is_flag=True, help="Run even when the memory estimate says it will not fit.")
def run(recipe, resume, no_tui, runs_dir, force):
    """Run RECIPE (a recipe.toml), or continue a run with --resume RUN.

    In a terminal the TUI watches the run while training runs in its own process;
    otherwise (or with --no-tui) one plain progress line per report.
    """
    from .. import recipe as recipe_mod
    from ..run import Run
    from ..train import distributed
    from ..train.prepare import prepare

    if bool(recipe) == bool(resume):
        raise click.UsageError("give a RECIPE file, or --resume RUN (not both)")
    main_rank = distributed.is_main()  # under mlx.launch only rank 0 writes the run directory and prints
    if not main_rank:
        runs_dir = distributed.private_runs_dir()
    if resume:
        run_ = distributed.mirror_run(lambda: _own(Run.open(resume)))  # the other ranks get rank 0's copy
        parsed = run_.recipe()  # a damaged recipe.toml or manifest.json stops here, named
        base_dir = run_.manifest().get("base_dir") or run_.status().get("base_dir", ".")
        if run_.status().get("state") == "done" or run_.manifest().get("finished"):
            raise LocaltuneError(f"{run_.path}: this run is already done; see {run_.path / 'report.md'}")
        gate = _gate(parsed, lambda: run_, quiet=not main_rank)
        prepared = prepare(parsed)
        _memory_gate(parsed, prepared, force, main_rank)
    else:
        parsed = recipe_mod.load(recipe)
        create = lambda: _own(  # noqa: E731  (locked before anything but recipe.toml is written)
            Run.create(runs_dir or parsed.runs_dir, parsed.name, Path(recipe).read_text()), main_rank)
        gate = _gate(parsed, create, quiet=not main_rank)  # before any model loads; a block leaves a run dir
        prepared = prepare(parsed)  # data, model folder, tokenizer: all checked before anything is written
        _memory_gate(parsed, prepared, force, main_rank)
        run_ = create()
        base_dir = str(Path(parsed.base_dir).resolve())
    run_.update_manifest(provenance=gate.to_dict())
    run_.request(paused=False)  # a pause left over from a killed process does not carry into this one
    if not main_rank:
        _train_here(run_, parsed, prepared, quiet=True)
        return
    device.warn_if_slow_blas(lambda m: click.echo(m, err=True))
    click.echo(f"run directory: {run_.path}")
    if distributed.size() > 1:
        click.echo(f"data-parallel on {distributed.size()} processes: each reads 1/{distributed.size()} of every "
                   "global batch")
    if _wants_tui(no_tui) and distributed.size() == 1:
        _train_with_tui(run_, base_dir)
    else:
        _train_here(run_, parsed, prepared)


def _own(run_, main_rank: bool = True):
    """Lock the run for this trainer before anything in it is written (a second trainer is refused:
    lock.RunBusy). Held until this command ends (or the process dies), unless handed to the TUI's
    training child (`_train_with_tui`). Under mlx.launch only rank 0 locks: the others write
    private copies."""
    from ..run import lock

    if main_rank:
        click.get_current_context().call_on_close(lock.acquire(run_.path).release)
    return run_


def _memory_gate(parsed, prepared, force: bool, loud: bool) -> None:
    """The planner's formula (weights read lazily: no compute) against the device's memory."""
    from .. import plan

    limit = device.memory_limit_bytes()
    plans = plan.plan(parsed, prepared, calibrate_steps=False)
    refusal = plan.refusal(plans, limit, parsed.source)
    if refusal and not force:
        raise plan.DoesNotFit(refusal)
    if loud:
        peak = max(plans, key=lambda p: p.peak)
        near = "" if refusal or peak.peak < 0.8 * limit else \
            f" -- close to the limit; `localtune plan {parsed.source}` measures it"
        click.echo(f"memory: peak about {plan.gib(peak.peak)} ([stages.{peak.name}]) of {plan.gib(limit)}"
                   + (" -- over the limit, running anyway (--force)" if refusal else near), err=True)


def _gate(parsed, make_run, quiet=False):
    """The license and provenance gate. A block: status `blocked`, exit 3, nothing trained."""
    from ..integrity import provenance

    report = provenance.check_recipe(parsed)
    for line in [] if quiet else report.lines(quiet_allow=True):
        click.echo(line, err=True)
    if report.verdict != "block":
        if not quiet:
            click.echo(f"provenance: {report.verdict} ({len(report.sources)} sources checked)", err=True)
        return report
    run_ = make_run()
    run_.update_manifest(provenance=report.to_dict())
    run_.set_status(state="blocked", stage="gate", step=0)
    raise provenance.Blocked(provenance.blocked_message(report, parsed.source) + f"\n  run directory: {run_.path}")


def _train_here(run_, parsed, prepared, quiet=False) -> None:
    """Train in this process with plain progress lines (also the TUI's child process, and the
    ranks other than 0 under mlx.launch, which print nothing)."""
    from ..train.pipeline import run_recipe
    from ..train.trainer import Interrupted

    def report(record):
        line = None if quiet else progress_line(record)
        if line:
            click.echo(line)

    try:
        run_recipe(parsed, run_, prepared, report=report)
    except (Interrupted, KeyboardInterrupt) as e:
        step = getattr(e, "step", run_.status().get("checkpoint_step"))
        run_.set_status(state="interrupted", step=step)
        click.echo(f"stopped at step {step}; checkpoint saved.\n"
                   f"  continue with: localtune run --resume {run_.path}")
        sys.exit(130)
    except LocaltuneError as e:
        _failed(run_, e.message)
        raise
    except Exception as e:
        _failed(run_, f"{type(e).__name__}: {e} (a bug in localtune; see train.log)")
        raise
    finally:
        run_.close()
    if quiet:
        return
    click.echo(f"done: {run_.path / 'report.md'}")
    report_text = (run_.path / "report.md").read_text()
    if "## Task metric" in report_text:
        click.echo(report_text.split("## Task metric")[1].split("Samples")[0].strip())


def _failed(run_, message: str) -> None:
    status = run_.status()
    run_.log(status.get("stage", "run"), status.get("step", 0), "event", event="failed", message=message)
    run_.set_status(state="failed", error=message)


def _train_with_tui(run_, base_dir: str) -> None:
    """Training in a child process that writes the run directory; the TUI reads it.

    The child has its own session, so detaching (or closing the terminal) leaves it running.
    """
    import subprocess

    from ..run import lock
    from ..tui.app import LocaltuneApp

    held = lock.held(run_.path)  # the child shares the lock's open file description: no gap, no second lock
    log = open(run_.path / "train.log", "ab")
    child = subprocess.Popen([sys.executable, "-m", "localtune.cli", "_train", str(run_.path), base_dir,
                              "--lock-fd", str(held.fileno())], pass_fds=(held.fileno(),),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    log.close()
    run_.set_status(state="running", stage="load", step=0, pid=child.pid, base_dir=base_dir)
    held.release()  # from here the child alone holds the lock, and this process only reads
    how = LocaltuneApp(run_.path).run()
    after_tui(run_, how, child)


def after_tui(run_, how, child=None) -> None:
    from ..run import effective_state

    if how == "detached":
        click.echo(f"training continues in the background (pid {run_.status().get('pid')}); "
                   f"log: {run_.path / 'train.log'}\n  watch again with: localtune watch {run_.path}")
        return
    if child is not None and how == "stopped":
        child.wait()
    status = run_.status()
    state = effective_state(status, run_.path)
    if state == "done":
        click.echo(f"done: {run_.path / 'report.md'}")
    elif state == "interrupted":
        click.echo(f"stopped at step {status.get('step')}; checkpoint saved.\n"
                   f"  continue with: localtune run --resume {run_.path}")
        sys.exit(130)
    elif state in ("failed", "crashed"):
        raise LocaltuneError(f"{run_.path}: {state}: {status.get('error') or 'see ' + str(run_.path / 'train.log')}"
                             f"\n  fix: correct the cause, then `localtune run --resume {run_.path}`")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--no-calibrate", is_flag=True, help="Estimate from the formula and measured FLOP/s only (no steps run).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(recipe, no_calibrate, as_json):
    """Estimate each stage's peak memory and time, before running RECIPE.

    Calibration runs a few real steps of each stage on its widest rows, at half and all of
    the batch when the formula says it fits with room (a ppo stage: two rollout batches);
    nothing is written.
    """
    from .. import plan
    from .. import recipe as recipe_mod
    from ..train.prepare import prepare

    parsed = recipe_mod.load(recipe)
    prepared = prepare(parsed)
    limit = device.memory_limit_bytes()
    plans = plan.plan(parsed, prepared, calibrate_steps=not no_calibrate,
                         note=lambda m: None if as_json else click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps({"limit": limit, "stages": [p.to_dict() for p in plans]}, indent=1))
    else:
        click.echo("\n".join(plan.lines(plans, limit)))
    if any(p.peak > limit for p in plans):
        sys.exit(plan.DoesNotFit.exit_code)


@cli.command("_train", hidden=True)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("base_dir")
@click.option("--lock-fd", type=int, default=None, help="The run's lock, inherited from the TUI's process.")
def train_child(run_dir, base_dir, lock_fd):
    """The TUI's child: train an already created run directory, writing progress to it."""
    from ..run import Run, lock
    from ..train.prepare import prepare

    run_ = Run.open(run_dir)
    if lock_fd is not None:
        lock.adopt(lock_fd, run_.path)
    else:  # started by hand: take the lock as `run` does
        lock.acquire(run_.path)
    parsed = run_.recipe(base_dir)
    try:
        prepared = prepare(parsed)
    except LocaltuneError as e:
        _failed(run_, e.message)
        raise
    _train_here(run_, parsed, prepared)
