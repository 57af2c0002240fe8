"""Log-probabilities of target tokens, shared by every method's loss.

A frozen output head is applied vocabulary block by block (a fused linear cross-entropy):
the (tokens, vocab) logits never exist whole, in the forward or the backward pass. With
a 49k vocabulary that is most of a small model's activation memory.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

_BLOCK = 1 << 22  # weights per vocab block (16 MiB in fp32)
LOGITS_BLOCK = 1 << 20  # logits per vocab block: a block's few (tokens, rows) temporaries stay small
BLOCKWISE_FROM = 1 << 22  # logits (tokens x vocab) below this are cheaper whole: no recompute


def plain_head(model) -> bool:
    """Are the logits exactly head(model.model(inputs)), with no soft-capping or scaling after? (families)"""
    from ..models import families

    family = families.family(getattr(model, "model_type", None))
    return family is not None and family.plain_head


def _head_module(model):
    """lm_head, wherever the model keeps it (Qwen3.5 under language_model), else the tied embedding."""
    outer = model.language_model if "language_model" in model else model
    return outer.lm_head if "lm_head" in outer else model.model.embed_tokens


def output_head(model):
    """hidden (.., H) -> logits (.., V) for a plain-head model."""
    module = _head_module(model)
    return module.as_linear if module is model.model.embed_tokens else module


class _PackedMask:
    """Stands in for mlx-lm's per-layer KV cache to hand the model a block-diagonal mask.

    Packed examples must not attend to each other. RoPE makes attention depend only on
    relative position, so with this mask a packed example sees exactly what it would
    see alone (no position reset needed).
    """

    offset = 0

    def __init__(self, segments: mx.array):
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        T = segments.shape[1]
        causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))
        self.mask = (same & causal)[:, None]  # (B, 1, T, T)

    def make_mask(self, N, return_array=False, window_size=None):
        if window_size is None:
            return self.mask
        idx = mx.arange(N)
        return self.mask & ((idx[:, None] - idx[None]) < window_size)

    def update_and_fetch(self, keys, values):
        return keys, values


class SharedPrompt:
    """Stands in for mlx-lm's per-layer KV cache so a pair's two responses share one prompt pass.

    First call: the B prompts, left-padded to P (a pad key is hidden; a pad query sees only itself,
    so its softmax stays finite). It keeps their keys and values. Second call: the 2B responses
    (chosen rows, then rejected), at positions P.. after their prompt's keys, tiled twice. RoPE
    depends only on relative position, so left padding changes nothing.
    """

    def __init__(self, real: mx.array):
        self.real, self.offset, self.keys, self.values = real, 0, None, None  # real (B, P) bool

    def make_mask(self, N, return_array=False, window_size=None):
        causal = mx.tril(mx.ones((N, N), dtype=mx.bool_))
        if window_size is not None:  # a sliding-window layer: a query sees the last window_size positions
            causal = causal & ((mx.arange(N)[:, None] - mx.arange(N)[None]) < window_size)
        if self.keys is None:
            return (causal[None] & (self.real[:, None, :] | mx.eye(N, dtype=mx.bool_)[None]))[:, None]
        prompt = mx.concatenate([self.real, self.real])[:, None, None, :]  # (2B, 1, 1, P)
        P = prompt.shape[-1]
        if window_size is not None:  # response token i sits at P + i, prompt key j at j (left padding
            # shifts both alike, so distances are the unpadded ones)
            prompt = prompt & ((P + mx.arange(N)[:, None] - mx.arange(P)[None]) < window_size)
        rows = prompt.shape[0]
        return mx.concatenate([mx.broadcast_to(prompt, (rows, 1, N, P)),
                               mx.broadcast_to(causal[None, None], (rows, 1, N, N))], axis=-1)

    def update_and_fetch(self, keys, values):
        if self.keys is None:
            self.keys, self.values, self.offset = keys, values, keys.shape[2]
            return keys, values
        return (mx.concatenate([mx.concatenate([self.keys, self.keys]), keys], axis=2),
                mx.concatenate([mx.concatenate([self.values, self.values]), values], axis=2))


def hidden_logprobs(model, hidden: mx.array, targets: mx.array) -> mx.array:
    """log p(targets) (K,) from final hidden states (K, H); needs a plain head (plain_head)."""
    head = _frozen_head(model)
    if head is not None and targets.size * head.vocab >= BLOCKWISE_FROM:
        return head_logprobs(hidden, head, targets)
    scores = output_head(model)(hidden).astype(mx.float32)
    return mx.take_along_axis(scores, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(scores, axis=-1)


def shares_prompts(model) -> bool:
    return plain_head(model) and getattr(model, "share_prompts", True)


def _cache(model, batch):
    return [_PackedMask(batch["segments"])] * len(model.layers) if "segments" in batch else None


def logits(model, batch) -> mx.array:
    """(B, T, V) logits for batch["inputs"] (B, T); packed rows get a block-diagonal mask."""
    return model(batch["inputs"], cache=_cache(model, batch))


class _Head:
    """A frozen output projection read one vocabulary block at a time: W (V, H), float or quantized."""

    def __init__(self, module):
        self.module = module
        self.quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        self.arrays = [module.weight] + ([module.scales, module.biases] if self.quantized else [])
        self.vocab = module.weight.shape[0]
        self.width = module.weight.shape[1] * (32 // module.bits if self.quantized else 1)

    def rows(self, index, arrays, dtype, after=None) -> mx.array:
        """W[index] (rows, H) in dtype; mx.depends holds it back until `after` exists, so that
        MLX does not build every block's weights up front."""
        w = arrays[0][index]
        if after is not None:
            w = mx.depends(w, after)
        if self.quantized:
            m = self.module
            w = mx.dequantize(w, arrays[1][index], arrays[2][index], group_size=m.group_size, bits=m.bits,
                              mode=getattr(m, "mode", "affine"))
        return w.astype(dtype)


