"""GRPO's generation batches: `group_size` completions to each prompt from one batched generation,
their rewards, advantages and (when needed) old and reference log-probs, kept as the arrays the
updates read; `Groups` is the grpo stage's resumable batch iterator over them."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import device
from ..models import inference_weights
from ..run.damage import DamagedFile, load_safetensors
from ..train import data
from ..train.adapters import adapters_disabled, save_arrays
from . import grpo_math
from .logprobs import hidden_logprobs
from .prompts import Prompt, dense, prompt_text, response_rows, sample_groups, scored_positions


def per_generation(stage) -> int:
    """Minibatches per generation batch: mu passes over batch_size x group_size completions."""
    o = stage.options
    n = stage.batch_size * o.group_size
    return o.mu * (n // (o.minibatch_size or n))


def off_policy(stage) -> bool:
    """Does the policy change between sampling and a minibatch (so old log-probs must be kept)?"""
    return per_generation(stage) > stage.grad_accum


# ---------------------------------------------------------------------------------------------
# Sampling and scoring


def sample_and_score(model, tokenizer, reward, prompts: list[Prompt], stage, group: int) -> list[dict]:
    """`group` completions to each prompt, with their rewards: one dict per prompt."""
    o = stage.options
    training = model.training
    model.eval()
    t0 = time.perf_counter()
    dequantized = inference_weights(model, embedding=False) if (
        o.dequantize_rollouts and device.policy().dequantize_rollouts) else None
    with dequantized or contextlib.nullcontext():
        responses, stopped, entropy = sample_groups(model, tokenizer, [p.tokens.tolist() for p in prompts], group,
                                                    o.max_new_tokens, o.temperature, o.top_p)
    t1 = time.perf_counter()
    each = [p for p in prompts for _ in range(group)]
    texts = [tokenizer.decode(r[:-1] if s else r) for r, s in zip(responses, stopped)]
    scores, parts = reward.score(model, each, texts)
    model.train(training)
    sec = (t1 - t0, time.perf_counter() - t1)
    out = []
    for i, p in enumerate(prompts):
        s = slice(i * group, (i + 1) * group)
        out.append({"prompt": p, "responses": responses[s], "stopped": np.array(stopped[s]),
                    "entropy": entropy[s], "texts": texts[s], "scores": scores[s],
                    "parts": {k: v[s] for k, v in parts.items()}, "sec": sec if i == 0 else (0.0, 0.0)})
    return out


def kept_logps(model, batch: data.Batch, chunk: int, T: float, old: bool, ref: bool) -> dict:
    """Log-probs (N, T) of the sampled tokens under the policy as it sampled them ("old_logp") and
    with this stage's adapters off ("ref_logp"), `chunk` rows at a time."""
    from ..train.trainer import to_mx

    out = {k: np.zeros(batch.loss_mask.shape, np.float32) for k, on in (("old_logp", old), ("ref_logp", ref)) if on}
    training = model.training
    model.eval()
    for i in range(0, len(batch.inputs), chunk):
        part = data.Batch(*(x[i:i + chunk] for x in (batch.inputs, batch.targets, batch.loss_mask, batch.real)))
        b = to_mx(part)
        for key, ctx in (("old_logp", contextlib.nullcontext), ("ref_logp", lambda: adapters_disabled(model))):
            if key in out:
                with ctx():
                    hidden, targets, _ = scored_positions(model, b)
                    out[key][i:i + chunk] = dense(hidden_logprobs(model, hidden / T, targets), b, part.loss_mask.shape)
    model.train(training)
    return out


def choose(groups: list[dict], n: int, dynamic: bool) -> list[dict]:
    """The n groups an update trains on: with dynamic sampling, groups whose rewards differ first
    (in order drawn), topped up with equal ones only when too few differ."""
    if not dynamic:
        return groups[:n]
    equal = [bool(grpo_math.zero_variance(g["scores"], len(g["scores"]))[0]) for g in groups]
    return ([g for g, e in zip(groups, equal) if not e] + [g for g, e in zip(groups, equal) if e])[:n]


