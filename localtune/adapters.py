"""Attach LoRA / DoRA (mlx-lm's layers) or unfreeze for full fine-tuning; save in mlx-lm's format."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .errors import ModelError, RecipeError
from .models import is_quantized
from .run import atomic_write, disk_error


def linear_names(block: nn.Module) -> list[str]:
    return sorted(name for name, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))


def attach(model: nn.Module, adapter, where: str = "adapter") -> dict:
    """Freeze the base and add trainable adapters. Returns mlx-lm's adapter_config.json dict.

    `adapter` is recipe.Adapter; `where` names the recipe table for errors.
    """
    n_blocks = len(model.layers)
    num_layers = n_blocks if adapter.layers == -1 else adapter.layers
    if num_layers > n_blocks:
        raise RecipeError(f"{where}.layers: asked for {num_layers} adapted layers but the model has {n_blocks}\n"
                          f"  fix: set layers = {n_blocks} (or -1 for all)")
    model.freeze()
    config = {"fine_tune_type": adapter.type, "num_layers": num_layers}
    if adapter.type == "full":
        if is_quantized(model):
            raise RecipeError(f"{where}.type: full fine-tuning needs a float base, but this base is quantized\n"
                              '  fix: use type = "lora" (QLoRA), or load a float model without [model.quantize]')
        for block in model.layers[n_blocks - num_layers:]:
            block.unfreeze()
        return config
    available = linear_names(model.layers[0])
    keys = list(adapter.targets) if adapter.targets else None
    if keys:
        unknown = [k for k in keys if k not in available]
        if unknown:
            raise RecipeError(f"{where}.targets: {unknown} are not linear layers of a transformer block\n"
                              f"  fix: choose from {available}")
    lora = {"rank": adapter.rank, "scale": adapter.alpha / adapter.rank, "dropout": adapter.dropout,
            "keys": keys}
    linear_to_lora_layers(model, num_layers, lora, use_dora=adapter.type == "dora")
    config["lora_parameters"] = {**lora, "keys": keys or available}
    return config


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The model as it was before this stage's LoRA adapters: their scale is 0 inside the block.

    y = W x + s * B A x with s = 0 is exactly W x, so a reference model costs no second copy
    of the weights. (DoRA's magnitude rescales W itself; it is not switched off here.)
    """
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save(model: nn.Module, folder: str | Path, config: dict) -> Path:
    """adapters.safetensors + adapter_config.json, loadable with `mlx_lm ... --adapter-path folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_arrays(folder / "adapters.safetensors", trainable_weights(model))
    atomic_write(folder / "adapter_config.json", json.dumps(config, indent=2))
    return folder


def save_arrays(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    """mx.save_safetensors through a temp file + rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".safetensors")
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise disk_error(e, path) from e
    except RuntimeError as e:  # mlx reports write failures as RuntimeError
        Path(tmp).unlink(missing_ok=True)
        raise disk_error(OSError(28 if "space" in str(e).lower() else 5, str(e)), path) from e


def load(model: nn.Module, folder: str | Path) -> dict:
    """Apply saved adapters (ours or mlx-lm's) to a model; returns their config."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        weights = mx.load(str(folder / "adapters.safetensors"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}: cannot read adapters ({e})\n"
                         "  fix: pass a stage folder holding adapters.safetensors and adapter_config.json")
    if config.get("fine_tune_type", "lora") != "full":
        linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"],
                              use_dora=config.get("fine_tune_type") == "dora")
    model.load_weights(list(weights.items()), strict=False)
    return config


def fuse(model: nn.Module) -> None:
    """Fold LoRA/DoRA into float base weights (exact up to rounding)."""
    if is_quantized(model):
        raise ModelError("fusing adapters into a quantized base would round them away\n"
                         "  fix: chain stages on a float base")
    fused = [(n, m.fuse()) for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]
    if fused:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(fused))
