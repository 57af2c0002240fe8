"""Attach LoRA / DoRA (mlx-lm's layers) or unfreeze for full fine-tuning; save in mlx-lm's format."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..errors import ModelError, RecipeError
from ..models import is_quantized
from ..run.damage import DamagedFile, load_safetensors, read_json
from ..run.files import atomic_path, atomic_write, disk_error

LORA = (LoRALinear, DoRALinear, LoRASwitchLinear)  # LoRASwitchLinear: a LoRA per expert, (E, r, in) (E, out, r)
LINEAR = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)  # Switch: stacked MoE experts


def block_linear_names(model: nn.Module) -> list[str]:
    """The linear layers of every block, as mlx-lm's linear_to_lora_layers collects them: blocks
    differ in hybrid models (Qwen3.5's linear-attention and attention layers, Gemma 4's KV-shared
    ones), and an adapter config listing the first block's alone would drop the others' adapters."""
    return sorted(set().union(*(linear_names(block) for block in model.layers)))


def linear_names(block: nn.Module) -> list[str]:
    """The block's linear layers, an earlier stage's adapted layer counting as the layer it adapts."""
    names = {name for name, m in block.named_modules() if isinstance(m, (*LINEAR, *LORA))}
    return sorted(n for n in names if not any(n.startswith(o + ".") for o in names))


def stage_adapters(model: nn.Module) -> list[nn.Module]:
    """This stage's adapter layers: the trainable ones. Earlier stages' are frozen, fused or stacked."""
    return [m for _, m in model.named_modules() if isinstance(m, LORA) and "lora_a" in m.trainable_parameters()]


def _stack(model: nn.Module, num_layers: int, lora: dict, dora: bool) -> None:
    """Like mlx-lm's linear_to_lora_layers, but a layer that already holds an earlier stage's
    adapter is wrapped: y = (W x + s1 B1 A1 x) + s2 B2 A2 x, the earlier adapter frozen."""
    if not any(isinstance(m, LORA) for _, m in model.named_modules()):
        linear_to_lora_layers(model, num_layers, lora, use_dora=dora)
        return
    if dora:
        raise RecipeError("adapter.type: DoRA cannot stack on an earlier stage's unfused adapters (a quantized "
                          "base keeps them unfused)\n  fix: use type = \"lora\" for this stage")
    keys = lora["keys"] or block_linear_names(model)
    for block in model.layers[len(model.layers) - num_layers:]:
        modules = dict(block.named_modules())
        new = []
        for key in (k for k in keys if k in modules):
            new.append((key, _wrap(modules[key], lora)))
        block.update_modules(tree_unflatten(new))


def _wrap(m: nn.Module, lora: dict) -> nn.Module:
    """A new LoRA layer around `m`: a base linear (or expert stack), or an earlier stage's LoRA."""
    rank, dropout, scale = lora["rank"], lora["dropout"], lora["scale"]
    if isinstance(m, LoRASwitchLinear):  # lora_a (E, r, in), lora_b (E, out, r)
        layer = LoRASwitchLinear(m.lora_a.shape[2], m.lora_b.shape[1], m.num_experts, rank, dropout, scale)
    elif isinstance(m, LORA):  # lora_a (in, r), lora_b (r, out)
        layer = LoRALinear(m.lora_a.shape[0], m.lora_b.shape[1], rank, dropout, scale)
    elif isinstance(m, (SwitchLinear, QuantizedSwitchLinear)):
        return LoRASwitchLinear.from_base(m, rank, dropout, scale)
    else:
        return LoRALinear.from_base(m, rank, dropout, scale)
    layer.linear = m
    return layer


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
    available = block_linear_names(model)
    keys = list(adapter.targets) if adapter.targets else None
    if keys:
        unknown = [k for k in keys if k not in available]
        if unknown:
            raise RecipeError(f"{where}.targets: {unknown} are not linear layers of a transformer block\n"
                              f"  fix: choose from {available}")
    lora = {"rank": adapter.rank, "scale": adapter.alpha / adapter.rank, "dropout": adapter.dropout,
            "keys": keys}
    _stack(model, num_layers, lora, adapter.type == "dora")
    config["lora_parameters"] = {**lora, "keys": keys or available}
    return config


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The model as it was before this stage's adapters, without a second copy of the weights.

    Each of this stage's LoRA / DoRA layers is swapped for the layer it wraps, W, for the
    duration: y = W x exactly, and the adapter's own matmuls are not run at all. W is the base
    with earlier stages' adapters: fused into a float base, or stacked underneath, unfused, on
    a quantized one.
    """
    names = stage_layers(model)
    layers = dict(model.named_modules())
    model.update_modules(tree_unflatten([(n, layers[n].linear) for n in names]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten([(n, layers[n]) for n in names]))


def side_adapters(model: nn.Module, folder: str | Path) -> tuple[dict, dict]:
    """Another stage's saved adapters, built on the model as this stage found it and kept aside.

    Returns ({module name: adapted layer}, their config). The layers wrap the same base weights
    as this stage's adapters (no copy); `swapped` puts them in place for a forward pass.
    """
    with adapters_disabled(model):
        before = {id(m) for _, m in model.named_modules()}
        config = load(model, folder)
        side = {n: m for n, m in model.named_modules() if isinstance(m, LORA) and id(m) not in before}
        model.update_modules(tree_unflatten([(n, m.linear) for n, m in side.items()]))
    for m in side.values():
        m.freeze()
    return side, config


@contextlib.contextmanager
def swapped(model: nn.Module, layers: dict):
    """The model with `layers` ({module name: layer}, from side_adapters) in place of its own."""
    own = dict(model.named_modules())
    model.update_modules(tree_unflatten(list(layers.items())))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten([(n, own[n]) for n in layers]))


def stage_layers(model: nn.Module) -> list[str]:
    """Names of this stage's adapter layers (trainable LoRA / DoRA): what adapters_disabled takes off."""
    return [n for n, m in model.named_modules() if isinstance(m, LORA) and "lora_a" in m.trainable_parameters()]