def buffer_of(model, groups: list[dict], stage, old: bool) -> dict:
    """The arrays one generation batch's updates read: prompt + completion rows, their loss mask,
    each completion's advantage, and the old and reference log-probs when they are needed."""
    o = stage.options
    scores = np.concatenate([g["scores"] for g in groups])
    if o.overlong == "penalty":
        lengths = np.concatenate([[len(r) for r in g["responses"]] for g in groups])
        scores = scores + grpo_math.overlong_penalty(lengths, o.max_new_tokens, o.overlong_buffer)
    advantages = grpo_math.group_advantages(scores, o.group_size, scale=o.loss_type != "dr_grpo")
    batch = response_rows([g["prompt"] for g in groups for _ in g["responses"]],
                          [r for g in groups for r in g["responses"]])
    if o.overlong == "filter":  # cut-off completions teach nothing (DAPO's overlong filtering)
        batch.loss_mask[~np.concatenate([g["stopped"] for g in groups])] = 0
    out = {"inputs": batch.inputs, "targets": batch.targets, "mask": batch.loss_mask, "real": batch.real,
           "advantages": advantages}
    if old or o.beta:
        chunk = o.minibatch_size or len(batch.inputs)
        out.update(kept_logps(model, batch, chunk, o.temperature, old, bool(o.beta)))
    return out


def statistics(groups: list[dict], kept: int, threshold: float) -> dict:
    """Means over every group sampled for an update (the skipped ones too)."""
    scores = np.concatenate([g["scores"] for g in groups])
    lengths = np.concatenate([[len(r) for r in g["responses"]] for g in groups])
    zero = [bool(grpo_math.zero_variance(g["scores"], len(g["scores"]))[0]) for g in groups]
    stats = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
             "solved": float((scores >= threshold).mean()), "zero_variance": float(np.mean(zero)),
             "entropy": float(np.concatenate([g["entropy"] for g in groups]).mean()),
             "completion_length": float(lengths.mean()),
             "stopped": float(np.concatenate([g["stopped"] for g in groups]).mean()),
             "rollout_sec": sum(g["sec"][0] for g in groups), "scoring_sec": sum(g["sec"][1] for g in groups),
             "completions": int(len(scores)), "groups_skipped": len(groups) - kept}
    for k in groups[0]["parts"]:
        stats[f"reward_{k}"] = float(np.concatenate([g["parts"][k] for g in groups]).mean())
    return stats


_SUMMED = ("rollout_sec", "scoring_sec", "completions", "groups_skipped")
_ROW_KEYS = ("advantages",)


