"""Qwen3.5 (dense): gated-DeltaNet linear-attention layers between gated full-attention layers.

mlx-lm nests the text model under `language_model.`, and already holds Qwen's (1 + w) norms
as 1 + w, as llama.cpp's converter stores them, so norms pass through unchanged. What does
change (llama.cpp's Qwen3Next/Qwen3.5 converter): A_log is stored as A = -exp(A_log), dt_bias
is named dt_proj.bias, the depthwise conv1d loses its unit axis, and where there are more value
heads than key heads the value heads go from grouped (by key head) to tiled order, in every
tensor they index. Full-attention layers rotate only head_dim * partial_rotary_factor dims;
llama.cpp reads them as M-RoPE sections, which for text positions is plain RoPE.
"""
from __future__ import annotations

from ...errors import ModelError
from . import Family

_LINEAR = ".linear_attn."


def _heads(config: dict) -> tuple[int, int]:
    """(key heads, value heads per key head) of the linear-attention layers."""
    k, v = config["linear_num_key_heads"], config["linear_num_value_heads"]
    return k, v // k


def _regroup(w, axis: int, k: int, r: int, inverse: bool):
    """Value heads along `axis`: grouped (k, r, unit) <-> tiled (r, k, unit); unit = size / (k r)."""
    size = w.shape[axis]
    if size % (k * r):
        raise ModelError(f"a linear-attention tensor of {size} along axis {axis} does not split into {k * r} heads")
    w = w.swapaxes(0, axis) if axis else w
    rest = w.shape[1:]
    w = w.reshape(*((r, k) if inverse else (k, r)), size // (k * r), *rest).swapaxes(0, 1).reshape(size, *rest)
    return w.swapaxes(0, axis) if axis else w


def _value_rows(name: str, config: dict) -> tuple[int, int] | None:
    """(first value-head row, axis) of a tensor whose value heads llama.cpp reorders, else None."""
    if _LINEAR not in name:
        return None
    key_dim = config["linear_key_head_dim"] * config["linear_num_key_heads"]
    if ".in_proj_qkv." in name or ".conv1d." in name:
        return 2 * key_dim, 0
    if any(p in name for p in (".in_proj_z.", ".in_proj_a.", ".in_proj_b.")) or name.endswith((".A_log", ".dt_bias")):
        return 0, 0
    if ".out_proj." in name:
        return 0, 1
    return None


def _reorder(name: str, w, config: dict, inverse: bool):
    k, r = _heads(config)
    where = _value_rows(name, config)
    if r == 1 or where is None:
        return w
    start, axis = where
    if axis == 1:
        return _regroup(w, 1, k, r, inverse)
    if start == 0:
        return _regroup(w, 0, k, r, inverse)
    import mlx.core as mx
    import numpy as np

    concatenate = np.concatenate if isinstance(w, np.ndarray) else mx.concatenate
    return concatenate([w[:start], _regroup(w[start:], 0, k, r, inverse)], axis=0)


class Qwen35(Family):
    name = "Qwen3.5"
    model_types = ("qwen3_5",)
    gguf_arch = "qwen35"
    hf_class = "Qwen3_5ForCausalLM"
    plain_head = True  # logits = lm_head(norm(h)); the head sits under language_model
    f32_tensors = (".ssm_conv1d.weight",)  # ggml's ssm_conv reads float32 only

    def tensor_name(self, name):
        name = name.removeprefix("language_model.")
        return name.replace(".linear_attn.dt_bias", ".linear_attn.dt_proj.bias")

    def import_config(self, meta, get):
        head_dim = get("attention.key_length")
        rotary = get("rope.dimension_count")
        sections = list(get("rope.dimension_sections"))[:3]
        return {
            "linear_conv_kernel_dim": get("ssm.conv_kernel"),
            "linear_key_head_dim": get("ssm.state_size"),
            "linear_value_head_dim": get("ssm.inner_size") // get("ssm.time_step_rank"),
            "linear_num_key_heads": get("ssm.group_count"),
            "linear_num_value_heads": get("ssm.time_step_rank"),
            "full_attention_interval": get("full_attention_interval", 4),
            "rope_parameters": {"type": "default", "rope_theta": float(get("rope.freq_base")),
                                "partial_rotary_factor": rotary / head_dim, "mrope_section": sections},
        }

    def to_gguf(self, name, w, config):
        w = _reorder(name, w, config, inverse=False)
        if name.endswith(".conv1d.weight"):
            return w[..., 0]  # (channels, kernel, 1) -> (channels, kernel)
        if name.endswith(".A_log"):
            import numpy as np

            return -np.exp(w)
        return w

    def from_gguf(self, name, w, config):
        if name.endswith(".conv1d.weight"):
            w = w[..., None]
        elif name.endswith(".A_log"):
            import mlx.core as mx

            w = mx.log(-w.astype(mx.float32))
        return _reorder(name, w, config, inverse=True)

    def lora_b_to_gguf(self, name, b, config):
        where = _value_rows(name, config)
        return b if where is None or where[1] == 1 else _reorder(name, b, config, inverse=False)

    def lora_a_to_gguf(self, name, a, config):
        """out_proj's value heads index its input columns: A's columns follow them."""
        where = _value_rows(name, config)
        return _reorder(name, a, config, inverse=False) if where and where[1] == 1 else a

    def check_config(self, config, where):
        if "text_config" in config:
            raise ModelError(f"{where}: the config nests the text model under text_config (a multimodal "
                             "Qwen3_5ForConditionalGeneration checkpoint); GGUF export reads a text-only config\n"
                             "  fix: export a Qwen3_5ForCausalLM (text-only) checkpoint")
        theta = (config.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None and float(config.get("rope_theta", theta)) != float(theta):
            raise ModelError(f"{where}: rope_theta {config['rope_theta']} differs from rope_parameters' {theta}, "
                             "which mlx-lm's qwen3_5 uses\n  fix: make them equal in config.json")
        if config["linear_key_head_dim"] != config["linear_value_head_dim"]:
            raise ModelError(f"{where}: linear_key_head_dim {config['linear_key_head_dim']} != linear_value_head_dim "
                             f"{config['linear_value_head_dim']}; llama.cpp's qwen35 reads one size for both")
        if config["linear_num_value_heads"] % config["linear_num_key_heads"]:
            raise ModelError(f"{where}: {config['linear_num_value_heads']} value heads do not group into "
                             f"{config['linear_num_key_heads']} key heads")

    def gguf_metadata(self, writer, config):
        rope = config.get("rope_parameters") or {}
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        rotary = int(head_dim * rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25)))
        sections = list(rope.get("mrope_section") or [rotary // 2])
        if sum(sections) != rotary // 2:
            raise ModelError(f"mrope_section {sections} does not cover the {rotary // 2} rotary pairs")
        writer.add_rope_dimension_count(rotary)
        writer.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
        writer.add_ssm_conv_kernel(config["linear_conv_kernel_dim"])
        writer.add_ssm_state_size(config["linear_key_head_dim"])
        writer.add_ssm_group_count(config["linear_num_key_heads"])
        writer.add_ssm_time_step_rank(config["linear_num_value_heads"])
        writer.add_ssm_inner_size(config["linear_value_head_dim"] * config["linear_num_value_heads"])
        writer.add_full_attention_interval(config.get("full_attention_interval", 4))


FAMILIES = [Qwen35()]
