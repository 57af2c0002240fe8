"""Ministral 3 (text): Llama's layout with YaRN rope and Llama 4's attention temperature.

llama.cpp's converter writes the text model as architecture `mistral3`: q/k rows permuted as for
Llama, rope `yarn` (factor, original context, beta fast/slow; mscale_all_dim as yarn_log_mul) and
`llama_4_scaling_beta` as attention.temperature_scale. llama.cpp then scales queries by
1 + beta * log(1 + floor(pos / original context)), as mlx-lm's ministral3 does, and hard-codes
mscale = 1. The tokenizer is Tekken: byte-level BPE, pre-tokenizer "tekken".
"""
from __future__ import annotations

from ...errors import ModelError
from . import Family, refused_everywhere
from .llama import Llama

# rope_parameters key -> (GGUF key, llama.cpp's default when absent; None: required)
_YARN_KEYS = {"factor": ("rope.scaling.factor", None),
              "original_max_position_embeddings": ("rope.scaling.original_context_length", None),
              "beta_fast": ("rope.scaling.yarn_beta_fast", 32.0), "beta_slow": ("rope.scaling.yarn_beta_slow", 1.0),
              "mscale_all_dim": ("rope.scaling.yarn_log_multiplier", 0.0),
              "llama_4_scaling_beta": ("attention.temperature_scale", 0.0)}


def _short(x) -> float:
    import numpy as np

    return float(str(np.float32(x)))


class Ministral3(Llama):
    name = "Ministral 3 (text)"
    model_types = ("ministral3",)
    gguf_arch = "mistral3"
    hf_class = "Ministral3ForCausalLM"
    rope_types = ("yarn",)  # read here, not by the import's generic rope scaling

    def import_config(self, meta, get):
        if meta.get("mistral3.rope.scaling.type") != "yarn":
            raise ModelError("mistral3.rope.scaling.type is not 'yarn'; mlx-lm's ministral3 needs YaRN rope parameters")
        rope = {"rope_type": "yarn", "rope_theta": _short(get("rope.freq_base")), "mscale": 1.0}
        rope.update({key: _short(get(gguf_key, default)) for key, (gguf_key, default) in _YARN_KEYS.items()})
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        return {"rope_parameters": rope, "rope_theta": None, "rope_scaling": None}

    def check_config(self, config, where):
        rope = config.get("rope_parameters") or {}
        if rope.get("rope_type") != "yarn" or float(rope.get("mscale", 1.0)) != 1.0:
            raise ModelError(f"{where}: rope_parameters {rope}: llama.cpp's mistral3 takes YaRN rope with mscale = 1 "
                             "only\n  fix: export the fused MLX folder")
        if config.get("layer_types") and any(t != "full_attention" for t in config["layer_types"]):
            raise ModelError(f"{where}: sliding-window layers; llama.cpp's mistral3 has none\n"
                             "  fix: export the fused MLX folder")

    def gguf_metadata(self, writer, config):
        import gguf

        super().gguf_metadata(writer, config)
        rope = config["rope_parameters"]
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
        writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))
        writer.add_rope_scaling_yarn_log_mul(float(rope.get("mscale_all_dim", 0.0)))
        writer.add_attn_temperature_scale(float(rope.get("llama_4_scaling_beta", 0.0)))


_WRAPPER = ("the Mistral 3 / Ministral 3 checkpoint is the multimodal wrapper (text_config + a Pixtral vision "
            "tower); localtune runs its text model, model_type ministral3: convert with the text config only")


class Mistral3(Family):
    name = "Mistral 3 (multimodal wrapper)"
    model_types = ("mistral3",)
    gguf_arch = None
    hf_class = "Mistral3ForConditionalGeneration"
    limits = refused_everywhere(_WRAPPER)


FAMILIES = [Ministral3(), Mistral3()]
