"""Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Qwen3 MoE: GGUF tensors equal the Hugging Face ones.

Qwen3 MoE's experts are stacked (E, out, in) in mlx-lm (`mlp.switch_mlp.*_proj`) as in GGUF
(`ffn_*_exps`); gguf-py knows them by the merged Hugging Face name `mlp.experts.*_proj`. llama.cpp's
qwen3moe hard-codes what mlx-lm reads from the config: every layer is MoE, softmax routing, and
the top-k weights renormalised (norm_topk_prob).
"""
from __future__ import annotations

from ...errors import ModelError
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


class Qwen3Moe(Family):
    name = "Qwen3 MoE"
    model_types = ("qwen3_moe",)
    gguf_arch = "qwen3moe"
    hf_class = "Qwen3MoeForCausalLM"
    limits = {"dora": "mlx-lm's DoRA has no expert (SwitchLinear) layer; use LoRA, which adapts every expert"}
    f32_tensors = ("ffn_gate_inp.weight",)  # the router: llama.cpp's quantizer keeps it float (rounded, it
    # picks other experts)

    def tensor_name(self, name):
        return name.replace(".mlp.switch_mlp.", ".mlp.experts.")

    def import_config(self, meta, get):
        return {"num_experts": get("expert_count"), "num_experts_per_tok": get("expert_used_count"),
                "moe_intermediate_size": get("expert_feed_forward_length"),
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}

    def check_config(self, config, where):
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise ModelError(f"{where}: mlp_only_layers = {config.get('mlp_only_layers')}, decoder_sparse_step = "
                             f"{config.get('decoder_sparse_step')}: dense layers, but llama.cpp's qwen3moe makes "
                             "every layer MoE\n  fix: export the fused MLX folder")
        if not config.get("norm_topk_prob", False):
            raise ModelError(f"{where}: norm_topk_prob = false, but llama.cpp's qwen3moe always renormalises the "
                             "top-k expert weights\n  fix: export the fused MLX folder")

    def gguf_metadata(self, writer, config):
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])


FAMILIES = [Qwen2(), Qwen3(), Qwen3Moe()]
