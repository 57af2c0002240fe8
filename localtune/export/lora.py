"""A run's LoRA adapters as one GGUF LoRA adapter, which llama.cpp applies to a base GGUF.

One base file, many small adapters: `llama-cli -m base.gguf --lora adapter.gguf`. Every LoRA
stage goes in, in order; their updates add, so they are concatenated along the rank:

    W' = W + sum_s scale_s B_s A_s = W + [scale_1 B_1 | scale_2 B_2 | ...] [A_1; A_2; ...]

Each stage's scale is folded into B and `adapter.lora.alpha` is left out, so llama.cpp's scale
is exactly the one given with `--lora-scaled FILE S` (1 with `--lora`).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import LocaltuneError
from .fuse import note_unfinished, resolve
from .gguf import atomic_gguf, check_architecture, write_gguf
from .verify import PROMPTS, llama_logits, mlx_logits, open_llama, parity, prompt_tokens, slack_limits


@dataclass
class LoraExportResult:
    path: Path
    base: Path | None  # the base GGUF it was verified on
    stages: list[str]
    tensors: int
    rank: dict  # total rank (all stages) -> number of adapted layers
    size_bytes: int
    seconds: float
    verify: dict | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path), "base": str(self.base) if self.base else None}


def _lora_stages(run: Path, stage: str | None) -> list[str]:
    """The stages to export, each checked to be plain LoRA (DoRA and full weights have no GGUF form)."""
    from ..loading import finished_chain
    from ..run.damage import read_json

    done = [s.name for s in finished_chain(run, stage)[1]]
    if not done:
        raise LocaltuneError(f"{run}: no stage has finished yet\n  fix: train first (localtune run), or wait "
                             f"for the first stage (`localtune watch {run}`)")
    for name in done:
        config = read_json(run / name / "adapter_config.json", f"copy {run / name} back from another copy of this run")
        kind = config.get("fine_tune_type", "lora")
        if kind != "lora":
            raise LocaltuneError(f"{run / name}: a {kind} stage cannot be a GGUF LoRA adapter (llama.cpp applies "
                                 "W + s B A only)\n  fix: export the fused model instead: "
                                 f"localtune export {run} --gguf --out FILE.gguf")
    return done


def load_stacked(run: Path, stages: list[str]):
    """Base + every stage's LoRA, each stage wrapping the one before and none fused."""
    from ..loading import chain, chain_base
    from ..train import adapters

    parsed, chained = chain(run, stages[-1])
    model, tokenizer, _ = chain_base(parsed, chained)
    for name in stages:
        model.freeze()
        adapters.load(model, run / name)
    return model, tokenizer, parsed


def lora_tensors(model, config: dict, family):
    """(name, array) pairs in llama.cpp's layout: `<tensor>.lora_a` (r, in), `<tensor>.lora_b` (out, r)."""
    import gguf
    from mlx_lm.tuner.lora import LoRASwitchLinear

    from ..train.adapters import LORA

    arch = family.gguf_arch
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    updates: dict[str, list] = {}
    for path, m in model.named_modules():
        if isinstance(m, LORA):
            base = path
            while base.endswith(".linear"):
                base = base[: -len(".linear")]
            updates.setdefault(base, []).append(m)
    for base, layers in sorted(updates.items()):
        target = names.get_name(family.tensor_name(base + ".weight"), try_suffixes=(".weight",))
        if target is None:
            raise LocaltuneError(f"{base}: no GGUF tensor name for it in architecture {arch}")
        layers.reverse()  # innermost (earliest stage) first
        if isinstance(layers[0], LoRASwitchLinear):  # experts: A (E, r, in), B (E, out, r), as llama.cpp's
            a = np.concatenate([np.array(m.lora_a.astype(mx.float32)) for m in layers], axis=1)  # mul_mat_id
            b = np.concatenate([np.array((m.scale * m.lora_b).astype(mx.float32)) for m in layers], axis=2)
        else:  # A (r, in), B (out, r)
            a = np.concatenate([np.array(m.lora_a.astype(mx.float32)).T for m in layers])
            b = np.concatenate([np.array((m.scale * m.lora_b).astype(mx.float32)).T for m in layers], axis=1)
        b = family.lora_b_to_gguf(base + ".weight", b, config)  # B's rows are W's rows
        a = family.lora_a_to_gguf(base + ".weight", a, config)  # A's columns are W's columns
        yield target + ".lora_a", a
        yield target + ".lora_b", b


