"""GRPO (Shao et al. 2024) and its variants, Dr. GRPO, BNPO, DAPO and GSPO, with verifiable rewards,
on one copy of the base. There is no critic: each prompt gets `group_size` completions, and a
completion's advantage is its reward against its group's (grpo_math.group_advantages).

- policy: the model plus this stage's LoRA;
- reference (beta > 0 only): the same model with that LoRA switched off;
- reward: rules and the user's Python functions from the recipe, and/or a reward stage swapped in
  (methods/rewards.py).

Completions are sampled inside the batch iterator (`grpo_groups.Groups`): one batched generation per
batch of prompts, each prompt's KV cache filled once for its group; then `mu` shuffled passes of
minibatches over it. The loss is a few lines; the loop is everyone's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import device
from ..recipe import option
from ..train.metrics import Metric
from . import grpo_math, rewards
from .grpo_groups import Groups, off_policy, per_generation, sample_and_score
from .logprobs import hidden_logprobs
from .prompts import Prompt, Sampling, at_positions, prompt_text, scored_positions


@dataclass(frozen=True)
class Options:
    reward_model: Union[str, None] = option(None, doc="grpo/ppo: the name of an earlier reward stage, or RUN/stage")
    rewards: Union[list, None] = option(None, doc="grpo: [[stages.rewards]] tables (rule kinds or python), summed "
                                                  "with their weights")
    group_size: int = option(8, min=2, max=256, doc="grpo: completions sampled per prompt")
    max_new_tokens: int = option(128, min=1)
    temperature: float = option(1.0, min=0.05, max=100.0)
    top_p: float = option(1.0, min=0.01, max=1.0)
    loss_type: str = option("grpo", choices=grpo_math.LOSS_TYPES)
    epsilon: float = option(0.2, min=0.0, max=1.0, doc="grpo: the clip range's lower side (and upper, unless "
                                                       "epsilon_high)")
    epsilon_high: Union[float, None] = option(None, min=0.0, max=10.0, doc="grpo: DAPO's clip-higher upper side")
    beta: float = option(0.0, min=0.0, doc="grpo: weight of the k3 KL to the reference (adapters off); 0 skips "
                                           "the reference pass")
    importance_sampling: str = option("token", choices=("token", "sequence"), doc='grpo: "sequence" is GSPO')
    mu: int = option(1, min=1, max=16, doc="grpo: optimisation passes over each generation batch")
    minibatch_size: int = option(0, min=0, doc="grpo: completions per optimizer step; 0 = a whole generation batch")
    dynamic_sampling: bool = option(False, doc="grpo: DAPO's dynamic sampling, groups whose rewards are all equal "
                                               "are replaced from further prompts")
    max_generation_rounds: int = option(3, min=1, max=16, doc="grpo: dynamic sampling's most generation batches "
                                                              "per update")
    overlong: str = option("none", choices=("none", "filter", "penalty"), doc="grpo: completions cut at "
                           "max_new_tokens: kept, left out of the loss, or DAPO's soft length penalty")
    overlong_buffer: int = option(0, min=0, doc="grpo: the penalty's ramp (tokens before max_new_tokens)")
    heldout_prompts: int = option(64, min=1)
    heldout_samples: int = option(4, min=1, max=64, doc="grpo: completions per held-out prompt (pass@k's k)")
    pass_threshold: float = option(1.0, doc="grpo: the total reward that counts a held-out completion as solved")
    dequantize_rollouts: bool = option(True)


# ---------------------------------------------------------------------------------------------
# The loss


def make_loss(stage):
    o = stage.options

    def loss(model, batch):
        """grpo_math.policy_loss on the completions' tokens, log pi at the sampling temperature T:
        log softmax(z / T). With the policy unchanged since sampling (one update per generation
        batch) the old log-probs are the current ones, without gradient: the ratio is 1.
        Returns (L, completion tokens, {clip_frac, ratio, kl when beta > 0})."""
        hidden, targets, w = scored_positions(model, batch)
        logp = hidden_logprobs(model, hidden / o.temperature, targets)
        n, width = batch["inputs"].shape
        rows = batch["target_index"] // width if "target_index" in batch else mx.arange(n * width) // width
        old = at_positions(batch, "old_logp") if "old_logp" in batch else mx.stop_gradient(logp)
        ref = at_positions(batch, "ref_logp") if o.beta else None
        L, metrics = grpo_math.policy_loss(
            logp, old, batch["advantages"], w, rows, n, loss_type=o.loss_type, epsilon=o.epsilon,
            epsilon_high=o.epsilon_high, level=o.importance_sampling, beta=o.beta, ref_logp=ref,
            max_new_tokens=o.max_new_tokens)
        return L, (w > 0).sum().astype(mx.float32), metrics

    return loss


def heldout(model, tokenizer, reward, prompts: list[Prompt], stage, seed: int = 1234) -> dict:
    """heldout_samples completions to each held-out prompt (a fixed seed): pass@1 with its standard
    error over prompts, pass@k (k = heldout_samples), the reward and each part of it, and samples."""
    o = stage.options
    k = o.heldout_samples
    mx.random.seed(seed)
    per_chunk = max(1, stage.batch_size * o.group_size // k)
    groups = []
    for i in range(0, len(prompts), per_chunk):
        groups += sample_and_score(model, tokenizer, reward, prompts[i:i + per_chunk], stage, k)
    solved = np.array([(g["scores"] >= o.pass_threshold).sum() for g in groups])
    share, scores = solved / k, np.concatenate([g["scores"] for g in groups])
    se = float(share.std(ddof=1) / np.sqrt(len(share))) if len(share) > 1 else 0.0
    result = {"pass1": float(share.mean()), "pass1_se": se, "k": k,
              "passk": float(np.mean([grpo_math.pass_at_k(k, int(c), k) for c in solved])),
              "reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
              "completion_length": float(np.mean([len(r) for g in groups for r in g["responses"]])),
              "n": len(groups), "samples": [{"prompt": prompt_text(g["prompt"].prompt), "got": g["texts"][0],
                                            "reward": float(g["scores"][0])} for g in groups[:5]]}
    for name in groups[0]["parts"]:
        result[f"reward_{name}"] = float(np.concatenate([g["parts"][name] for g in groups]).mean())
    return result


# ---------------------------------------------------------------------------------------------
# The method


class GRPO(Sampling):
    kind = "grpo"
    options = Options
    rules_key = "rewards"
    capability = "ppo"  # the same needs as ppo: sampling, and log-probs through a plain head
    one_process = "each rank would sample its own groups"
    metrics = (Metric("reward_mean", "reward", "{:+.3f}"), Metric("reward_std", "reward std", "{:.3f}"),
               Metric("solved", "solved", "{:.1%}"), Metric("zero_variance", "equal-reward groups", "{:.0%}"),
               Metric("kl", "KL to reference", "{:.4f}"), Metric("entropy", "entropy", "{:.3f}"),
               Metric("clip_frac", "clip fraction", "{:.1%}"),
               Metric("completion_length", "completion length", "{:.1f}"),
               Metric("rollout_sec", "sampling s", "{:.1f}"), Metric("scoring_sec", "scoring s", "{:.1f}"),
               # each reward's mean, in [[stages.rewards]] order (the first three), and a reward model's
               *(Metric(f"reward_rule{i}", f"reward {i}", "{:+.3f}") for i in (1, 2, 3)),
               Metric("reward_model", "reward model", "{:+.3f}"))

    def validate(self, stage, before, fail):
        from .dpo import refuse_full, refuse_packing

        o = stage.options
        if not o.reward_model and not o.rewards:
            raise fail("", f"{fail.table} is a grpo stage with neither reward_model nor rewards: nothing scores its "
                       "completions", 'add a reward:\n  [[stages.rewards]]\n  kind = "python"\n'
                       '  function = "rewards.py:exact_answer"   # (prompt, completion, row) -> float')
        refuse_full(self.kind, stage, fail)
        refuse_packing(self.kind, stage, fail)
        n = stage.batch_size * o.group_size
        if o.minibatch_size and (o.minibatch_size > n or n % o.minibatch_size):
            raise fail("minibatch_size", f"minibatch_size = {o.minibatch_size} must divide batch_size x group_size "
                       f"= {stage.batch_size} x {o.group_size} = {n} (the completions of a generation batch)",
                       f"use minibatch_size = {n // 2 if n % 2 == 0 else n}")
        if o.epsilon_high is not None and o.epsilon_high < o.epsilon:
            raise fail("epsilon_high", f"epsilon_high = {o.epsilon_high:g} is below epsilon = {o.epsilon:g}: "
                       "clip-higher widens the upper side", f"use epsilon_high = {max(0.28, o.epsilon):g}")
        if o.overlong == "penalty" and not 0 < o.overlong_buffer < o.max_new_tokens:
            raise fail("overlong_buffer", f"overlong = \"penalty\" needs 0 < overlong_buffer < max_new_tokens = "
                       f"{o.max_new_tokens}, got {o.overlong_buffer}", f"use overlong_buffer = "
                       f"{max(1, o.max_new_tokens // 4)} (the penalty ramps over the last quarter)")
        if o.overlong_buffer and o.overlong != "penalty":
            raise fail("overlong_buffer", "overlong_buffer only applies to overlong = \"penalty\"",
                       'set overlong = "penalty", or remove overlong_buffer')
        rewards.validate_reward_model(stage, before, fail)

    def data_hint(self, stage):
        return ('a grpo stage samples its own completions, so it needs prompts: {"prompt", ...} rows (other '
                'columns such as "answer" reach python rewards)\n  fix: write each row as {"prompt": "...", '
                '"answer": "..."}')

    def steps_per_batch(self, stage):
        return per_generation(stage)

    def setup(self, ctx):
        """(loss, Groups, None) for the one loop; ctx.batches yields lists of prompts."""
        stage = ctx.stage
        reward = self.reward(ctx)

        def log(kind, **fields):
            return ctx.run.log(stage.name, 0, kind, **fields)

        return make_loss(stage), Groups(ctx.model, ctx.tokenizer, ctx.batches, reward, stage, ctx.stage_dir, log), None

    def heldout(self, ctx, model):
        """pass@1, pass@k and the reward on held-out prompts (sampled with a fixed seed), before and after."""
        if not ctx.valid:
            return None
        prompts = ctx.valid.examples[:ctx.stage.options.heldout_prompts]
        return heldout(model, ctx.tokenizer, ctx.state["reward"], prompts, ctx.stage)

    def heldout_line(self, when, h):
        return (f"held-out prompts {when}: pass@1 {h['pass1']:.1%} ± {h['pass1_se']:.1%}, pass@{h['k']} "
                f"{h['passk']:.1%}, reward {h['reward_mean']:+.3f} ± {h['reward_std']:.3f} ({h['n']} prompts x "
                f"{h['k']} samples)")

    def report(self, stage, r, run_path):
        return report_lines(stage, r, run_path) if "heldout_before" in r else []

    def plan_shapes(self, stage, dataset):
        """One minibatch of completions: the longest prompt plus max_new_tokens, max_new_tokens scored each."""
        o = stage.options
        width = max(len(p.tokens) for p in dataset.examples) + o.max_new_tokens
        rows = o.minibatch_size or stage.batch_size * o.group_size
        return [(rows, -(-width // 8) * 8, rows * o.max_new_tokens)]

    def plan_extras(self, model, stage, dataset, dims, dtype_bytes):
        """Sampling: the KV cache of a whole generation batch (and an fp32 copy of a 4-bit base on the CPU)."""
        from .. import models, plan

        o = stage.options
        width = max(len(p.tokens) for p in dataset.examples) + o.max_new_tokens
        kv = plan.rollout_cache_bytes(dims, stage.batch_size * o.group_size, width, dtype_bytes)
        copy_bytes = 0
        if o.dequantize_rollouts and device.policy().dequantize_rollouts and models.is_quantized(model):
            copy_bytes = plan.block_params(dims, "i_total") * 4
        trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
        return {"phase:sampling": kv + copy_bytes + trainable * 4}

    def plan_step_flops(self, stage, params, mean_width):
        """A generation batch (sampling, plus the old and reference passes when they run) shared by its updates."""
        o = stage.options
        passes = 2 + int(off_policy(stage)) + int(o.beta > 0)
        return passes * 2 * params * stage.batch_size * o.group_size * mean_width / per_generation(stage)


def time_split(run_path: Path, stage: str) -> dict:
    """Seconds of the stage's steps spent sampling, scoring and training (metrics.jsonl, last record per step)."""
    records = {}
    path = Path(run_path) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("stage") == stage and r.get("kind") == "train":
            records[r.get("step")] = r
    total = {k: sum(r.get(k, 0.0) for r in records.values())
             for k in ("time_sec", "rollout_sec", "scoring_sec", "completions")}
    total["training_sec"] = max(0.0, total["time_sec"] - total["rollout_sec"] - total["scoring_sec"])
    return total


