"""localtune's command line: the `cli` group, `main`, and the record formatting its commands share.

Each command lives in the module for what the user does: train (run, plan), runs (watch, runs, status),
evaluate (generate, eval, score), chat (chat), export (fuse, export), data (data, license), models (models),
doctor (doctor), init (init).
"""
from __future__ import annotations

import os

import click

from .. import __version__


def format_duration(sec) -> str:
    sec = int(sec or 0)
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


def progress_line(record: dict) -> str | None:
    """One plain line per report: stage, step/total, loss, lr, tokens/s, peak memory, ETA."""
    kind = record.get("kind")
    if kind == "train":
        rl = ""
        if "reward_mean" in record:  # ppo, grpo: the samples since the last report
            rl = (f"  reward {record['reward_mean']:+.3f}±{record['reward_std']:.3f}"
                  + (f"  KL {record['kl']:.3f}" if "kl" in record else "") + f"  clip {record.get('clip_frac', 0):.2f}")
            if "rollout_sec" in record:  # the time split of this window: rollout / scoring / training
                train = record["time_sec"] - record["rollout_sec"] - record["scoring_sec"]
                rl += f"  time {record['rollout_sec']:.1f}/{record['scoring_sec']:.1f}/{train:.1f}s"
        return (f"{record['stage']:>8}  step {record['step']:>5}/{record['steps_total']}  "
                f"loss {record['loss']:.4f}{rl}  lr {record['lr']:.2e}  "
                f"{record['real_tokens_per_sec']:,.0f} tok/s  peak {record['peak_memory_gb']:.2f} GB  "
                f"ETA {format_duration(record['eta_sec'])}")
    if kind == "eval" and "loss" not in record:
        return (f"{record['stage']:>8}  step {record['step']:>5}/{record['steps_total']}  held-out reward "
                f"{record['reward_mean']:+.3f}±{record['reward_std']:.3f}"
                + (f"  KL {record['kl']:.3f}" if "kl" in record else "")
                + (f"  pass@1 {record['pass1']:.1%}" if "pass1" in record else ""))
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


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli(prog_name="localtune")


# Each module registers its commands on `cli`, so it is imported once `cli` exists.
from . import chat, data, doctor, evaluate, export, init, models, runs, train  # noqa: E402, F401

if __name__ == "__main__":
    main()
