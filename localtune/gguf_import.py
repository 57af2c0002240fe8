"""Import a .gguf file as an mlx-lm model folder (config.json, model.safetensors, tokenizer).

llama.cpp's converter permutes llama's attn_q/attn_k rows for its interleaved rotary; we undo that,
so the folder has the plain Hugging Face layout that mlx-lm and our GGUF export expect.
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K tensors stay quantized (exact MLX affine triplets, group size 32);
any other type is dequantized exactly to float32 with the `gguf` package (see gguf_quants).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader

from . import gguf_quants
from .errors import ModelError
from .gguf_tokenizer import build_tokenizer, check_tokenizer, special_token_ids

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
MANIFEST = "localtune-import.json"

# Types mx.load reads exactly; mx.load turns BF16 into F16 and K-quants into F16 (lossy) or fails.
_NATIVE_TYPES = {QType.F32, QType.F16, QType.Q4_0, QType.Q4_1, QType.Q8_0}
_QUANT_BITS = gguf_quants.MLX_BITS  # the types gguf_quants keeps quantized, and mx.load for native files
_GROUP_SIZE = gguf_quants.GROUP_SIZE

_TOP_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Convert `path` (.gguf) into a folder `mlx_lm.load` opens offline; return the folder.

    Without `out_dir` the folder is $LOCALTUNE_HOME/models/<stem>-<sha256[:12]>, reused when present.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"{path}: no such file. Check the path to the .gguf model.")
    digest = _sha256(path)
    target = Path(out_dir).expanduser() if out_dir else models_home() / f"{path.stem}-{digest[:12]}"
    if _manifest(target).get("sha256") == digest:
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not _manifest(target):
        raise ModelError(f"{target}: exists and is not a localtune import. Choose an empty or new folder.")
    reader, meta = _read_header(path)
    _check_supported(path, reader, meta)

    weights, quantization, tensor_types = _load_weights(path, reader)
    try:
        config = _model_config(meta, weights, quantization)
    except ModelError as e:
        raise ModelError(f"{path}: {e.message}") from None
    tokenizer, tokenizer_config = build_tokenizer(meta, config)
    manifest = {
        "name": meta.get("general.name") or path.stem,
        "source": str(path),
        "sha256": digest,
        "architecture": meta["general.architecture"],
        "license": meta.get("general.license"),
        "license_name": meta.get("general.license.name"),
        "license_link": meta.get("general.license.link"),
        "tensor_types": tensor_types,
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = _temp_dir_beside(target)
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        _write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        (tmp / "README.md").write_text(_model_card(manifest, path))
        _write_json(tmp / MANIFEST, manifest)
        _publish(tmp, target, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def list_imported() -> list[dict]:
    """The cached imports: name, path, source gguf, sha256, size_bytes, license, architecture."""
    found = []
    for folder in sorted(models_home().glob("*/")):
        manifest = _manifest(folder)
        if manifest:
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            found.append({**manifest, "path": str(folder), "size_bytes": size})
    return found


def imported_from(folder: str | os.PathLike) -> Path | None:
    """The .gguf file a folder was imported from (it may have moved since), or None."""
    source = _manifest(Path(folder)).get("source")
    return Path(source) if source else None


def models_home() -> Path:
    return Path(os.environ.get("LOCALTUNE_HOME", "~/.cache/localtune")).expanduser() / "models"


# ---------------------------------------------------------------- reading and checking


def _read_header(path: Path) -> tuple[GGUFReader, dict]:
    try:
        reader = GGUFReader(path)
        meta = {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # gguf raises ValueError, struct.error, IndexError... on damaged files
        raise ModelError(f"{path}: not a readable GGUF file ({e}). Re-download it; partial downloads look like this.")
    return reader, meta


def _check_supported(path: Path, reader: GGUFReader, meta: dict) -> None:
    """Fail before any heavy work: architecture, tokenizer kind, pre-tokenizer, tensor names."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"{path}: architecture {arch!r} cannot be imported; supported: {', '.join(ARCHITECTURES)}. "
            "Use a GGUF of a supported model, or its Hugging Face checkpoint."
        )
    try:
        check_tokenizer(meta)
    except ModelError as e:
        raise ModelError(f"{path}: {e.message}") from None
    unknown = [t.name for t in reader.tensors if t.name != "rope_freqs.weight" and not _mlx_name(t.name)]
    if unknown:
        raise ModelError(
            f"{path}: tensors {unknown[:5]} have no mlx-lm {arch} equivalent; this model variant is not supported."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- weights


def _mlx_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (also .bias/.scales/.biases)."""
    module, _, param = gguf_name.rpartition(".")
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_MODULES:
        return f"model.layers.{parts[1]}.{_LAYER_MODULES[parts[2]]}.{param}"
    if module in _TOP_MODULES:
        return f"{_TOP_MODULES[module]}.{param}"
    return None


def _load_weights(path: Path, reader: GGUFReader) -> tuple[dict, dict | None, dict]:
    """GGUF tensors -> (mlx-lm weights, quantization config or None, {GGUF type: tensor count})."""
    types = {t.name: QType(t.tensor_type) for t in reader.tensors}
    native = set(types.values()) <= _NATIVE_TYPES
    if native:
        raw = mx.load(str(path))
        # float32 scales/biases keep dequantization exact (float16 would round the products)
        raw = {k: v.astype(mx.float32) if k.endswith((".scales", ".biases")) else v for k, v in raw.items()}
    else:
        for t in reader.tensors:  # fail before converting anything
            try:
                gguf_quants.check_readable(t.name, types[t.name])
            except ModelError as e:
                raise ModelError(f"{path}: {e.message}") from None
        raw = {name: value for t in reader.tensors for name, value in gguf_quants.mlx_arrays(t).items()}
    weights = {_mlx_name(k) or k: v for k, v in raw.items()}
    matrices = {  # module -> GGUF type, 2-D weights only (norms are never quantized)
        _mlx_name(t.name).rpartition(".")[0]: types[t.name]
        for t in reader.tensors
        if t.name.endswith(".weight") and len(t.shape) == 2 and _mlx_name(t.name)
    }
    quantization = _quantization(matrices)
    return weights, quantization, dict(Counter(t.name for t in types.values()))


def _quantization(matrices: dict) -> dict | None:
    """mlx-lm `quantization` config: the commonest bits as default, per-module entries for the rest."""
    bits = {m: _QUANT_BITS[t] for m, t in matrices.items() if t in _QUANT_BITS}
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    config = {"group_size": _GROUP_SIZE, "bits": default, "mode": "affine"}
    for module in sorted(matrices):
        if module not in bits:
            config[module] = False
        elif bits[module] != default:
            config[module] = {"group_size": _GROUP_SIZE, "bits": bits[module], "mode": "affine"}
    return config


def _unpermute(x: mx.array, n_head: int) -> mx.array:
    """Inverse of llama.cpp's convert permute: rows (n_head, 2, d/2) were stored as (n_head, d/2, 2)."""
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _undo_rotary_permutation(weights: dict, config: dict) -> None:
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name in list(weights):
        for proj, n_head in heads.items():
            if f".self_attn.{proj}." in name:
                weights[name] = _unpermute(weights[name], n_head)


# ---------------------------------------------------------------- config


def _model_config(meta: dict, weights: dict, quantization: dict | None) -> dict:
    arch = meta["general.architecture"]

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"metadata has no {arch}.{key}; the file is incomplete. Re-export it with llama.cpp.")
        return value

    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ModelError(f"partial rotary ({arch}.rope.dimension_count != head dim {head_dim}) is not supported.")
    config = {
        "model_type": arch,
        "architectures": [ARCHITECTURES[arch]],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _short_float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _short_float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch, weights.pop("rope_freqs.weight", None), head_dim),
        "max_position_embeddings": get("context_length"),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in weights,
        "mlp_bias": False,
        **special_token_ids(meta),
    }
    if quantization:
        config["quantization"] = quantization
    config = {k: v for k, v in config.items() if v is not None}
    if arch == "llama":
        _undo_rotary_permutation(weights, config)
    return config