def detach(model: nn.Module) -> None:
    """Take this stage's adapters (and a reward head) off for good: a branch stage ends."""
    layers = dict(model.named_modules())
    model.update_modules(tree_unflatten([(n, layers[n].linear) for n in stage_layers(model)]))
    model.pop("reward_head", None)
    model.freeze()


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
    """mx.save_safetensors through a temp file + rename (mlx appends .safetensors to a name without it)."""
    try:
        with atomic_path(path, suffix=".safetensors") as tmp:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    except OSError as e:
        raise disk_error(e, path) from e
    except RuntimeError as e:  # mlx reports write failures as RuntimeError
        raise disk_error(OSError(28 if "space" in str(e).lower() else 5, str(e)), path) from e


def load(model: nn.Module, folder: str | Path) -> dict:
    """Apply saved adapters (ours or mlx-lm's) to a model; returns their config.

    Damaged or mismatched files are a DamagedFile / ModelError naming the file, never a traceback.
    """
    folder = Path(folder)
    fix = (f"copy {folder} back from another copy of this run (a finished stage's adapters cannot be "
           "rebuilt from the run directory); or train it again with `localtune run RECIPE`")
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such adapter folder\n"
                         "  fix: pass a stage folder holding adapters.safetensors and adapter_config.json")
    config = read_json(folder / "adapter_config.json", fix)
    weights = load_safetensors(folder / "adapters.safetensors", fix)
    try:
        if config.get("fine_tune_type", "lora") != "full":
            _stack(model, config["num_layers"], config["lora_parameters"], config.get("fine_tune_type") == "dora")
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedFile(folder / "adapter_config.json", f"not an adapter config this model takes ({e!r})",
                          fix) from None
    params = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        if name in params and params[name].shape != value.shape:
            raise DamagedFile(folder / "adapters.safetensors", f"{name} has shape {tuple(value.shape)}, but the "
                              f"model's is {tuple(params[name].shape)}: adapters of another model or config", fix)
    model.load_weights(list(weights.items()), strict=False)
    return config


def fuse(model: nn.Module) -> None:
    """Fold LoRA/DoRA into float base weights (exact up to rounding), innermost stage first."""
    if is_quantized(model):
        raise ModelError("fusing adapters into a quantized base would round them away\n"
                         "  fix: chain stages on a float base")
    while fused := [(n, m.fuse()) for n, m in model.named_modules()
                    if isinstance(m, LORA) and not isinstance(m.linear, LORA)]:
        model.update_modules(tree_unflatten(fused))


def next_stage(model: nn.Module) -> str:
    """Make this stage's adapters part of the model the next stage starts from.

    A float base: fuse them (exact). A quantized base: fusing would round them into 4-bit
    weights, so they stay as they are, frozen, and the next stage's adapters wrap them.
    """
    if is_quantized(model):
        model.freeze()
        return "stacked"
    fuse(model)
    return "fused"
