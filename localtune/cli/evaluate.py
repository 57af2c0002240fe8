"""Using a trained model: `generate`, `score`, `eval`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import LocaltuneError
from . import cli


@cli.command()
@click.argument("target")
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--stage", default=None, help="Stop after this stage's adapters (default: all stages).")
def generate(target, prompt, max_tokens, stage):
    """Generate from a run's adapted model (RUN or RUN/stage) or a plain model, with greedy decoding."""
    import dataclasses

    from .. import loading
    from ..integrity.evaluate import generate as gen

    t = loading.parse_target(target)
    if stage and t.run:
        t = dataclasses.replace(t, stage=stage)
    model, tokenizer = loading.load(t)
    click.echo(gen(model, tokenizer, [prompt], max_tokens)[0])


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

        pairs = encode_pairs(rows, tokenizer, 1 << 16, data_path).examples
        examples = [e for p in pairs for e in (p.chosen, p.rejected)]
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
@click.option("--golden", help="The golden set: a data file, folder or hf:owner/name (default: the run's [eval] data).")
@click.option("--metric", type=click.Choice(["exact_match", "contains", "regex", "json", "loglik", "preference",
                                           "tool_call"]),
              help="Task metric (default: the run's, else exact_match).")
@click.option("--format", "pattern", help='Regex for --metric regex (and the well-formed share).')
@click.option("--general", default=None, help='"bundled" (default), a JSONL file of {"text"} rows, or "none".')
@click.option("--limit", type=int, default=None, help="Golden rows scored (default: the run's, else 100).")
@click.option("--json", "as_json", is_flag=True)
def eval_(target, golden, metric, pattern, general, limit, as_json):
    """Task metric on a golden set and general NLL of MODEL, RUN or RUN/stage."""
    import dataclasses

    from .. import datasets, loading
    from ..integrity import evaluate
    from ..recipe import EvalSpec, Recipe
    from ..train.prepare import general_texts, golden_formats

    t = loading.parse_target(target)
    if t.run:
        parsed = loading.chain(t.run, t.stage)[0]
        spec = parsed.eval
        if golden is None and spec.data:
            golden = datasets.eval_spec(parsed)
    else:
        parsed, spec = Recipe(eval=EvalSpec()), EvalSpec()
    spec = dataclasses.replace(spec, **{k: v for k, v in (("metric", metric), ("format", pattern),
                                                            ("general", general), ("limit", limit)) if v is not None})
    if spec.general not in ("bundled", "none"):
        spec = dataclasses.replace(spec, general=str(Path(spec.general).resolve()))
    model, tokenizer = loading.load(t)
    result = {"target": target}
    if golden:
        golden = golden if isinstance(golden, datasets.Spec) else datasets.Spec(str(golden))
        rows = datasets.read(golden, golden_formats(spec.metric)).rows
        golden = golden.ref if golden.is_hub else str(golden.path())
        result["task"] = evaluate.task(model, tokenizer, rows, spec) | {"golden": golden}
    texts = general_texts(dataclasses.replace(parsed, eval=spec))
    if texts:
        result["general"] = evaluate.general_nll(model, tokenizer, texts)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    if "task" in result:
        t = result["task"]
        value = f"{t['value']:.4f}" if t["metric"] == "loglik" else f"{t['value']:.1%}"
        also = "".join(f", {k} {v:.1%}" for k, v in t.get("secondary", {}).items())
        click.echo(f"{t['metric']}: {value} on {t['n']} rows of {golden}{also}")
    if "general" in result:
        g = result["general"]
        click.echo(f"general NLL: {g['nll']:.4f} nats/token (perplexity {g['perplexity']:.1f}) on {g['texts']} "
                   f"texts, {g['tokens']:,} tokens")
    if len(result) == 1:
        click.echo("nothing to evaluate: give --golden FILE, or a run with [eval] data; general is none")