def report_lines(s, r: dict, run_path: Path) -> list[str]:
    """Held-out pass@1 (with its standard error) and pass@k before and after a grpo stage, the reward's
    parts, where the time went, and sample completions."""
    b, a, o = r["heldout_before"], r["heldout_after"], s.options
    gain, se = a["pass1"] - b["pass1"], float(np.hypot(a["pass1_se"], b["pass1_se"]))
    lines = ["", f"## GRPO ({s.name}: {b['n']} held-out prompts of `{s.valid or 'the valid split'}` x {b['k']} "
             f"samples at T={o.temperature:g}; loss `{o.loss_type}`"
             + (", sequence-level ratios (GSPO)" if o.importance_sampling == "sequence" else "") + ")", "",
             f"Reward: {rewards.describe(o.reward_model, o.rewards)}; solved when it reaches {o.pass_threshold:g}.",
             "", "| | before the stage | after | change |", "|---|---|---|---|",
             f"| pass@1 | {b['pass1']:.1%} ± {b['pass1_se']:.1%} | {a['pass1']:.1%} ± {a['pass1_se']:.1%} | "
             f"{gain * 100:+.1f} points" + (f" ({gain / se:.1f} standard errors)" if se > 0 else "") + " |",
             f"| pass@{b['k']} | {b['passk']:.1%} | {a['passk']:.1%} | {(a['passk'] - b['passk']) * 100:+.1f} points |",
             f"| reward (mean ± std) | {b['reward_mean']:+.3f} ± {b['reward_std']:.3f} | "
             f"{a['reward_mean']:+.3f} ± {a['reward_std']:.3f} | {a['reward_mean'] - b['reward_mean']:+.3f} |"]
    for key in sorted(k for k in b if k.startswith("reward_rule")):
        rule = (o.rewards or [])[int(key[11:]) - 1]
        lines.append(f"| {rewards.rule_name(rule)} (mean) | {b[key]:.3f} | {a[key]:.3f} | {a[key] - b[key]:+.3f} |")
    if "reward_model" in b:
        lines.append(f"| reward model score | {b['reward_model']:+.3f} | {a['reward_model']:+.3f} | "
                     f"{a['reward_model'] - b['reward_model']:+.3f} |")
    lines.append(f"| completion length (tokens) | {b['completion_length']:.1f} | {a['completion_length']:.1f} | "
                 f"{a['completion_length'] - b['completion_length']:+.1f} |")
    t = time_split(run_path, s.name)
    if t["time_sec"]:
        lines += ["", f"Training: {t['completions']:.0f} completions in {t['time_sec']:.0f} s of steps: sampling "
                  f"{t['rollout_sec'] / t['time_sec']:.0%}, scoring {t['scoring_sec'] / t['time_sec']:.0%}, "
                  f"updates {t['training_sec'] / t['time_sec']:.0%}."]
    return lines + rewards.samples_table(b["samples"], a["samples"])


METHOD = GRPO()