def write_lora_gguf(model, config: dict, out: Path, name: str, extra: dict | None = None) -> tuple[int, dict]:
    """Write the adapter atomically. Returns (tensor count, {total rank: layers})."""
    family = check_architecture(config, name, "gguf_lora")
    count, ranks = 0, {}
    with atomic_gguf(out, family.gguf_arch) as w:
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_name(name)
        for key, value in (extra or {}).items():
            w.add_string(key, value)
        for tname, array in lora_tensors(model, config, family):
            w.add_tensor(tname, array.astype(np.float16))
            count += 1
            if tname.endswith(".lora_a"):  # (r, in), or (E, r, in) for experts
                ranks[array.shape[-2]] = ranks.get(array.shape[-2], 0) + 1
        if not count:
            raise LocaltuneError(f"{name}: the run has no LoRA layers to export")
    return count, ranks


def _base_gguf(source_folder: Path, quantize) -> Path | None:
    """The GGUF the run's base was imported from, if the run trained on it as it is."""
    from ..models.gguf_import import imported_from

    path = imported_from(source_folder) if quantize is None else None
    return path if path is not None and path.is_file() else None


def without_adapters(model):
    """Every LoRA layer swapped for the base layer underneath, in place (the base model)."""
    from mlx.utils import tree_unflatten

    from ..train.adapters import LORA

    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, LORA) and not path.endswith(".linear"):
            inner = m
            while isinstance(inner, LORA):
                inner = inner.linear
            swaps.append((path, inner))
    model.update_modules(tree_unflatten(swaps))


def verify_lora(adapter: Path, base: Path, model, tokenizer, report=print) -> dict:
    """llama.cpp (base GGUF + adapter) against MLX (base + adapters), judged by how far the two
    bases alone are apart, and the base GGUF's tokenizer against ours (an adapter has none).
    Raises LocaltuneError beyond that."""
    from ..models.tokenizer_check import LlamaVocab, compare

    tokens = prompt_tokens(tokenizer, PROMPTS)
    mlx_adapted = mlx_logits(model, tokens)
    without_adapters(model)
    mlx_base = mlx_logits(model, tokens)
    llm = open_llama(base)
    tokenizer_check = compare(LlamaVocab.of(llm), tokenizer)
    llama_base = [llama_logits(llm, t) for t in tokens]
    del llm
    llm = open_llama(base, lora=adapter)
    llama_adapted = [llama_logits(llm, t) for t in tokens]
    bases, adapted = parity(mlx_base, llama_base), parity(mlx_adapted, llama_adapted)
    effect, effect_llama = parity(mlx_adapted, mlx_base), parity(llama_adapted, llama_base)
    max_kl, min_top1 = slack_limits(bases)  # no further apart than the two bases without the adapter
    rows = [("mean KL (nats/token)", f"{adapted.mean_kl:.3g}", f"{bases.mean_kl:.3g}", f"<= {max_kl:.3g}"),
            ("top-1 agreement", f"{adapted.top1:.1%}", f"{bases.top1:.1%}", f">= {min_top1:.1%}"),
            ("max logit difference", f"{adapted.max_abs_logit:.4g}", f"{bases.max_abs_logit:.4g}", ""),
            ("adapter effect (KL to the base)", f"llama.cpp {effect_llama.mean_kl:.3g}",
             f"MLX {effect.mean_kl:.3g}", ""),
            *[(check, f"{base.name}: {result}", "", limit) for check, result, limit in tokenizer_check.rows]]
    report(f"llama.cpp ({base.name} + {adapter.name}) vs MLX (base + adapters), {len(tokens)} prompts:")
    report("| check | with the adapter | bases alone | limit |\n|---|---|---|---|")
    for row in rows:
        report("| " + " | ".join(row) + " |")
    if effect.mean_kl < max_kl:
        report(f"note: the adapters' effect (KL {effect.mean_kl:.3g}) is below what this check resolves "
               f"({max_kl:.3g}); a dropped adapter would pass")
    if adapted.mean_kl > max_kl or adapted.top1 < min_top1:
        raise LocaltuneError(f"{adapter}: llama.cpp with the adapter does not reproduce base + adapters (mean KL "
                             f"{adapted.mean_kl:.3g}, top-1 {adapted.top1:.1%}; limit KL <= {max_kl:.3g}, top-1 >= "
                             f"{min_top1:.1%}). The file was removed.")
    if tokenizer_check.problems:
        raise LocaltuneError(f"{adapter}: llama.cpp tokenizes with {base} unlike the model was trained (the file "
                             "was removed):\n  " + "\n  ".join(tokenizer_check.problems[:3]))
    return {"base": str(base), "mean_kl": adapted.mean_kl, "top1": adapted.top1,
            "max_abs_logit": adapted.max_abs_logit, "bases_mean_kl": bases.mean_kl, "bases_top1": bases.top1,
            "effect_mlx": effect.mean_kl, "effect_llama_cpp": effect_llama.mean_kl, "max_kl": max_kl,
            "min_top1": min_top1, "tokenizer": tokenizer_check.to_dict()}


