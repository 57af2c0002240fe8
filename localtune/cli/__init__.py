"""localtune's command line."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .. import __version__, device
from ..errors import LocaltuneError


def _duration(sec) -> str:
    sec = int(sec or 0)
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


def progress_line(record: dict) -> str | None:
    """One plain line per report: stage, step/total, loss, lr, tokens/s, peak memory, ETA."""
    kind = record.get("kind")
    if kind == "train":
        rl = ""
        if "reward_mean" in record:  # ppo: the rollouts since the last report
            rl = (f"  reward {record['reward_mean']:+.3f}±{record['reward_std']:.3f}  KL {record['kl']:.3f}  "
                  f"clip {record.get('clip_frac', 0):.2f}")
            if "rollout_sec" in record:  # the time split of this window: rollout / scoring / training
                train = record["time_sec"] - record["rollout_sec"] - record["scoring_sec"]
                rl += f"  time {record['rollout_sec']:.1f}/{record['scoring_sec']:.1f}/{train:.1f}s"
        return (f"{record['stage']:>8}  step {record['step']:>5}/{record['steps_total']}  "
                f"loss {record['loss']:.4f}{rl}  lr {record['lr']:.2e}  "
                f"{record['real_tokens_per_sec']:,.0f} tok/s  peak {record['peak_memory_gb']:.2f} GB  "
                f"ETA {_duration(record['eta_sec'])}")
    if kind == "eval" and "loss" not in record:
        return (f"{record['stage']:>8}  step {record['step']:>5}/{record['steps_total']}  held-out reward "
                f"{record['reward_mean']:+.3f}±{record['reward_std']:.3f}  KL {record['kl']:.3f}")
    if kind == "eval":
        return f"{record['stage']:>8}  step {record['step']:>5}/{record['steps_total']}  eval loss {record['loss']:.4f}"
    if kind == "guard":
        budget = f" (budget {record['budget']:+.0%})" if "budget" in record else ""
        return (f"{record['stage']:>8}  step {record['step']:>5}/{record['steps_total']}  general NLL "
                f"{record['general_nll']:.4f}  {record['general_nll_increase']:+.2%} vs base{budget}")
    if kind == "event" and record.get("message"):
        prefix = "warning: " if record.get("event") == "warning" else ""
        return f"{record['stage']:>8}  {prefix}{record['message']}"
    return None


@click.group()
@click.version_option(__version__, prog_name="localtune")
def cli():
    """Adapt language models on your own machine."""


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
    _after_tui(run_, how, child)


def _after_tui(run_, how, child=None) -> None:
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
    _after_tui(run_, LocaltuneApp(path, runs_dir).run())


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
                   f"{started:<16}  {_duration(r['duration']):<9}  {_trainer(r['trainer'])}")
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


@cli.command()
@click.argument("target")
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--stage", default=None, help="Stop after this stage's adapters (default: all stages).")
def generate(target, prompt, max_tokens, stage):
    """Generate from a run's adapted model (or a plain model path) with greedy decoding."""
    from ..integrity.evaluate import generate as gen
    from ..loading import load_for_inference

    model, tokenizer = load_for_inference(target, stage)
    click.echo(gen(model, tokenizer, [prompt], max_tokens)[0])