def _frozen_head(model) -> _Head | None:
    """The output head when logits are exactly head(model.model(x)) and it has nothing to train."""
    if not plain_head(model):
        return None
    module = _head_module(model)
    plain = (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)
    if not isinstance(module, plain) or "bias" in module or tree_flatten(module.trainable_parameters()):
        return None
    return _Head(module)


def _blocks(head: _Head, K: int) -> list[slice]:
    rows = max(1, min(_BLOCK // head.width, LOGITS_BLOCK // max(K, 1)))
    return [slice(i, min(i + rows, head.vocab)) for i in range(0, head.vocab, rows)]


def hidden_entropy(model, hidden: mx.array) -> mx.array:
    """Entropy (K,) in nats of the next-token distribution at final hidden states (K, H), no gradient:

    H = logsumexp(z) - sum_v softmax(z)_v z_v, with z = head(h); a frozen head is read block by
    block, each block's (lse_b, s_b = sum softmax_b(z) z) merged online.
    """
    hidden = mx.stop_gradient(hidden)
    head = _frozen_head(model)
    if head is None or hidden.shape[0] * head.vocab < BLOCKWISE_FROM:
        z = output_head(model)(hidden)
        z = z.astype(mx.float32)
        return mx.logsumexp(z, axis=-1) - (mx.softmax(z, axis=-1) * z).sum(-1)
    lse = s = None
    for b in _blocks(head, hidden.shape[0]):
        z = (hidden @ head.rows(b, head.arrays, hidden.dtype, after=lse).T).astype(mx.float32)
        lb = mx.logsumexp(z, axis=-1)
        sb = (mx.exp(z - lb[:, None]) * z).sum(-1)
        if lse is None:
            lse, s = lb, sb
            continue
        new = mx.logaddexp(lse, lb)
        s, lse = s * mx.exp(lse - new) + sb * mx.exp(lb - new), new
    return lse - s


def head_logprobs(hidden: mx.array, head: _Head, targets: mx.array) -> mx.array:
    """log p(y_k) = h_k·W[y_k] - logsumexp_v(h_k·W_v) for hidden (K, H), targets (K,) -> (K,).

    Forward and backward visit the vocabulary in blocks of rows; each block's logits
    z = h W_b^T (K, rows) are rebuilt in the backward pass, where
    d logp_k / d h_k = W[y_k] - sum_v softmax(z_k)_v W_v.
    """
    blocks = _blocks(head, hidden.shape[0])

    @mx.custom_function
    def f(hidden, targets, *arrays):
        lse = None
        for b in blocks:
            z = hidden @ head.rows(b, arrays, hidden.dtype, after=hidden if lse is None else lse).T
            block_lse = mx.logsumexp(z.astype(mx.float32), axis=-1)
            lse = block_lse if lse is None else mx.logaddexp(lse, block_lse)
        target_logit = (hidden * head.rows(targets, arrays, hidden.dtype)).sum(-1).astype(mx.float32)
        return target_logit - lse, lse

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        hidden, targets, *arrays = primals
        g = cotangents[0].astype(mx.float32)[:, None]  # (K, 1); lse's cotangent is ignored: lse is internal
        lse = outputs[1][:, None]
        dh = (g * head.rows(targets, arrays, mx.float32)).astype(hidden.dtype)
        for b in blocks:
            w = head.rows(b, arrays, hidden.dtype, after=dh)
            p = mx.exp((hidden @ w.T).astype(mx.float32) - lse)  # softmax over the whole vocab, block b
            dh = dh - (g * p).astype(hidden.dtype) @ w
        return (dh, mx.zeros_like(targets), *(mx.zeros_like(a) for a in arrays))  # the head is frozen

    return f(hidden, targets, *head.arrays)[0]


def target_logprobs(model, batch) -> tuple[mx.array, mx.array]:
    """log p(target) (K,) and weights (K,) for the scored positions of a batch.

    With prompt masking most positions are never scored: when the batch carries
    `target_index` (K,), flat positions into (B*T) padded with weight-0 entries to a
    bucketed K, only those K hidden states reach the head; otherwise all B*T do.
    """
    targets = batch["targets"].reshape(-1)
    index = batch.get("target_index")
    weight = batch["target_weight"] if index is not None else batch["loss_mask"].reshape(-1)
    if index is not None:
        targets = targets[index]
    head = _frozen_head(model)
    if head is not None and targets.size * head.vocab < BLOCKWISE_FROM:
        head = None
    if head is None:  # small logits, soft-capped or trainable heads: full logits
        scores = logits(model, batch)
        scores = scores.reshape(-1, scores.shape[-1])
        if index is not None:
            scores = scores[index]
        scores = scores.astype(mx.float32)
        picked = mx.take_along_axis(scores, targets[:, None], axis=-1)[:, 0]
        return picked - mx.logsumexp(scores, axis=-1), weight
    hidden = model.model(batch["inputs"], _cache(model, batch))  # (B, T, H)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if index is not None:
        hidden = hidden[index]
    return head_logprobs(hidden, head, targets), weight


# ---------------------------------------------------------------------------------------------
# Log-probabilities of whole responses (the preference methods' pairs).


def sequence_logps(model, batch) -> tuple[mx.array, mx.array]:
    """Summed log p(response) per row (R,) and the number of response tokens per row (R,).

    log p(y | x) = sum_t mask_t * log p(y_t | x, y_<t) over the response tokens of each row.
    """
    if "prompt" in batch and shares_prompts(model):
        return shared_logps(model, batch)
    R, T = batch["inputs"].shape
    logp, weight = target_logprobs(model, batch)  # (K,) flat positions
    rows = batch["target_index"] // T if "target_index" in batch else mx.arange(R * T) // T
    zeros = mx.zeros((R,), dtype=mx.float32)
    return zeros.at[rows].add(logp * weight), zeros.at[rows].add(weight)


def chosen_nll(chosen: mx.array, ntoks: mx.array) -> mx.array:
    """NLL per token of the chosen answers: -sum_i log p(y_w,i | x_i) / sum_i |y_w,i| (summed log-probs (B,))."""
    return -chosen.sum() / mx.maximum(ntoks.sum(), 1)


def shared_logps(model, batch) -> tuple[mx.array, mx.array]:
    """sequence_logps with each prompt run once for both of its responses.

    Pass 1 runs the B prompts and keeps their keys and values; pass 2 runs the 2B responses on
    top. Response token j is predicted from the response's hidden state j - 1, or, for j = 0,
    from the prompt's last one. Tokens through the model: B P + 2B R instead of 2B (P + R).
    """
    cache = [SharedPrompt(batch["prompt_real"]) for _ in model.layers]
    prompt_h = model.model(batch["prompt"], cache=cache)  # (B, P, H)
    response_h = model.model(batch["response"], cache=cache)  # (2B, R, H)
    last = mx.concatenate([prompt_h[:, -1:], prompt_h[:, -1:]])
    hidden = mx.concatenate([last, response_h[:, :-1]], axis=1)
    rows, R = batch["response"].shape
    logp = hidden_logprobs(model, hidden.reshape(rows * R, -1), batch["response"].reshape(-1)).reshape(rows, R)
    mask = batch["response_mask"]
    return (logp * mask).sum(-1), mask.sum(-1)


def check_shared_prompts(model, batches, note) -> None:
    """Run two pairs both ways; share prompts only where that gives the same numbers."""
    from ..models import CPUQuantizedLinear
    from ..train.trainer import to_mx

    if not shares_prompts(model):
        return
    if any(isinstance(m, CPUQuantizedLinear) for _, m in model.named_modules()):
        # on CPU every pass over a quantized base dequantizes it again: two passes cost more than they save
        model.share_prompts = False
        note("prompts are run once per response: on CPU a second pass would dequantize the 4-bit base again")
        return
    b = batches.collate([batches.dataset.examples[i] for i in next(batches.upcoming())[:2]])  # 2 pairs: cheap
    if "prompt" not in b.extras:
        return
    batch = to_mx(b)
    plain = {k: v for k, v in batch.items() if k not in ("prompt", "prompt_real", "response", "response_mask")}
    try:
        shared, same = shared_logps(model, batch)[0], sequence_logps(model, plain)[0]
        ok = bool(mx.allclose(shared, same, rtol=1e-3, atol=1e-2).item())
    except (NotImplementedError, ValueError, TypeError):  # TypeError: a recurrent layer's cache is no KV cache
        ok = False
    if not ok:
        model.share_prompts = False
        note("prompts are run once per response: sharing them does not reproduce this model's numbers")
        return
    rows, T = b.inputs.shape
    saved = 1 - (b.extras["prompt"].size + b.extras["response"].size) / (rows * T)
    note(f"each prompt runs once for both of its responses ({saved:.0%} fewer tokens in the first two pairs)")
