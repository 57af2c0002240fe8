"""Phi-3 / Phi-3.5-mini / Phi-4 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary, longrope.

The fused projections are GGUF tensors as they are (attn_qkv, and ffn_up holding gate then up),
so LoRA targets qkv_proj and gate_up_proj whole. Rotary covers the first
int(head_dim * partial_rotary_factor) dims of each head (rope.dimension_count; Phi-4-mini: 0.75).

longrope (Phi-3.5-mini, Phi-4-mini): llama.cpp's converter stores the long and short per-frequency
factors as tensors and the attention factor sqrt(1 + ln(s) / ln(original context)); llama.cpp uses
the long factors only when its context exceeds the original one. mlx-lm's SuScaledRoPE uses the
long factors at every length, so that is the model localtune trains: export stores the long factors
in both tensors, and llama.cpp reproduces the MLX model at any context size. Import reads the long
factors, which is what mlx-lm makes of the Hugging Face checkpoint too.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np

from ...errors import ModelError
from . import Family

_LONG, _SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
# llama.cpp (llama-vocab.cpp): a general.name containing "phi-3" or "phi3" makes every special token
# right-strip the whitespace after it, except these three, and needs all four in the vocabulary.
_PHI3_NAME = re.compile("phi-?3", re.IGNORECASE)
_NOT_RSTRIP, _PHI3_TOKENS = {"<unk>", "<s>", "<|endoftext|>"}, {"</s>", "<unk>", "<s>", "<|endoftext|>"}


def _head_dim(config: dict) -> int:
    return config["hidden_size"] // config["num_attention_heads"]  # mlx-lm's phi3 has no head_dim key


def _rope_dims(config: dict) -> int:
    return int(_head_dim(config) * config.get("partial_rotary_factor", 1.0))


def _longrope(config: dict) -> dict | None:
    scaling = config.get("rope_scaling") or {}
    return scaling if scaling.get("type", scaling.get("rope_type")) in ("longrope", "su") else None


def _attn_factor(config: dict) -> float:
    """mlx-lm's SuScaledRoPE scale of the rotated dims (the converter's rope.scaling.attn_factor)."""
    scale = config.get("max_position_embeddings", 131072) / config.get("original_max_position_embeddings", 4096)
    return math.sqrt(1 + math.log(scale) / math.log(config.get("original_max_position_embeddings", 4096))) \
        if scale > 1.0 else 1.0


def _phi3_rule_holds(folder) -> bool:
    path = folder / "tokenizer.json"
    if not path.exists():
        return False
    tokenizer = json.loads(path.read_text())
    added = tokenizer.get("added_tokens", [])
    present = {t["content"] for t in added} | set(tokenizer.get("model", {}).get("vocab", {}))
    return _PHI3_TOKENS <= present and all(
        bool(t.get("rstrip")) == (t["content"] not in _NOT_RSTRIP) for t in added if t.get("special"))


class Phi3(Family):
    name = "Phi-3 / Phi-4 (mini)"
    model_types = ("phi3",)
    gguf_arch = "phi3"
    hf_class = "Phi3ForCausalLM"
    partial_rotary = True
    config_tensors = (_LONG, _SHORT)

    def gguf_name(self, name, tokenizer_folder):
        """Keep llama.cpp's Phi-3 name rule only where this tokenizer is what it assumes (Phi-3's own:
        right-stripping specials); elsewhere it would tokenize otherwise, or fail to load (Phi-4-mini)."""
        if not _PHI3_NAME.search(name) or _phi3_rule_holds(tokenizer_folder):
            return name
        return _PHI3_NAME.sub(lambda m: m.group(0).replace("3", "_3"), name)

    def import_config(self, meta, get):
        head_dim = get("embedding_length") // get("attention.head_count")
        if get("attention.key_length", head_dim) != head_dim:
            raise ModelError(f"phi3.attention.key_length != embedding_length / head_count ({head_dim}); "
                             "mlx-lm's phi3 cannot hold it.")
        config = {"original_max_position_embeddings": get("rope.scaling.original_context_length",
                                                          get("context_length"))}
        if (rope_dims := get("rope.dimension_count", head_dim)) != head_dim:
            config["partial_rotary_factor"] = rope_dims / head_dim
        if window := meta.get("phi3.attention.sliding_window"):
            config["sliding_window"] = window  # llama.cpp and mlx-lm attend to everything anyway
        return config

    def tensor_config(self, tensors, config):
        if _LONG not in tensors:
            return {}
        long = [float(x) for x in np.asarray(tensors[_LONG], dtype=np.float32)]
        short = [float(x) for x in np.asarray(tensors.get(_SHORT, tensors[_LONG]), dtype=np.float32)]
        return {"rope_scaling": {"type": "longrope", "long_factor": long, "short_factor": short}}

    def check_config(self, config, where):
        heads = config["num_attention_heads"]
        if config.get("head_dim") not in (None, _head_dim(config)):
            raise ModelError(f"{where}: head_dim = {config['head_dim']}, but llama.cpp's phi3 needs hidden_size / "
                             f"num_attention_heads = {_head_dim(config)}\n  fix: export the fused MLX folder")
        # llama.cpp's converter: int(factor * hidden) // heads; mlx-lm: int(head_dim * factor)
        factor = config.get("partial_rotary_factor", 1.0)
        if int(factor * config["hidden_size"]) // heads != _rope_dims(config):
            raise ModelError(f"{where}: partial_rotary_factor {factor} rounds to different rotary dims in "
                             "llama.cpp and mlx-lm\n  fix: export the fused MLX folder")
        scaling = config.get("rope_scaling")
        if scaling and not _longrope(config):
            raise ModelError(f"{where}: rope_scaling {scaling.get('type', scaling.get('rope_type'))!r}: only "
                             "longrope is exported for phi3 (mlx-lm's phi3 reads no other)\n"
                             "  fix: export the fused MLX folder")
        if (longrope := _longrope(config)) and np.size(longrope["long_factor"]) != _rope_dims(config) // 2:
            raise ModelError(f"{where}: rope_scaling.long_factor has {np.size(longrope['long_factor'])} values; "
                             f"the rotary dims need {_rope_dims(config) // 2}")

    def gguf_metadata(self, writer, config):
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(_rope_dims(config))
        writer.add_rope_scaling_orig_ctx_len(int(config.get("original_max_position_embeddings", 4096)))
        writer.add_sliding_window(int(config.get("sliding_window") or 0))  # 0: Phi-4 (the converter's mark)
        if _longrope(config):
            writer.add_rope_scaling_attn_factors(_attn_factor(config))

    def gguf_config_tensors(self, config):
        if (longrope := _longrope(config)) is None:
            return
        long = np.asarray(longrope["long_factor"], dtype=np.float32).reshape(-1)
        # mlx-lm applies the long factors at every length: so must llama.cpp, whatever its context
        yield _LONG, long
        yield _SHORT, long.copy()


FAMILIES = [Phi3()]
