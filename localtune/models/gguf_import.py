"""Import a .gguf file as an mlx-lm model folder (config.json, model.safetensors, tokenizer).

The model's family (localtune.models.families) builds its config from the metadata and undoes what
llama.cpp's converter changed (llama's q/k row order, Gemma's 1 + w norms), so the folder has
the plain Hugging Face layout that mlx-lm and our GGUF export expect. Tensor names are mapped
with gguf-py's TensorNameMap over the parameters of the mlx-lm model the config describes.
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

from ..errors import ModelError
from . import families, gguf_quants
from .gguf_tokenizer import build_tokenizer, check_tokenizer, sentencepiece_model, special_token_ids

MANIFEST = "localtune-import.json"

# Types mx.load reads exactly; mx.load turns BF16 into F16 and K-quants into F16 (lossy) or fails.
_NATIVE_TYPES = {QType.F32, QType.F16, QType.Q4_0, QType.Q4_1, QType.Q8_0}
_QUANT_BITS = gguf_quants.MLX_BITS  # the types gguf_quants keeps quantized, and mx.load for native files
_GROUP_SIZE = gguf_quants.GROUP_SIZE



def import_gguf(path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Convert `path` (.gguf) into a folder `mlx_lm.load` opens offline; return the folder.

    Without `out_dir` the folder is $LOCALTUNE_HOME/models/<stem>-<sha256[:12]>, reused when present.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"{path}: no such file. Check the path to the .gguf model.")
    from . import gguf_architecture

    _check_architecture(path, gguf_architecture(path))  # from the header's first keys: before hashing or parsing
    digest = _sha256(path)
    target = Path(out_dir).expanduser() if out_dir else models_home() / f"{path.stem}-{digest[:12]}"
    if _manifest(target).get("sha256") == digest:
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not _manifest(target):
        raise ModelError(f"{target}: exists and is not a localtune import. Choose an empty or new folder.")
    reader, meta = _read_header(path)
    family = _check_supported(path, reader, meta)
    try:
        config = _model_config(meta, reader, family)
    except ModelError as e:
        raise ModelError(f"{path}: {e.message}") from None
    names = _name_map(path, reader, family, config)

    weights, quantization, tensor_types = _load_weights(path, reader, names)
    weights.pop("rope_freqs.weight", None)  # read into rope_scaling
    for name in family.config_tensors:  # read into the config by the family
        weights.pop(name, None)
    if quantization:
        config["quantization"] = quantization
    weights = {k: family.from_gguf(k, v, config) for k, v in weights.items()}
    tokenizer, tokenizer_config = build_tokenizer(meta, config)
    if "chat_template" not in tokenizer_config and family.chat_template:
        tokenizer_config["chat_template"] = family.chat_template  # llama.cpp falls back to its built-in one
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
        if (spm := sentencepiece_model(meta)) is not None:  # what llama.cpp's converter reads back
            (tmp / "tokenizer.model").write_bytes(spm)
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


def _check_supported(path: Path, reader: GGUFReader, meta: dict) -> families.Family:
    """Fail before any heavy work: architecture, tokenizer kind, pre-tokenizer."""
    family = _check_architecture(path, meta.get("general.architecture"))
    try:
        check_tokenizer(meta)
    except ModelError as e:
        raise ModelError(f"{path}: {e.message}") from None
    return family


def _check_architecture(path: Path, arch: str | None) -> families.Family:
    family = families.by_gguf_arch(arch)
    importable = [f.gguf_arch for f in families.FAMILIES if f.gguf_arch and f.support()["gguf_import"] is True]
    if family is None or arch not in importable:
        why = f" ({family.support()['gguf_import']})" if family else ""
        raise ModelError(
            f"{path}: architecture {arch!r} cannot be imported{why}; supported: {', '.join(importable)}"
            f"{families.nearest(arch, importable)}. Use a GGUF of a supported model, or its Hugging Face checkpoint."
        )
    return family


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


def _name_map(path: Path, reader: GGUFReader, family: families.Family, config: dict) -> dict[str, str]:
    """GGUF module name -> mlx-lm module name ('blk.3.attn_q' -> 'model.layers.3.self_attn.q_proj').

    The mlx-lm model the config describes is built lazily (MLX never evaluates its random
    weights) just to list its parameters; gguf-py's TensorNameMap names each one.
    """
    import gguf
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.gguf_arch.upper()], config["num_hidden_layers"])
    names = {}  # GGUF module -> mlx-lm module; a parameter outside that pattern (ssm_a) by its full name
    for name, _ in tree_flatten(model.parameters()):
        if (target := table.get_name(family.tensor_name(name), try_suffixes=(".weight", ".bias"))) is None:
            continue
        (module, _, param), (gguf_module, _, gguf_param) = name.rpartition("."), target.rpartition(".")
        if param == gguf_param and param in ("weight", "bias"):
            names[gguf_module] = module
        else:
            names[target] = name
    config_tensors = ("rope_freqs.weight", *family.config_tensors)
    unknown = [t.name for t in reader.tensors if t.name not in config_tensors
               and t.name not in names and t.name.rpartition(".")[0] not in names]
    if unknown:
        raise ModelError(f"{path}: tensors {unknown[:5]} have no mlx-lm {config['model_type']} equivalent; "
                         "this model variant is not supported.")
    return names


def _load_weights(path: Path, reader: GGUFReader, names: dict) -> tuple[dict, dict | None, dict]:
    """GGUF tensors -> (mlx-lm weights, quantization config or None, {GGUF type: tensor count})."""
    def mlx_name(gguf_name: str) -> str:
        if gguf_name in names:
            return names[gguf_name]
        module, _, param = gguf_name.rpartition(".")
        return f"{names[module]}.{param}" if module in names else gguf_name

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
    weights = {mlx_name(k): v for k, v in raw.items()}
    matrices = {  # module -> GGUF type: 2-D weights and 3-D expert stacks (norms are never quantized)
        mlx_name(t.name).rpartition(".")[0]: types[t.name]
        for t in reader.tensors
        if t.name.endswith(".weight") and len(t.shape) in (2, 3) and t.name.rpartition(".")[0] in names
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


# ---------------------------------------------------------------- config


def _model_config(meta: dict, reader: GGUFReader, family: families.Family) -> dict:
    arch = meta["general.architecture"]
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # innermost dimension first
    rope_freqs = next((np.asarray(t.data) for t in reader.tensors if t.name == "rope_freqs.weight"), None)

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"metadata has no {arch}.{key}; the file is incomplete. Re-export it with llama.cpp.")
        return value

    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // heads)
    family_keys = family.import_config(meta, get)
    partial = any("partial_rotary_factor" in keys for keys in (family_keys, family_keys.get("rope_parameters", {})))
    if get("rope.dimension_count", head_dim) != head_dim and not (partial or family.partial_rotary):
        raise ModelError(f"partial rotary ({arch}.rope.dimension_count != head dim {head_dim}) is not supported.")
    config = {
        "model_type": family.model_types[0],
        "architectures": [family.hf_class],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _short_float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _short_float(get("rope.freq_base", 10000.0)),
        "rope_scaling": None if meta.get(f"{arch}.rope.scaling.type") in family.rope_types
        else _rope_scaling(meta, arch, rope_freqs, head_dim),
        "max_position_embeddings": get("context_length"),
        "vocab_size": shapes["token_embd.weight"][-1],
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "mlp_bias": False,
        **special_token_ids(meta),
        **family_keys,
    }
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors if t.name in family.config_tensors}
    config.update(family.tensor_config(tensors, config))
    return {k: v for k, v in config.items() if v is not None}


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
