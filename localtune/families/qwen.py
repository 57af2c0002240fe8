"""Qwen2 (q/k/v biases) and Qwen3 (q/k norms): GGUF tensors equal the Hugging Face ones."""
from __future__ import annotations

from . import Family


class Qwen2(Family):
    name = "Qwen2 / Qwen2.5"
    model_types = ("qwen2",)
    gguf_arch = "qwen2"
    hf_class = "Qwen2ForCausalLM"


class Qwen3(Family):
    name = "Qwen3"
    model_types = ("qwen3",)
    gguf_arch = "qwen3"
    hf_class = "Qwen3ForCausalLM"


FAMILIES = [Qwen2(), Qwen3()]