@cli.command()
@click.argument("target")
@click.option("--out", required=True, type=click.Path(), help="The folder to write (must not exist).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="Re-quantize the fused model (group size 64); default: a float model.")
@click.option("--dequantize", is_flag=True, help="Accepted for mlx_lm.fuse users: a quantized base is always "
              "dequantized before fusing (fusing into 4-bit weights would round the adapters away).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (paths and check numbers).")
def fuse(target, out, quantize, dequantize, as_json):
    """Fold a run's adapters (every stage, in order) into its base; checked against base + adapters."""
    from ..export import fuse as do_fuse

    result = do_fuse(target, out, quantize=int(quantize) if quantize else None,
                     report=(lambda _: None) if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
    else:
        click.echo(f"fused model written to {out} (adapter effect kept: {result.effect_kept:.1%})")


@cli.command()
@click.argument("target")
@click.option("--gguf", "as_gguf", is_flag=True, help="Write the model (adapters fused) as a GGUF file.")
@click.option("--lora", "as_lora", is_flag=True,
              help="Write only the run's LoRA adapters, as a GGUF LoRA adapter for llama.cpp's --lora.")
@click.option("--quant", type=click.Choice(["f16", "q8_0", "q4_0", "q4_k_m"]), default="f16", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .gguf file to write.")
@click.option("--base", type=click.Path(dir_okay=False),
              help="With --lora --verify: the base .gguf to apply it to (default: the run's base GGUF).")
@click.option("--verify", is_flag=True, help="Load the file in llama.cpp and compare it with the MLX model.")
@click.option("--ollama", is_flag=True, help="Also write a Modelfile beside the file (ChatML templates).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (path, tensors, check numbers).")
def export(target, as_gguf, as_lora, quant, out, base, verify, ollama, as_json):
    """Export a run (RUN or RUN/stage) or a model folder to GGUF for llama.cpp: the whole model
    with the adapters fused (--gguf), or the adapters alone (--lora)."""
    report = (lambda _: None) if as_json else click.echo
    if as_gguf == as_lora:
        raise click.UsageError("choose one of --gguf (the fused model) or --lora (the adapters alone)")
    if as_lora:
        from ..export.lora import export_lora

        if quant != "f16" or ollama:
            raise click.UsageError("--lora writes f16 adapters; --quant and --ollama apply to --gguf only")
        result = export_lora(target, out, base, verify, report=report)
    else:
        from ..export import export_gguf

        if base:
            raise click.UsageError("--base applies to --lora only")
        result = export_gguf(target, out, quant, verify, ollama, report=report)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))


@cli.command()
@click.option("--reward", "reward", required=True, help="A reward stage: RUN/stage.")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False),
              help='JSONL rows: {"prompt", "completion"} (or messages); {"prompt", "chosen", "rejected"} scores both.')
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row.")
def score(reward, data_path, as_json):
    """Score each row with a trained reward model: one number per line, for scripting."""
    from .. import loading, methods
    from ..methods import reward as reward_method
    from ..train import data

    t = loading.parse_target(reward)
    if t.run is None or t.stage is None:
        raise click.BadParameter(f"{reward}: expected RUN/stage, a reward stage of a run", param_hint="--reward")
    stage = next((s for s in loading.chain(t.run, t.stage)[1] if s.name == t.stage), None)
    if stage is None or not methods.of(stage).scores:
        raise click.BadParameter(f"{reward}: stage {t.stage!r} is not a reward stage", param_hint="--reward")
    model, tokenizer = loading.load(t)
    rows, fmt = data.read_jsonl(data_path)
    if fmt == "preference":
        from ..methods.pairs import encode_pairs

        examples = [e for p in encode_pairs(rows, tokenizer, 1 << 16, data_path).examples for e in (p.chosen, p.rejected)]
    elif fmt in ("completion", "messages"):
        examples = data.encode(rows, fmt, tokenizer, 1 << 16, True, data_path).examples
    else:
        raise LocaltuneError(f"{data_path}: score needs prompt/completion, messages or preference rows, got {fmt!r}")
    scores = reward_method.score(model, examples)
    if fmt == "preference":
        out = [{"chosen": scores[2 * i], "rejected": scores[2 * i + 1]} for i in range(len(scores) // 2)]
    else:
        out = [{"score": s} for s in scores]
    for o in out:
        click.echo(json.dumps(o) if as_json else "\t".join(f"{v:.6f}" for v in o.values()))


@cli.command(name="eval")
@click.argument("target")
@click.option("--golden", type=click.Path(dir_okay=False), help="Golden JSONL (default: the run's [eval] data).")
@click.option("--metric", type=click.Choice(["exact_match", "contains", "regex", "json", "loglik", "preference"]),
              help="Task metric (default: the run's, else exact_match).")
@click.option("--format", "pattern", help='Regex for --metric regex (and the well-formed share).')
@click.option("--general", default=None, help='"bundled" (default), a JSONL file of {"text"} rows, or "none".')
@click.option("--limit", type=int, default=None, help="Golden rows scored (default: the run's, else 100).")
@click.option("--json", "as_json", is_flag=True)
def eval_(target, golden, metric, pattern, general, limit, as_json):
    """Task metric on a golden set and general NLL of MODEL, RUN or RUN/stage."""
    import dataclasses

    from ..integrity import evaluate
    from .. import loading
    from ..recipe import EvalSpec, Recipe
    from ..train import data
    from ..train.prepare import general_texts

    t = loading.parse_target(target)
    if t.run:
        parsed = loading.chain(t.run, t.stage)[0]
        spec = parsed.eval
        if golden is None and spec.data:
            golden = parsed.resolve(spec.data)
    else:
        parsed, spec = Recipe(eval=EvalSpec()), EvalSpec()
    spec = dataclasses.replace(spec, **{k: v for k, v in (("metric", metric), ("format", pattern),
                                                            ("general", general), ("limit", limit)) if v is not None})
    if spec.general not in ("bundled", "none"):
        spec = dataclasses.replace(spec, general=str(Path(spec.general).resolve()))
    model, tokenizer = loading.load(t)
    result = {"target": target}
    if golden:
        rows, _ = data.read_jsonl(golden)
        result["task"] = evaluate.task(model, tokenizer, rows, spec) | {"golden": str(golden)}
    texts = general_texts(dataclasses.replace(parsed, eval=spec))
    if texts:
        result["general"] = evaluate.general_nll(model, tokenizer, texts)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    if "task" in result:
        t = result["task"]
        value = f"{t['value']:.4f}" if t["metric"] == "loglik" else f"{t['value']:.1%}"
        click.echo(f"{t['metric']}: {value} on {t['n']} rows of {golden}")
    if "general" in result:
        g = result["general"]
        click.echo(f"general NLL: {g['nll']:.4f} nats/token (perplexity {g['perplexity']:.1f}) on {g['texts']} "
                   f"texts, {g['tokens']:,} tokens")
    if len(result) == 1:
        click.echo("nothing to evaluate: give --golden FILE, or a run with [eval] data; general is none")


@cli.group(name="data")
def data_():
    """Check training data against a golden set, and split data cleanly."""


@data_.command("check")
@click.argument("train", nargs=-1, required=True, type=click.Path())
@click.option("--against", "golden", multiple=True, required=True, type=click.Path(),
              help="The golden (test) set: a JSONL file or folder. Repeatable.")
@click.option("--ngram", default=13, show_default=True, help="Words per n-gram for near duplicates.")
@click.option("--near", default=0.5, show_default=True, help="Share of a golden row's n-grams that makes a near duplicate.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report, every overlap, as JSON.")
@click.pass_context
def data_check(ctx, train, golden, ngram, near, as_json):
    """Exact and near duplicates between TRAIN and the golden set. Exit 0 clean, 1 overlap."""
    from ..integrity.contamination import check_files

    report = check_files(train, golden, ngram, near)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else "\n".join(report.lines()))
    ctx.exit(1 if report.overlaps else 0)


@data_.command("split")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--test", "fraction", default=0.1, show_default=True, help="Share of rows for the test side.")
@click.option("--seed", default=0, show_default=True)
@click.option("--ngram", default=13, show_default=True)
@click.option("--near", default=0.5, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for train.jsonl and test.jsonl.")
def data_split(path, fraction, seed, ngram, near, out):
    """Split PATH into train and test with no exact or near duplicate across them."""
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
        atomic_write(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in rows))
    click.echo(f"{out / 'train.jsonl'}: {len(train)} rows · {out / 'test.jsonl'}: {len(test)} rows"
               + (f" ({moved} rows that duplicate a test row moved to the test side)" if moved else ""))


@cli.group(name="license")
def license_():
    """The license and provenance gate, on its own."""


@license_.command("check")
@click.option("--teacher", "teachers", multiple=True, metavar="REF",
              help="A teacher: folder, .gguf, repo id or bare model name (gpt-4o). Repeatable.")
@click.option("--data", "datasets", multiple=True, type=click.Path(), metavar="PATH",
              help="A JSONL file or a folder of them, with its dataset card. Repeatable.")
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


@cli.command()
def doctor():
    """Report the device, the BLAS in use, measured matmul GFLOP/s and the memory limit."""
    info = device.describe()
    info["matmul_gflops"] = round(device.matmul_gflops(), 1)
    for k, v in info.items():
        click.echo(f"{k:>16}: {v}")
    if sys.platform == "linux" and not device.blas_in_use():
        click.echo("\nwarning: reference BLAS in use; training will be ~20x slower.\n  fix: pip install mkl")


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


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli(prog_name="localtune")


if __name__ == "__main__":
    main()