def export_lora(target: str, out: str | Path, base: str | Path | None = None, verify: bool = False,
                report=print) -> LoraExportResult:
    """RUN or RUN/stage -> a GGUF LoRA adapter at `out`. With `verify`, llama.cpp applies it to
    `base` (default: the GGUF the run's base came from, else an f16 export of the base)."""
    from .. import models

    t0 = time.perf_counter()
    out = Path(out)
    source = resolve(target)
    if source.run is None:
        raise LocaltuneError(f"{target}: --lora exports a run's adapters; pass RUN or RUN/stage")
    config = models.read_config(source.folder)
    check_architecture(config, str(source.folder), "gguf_lora")
    if base is not None and not Path(base).is_file():
        raise LocaltuneError(f"--base {base}: no such file\n  fix: pass the base model's .gguf")
    stages = _lora_stages(source.run, source.stage)
    note_unfinished(source, report)
    model, tokenizer, parsed = load_stacked(source.run, stages)
    count, ranks = write_lora_gguf(model, config, out, *source.metadata(report))
    result = LoraExportResult(out, None, stages, count, ranks, out.stat().st_size, time.perf_counter() - t0)
    report(f"{out}: LoRA adapter of stages {', '.join(stages)}, {count} tensors, rank "
           f"{', '.join(f'{r} ({n} layers)' for r, n in ranks.items())}, {result.size_bytes / 1e6:.1f} MB")
    if not verify:
        return result
    from ..loading import chain, starting_model

    student = starting_model(chain(source.run, source.stage)[1]) is not None
    base = Path(base) if base else _base_gguf(source.folder, None if student else parsed.model.quantize)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".base.") as tmp:
        if base is None:  # a folder (or in-memory quantized) base: check against its f16 export
            base = Path(tmp) / "base-f16.gguf"
            plain = models.load(str(source.folder))[0]
            if models.is_quantized(plain):
                from mlx_lm.utils import dequantize_model

                plain = dequantize_model(plain)
            write_gguf(plain, config, source.folder, base, "f16", "base")
            del plain
            report("verifying on an f16 export of the base (make yours with: localtune export "
                   f"{source.folder} --gguf --out base.gguf)")
        try:
            result.verify = verify_lora(out, base, model, tokenizer, report=report)
        except LocaltuneError:
            out.unlink(missing_ok=True)
            raise
        result.base = base if base.parent != Path(tmp) else None
    return result
