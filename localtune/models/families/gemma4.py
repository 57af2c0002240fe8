"""Gemma 4 (text): trains and fuses through mlx-lm; its GGUF layout is not written or read yet.

What differs from Gemma 3 (llama.cpp's Gemma4 converter and mlx-lm's gemma4_text): norms are
plain w (no 1 + w); full-attention layers have their own head dim (global_head_dim) and rotate a
quarter of it ("proportional" RoPE, stored as a rope_freqs tensor of 1 / 1e30 factors); the last
num_kv_shared_layers layers reuse the keys and values of an earlier layer of their kind and have
no k/v projections; small models add per-layer token embeddings (embed_tokens_per_layer, a
per-layer gate and projection); every layer ends with a learned scalar (layer_scalar); shared
layers may use a double-wide MLP; values get a scale-free RMSNorm; logits are soft-capped
(tanh(z / 30) * 30); and llama.cpp reads a tokenizer model of its own, "gemma4".
"""
from __future__ import annotations

from . import Family

# Gemma 4's turn format: <|turn>role ... <turn|>, assistant turns are "model".
GEMMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{{ m['content'] | trim }}{{ '<turn|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)

_GGUF = ("llama.cpp's gemma4 reads tokenizer model \"gemma4\" (BPE merges over raw UTF-8 with ▁ for spaces), "
         "which localtune's GGUF tokenizer writer and reader do not produce; and the per-layer embeddings, "
         "KV-shared layers, per-kind head dims and proportional RoPE (rope_freqs) are not mapped yet")


class Gemma4(Family):
    name = "Gemma 4"
    model_types = ("gemma4_text",)
    gguf_arch = "gemma4"
    hf_class = "Gemma4ForCausalLM"
    chat_template = GEMMA4_TEMPLATE
    plain_head = False  # final_logit_softcapping: logits = 30 tanh(head(h) / 30)
    limits = {
        "gguf_import": _GGUF,
        "gguf_export": _GGUF,
        "gguf_lora": "the GGUF base it applies to cannot be exported yet (see GGUF export)",
        "ppo": "logits are soft-capped (30 tanh(z / 30)); the reward, PPO and GRPO heads read log-probs "
               "from hidden states through a plain output head",
    }


FAMILIES = [Gemma4()]
