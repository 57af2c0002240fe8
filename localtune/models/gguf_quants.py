"""One GGUF tensor as MLX arrays: quantized where MLX holds the blocks as they are, exact floats otherwise.

MLX's affine quantization (group size 32) stores w = scale * code + bias per 32 consecutive values of a
row, codes of 2-8 bits packed into uint32 as a little-endian bit stream. These GGUF block types are
exactly that, with float32 scale and bias computed from the block's fields:

    Q4_0  w = d * (q - 8)          scale d,        bias -8 d      4 bits
    Q5_0  w = d * (q - 16)         scale d,        bias -16 d     5 bits
    Q8_0  w = d * x  (x int8)      scale d,        bias -128 d    8 bits, code x + 128
    Q4_1  w = d * q + m            scale d,        bias m         4 bits  (Q5_1: 5 bits)
    Q4_K  w = d sc_j * q - dmin m_j  per 32-value sub-block j of a 256 super-block   4 bits  (Q5_K: 5 bits)

Every product scale * code is exact in float32 (an f16 times at most 6 + 8 bits), so MLX's dequantization
rounds once where gguf's does, and returns the same float32 values. Q2_K, Q3_K and Q6_K scale 16-value
sub-blocks (MLX's smallest group is 32), IQ and other types are not affine: those are dequantized exactly
with the `gguf` package, to float32 (F16 and BF16 keep their dtype).
"""
from __future__ import annotations

from functools import cache
from importlib.metadata import version

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as QType

from ..errors import ModelError

GROUP_SIZE = 32
MLX_BITS = {QType.Q4_0: 4, QType.Q4_1: 4, QType.Q5_0: 5, QType.Q5_1: 5, QType.Q8_0: 8, QType.Q4_K: 4, QType.Q5_K: 5}
_CHUNK_BLOCKS = 1 << 16  # blocks converted at a time: bounds the temporaries to ~100 MB


def mlx_arrays(tensor) -> dict[str, mx.array]:
    """A gguf ReaderTensor as named MLX arrays: {name} alone, or {prefix}.weight/.scales/.biases."""
    found = mlx_tensor(tensor)
    if "scales" not in found:
        return {tensor.name: found["weight"]}
    prefix = tensor.name.removesuffix(".weight")
    return {f"{prefix}.{key}": found[key] for key in ("weight", "scales", "biases")}


def mlx_tensor(tensor) -> dict:
    """{"weight": exact floats} or MLX's affine triplet {"weight", "scales", "biases", "bits", "group_size"}.

    tensor: a gguf ReaderTensor (name, tensor_type, shape innermost first, data as stored).
    """
    qtype = QType(tensor.tensor_type)
    check_readable(tensor.name, qtype)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # (..., rows, columns)
    if qtype in MLX_BITS:
        return {**_affine(np.asarray(tensor.data), qtype, shape), "bits": MLX_BITS[qtype], "group_size": GROUP_SIZE}
    return {"weight": _dequantize(np.asarray(tensor.data), qtype, shape)}


def check_readable(name: str, qtype: QType) -> None:
    if not _readable(qtype):
        readable = ", ".join(t.name for t in QType if _readable(t))
        raise ModelError(
            f"tensor {name!r} has GGUF type {qtype.name}, which the gguf package {version('gguf')} cannot read "
            f"(it reads {readable}). Use a GGUF of this model with another quantization, such as Q4_K_M or Q8_0."
        )


@cache
def _readable(qtype: QType) -> bool:
    """Whether gguf.quants dequantizes this type: probe one all-zero block."""
    try:
        quants.dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _dequantize(data: np.ndarray, qtype: QType, shape: tuple) -> mx.array:
    if qtype in (QType.F32, QType.F16):
        return mx.array(data.reshape(shape))
    values = mx.array(quants.dequantize(data, qtype).reshape(shape))
    return values.astype(mx.bfloat16) if qtype == QType.BF16 else values


# ---------------------------------------------------------------- affine blocks


