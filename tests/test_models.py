"""Model loading, QLoRA quantization and the CPU dequantize path."""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_tiny_model

from localtune import adapters, models
from localtune.errors import ModelError
from localtune.recipe import Adapter


def test_quantize_reports_layers_it_cannot_quantize():
    model = make_tiny_model(hidden=64)  # widths 64 and 128: group 128 cannot split the 64-wide inputs
    skipped = models.quantize_base(model, bits=4, group_size=128)
    assert skipped and all("(width 64)" in s for s in skipped)
    assert isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)  # 128-wide input: quantized
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)


def test_cpu_dequantized_path_matches_the_quantized_kernel():
    model = make_tiny_model(tie=True)
    models.quantize_base(model, bits=4, group_size=32)
    x = mx.array(np.random.default_rng(0).integers(0, 100, (2, 9)))
    reference = model(x)
    assert models.use_cpu_quantized_path(model) == 1 + 2 * 7  # the tied embedding + 7 linears per block
    assert type(model.layers[0].mlp.up_proj) is models.CPUQuantizedLinear
    np.testing.assert_allclose(np.array(model(x)), np.array(reference), atol=2e-4)


def test_qlora_trains_only_the_adapters_and_counts_logical_parameters():
    model = make_tiny_model()
    models.quantize_base(model, bits=4, group_size=32)
    models.use_cpu_quantized_path(model)
    adapters.attach(model, Adapter(rank=4, alpha=8))
    trainable, total = models.count_parameters(model)
    assert trainable == 8192 and total == 86_848 + 8192
    x = mx.array(np.random.default_rng(0).integers(0, 100, (2, 9)))

    def loss(m):
        return m(x).astype(mx.float32).square().mean()

    grads = nn.value_and_grad(model, loss)(model)[1]
    from mlx.utils import tree_flatten

    names = [k for k, _ in tree_flatten(grads)]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)


def test_full_finetuning_refuses_a_quantized_base():
    from localtune.errors import RecipeError

    model = make_tiny_model()
    models.quantize_base(model, bits=4, group_size=32)
    with pytest.raises(RecipeError, match="full fine-tuning needs a float base"):
        adapters.attach(model, Adapter(type="full"))


@pytest.mark.parametrize("case,expected", [
    ("missing", "no such model folder"),
    ("no_config", "has no config.json"),
    ("no_weights", "has no weights"),
    ("gguf_missing", "no such GGUF file"),
])
def test_bad_model_references(tmp_path, case, expected):
    if case == "missing":
        ref = str(tmp_path / "nope")
    elif case == "gguf_missing":
        ref = str(tmp_path / "nope.gguf")
    else:
        ref = tmp_path / case
        ref.mkdir()
        if case == "no_weights":
            (ref / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match=expected):
        models.resolve(str(ref))


def test_offline_repo_id_names_the_id_and_the_fix():
    with pytest.raises(ModelError) as err:
        models.resolve("SomeOrg/some-model-that-is-not-cached")
    assert "SomeOrg/some-model-that-is-not-cached" in err.value.message
    assert "hf download" in err.value.message
