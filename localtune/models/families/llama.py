"""Llama and Mistral: llama.cpp's converter interleaves q/k rows for its rotary; undone on import."""
from __future__ import annotations

from . import Family


def permute(w, n_head: int):
    """Hugging Face q/k rows (half-split rotary) -> llama.cpp's interleaved order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head: int):
    """Inverse of `permute`: rows (n_head, 2, d/2) were stored as (n_head, d/2, 2)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(name: str, config: dict) -> int | None:
    if ".self_attn.q_proj." in name:
        return config["num_attention_heads"]
    if ".self_attn.k_proj." in name:
        return config.get("num_key_value_heads", config["num_attention_heads"])
    return None


class Llama(Family):
    name = "Llama / Mistral"
    model_types = ("llama", "mistral")
    gguf_arch = "llama"
    hf_class = "LlamaForCausalLM"

    def from_gguf(self, name, w, config):
        heads = _heads(name, config)
        return w if heads is None else unpermute(w, heads)

    def to_gguf(self, name, w, config):
        heads = _heads(name, config)
        return w if heads is None else permute(w, heads)

    lora_b_to_gguf = to_gguf  # B's rows are W's rows

    def gguf_metadata(self, writer, config):
        writer.add_vocab_size(config["vocab_size"])
        heads = config["num_attention_heads"]
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)


FAMILIES = [Llama()]
