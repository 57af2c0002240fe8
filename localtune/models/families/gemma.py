"""Gemma 3 (text): sliding-window layers, an embedding scaled by sqrt(hidden), (1 + w) norms.

llama.cpp's converter stores every `*norm.weight` as 1 + w (Gemma's RMSNorm multiplies by
1 + w; mlx-lm keeps w). llama.cpp hard-codes what the GGUF does not store: every 6th layer is
global, local layers use rope base 10000, and queries are scaled by head_dim^-0.5 except on the
62-layer 27B model (hidden / heads).
"""
from __future__ import annotations

from ...errors import ModelError
from . import Family, refused_everywhere

# Gemma's turn format, as llama.cpp's built-in "gemma" template renders it: no system role (a
# system message is put before the first user message), assistant turns are "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{ (prefix if loop.first else '') + m['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_PATTERN, _LOCAL_BASE = 6, 10000.0


def _norm(name: str) -> bool:
    return name.endswith("norm.weight")


class Gemma3(Family):
    name = "Gemma 3"
    model_types = ("gemma3_text",)
    gguf_arch = "gemma3"
    hf_class = "Gemma3ForCausalLM"
    chat_template = GEMMA_TEMPLATE

    def import_config(self, meta, get):
        hidden, heads, layers = get("embedding_length"), get("attention.head_count"), get("block_count")
        head_dim = get("attention.key_length")
        config = {"head_dim": head_dim, "sliding_window": get("attention.sliding_window"),
                  "sliding_window_pattern": _PATTERN, "rope_local_base_freq": _LOCAL_BASE,
                  "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim}
        if meta.get("gemma3.final_logit_softcapping"):
            raise ModelError("gemma3.final_logit_softcapping is set; mlx-lm's gemma3_text has no soft-capping.")
        return config

    def from_gguf(self, name, w, config):
        return w - 1 if _norm(name) else w

    def to_gguf(self, name, w, config):
        return w + 1 if _norm(name) else w

    def check_config(self, config, where):
        expected = {"sliding_window_pattern": _PATTERN, "rope_local_base_freq": _LOCAL_BASE,
                    "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"]
                    if config["num_hidden_layers"] == 62 else config.get("head_dim", 256)}
        for key, value in expected.items():
            if key in config and float(config[key]) != float(value):
                raise ModelError(f"{where}: {key} = {config[key]}, but llama.cpp's gemma3 hard-codes {value}; "
                                 "a GGUF of this model would not reproduce it\n  fix: export the fused MLX folder")

    def gguf_metadata(self, writer, config):
        writer.add_sliding_window(config.get("sliding_window", 512))
        scaling = config.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type")) == "linear":
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))


_WRAPPER = ("the Gemma 3 4B, 12B and 27B checkpoints are the multimodal wrapper (text_config + a SigLIP vision "
            "tower); localtune runs the text model, model_type gemma3_text (the 270M and 1B checkpoints, or a "
            "GGUF of any size: llama.cpp's converter writes the text model)")


class Gemma3Multimodal(Family):
    name = "Gemma 3 (multimodal wrapper)"
    model_types = ("gemma3",)
    gguf_arch = None  # a gemma3 GGUF holds the text model: Gemma3 above
    limits = refused_everywhere(_WRAPPER)


FAMILIES = [Gemma3(), Gemma3Multimodal()]
