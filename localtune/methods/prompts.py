"""Prompts for methods that sample their own responses (PPO, GRPO): encoding rows as generation
inputs, batched sampling from the policy, prompt + response rows with their scored positions, and
`Sampling`, the hooks such methods share."""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..train import data
from . import rewards
from .base import Method


@dataclass
class Prompt(data.Example):
    prompt: object = None  # the row's prompt: a string or a message list
    row: dict | None = None  # the whole row (python rewards read its other columns)
    where: str = ""  # "row N of FILE", for errors about it


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
    for n, row in enumerate(rows, 1):
        p = prompt_of(row)
        ids = enc.prompt_tokens(p) if isinstance(p, str) else enc.template(p, add_generation_prompt=True)
        if len(ids) + max_new_tokens > max_seq_len:
            dropped += 1
            continue
        out.append(Prompt(np.array(ids, np.int32), np.ones(len(ids), bool), p, row, f"row {n} of {source}"))
    if not out:
        from ..errors import DataError

        raise DataError(f"{source}: every prompt is longer than max_seq_len - max_new_tokens "
                        f"({max_seq_len} - {max_new_tokens})\n  fix: raise max_seq_len or lower max_new_tokens")
    return data.Dataset(out, 0, dropped, source)


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


def sample_groups(model, tokenizer, prompts: list[list[int]], group: int, max_new_tokens: int, temperature: float,
                  top_p: float):
    """`group` responses to each prompt, in one batch: each prompt's KV cache is filled once and shared
    by its group (the bundled model, 4 prompts x 8: 0.6 s against 1.9 s for 32 separate prefills
    with short answers, 5.0 s against 6.3 s with 32 tokens each).

    Returns (responses, stopped, entropy): responses[i * group + j] is prompt i's j-th; entropy (N,)
    is each response's mean next-token entropy (nats) at the sampling temperature, read off the
    sampler's own log-probabilities (no extra forward pass).
    """
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    n = len(prompts) * group
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         sampler=make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0),
                         completion_batch_size=n, prefill_batch_size=n)
    caches, inputs = [], []
    for p in prompts:
        cache = None
        if len(p) > 1:  # the generator runs the last prompt token itself
            cache = make_prompt_cache(model)
            model(mx.array(p[:-1])[None], cache=cache)
            mx.eval([c.state for c in cache])
        caches += [cache] * group
        inputs += [p[-1:] if cache is not None else p] * group
    uids = gen.insert(inputs, [max_new_tokens] * n, caches=caches)
    out, stopped, entropy = {u: [] for u in uids}, {}, {u: [] for u in uids}
    while responses := gen.next_generated():
        lp = mx.stack([r.logprobs for r in responses]).astype(mx.float32) / (temperature or 1.0)
        h = mx.logsumexp(lp, axis=-1) - (mx.softmax(lp, axis=-1) * lp).sum(-1)  # H of softmax(z / T)
        for r, e in zip(responses, h.tolist()):
            out[r.uid].append(r.token)
            entropy[r.uid].append(e)
            if r.finish_reason is not None:
                stopped[r.uid] = r.finish_reason == "stop"
    gen.close()
    return ([out[u] for u in uids], [stopped.get(u, False) for u in uids],
            np.array([np.mean(entropy[u]) if entropy[u] else 0.0 for u in uids], np.float32))


def prompt_text(p) -> str:
    """The text of a prompt: a string, or the last message of a list."""
    return p if isinstance(p, str) else p[-1]["content"]


def response_rows(prompts: list[Prompt], responses: list[list[int]]) -> data.Batch:
    """prompt + response rows; the loss mask covers the response tokens as targets."""
    seqs = [np.concatenate([p.tokens, np.array(r, np.int32)]) for p, r in zip(prompts, responses)]
    examples = []
    for p, s in zip(prompts, seqs):
        mask = np.zeros(len(s), bool)
        mask[len(p.tokens):] = True
        examples.append(data.Example(s, mask))
    return data.collate_examples(examples)


def scored_positions(model, batch: dict):
    """Final hidden states (K, H), targets (K,) and weights (K,) at the scored positions."""
    hidden = model.model(batch["inputs"])
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = batch["targets"].reshape(-1)
    if "target_index" in batch:
        index = batch["target_index"]
        return hidden[index], targets[index], batch["target_weight"]
    return hidden, targets, batch["loss_mask"].reshape(-1)


def at_positions(batch: dict, key: str) -> mx.array:
    x = batch[key].reshape(-1)
    return x[batch["target_index"]] if "target_index" in batch else x


def dense(values: mx.array, batch: dict, shape) -> np.ndarray:
    """Flat values at the scored positions back to a (B, T) array (0 elsewhere)."""
    out = np.zeros(int(np.prod(shape)), np.float32)
    index = np.array(batch["target_index"]) if "target_index" in batch else np.arange(out.size)
    w = np.array(batch["target_weight"] if "target_index" in batch else batch["loss_mask"].reshape(-1))
    out[index[w > 0]] = np.array(values.astype(mx.float32))[w > 0]
    return out.reshape(shape)


class Sampling(Method):
    """A method that samples its own responses to prompts, scored by methods/rewards.py: the rule
    rewards are in the option `rules_key`, a reward model in `reward_model`; `heldout` is its own."""

    formats = ("prompt", "messages", "completion", "preference")
    samples = True
    collate = staticmethod(collate)
    rules_key = "rules"

    def rules(self, stage):
        return getattr(stage.options, self.rules_key)

    def files(self, stage):
        return rewards.files(self.rules(stage))

    def references(self, stage):
        return {"reward_model": stage.options.reward_model} if stage.options.reward_model else {}

    def encode(self, stage, rows, fmt, tokenizer, source):
        return encode_prompts(rows, tokenizer, stage.max_seq_len, stage.options.max_new_tokens, source)

    def check(self, recipe, stage, tokenizer, folder):
        rewards.check(recipe, stage, self.rules(stage), tokenizer, folder)

    def reward(self, ctx):
        """The stage's reward, once the model it samples from can give exact log-probs."""
        from .logprobs import plain_head

        if not plain_head(ctx.model):
            from ..errors import ModelError
            from ..models import families

            plain = [t for f in families.FAMILIES if f.plain_head for t in f.model_types]
            raise ModelError(f"[stages.{ctx.stage.name}]: {self.kind} reads log-probs from the hidden states through "
                             f"the output head, which is exact for {', '.join(plain)} models; this one is "
                             f"{getattr(ctx.model, 'model_type', '?')!r} (its logits are post-processed)\n"
                             f"  fix: use a model of one of those families for the {self.kind} stage")
        reward = ctx.state["reward"] = rewards.build(ctx, ctx.stage.options.reward_model, self.rules(ctx.stage))
        return reward

    def evaluator(self, ctx, loss_fn, valid_batches):
        if not ctx.valid:
            return None

        def evaluate(model):
            return {k: v for k, v in self.heldout(ctx, model).items() if k != "samples"}

        return evaluate