def _affine(data: np.ndarray, qtype: QType, shape: tuple) -> dict:
    """Stored blocks -> packed codes (..., columns * bits / 32) uint32, scales and biases (..., columns / 32)."""
    *outer, columns = shape
    bits, type_size = MLX_BITS[qtype], GGML_QUANT_SIZES[qtype][1]
    blocks = data.reshape(-1, type_size)  # blocks run along a row, rows follow each other
    groups = len(blocks) * GGML_QUANT_SIZES[qtype][0] // GROUP_SIZE
    packed = np.empty((groups, bits), np.uint32)
    scales, biases = np.empty(groups, np.float32), np.empty(groups, np.float32)
    per_block = GGML_QUANT_SIZES[qtype][0] // GROUP_SIZE
    for start in range(0, len(blocks), _CHUNK_BLOCKS):
        scale, bias, codes = _FIELDS[qtype](np.ascontiguousarray(blocks[start : start + _CHUNK_BLOCKS]))
        at = slice(start * per_block, start * per_block + scale.size)
        scales[at], biases[at] = scale.reshape(-1), bias.reshape(-1)
        packed[at] = _pack(codes.reshape(-1, GROUP_SIZE), bits)
    return {
        "weight": mx.array(packed.reshape(*outer, columns * bits // 32)),
        "scales": mx.array(scales.reshape(*outer, columns // GROUP_SIZE)),
        "biases": mx.array(biases.reshape(*outer, columns // GROUP_SIZE)),
    }


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes (n, 32) uint8 -> (n, bits) uint32: code i at bits [i * bits, (i + 1) * bits) of the group."""
    if bits == 8:
        return codes.view(np.uint32)
    octets = codes.reshape(-1, 4, 8).astype(np.uint64)  # 8 codes fill exactly `bits` bytes
    stream = np.bitwise_or.reduce(octets << (np.arange(8, dtype=np.uint64) * np.uint64(bits)), axis=-1)
    return np.ascontiguousarray(stream.view(np.uint8).reshape(-1, 4, 8)[..., :bits]).reshape(-1, 4 * bits).view(
        np.uint32
    )


def _f16(field: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32."""
    return np.ascontiguousarray(field).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) codes: each `width` bytes give `width` low nibbles, then their high nibbles."""
    halves = qs.reshape(len(qs), -1, 1, width) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (halves & np.uint8(0x0F)).reshape(len(qs), -1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: 4 bytes, bit i is the fifth bit of value i -> (n, 32) of 0/16."""
    bits = qh.copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)
    return ((bits & np.uint32(1)) << np.uint32(4)).astype(np.uint8)


def _q4_0(b):
    d = _f16(b[:, :2])
    return d, -8 * d, _nibbles(b[:, 2:], 16)


def _q4_1(b):
    return _f16(b[:, :2]), _f16(b[:, 2:4]), _nibbles(b[:, 4:], 16)


def _q5_0(b):
    d = _f16(b[:, :2])
    return d, -16 * d, _nibbles(b[:, 6:], 16) | _high_bits(b[:, 2:6])


def _q5_1(b):
    return _f16(b[:, :2]), _f16(b[:, 2:4]), _nibbles(b[:, 8:], 16) | _high_bits(b[:, 4:8])


def _q8_0(b):
    d = _f16(b[:, :2])
    return d, -128 * d, b[:, 2:] ^ np.uint8(0x80)  # int8 x -> x + 128


def _k_scales(b):
    """Q4_K/Q5_K: per sub-block scale d * sc_j and bias -dmin * m_j, (n, 8) each."""
    sc, m = quants.Q4_K.get_scale_min(b[:, 4:16])
    return _f16(b[:, :2]) * sc.astype(np.float32), -(_f16(b[:, 2:4]) * m.astype(np.float32))


def _q4_k(b):
    return *_k_scales(b), _nibbles(b[:, 16:], 32)


def _q5_k(b):
    qh = b[:, 16:48].reshape(len(b), 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # bit j: sub-block j
    return *_k_scales(b), _nibbles(b[:, 48:], 32) | ((qh & np.uint8(1)) << np.uint8(4)).reshape(len(b), -1)


_FIELDS = {QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q5_0: _q5_0, QType.Q5_1: _q5_1, QType.Q8_0: _q8_0,
           QType.Q4_K: _q4_k, QType.Q5_K: _q5_k}
