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
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import device
from ..integrity.evaluate import normalize
from ..models import inference_weights
from ..run.damage import DamagedFile, load_safetensors
from ..train import data
from ..train.adapters import adapters_disabled, save_arrays, swapped
from . import ppo_math
from .logprobs import hidden_entropy, hidden_logprobs, plain_head

# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt(data.Example):
    prompt: object = None  # the row's prompt: a string or a message list


def collate(prompts: list[Prompt]) -> list[Prompt]:
    """The prompts of one rollout batch, as they are: Rollouts samples their responses."""
    return prompts


def prompt_of(row: dict):
    """The prompt of a row: "prompt", or the messages before the last assistant turn."""
    if "messages" in row:
        msgs = row["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        return msgs[:last]
    return row["prompt"]


def encode_prompts(rows: list[dict], tokenizer, max_seq_len: int, max_new_tokens: int, source: str = ""):
    """Prompts as generation inputs; prompts leaving fewer than max_new_tokens of max_seq_len are dropped."""
    enc = data.Encoder(tokenizer)
    out, dropped = [], 0
    for row in rows:
        p = prompt_of(row)
        ids = enc.prompt_tokens(p) if isinstance(p, str) else enc.template(p, add_generation_prompt=True)
        if len(ids) + max_new_tokens > max_seq_len:
            dropped += 1
            continue
        out.append(Prompt(np.array(ids, np.int32), np.ones(len(ids), bool), p))
    if not out:
        from ..errors import DataError

        raise DataError(f"{source}: every prompt is longer than max_seq_len - max_new_tokens "
                        f"({max_seq_len} - {max_new_tokens})\n  fix: raise max_seq_len or lower max_new_tokens")
    return data.Dataset(out, 0, dropped, source)


# ---------------------------------------------------------------------------------------------
# Rewards


def passes(rule, text: str) -> bool:
    """Whether a response passes one rule (recipe.Rule). Text is whitespace-normalised first.

    regex: fully matches `pattern` · json: parses (as an object holding `keys`, when given) ·
    length: min <= characters <= max · contains / excludes: `text`, case-insensitive.
    """
    t = normalize(text)
    if rule.kind == "regex":
        return re.fullmatch(rule.pattern, t) is not None
    if rule.kind == "json":
        try:
            value = json.loads(t)
        except ValueError:
            return False
        return not rule.keys or (isinstance(value, dict) and all(k in value for k in rule.keys))
    if rule.kind == "length":
        return (rule.min is None or len(t) >= rule.min) and (rule.max is None or len(t) <= rule.max)
    found = rule.text.casefold() in t.casefold()
    return found if rule.kind == "contains" else not found


class Reward:
    """score(x, y) = r(x, y) of a reward model (when there is one) + sum_i weight_i * [y passes rule i].

    The reward model is a reward stage's adapters and head on the policy's own base (`layers`,
    `head`), or a separate model with its own `reward_head` (`model`).
    """

    def __init__(self, tokenizer, rules=(), layers=None, head=None, model=None):
        self.enc, self.rules = data.Encoder(tokenizer, mask_prompt=True), list(rules or ())
        self.layers, self.head, self.model = layers, head, model

    @property
    def has_model(self) -> bool:
        return self.head is not None or self.model is not None

    def __call__(self, policy, prompts: list, texts: list[str]) -> tuple[np.ndarray, dict]:
        """(scores (B,), {"model": r (B,), "rule1": passed (B,), ...})."""
        from .dpo import _response
        from .reward import rewards, whole

        total, parts = np.zeros(len(texts), np.float32), {}
        if self.has_model:  # encoded exactly as the reward stage's training pairs were
            tokens, real = whole([_response(self.enc, p, t, "rollout") for p, t in zip(prompts, texts)])
            tokens, real = mx.array(tokens), mx.array(real)
            if self.model is not None:
                r = rewards(self.model, tokens, real)
            else:  # the policy's own adapters off, the reward stage's in: the reward model on the shared base
                with adapters_disabled(policy), swapped(policy, self.layers):
                    r = rewards(policy, tokens, real, self.head)
            parts["model"] = np.array(r.astype(mx.float32))
            total += parts["model"]
        for i, rule in enumerate(self.rules, 1):
            parts[f"rule{i}"] = np.array([passes(rule, t) for t in texts], np.float32)
            total += rule.weight * parts[f"rule{i}"]
        return total, parts


def load_reward_head(folder: Path, hidden: int) -> nn.Linear:
    weights = load_safetensors(Path(folder) / "adapters.safetensors",
                               f"copy {folder} back from another copy of the run, or train the reward stage again")
    head = nn.Linear(hidden, 1)
    head.load_weights([(k.removeprefix("reward_head."), v) for k, v in weights.items() if k.startswith("reward_head.")])
    head.freeze()
    return head


# ---------------------------------------------------------------------------------------------
# Rollouts


def attach_value_head(model) -> nn.Module:
    """V(s_t) = w . h_t + b on the policy's final hidden state; starts at 0 (saved as value_head.*)."""
    hidden = model.model.norm.weight.shape[0]
    head = nn.Linear(hidden, 1)
    head.weight, head.bias = mx.zeros_like(head.weight), mx.zeros_like(head.bias)
    model.value_head = head
    return head


def sample(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float):
    """Batched sampling with a KV cache (mlx-lm's BatchGenerator). Returns (responses, stopped): the
    tokens of each response, with its EOS when it stopped at one."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    n = len(prompts)
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         sampler=make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0),
                         completion_batch_size=n, prefill_batch_size=n)
    uids = gen.insert(prompts, [max_new_tokens] * n)
    out, stopped = {u: [] for u in uids}, {}
    while responses := gen.next_generated():
        for r in responses:
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                stopped[r.uid] = r.finish_reason == "stop"
    gen.close()
    return [out[u] for u in uids], [stopped.get(u, False) for u in uids]


def _rows(prompts: list[Prompt], responses: list[list[int]]) -> data.Batch:
    """prompt + response rows; the loss mask covers the response tokens as targets."""
    seqs = [np.concatenate([p.tokens, np.array(r, np.int32)]) for p, r in zip(prompts, responses)]
    examples = []
    for p, s in zip(prompts, seqs):
        mask = np.zeros(len(s), bool)
        mask[len(p.tokens):] = True
        examples.append(data.Example(s, mask))
    return data._collate(examples)


def _positions(model, batch: dict):
    """Final hidden states (K, H), targets (K,) and weights (K,) at the scored positions."""
    hidden = model.model(batch["inputs"])
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = batch["targets"].reshape(-1)
    if "target_index" in batch:
        index = batch["target_index"]
        return hidden[index], targets[index], batch["target_weight"]
    return hidden, targets, batch["loss_mask"].reshape(-1)


def _at_positions(batch: dict, key: str) -> mx.array:
    x = batch[key].reshape(-1)
    return x[batch["target_index"]] if "target_index" in batch else x


def _dense(values: mx.array, batch: dict, shape) -> np.ndarray:
    """Flat values at the scored positions back to a (B, T) array (0 elsewhere)."""
    out = np.zeros(int(np.prod(shape)), np.float32)
    index = np.array(batch["target_index"]) if "target_index" in batch else np.arange(out.size)
    w = np.array(batch["target_weight"] if "target_index" in batch else batch["loss_mask"].reshape(-1))
    out[index[w > 0]] = np.array(values.astype(mx.float32))[w > 0]
    return out.reshape(shape)


def collect(model, tokenizer, reward: Reward, prompts: list[Prompt], stage, kl_coef: float) -> dict:
    """Sample responses to `prompts` and score them: everything one PPO update needs.

    Returns numpy arrays inputs/targets/mask/real (B, T), old_logp, ref_logp, old_values,
    advantages, returns (B, T), scores (B,), and texts, parts, stats.
    """
    from ..train.trainer import _to_mx

    T = stage.temperature
    model.eval()
    t0 = time.perf_counter()
    dequantize = stage.dequantize_rollouts and device.policy().dequantize_rollouts
    with inference_weights(model, embedding=False) if dequantize else contextlib.nullcontext():
        responses, stopped = sample(model, tokenizer, [p.tokens.tolist() for p in prompts],
                                    stage.max_new_tokens, T, stage.top_p)
        t1 = time.perf_counter()
        batch = _rows(prompts, responses)
        b = _to_mx(batch)
        hidden, targets, w = _positions(model, b)
        logp = hidden_logprobs(model, hidden / T, targets)
        values = model.value_head(hidden.astype(mx.float32))[:, 0]
        entropy = hidden_entropy(model, hidden / T)
        with adapters_disabled(model):
            ref_hidden, _, _ = _positions(model, b)
            ref_logp = hidden_logprobs(model, ref_hidden / T, targets)
        mx.eval(logp, values, entropy, ref_logp)
        texts = [tokenizer.decode(r[:-1] if s else r) for r, s in zip(responses, stopped)]
        scores, parts = reward(model, [p.prompt for p in prompts], texts)
    t2 = time.perf_counter()
    model.train()
    shape = batch.loss_mask.shape
    mask = mx.array(batch.loss_mask)
    old_logp, ref_lp, old_values = (mx.array(_dense(x, b, shape)) for x in (logp, ref_logp, values))
    kl = ppo_math.kl_penalty(old_logp, ref_lp, stage.kl_estimator) * mask
    token_r = ppo_math.token_rewards(mx.array(scores), kl, mask, kl_coef)
    advantages, returns = ppo_math.gae(token_r, old_values, mask, stage.gamma, stage.lam)
    if stage.whiten_advantages:
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
        self.kl = ppo_math.AdaptiveKL(stage.kl_coef, stage.target_kl, stage.kl_horizon)
        self.minibatch = stage.minibatch_size or stage.batch_size
        self.per_rollout = stage.ppo_epochs * (stage.batch_size // self.minibatch)
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
        for epoch in range(self.stage.ppo_epochs):
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
            self.log("sample", when=f"rollout {self.count}", prompt=_prompt_text(p.prompt), got=text,
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


def _prompt_text(p) -> str:
    return p if isinstance(p, str) else p[-1]["content"]


# ---------------------------------------------------------------------------------------------
# The loss


def make_loss(stage):
    T, clip, value_clip, vf_coef = stage.temperature, stage.clip_range, stage.value_clip, stage.vf_coef

    def loss(model, batch):
        """PPO's clipped surrogate plus the critic's clipped value loss over response tokens
        (ppo_math.policy_loss, ppo_math.value_loss):

            L = L_clip(theta) + vf_coef * L_V(theta)

        log pi is at the sampling temperature T: log softmax(z / T). Returns (L, response tokens,
        {policy_loss, value_loss, clip_frac, approx_kl, value_clip_frac}).
        """
        hidden, targets, w = _positions(model, batch)
        logp = hidden_logprobs(model, hidden / T, targets)
        values = model.value_head(hidden.astype(mx.float32))[:, 0]
        pl, clip_frac, approx_kl = ppo_math.policy_loss(logp, _at_positions(batch, "old_logp"),
                                                        _at_positions(batch, "advantages"), w, clip)
        vl, value_clip_frac = ppo_math.value_loss(values, _at_positions(batch, "old_values"),
                                                  _at_positions(batch, "returns"), w, value_clip)
        # not w.sum(): mx.compile (MLX 0.32) merges an output with policy_loss's identical sum, then fails
        ntoks = (w > 0).sum().astype(mx.float32)
        return pl + vf_coef * vl, ntoks, {"policy_loss": pl, "value_loss": vl, "clip_frac": clip_frac,
                                            "approx_kl": approx_kl, "value_clip_frac": value_clip_frac}

    return loss


def setup(model, stage, batches, valid, steps, stage_dir, note, *, tokenizer, reward: Reward, log):
    """(loss, Rollouts, None) for the one loop; `batches` yields lists of prompts."""
    if not plain_head(model):
        from ..errors import ModelError
        from ..models import families

        plain = [t for f in families.FAMILIES if f.plain_head for t in f.model_types]
        raise ModelError(f"[stages.{stage.name}]: ppo reads log-probs from the hidden states through the output "
                         f"head, which is exact for {', '.join(plain)} models; this one is "
                         f"{getattr(model, 'model_type', '?')!r} (its logits are post-processed)\n"
                         "  fix: use a model of one of those families for the ppo stage")
    return make_loss(stage), Rollouts(model, tokenizer, batches, reward, stage, stage_dir, log), None


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
        out += [{"prompt": _prompt_text(p.prompt), "got": t, "reward": float(s)}
                for p, t, s in zip(chunk, r["texts"], r["scores"])]
    s, k = np.concatenate(scores), np.concatenate(kls)
    result = {"reward_mean": float(s.mean()), "reward_std": float(s.std()), "kl": float(k.mean()),
              "kl_std": float(k.std()), "n": int(len(s)), "samples": out[:5]}
    for name, v in parts.items():
        result[f"reward_{name}"] = float(np.concatenate(v).mean())
    return result
