"""PPO with a critic (Schulman et al. 2017; as in Ziegler et al. 2019 and Ouyang et al. 2022) on one
copy of the base weights. Four roles, one set of base weights:

- policy: the model plus this stage's LoRA;
- reference: the same model with that LoRA switched off (adapters.adapters_disabled);
- value: a linear head on the policy's final hidden states (`value_head`). It shares the policy's
  trunk and LoRA, so one forward pass gives log-probs and values, and vf_coef * the value loss
  trains the LoRA too. (A separate critic LoRA would need a second forward pass per minibatch.)
- reward: a reward stage's LoRA and head, swapped in for scoring only (adapters.swapped), and/or
  rule rewards declared in the recipe.

Rollouts are made inside the batch iterator (`Rollouts`): sample, score, GAE, once per rollout
batch, then minibatches for `ppo_epochs` passes. The loss is a few lines; the loop is everyone's.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .. import device
from ..models import inference_weights
from ..recipe import option
from ..run.damage import DamagedFile, load_safetensors
from ..train import data
from ..train.adapters import adapters_disabled, save_arrays
from ..train.metrics import Metric
from . import ppo_math, rewards
from .logprobs import hidden_entropy, hidden_logprobs
from .prompts import Prompt, Sampling, at_positions, dense, prompt_text, response_rows, sample, scored_positions
from .rewards import Reward

# ---------------------------------------------------------------------------------------------
# Rollouts


def attach_value_head(model) -> nn.Module:
    """V(s_t) = w . h_t + b on the policy's final hidden state; starts at 0 (saved as value_head.*)."""
    hidden = model.model.norm.weight.shape[0]
    head = nn.Linear(hidden, 1)
    head.weight, head.bias = mx.zeros_like(head.weight), mx.zeros_like(head.bias)
    model.value_head = head
    return head


def collect(model, tokenizer, reward: Reward, prompts: list[Prompt], stage, kl_coef: float) -> dict:
    """Sample responses to `prompts` and score them: everything one PPO update needs.

    Returns numpy arrays inputs/targets/mask/real (B, T), old_logp, ref_logp, old_values,
    advantages, returns (B, T), scores (B,), and texts, parts, stats.
    """
    from ..train.trainer import to_mx

    T = stage.options.temperature
    model.eval()
    t0 = time.perf_counter()
    dequantize = stage.options.dequantize_rollouts and device.policy().dequantize_rollouts
    dequantized = inference_weights(model, embedding=False) if dequantize else None
    with dequantized or contextlib.nullcontext():
        responses, stopped = sample(model, tokenizer, [p.tokens.tolist() for p in prompts],
                                    stage.options.max_new_tokens, T, stage.options.top_p)
        t1 = time.perf_counter()
        batch = response_rows(prompts, responses)
        b = to_mx(batch)
        hidden, targets, w = scored_positions(model, b)
        logp = hidden_logprobs(model, hidden / T, targets)
        values = model.value_head(hidden.astype(mx.float32))[:, 0]
        entropy = hidden_entropy(model, hidden / T)
        with adapters_disabled(model):
            ref_hidden, _, _ = scored_positions(model, b)
            ref_logp = hidden_logprobs(model, ref_hidden / T, targets)
        mx.eval(logp, values, entropy, ref_logp)
        texts = [tokenizer.decode(r[:-1] if s else r) for r, s in zip(responses, stopped)]
        scores, parts = reward.score(model, prompts, texts)
    t2 = time.perf_counter()
    model.train()
    shape = batch.loss_mask.shape
    mask = mx.array(batch.loss_mask)
    old_logp, ref_lp, old_values = (mx.array(dense(x, b, shape)) for x in (logp, ref_logp, values))
    kl = ppo_math.kl_penalty(old_logp, ref_lp, stage.options.kl_estimator) * mask
    token_r = ppo_math.token_rewards(mx.array(scores), kl, mask, kl_coef)
    advantages, returns = ppo_math.gae(token_r, old_values, mask, stage.options.gamma, stage.options.lam)
    if stage.options.whiten_advantages:
        advantages = ppo_math.whiten(advantages, mask)
    seq_kl = np.array(kl.sum(-1))
    n = float(w.sum().item())
    lengths = np.array([len(r) for r in responses])
    stats = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
             "kl": float(seq_kl.mean()), "kl_coef": kl_coef,
             "entropy": float((entropy * w).sum().item() / max(n, 1)),
             "response_length": float(lengths.mean()), "stopped": float(np.mean(stopped)),
             "explained_variance": float(ppo_math.explained_variance(old_values, returns, mask).item()),
             "rollout_sec": t1 - t0, "scoring_sec": t2 - t1, "rollout_tokens": int(lengths.sum())}
    for k, v in parts.items():
        stats[f"reward_{k}"] = float(v.mean())
    return {"inputs": batch.inputs, "targets": batch.targets, "mask": batch.loss_mask, "real": batch.real,
            "old_logp": np.array(old_logp), "ref_logp": np.array(ref_lp), "old_values": np.array(old_values),
            "advantages": np.array(advantages), "returns": np.array(returns), "scores": scores,
            "seq_kl": seq_kl, "texts": texts, "parts": parts, "stats": stats}


