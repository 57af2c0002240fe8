"""SmolLM3: a Llama (q/k rows interleaved for llama.cpp's rotary) whose every 4th layer has no RoPE.

mlx-lm reads `no_rope_layers` (1 = rotary on) or builds it from `no_rope_layer_interval`; llama.cpp's
smollm3 hard-codes the step (src/models/smollm3.cpp: layer il skips RoPE when (il + 1) % 4 == 0) and
its converter writes nothing for it, so only that pattern can be exported or imported.
"""
from __future__ import annotations

from ...errors import ModelError
from .llama import Llama

_NO_ROPE_STEP = 4


def _rope_layers(config: dict) -> list[int]:
    """Per layer, 1 where rotary applies (mlx-lm's `no_rope_layers`)."""
    if config.get("no_rope_layers") is not None:
        return [int(x) for x in config["no_rope_layers"]]
    step = config.get("no_rope_layer_interval", _NO_ROPE_STEP)
    return [int((i + 1) % step != 0) for i in range(config["num_hidden_layers"])]


class SmolLM3(Llama):
    name = "SmolLM3"
    model_types = ("smollm3",)
    gguf_arch = "smollm3"
    hf_class = "SmolLM3ForCausalLM"

    def import_config(self, meta, get):
        return {"no_rope_layer_interval": _NO_ROPE_STEP}

    def check_config(self, config, where):
        llama_cpp = [int((i + 1) % _NO_ROPE_STEP != 0) for i in range(config["num_hidden_layers"])]
        if (ours := _rope_layers(config)) != llama_cpp:
            without = [i for i, on in enumerate(ours) if not on]
            raise ModelError(f"{where}: layers {without} have no RoPE, but llama.cpp's smollm3 hard-codes every "
                             f"{_NO_ROPE_STEP}th layer ({[i for i, on in enumerate(llama_cpp) if not on]})\n"
                             "  fix: export the fused MLX folder")
        if config.get("rope_scaling"):
            raise ModelError(f"{where}: rope_scaling {config['rope_scaling']} is not exported for smollm3 "
                             "(the GGUF would run without it)\n  fix: remove it from config.json for contexts "
                             "within max_position_embeddings, or export the fused MLX folder")


FAMILIES = [SmolLM3()]