def _short_float(x: float) -> float:
    """GGUF stores float32: 9.999999747e-06 -> 1e-05 (shortest repr that round-trips)."""
    return float(str(np.float32(x)))


def _rope_scaling(meta: dict, arch: str, rope_freqs, head_dim: int) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return {"type": "linear", "factor": _short_float(meta[f"{arch}.rope.scaling.factor"])}
    if kind not in ("none", ""):
        raise ModelError(f"rope scaling {kind!r} ({arch}.rope.scaling.type) is not supported; supported: linear.")
    if rope_freqs is None:
        return None
    return _llama3_rope_scaling(np.array(rope_freqs, dtype=np.float64), meta[f"{arch}.rope.freq_base"], head_dim)


def _llama3_rope_scaling(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover Llama 3.x rope_scaling from the per-frequency divisors llama.cpp stores (rope_freqs)."""
    scaling = {"rope_type": "llama3", "factor": float(rope_freqs.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    old, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    smooth = (old / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen < old / 4.0, 1.0, np.where(wavelen > old, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(expected, rope_freqs, rtol=1e-4):
        raise ModelError("rope_freqs.weight does not match Llama 3 rope scaling (low 1, high 4, 8192); unsupported.")
    return scaling


# ---------------------------------------------------------------- writing


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _model_card(manifest: dict, source: Path) -> str:
    """README.md with Hugging Face style front matter; the provenance gate reads `license` there."""
    front = "".join(f"{key}: {manifest[key]}\n" for key in ("license", "license_name", "license_link") if manifest[key])
    return (
        f"---\n{front}library_name: mlx\ntags:\n- gguf-import\n- localtune\n---\n\n"
        f"# {manifest['name']}\n\nImported by localtune from `{source.name}` "
        f"(sha256 `{manifest['sha256']}`), {manifest['architecture']} architecture.\n"
    )


def _temp_dir_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    return tmp


def _publish(tmp: Path, target: Path, digest: str) -> None:
    """Swap the finished folder in with renames, so readers never see half an import."""
    if _manifest(target).get("sha256") == digest:
        return  # a concurrent import of the same file finished first
    old = target.with_name(f".{target.name}.old-{os.getpid()}") if target.exists() else None
    if old:
        os.replace(target, old)  # an older import of another file, or an empty folder
    os.replace(tmp, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