_SUMMED = ("rollout_sec", "scoring_sec", "rollout_tokens")
_BUFFER_KEYS = ("inputs", "targets", "mask", "real", "old_logp", "old_values", "advantages", "returns")


class Rollouts:
    """The ppo stage's batch iterator: every `per_rollout` minibatches it samples a new rollout batch
    from the current policy; in between it hands out minibatches of the last one, shuffled, for
    ppo_epochs passes. Checkpoints hold its cursor; each rollout batch is kept on disk so a resumed
    stage continues from the same rollouts."""

    def __init__(self, model, tokenizer, prompts: data.Batches, reward: Reward, stage, stage_dir: Path, log):
        self.model, self.tokenizer, self.prompts, self.reward = model, tokenizer, prompts, reward
        self.stage, self.stage_dir, self.log = stage, Path(stage_dir), log
        self.kl = ppo_math.AdaptiveKL(stage.options.kl_coef, stage.options.target_kl, stage.options.kl_horizon)
        self.minibatch = stage.options.minibatch_size or stage.batch_size
        self.per_rollout = updates_per_rollout(stage)
        self.count, self.position, self.buffer, self.start = 0, 0, None, prompts.state()
        self.window: list[dict] = []
        self.last: dict = {}

    @property
    def batches_per_epoch(self) -> int:
        return self.prompts.batches_per_epoch * self.per_rollout

    def state(self) -> dict:
        return {"prompts": self.start, "rollout": self.count, "position": self.position, "kl_coef": self.kl.beta}

    def restore(self, state: dict) -> None:
        self.prompts.restore(state["prompts"])
        self.start, self.count, self.kl.beta = state["prompts"], state["rollout"], state["kl_coef"]
        self.position, self.buffer = 0, None
        path = self._path(self.count)
        if not state["position"]:
            return
        try:
            self.buffer = {k: np.array(v) for k, v in load_safetensors(path, "").items()}
            problem = None if set(_BUFFER_KEYS) <= set(self.buffer) else "not a rollout batch (arrays missing)"
        except DamagedFile as e:
            problem = e.problem
        if problem:  # sampled again from the same prompts, never trusted
            self.buffer, self.count = None, self.count - 1
            self.log("event", event="warning", message=f"{path}: {problem}; the rollout batch is sampled again "
                     "from the same prompts (with the restored policy)")
            return
        self.position = state["position"]
        next(self.prompts)  # the prompts this buffer was made from

    def _path(self, count: int) -> Path:
        return self.stage_dir / f"rollout-{count}.safetensors"

    def _order(self) -> list[np.ndarray]:
        """Minibatch row indices for ppo_epochs shuffled passes over the rollout batch."""
        B = len(self.buffer["inputs"])
        out = []
        for epoch in range(self.stage.options.ppo_epochs):
            order = np.random.default_rng([self.stage.seed, self.count, epoch]).permutation(B)
            out += [order[i:i + self.minibatch] for i in range(0, B, self.minibatch)]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> data.Batch:
        if self.buffer is None or self.position >= self.per_rollout:
            self._rollout()
        rows = self._order()[self.position]
        self.position += 1
        b = {k: self.buffer[k][rows] for k in _BUFFER_KEYS}
        width = -(-int(b["real"].sum(-1).max()) // 8) * 8  # trim the padding this minibatch does not need
        b = {k: v[:, :width] for k, v in b.items()}
        return data.Batch(b["inputs"], b["targets"], b["mask"], b["real"], extras={
            k: b[k] for k in ("old_logp", "old_values", "advantages", "returns")})

    def _rollout(self) -> None:
        self.start = self.prompts.state()
        prompts = next(self.prompts)
        out = collect(self.model, self.tokenizer, self.reward, prompts, self.stage, self.kl.beta)
        self.kl.update(out["stats"]["kl"], len(prompts))
        self.count += 1
        self.buffer = {k: out[k] for k in _BUFFER_KEYS}
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        save_arrays(self._path(self.count), {k: mx.array(v) for k, v in self.buffer.items()})
        self._path(self.count - 2).unlink(missing_ok=True)  # a checkpoint may still point at count - 1
        self.position = 0
        self.window.append(out["stats"])
        for p, text, score in list(zip(prompts, out["texts"], out["scores"]))[:2]:
            self.log("sample", when=f"rollout {self.count}", prompt=prompt_text(p.prompt), got=text,
                     reward=float(score))

    def metrics(self) -> dict:
        """Means of the rollout statistics since the last call (times and tokens summed); the last
        rollout batch's statistics, without times, when no new one was made since."""
        if not self.window:
            return {k: v for k, v in self.last.items() if k not in _SUMMED}
        out = {k: float(np.mean([s[k] for s in self.window])) for k in self.window[0]}
        out.update({k: float(sum(s[k] for s in self.window)) for k in _SUMMED}, rollouts=self.count)
        self.last, self.window = out, []
        return out


# ---------------------------------------------------------------------------------------------
# The loss


def make_loss(stage):
    o = stage.options
    T, clip, value_clip, vf_coef = o.temperature, o.clip_range, o.value_clip, o.vf_coef

    def loss(model, batch):
        """PPO's clipped surrogate plus the critic's clipped value loss over response tokens
        (ppo_math.policy_loss, ppo_math.value_loss):

            L = L_clip(theta) + vf_coef * L_V(theta)

        log pi is at the sampling temperature T: log softmax(z / T). Returns (L, response tokens,
        {policy_loss, value_loss, clip_frac, approx_kl, value_clip_frac}).
        """
        hidden, targets, w = scored_positions(model, batch)
        logp = hidden_logprobs(model, hidden / T, targets)
        values = model.value_head(hidden.astype(mx.float32))[:, 0]
        pl, clip_frac, approx_kl = ppo_math.policy_loss(logp, at_positions(batch, "old_logp"),
                                                        at_positions(batch, "advantages"), w, clip)
        vl, value_clip_frac = ppo_math.value_loss(values, at_positions(batch, "old_values"),
                                                  at_positions(batch, "returns"), w, value_clip)
        # not w.sum(): mx.compile (MLX 0.32) merges an output with policy_loss's identical sum, then fails
        ntoks = (w > 0).sum().astype(mx.float32)
        return pl + vf_coef * vl, ntoks, {"policy_loss": pl, "value_loss": vl, "clip_frac": clip_frac,
                                            "approx_kl": approx_kl, "value_clip_frac": value_clip_frac}

    return loss


def heldout(model, tokenizer, reward: Reward, prompts: list[Prompt], stage, seed: int = 1234) -> dict:
    """Sampled answers to held-out prompts (a fixed seed): score mean and spread, KL to the reference
    per response (k1, summed over tokens), each rule's pass rate, and a few samples."""
    mx.random.seed(seed)
    out, scores, kls, parts = [], [], [], {}
    for i in range(0, len(prompts), stage.batch_size):
        chunk = prompts[i:i + stage.batch_size]
        r = collect(model, tokenizer, reward, chunk, stage, 0.0)
        scores.append(r["scores"])
        kls.append(((r["old_logp"] - r["ref_logp"]) * r["mask"]).sum(-1))
        for k, v in r["parts"].items():
            parts.setdefault(k, []).append(v)
        out += [{"prompt": prompt_text(p.prompt), "got": t, "reward": float(s)}
                for p, t, s in zip(chunk, r["texts"], r["scores"])]
    s, k = np.concatenate(scores), np.concatenate(kls)
    result = {"reward_mean": float(s.mean()), "reward_std": float(s.std()), "kl": float(k.mean()),
              "kl_std": float(k.std()), "n": int(len(s)), "samples": out[:5]}
    for name, v in parts.items():
        result[f"reward_{name}"] = float(np.concatenate(v).mean())
    return result


@dataclass(frozen=True)
class Options:
    reward_model: Union[str, None] = option(None, doc="ppo: the name of an earlier reward stage, or RUN/stage")
    rules: Union[list, None] = option(None, doc="ppo: rule rewards, [[stages.rules]] tables")
    temperature: float = option(1.0, min=0.05, max=100.0)
    max_new_tokens: int = option(64, min=1, doc="ppo: the longest sampled response")
    top_p: float = option(1.0, min=0.01, max=1.0, doc="ppo: nucleus sampling of rollouts")
    ppo_epochs: int = option(2, min=1, max=16, doc="ppo: passes over each rollout batch")
    minibatch_size: int = option(0, min=0, doc="ppo: rollouts per optimizer step; 0 = batch_size")
    kl_coef: float = option(0.05, min=0.0, doc="ppo: weight of the per-token KL penalty to the reference")
    kl_estimator: str = option("k1", choices=("k1", "k3"))
    target_kl: Union[float, None] = option(None, min=0.0, doc="ppo: KL per response (nats) that an adaptive "
                                                              "kl_coef steers towards; unset = fixed kl_coef")
    kl_horizon: int = option(10000, min=1, doc="ppo: adaptive KL's horizon (Ziegler et al. 2019)")
    gamma: float = option(1.0, min=0.0, max=1.0)
    lam: float = option(0.95, min=0.0, max=1.0)
    clip_range: float = option(0.2, min=0.0, max=1.0)
    value_clip: float = option(0.2, min=0.0)
    vf_coef: float = option(0.1, min=0.0, doc="ppo: weight of the value loss (the critic shares the policy trunk)")
    whiten_advantages: bool = option(True)
    heldout_prompts: int = option(64, min=1, doc="ppo: held-out prompts scored before and after the stage")
    dequantize_rollouts: bool = option(True, doc="ppo, QLoRA on CPU: sample from an fp32 copy of the base (about "
                                                 "3x faster rollouts, 4 bytes per weight while sampling)")


def updates_per_rollout(stage) -> int:
    """Optimizer steps per rollout batch: ppo_epochs passes over its minibatches."""
    o = stage.options
    return o.ppo_epochs * (stage.batch_size // (o.minibatch_size or stage.batch_size))


class PPO(Sampling):
    kind = "ppo"
    options = Options
    capability = "ppo"
    one_process = "each rank would sample its own rollouts and adapt its own KL coefficient"
    metrics = (Metric("reward_mean", "reward", "{:+.3f}"), Metric("reward_std", "reward std", "{:.3f}"),
               Metric("kl", "KL to reference", "{:.3f}"), Metric("kl_coef", "KL coefficient", "{:.4f}"),
               Metric("entropy", "entropy", "{:.3f}"), Metric("clip_frac", "clip fraction", "{:.1%}"),
               Metric("approx_kl", "approx KL", "{:.4f}"), Metric("value_loss", "value loss"),
               Metric("explained_variance", "explained var.", "{:.2f}"),
               Metric("response_length", "response length", "{:.1f}"), Metric("rollout_sec", "rollout s", "{:.1f}"),
               Metric("scoring_sec", "scoring s", "{:.1f}"))

    def validate(self, stage, before, fail):
        from .dpo import refuse_full, refuse_packing

        o = stage.options
        if not o.reward_model and not o.rules:
            raise fail("", f"{fail.table} is a ppo stage with neither reward_model nor rules: nothing scores its "
                       "rollouts", 'add reward_model = "reward" (an earlier reward stage), or a rule:\n'
                       '  [[stages.rules]]\n  kind = "regex"\n  pattern = \'\\d{4}-\\d{2}-\\d{2}\'')
        refuse_full(self.kind, stage, fail)
        if o.minibatch_size and (o.minibatch_size > stage.batch_size or stage.batch_size % o.minibatch_size):
            raise fail("minibatch_size", f"minibatch_size = {o.minibatch_size} must divide batch_size = "
                       f"{stage.batch_size} (the rollouts per batch)",
                       f"use minibatch_size = {stage.batch_size // 2 or 1}")
        refuse_packing(self.kind, stage, fail)
        rewards.validate_reward_model(stage, before, fail)

    def data_hint(self, stage):
        return ('a ppo stage samples its own responses, so it needs prompts: {"prompt"} rows (or {"messages"} '
                'or preference rows; their answers are ignored)\n  fix: write each row as {"prompt": "..."}')

    def steps_per_batch(self, stage):
        return updates_per_rollout(stage)

    def heads(self, model):
        attach_value_head(model)
        return {"value_head": True}

    def setup(self, ctx):
        """(loss, Rollouts, None) for the one loop; ctx.batches yields lists of prompts."""
        model, stage = ctx.model, ctx.stage
        reward = self.reward(ctx)

        def log(kind, **fields):
            return ctx.run.log(stage.name, 0, kind, **fields)

        return make_loss(stage), Rollouts(model, ctx.tokenizer, ctx.batches, reward, stage, ctx.stage_dir, log), None

    def heldout(self, ctx, model):
        """Reward and KL on held-out prompts (sampled with a fixed seed), before and after the stage."""
        if not ctx.valid:
            return None
        prompts = ctx.valid.examples[:ctx.stage.options.heldout_prompts]
        return heldout(model, ctx.tokenizer, ctx.state["reward"], prompts, ctx.stage)

    def heldout_line(self, when, h):
        rules = "".join(f", {k[7:]} pass rate {v:.0%}" for k, v in h.items() if k.startswith("reward_rule"))
        return (f"held-out prompts {when}: reward {h['reward_mean']:+.3f} ± {h['reward_std']:.3f}, KL to the "
                f"reference {h['kl']:.3f} nats per response{rules} ({h['n']} sampled answers)")

    def after(self, ctx, summary):
        ctx.model.pop("value_head")  # the critic ends with the stage; the policy's adapters go on

    def report(self, stage, r, run_path):
        return report_lines(stage, r) if "heldout_before" in r else []

    def plan_shapes(self, stage, dataset):
        """One rollout minibatch: the longest prompt plus max_new_tokens, max_new_tokens scored per row."""
        width = max(len(p.tokens) for p in dataset.examples) + stage.options.max_new_tokens
        rows = stage.options.minibatch_size or stage.batch_size
        return [(rows, -(-width // 8) * 8, rows * stage.options.max_new_tokens)]

    def plan_extras(self, model, stage, dataset, dims, dtype_bytes):
        """Rollouts: the KV cache of a whole rollout batch (and an fp32 copy of a 4-bit base on the
        CPU), and the value head."""
        from .. import models, plan

        o = stage.options
        width = max(len(p.tokens) for p in dataset.examples) + o.max_new_tokens
        kv = plan.rollout_cache_bytes(dims, stage.batch_size, width, dtype_bytes)
        copy_bytes = 0
        if o.dequantize_rollouts and device.policy().dequantize_rollouts and models.is_quantized(model):
            copy_bytes = plan.block_params(dims, "i_total") * 4
        trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
        return {"phase:rollouts": kv + copy_bytes + trainable * 4, "value head": (dims["h"] + 1) * 4}

    def plan_step_flops(self, stage, params, mean_width):
        """A rollout batch (generation + 3 scoring passes) shared by its updates."""
        return 5 * 2 * params * stage.batch_size * mean_width / updates_per_rollout(stage)


def report_lines(s, r: dict) -> list[str]:
    """Held-out reward, KL and rule pass rates before and after a ppo stage, and sample answers."""
    b, a, o = r["heldout_before"], r["heldout_after"], s.options
    lines = ["", f"## PPO ({s.name}: {b['n']} held-out prompts of `{s.valid or 'the valid split'}`, sampled at "
             f"T={o.temperature:g})", "", f"Reward: {rewards.describe(o.reward_model, o.rules)}.", "",
             "| | before the stage | after | change |", "|---|---|---|---|",
             f"| reward (mean ± std) | {b['reward_mean']:+.3f} ± {b['reward_std']:.3f} | "
             f"{a['reward_mean']:+.3f} ± {a['reward_std']:.3f} | {a['reward_mean'] - b['reward_mean']:+.3f} |",
             f"| KL to the reference (nats per response) | {b['kl']:.3f} | {a['kl']:.3f} ± {a['kl_std']:.3f} | "
             + (f"target {o.target_kl:g} |" if o.target_kl else "— |")]
    if "reward_model" in b and o.rules:
        lines.append(f"| reward model score | {b['reward_model']:+.3f} | {a['reward_model']:+.3f} | "
                     f"{a['reward_model'] - b['reward_model']:+.3f} |")
    for key in sorted(k for k in b if k.startswith("reward_rule")):
        rule = (o.rules or [])[int(key[11:]) - 1]
        lines.append(f"| rule {key[11:]} ({rule.kind}) pass rate | {b[key]:.1%} | {a[key]:.1%} | "
                     f"{(a[key] - b[key]) * 100:+.1f} points |")
    return lines + rewards.samples_table(b["samples"], a["samples"])


METHOD = PPO()
