"""The blockwise output head and the blockwise dequantize: same numbers, less memory."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_tiny_model

from localtune import models
from localtune.methods import logprobs


def plain_logprobs(model, hidden, targets):
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    scores = head(hidden).astype(mx.float32)
    return mx.take_along_axis(scores, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(scores, axis=-1)


@pytest.mark.parametrize("kind", ["untied", "tied", "quantized tied", "quantized untied"])
def test_blockwise_head_matches_full_logits_in_value_and_gradient(kind, monkeypatch):
    model = make_tiny_model(tie="tied" in kind, vocab=100)
    if "quantized" in kind:
        models.quantize_base(model, bits=4, group_size=32)
        models.use_cpu_quantized_path(model)
    model.freeze()
    monkeypatch.setattr(logprobs, "_BLOCK", 64 * 30)  # 30 rows of 64: blocks of 30, 30, 30 and 10
    head = logprobs._frozen_head(model)
    assert head is not None and head.vocab == 100 and head.width == 64
    rng = np.random.default_rng(0)
    hidden = mx.array(rng.normal(size=(7, 64)).astype(np.float32))
    targets = mx.array(rng.integers(0, 100, 7).astype(np.int32))
    weights = mx.array(rng.uniform(size=7).astype(np.float32))

    ours, ours_grad = mx.value_and_grad(lambda h: (logprobs.head_logprobs(h, head, targets) * weights).sum())(hidden)
    ref, ref_grad = mx.value_and_grad(lambda h: (plain_logprobs(model, h, targets) * weights).sum())(hidden)
    np.testing.assert_allclose(ours.item(), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(ours_grad), np.array(ref_grad), atol=1e-5)


def test_a_trainable_or_capped_head_takes_the_full_logits_path():
    model = make_tiny_model()
    model.freeze()
    assert logprobs._frozen_head(model) is not None
    model.lm_head.unfreeze()
    assert logprobs._frozen_head(model) is None  # full fine-tuning of the head needs its gradient
    model.freeze()
    model.model_type = "gemma2"  # soft-capped logits are not head(hidden)
    assert logprobs._frozen_head(model) is None


def test_blockwise_head_never_holds_the_whole_logits():
    K, V, H = 512, 16384, 64
    model = make_tiny_model(vocab=V, hidden=H, layers=1)
    model.freeze()
    head = logprobs._frozen_head(model)
    rng = np.random.default_rng(0)
    hidden = mx.array(rng.normal(size=(K, H)).astype(np.float32))
    targets = mx.array(rng.integers(0, V, K).astype(np.int32))
    mx.eval(hidden, targets)
    logits_bytes = K * V * 4  # 32 MiB

    def peak(fn):
        mx.eval(fn())  # warm up
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    grad = mx.grad(lambda h: logprobs.head_logprobs(h, head, targets).sum())
    plain = mx.grad(lambda h: plain_logprobs(model, h, targets).sum())
    # The CPU scheduler allocates ahead of execution up to the memory limit: keep it tight to see the need.
    previous = mx.set_memory_limit(mx.get_active_memory() + 8 * 2**20)
    try:
        assert peak(lambda: plain(hidden)) > 2 * logits_bytes  # logits and their gradient
        assert peak(lambda: grad(hidden)) < logits_bytes / 2  # blocks of 1M logits (4 MiB) at a time
    finally:
        mx.set_memory_limit(previous)


def test_blockwise_dequantize_matches_the_quantized_kernel_in_value_and_gradient(monkeypatch):
    layer = nn.Linear(64, 96, bias=False)
    quantized = nn.QuantizedLinear.from_linear(layer, group_size=32, bits=4)
    ours = nn.QuantizedLinear.from_linear(layer, group_size=32, bits=4)
    ours.__class__ = models.CPUQuantizedLinear
    monkeypatch.setattr(models, "_DEQUANT_CHUNK", 64 * 40)  # row blocks of 40, 40 and 16
    x = mx.array(np.random.default_rng(0).normal(size=(3, 5, 64)).astype(np.float32))
    cot = mx.array(np.random.default_rng(1).normal(size=(3, 5, 96)).astype(np.float32))
    y, dx = mx.value_and_grad(lambda x: (ours(x) * cot).sum())(x)
    y_ref, dx_ref = mx.value_and_grad(lambda x: (quantized(x) * cot).sum())(x)
    np.testing.assert_allclose(y.item(), y_ref.item(), rtol=1e-4)
    np.testing.assert_allclose(np.array(dx), np.array(dx_ref), atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_sft_loss_and_lora_gradients_are_the_same_blockwise_or_whole(tie, monkeypatch):
    from mlx.utils import tree_flatten

    from localtune.methods import sft
    from localtune.recipe import Adapter
    from localtune.train import adapters, data, trainer

    model = make_tiny_model(tie=tie)
    model.freeze()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    rng = np.random.default_rng(0)
    rows = [data.Example(rng.integers(3, 100, n).astype(np.int32), np.arange(n) >= n // 2) for n in (9, 17, 30)]
    batch = trainer.to_mx(data.collate_examples(rows))
    loss_and_grad = nn.value_and_grad(model, lambda m, b: sft.loss(m, b)[0])
    whole, whole_grads = loss_and_grad(model, batch)
    monkeypatch.setattr(logprobs, "BLOCKWISE_FROM", 0)
    monkeypatch.setattr(logprobs, "LOGITS_BLOCK", 7 * 32)  # several vocab blocks
    blockwise, blockwise_grads = loss_and_grad(model, batch)
    np.testing.assert_allclose(blockwise.item(), whole.item(), rtol=1e-5)
    for (name, g), (_, h) in zip(tree_flatten(whole_grads), tree_flatten(blockwise_grads)):
        np.testing.assert_allclose(np.array(h), np.array(g), atol=1e-6, err_msg=name)