class Groups:
    """The grpo stage's batch iterator: every `per_generation` minibatches it samples a new generation
    batch from the current policy (prompts x group_size completions); in between it hands out
    minibatches of it, shuffled, for mu passes. Checkpoints hold its cursor; each generation batch
    is kept on disk, so a resumed stage continues from the same completions."""

    def __init__(self, model, tokenizer, prompts: data.Batches, reward, stage, stage_dir: Path, log):
        self.model, self.tokenizer, self.prompts, self.reward = model, tokenizer, prompts, reward
        self.stage, self.stage_dir, self.log = stage, Path(stage_dir), log
        o = stage.options
        self.minibatch = o.minibatch_size or stage.batch_size * o.group_size
        self.per_generation, self.old = per_generation(stage), off_policy(stage)
        self.count, self.position, self.buffer = 0, 0, None
        self.start = self.end = prompts.state()
        self.window: list[dict] = []
        self.last: dict = {}

    @property
    def batches_per_epoch(self) -> int:
        return self.prompts.batches_per_epoch * self.per_generation

    def state(self) -> dict:
        return {"prompts": self.start, "end": self.end, "generation": self.count, "position": self.position}

    def restore(self, state: dict) -> None:
        self.start, self.end, self.count = state["prompts"], state["end"], state["generation"]
        self.prompts.restore(self.start)
        self.position, self.buffer = 0, None
        if not state["position"]:
            return
        path = self._path(self.count)
        keys = {"inputs", "targets", "mask", "real", "advantages"}
        try:
            self.buffer = {k: np.array(v) for k, v in load_safetensors(path, "").items()}
            problem = None if keys <= set(self.buffer) else "not a generation batch (arrays missing)"
        except DamagedFile as e:
            problem = e.problem
        if problem:  # sampled again from the same prompts, never trusted
            self.buffer, self.count = None, self.count - 1
            self.log("event", event="warning", message=f"{path}: {problem}; the generation batch is sampled again "
                     "from the same prompts (with the restored policy)")
            return
        self.position = state["position"]
        self.prompts.restore(self.end)  # past the prompts this buffer was made from

    def _path(self, count: int) -> Path:
        return self.stage_dir / f"generation-{count}.safetensors"

    def _order(self) -> list[np.ndarray]:
        """Minibatch row indices for mu shuffled passes over the generation batch."""
        n = len(self.buffer["inputs"])
        out = []
        for epoch in range(self.stage.options.mu):
            order = np.random.default_rng([self.stage.seed, self.count, epoch]).permutation(n)
            out += [order[i:i + self.minibatch] for i in range(0, n, self.minibatch)]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> data.Batch:
        if self.buffer is None or self.position >= self.per_generation:
            self._generate()
        rows = self._order()[self.position]
        self.position += 1
        b = {k: v[rows] for k, v in self.buffer.items()}
        width = -(-int(b["real"].sum(-1).max()) // 8) * 8  # trim the padding this minibatch does not need
        b = {k: v if k in _ROW_KEYS else v[:, :width] for k, v in b.items()}
        extras = {k: b[k] for k in ("advantages", "old_logp", "ref_logp") if k in b}
        loss_type = self.stage.options.loss_type
        units = {"grpo": int((b["mask"].sum(-1) > 0).sum()), "dr_grpo": len(rows), "bnpo": 1}.get(loss_type, 0)
        return data.Batch(b["inputs"], b["targets"], b["mask"], b["real"], extras=extras, units=units)

    def _generate(self) -> None:
        o, stage = self.stage.options, self.stage
        self.start = self.prompts.state()
        groups: list[dict] = []
        for _ in range(o.max_generation_rounds if o.dynamic_sampling else 1):
            groups += sample_and_score(self.model, self.tokenizer, self.reward, next(self.prompts), stage,
                                       o.group_size)
            if sum(not grpo_math.zero_variance(g["scores"], o.group_size)[0] for g in groups) >= stage.batch_size:
                break
        self.end = self.prompts.state()
        kept = choose(groups, stage.batch_size, o.dynamic_sampling)
        self.count += 1
        t0 = time.perf_counter()
        self.buffer = buffer_of(self.model, kept, stage, self.old)
        passes = time.perf_counter() - t0  # the old and reference log-prob passes, when they run
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        save_arrays(self._path(self.count), {k: mx.array(v) for k, v in self.buffer.items()})
        self._path(self.count - 2).unlink(missing_ok=True)  # a checkpoint may still point at count - 1
        self.position = 0
        stats = statistics(groups, len(kept), o.pass_threshold)
        stats["scoring_sec"] += passes
        self.window.append(stats)
        for g in groups[:2]:
            self.log("sample", when=f"generation {self.count}", prompt=prompt_text(g["prompt"].prompt),
                     got=g["texts"][0], reward=float(g["scores"][0]))

    def metrics(self) -> dict:
        """Means of the generation statistics since the last call (times and counts summed); the last
        ones, without times, when no generation batch was made since."""
        if not self.window:
            return {k: v for k, v in self.last.items() if k not in _SUMMED}
        out = {k: float(np.mean([s[k] for s in self.window])) for k in self.window[0]}
        out.update({k: float(sum(s[k] for s in self.window)) for k in _SUMMED}, generations=self.count)
        self.last, self.window = out, []
        return out
