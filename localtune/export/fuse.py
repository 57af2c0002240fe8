"""Fuse: fold every stage's adapters into the base, and prove the fused model is base + adapters.

`resolve` says what to export (a run, RUN/stage, or a plain model); `fused` gives the float model
with the adapters folded in, for the GGUF writer; `fuse` writes it as an MLX / Hugging Face folder
carrying the base's tokenizer, template and license files, and a record of where it came from.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.nn as nn

from .. import device
from ..errors import LocaltuneError
from .verify import PROMPTS, Parity, mlx_logits, parity, prompt_tokens


@dataclass
class FuseResult:  # what the Python API returns; `--json` prints it
    path: Path
    adapter_effect: Parity  # base + adapters vs the base
    fused_vs_adapters: Parity
    effect_kept: float
    quantized_bits: int | None

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def fold_adapters(model: nn.Module, dequantize: bool) -> None:
    """Fold every stage's adapters in, innermost first; a quantized base is dequantized first."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    from ..train import adapters

    while fused := [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
                    if isinstance(m, adapters.LORA) and not isinstance(m.linear, adapters.LORA)]:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)


@dataclass
class Source:
    """What to export: a run (base + its stages' adapters, up to `stage`) or a plain model."""

    run: Path | None
    stage: str | None
    folder: Path  # the base model folder: config, tokenizer files
    name: str
    license: str | None
    provenance: dict | None = None  # the run's data bill of materials
    unfinished: tuple = ()  # stages of RUN left out: they have not finished (pipeline.finished_chain)
    chat_template: str | None = None  # the run's [model] chat_template, replacing the base's

    def metadata(self, report=print) -> tuple[str, dict]:
        """(general.name, extra GGUF keys): the bill of materials, and a name prefix its licenses require."""
        from ..integrity.bom import name_prefix

        if not self.provenance:
            return self.name, {}
        name, prefix = self.name, name_prefix(self.provenance)
        if prefix and not name.lower().startswith(prefix.lower()):
            name = f"{prefix}-{name}"
            report(f"general.name = {name!r}: a teacher's or dataset's license requires the prefix {prefix!r}")
        return name, {"localtune.provenance": json.dumps(self.provenance, separators=(",", ":"))}


def resolve(target: str) -> Source:
    """RUN, RUN/stage, or a model reference (folder, repo id, .gguf, pkg:)."""
    from .. import models
    from ..loading import parse_target
    from ..run import Run

    parsed_target = parse_target(target)
    run, stage = parsed_target.run, parsed_target.stage
    bom, unfinished, template = None, (), None
    if run is not None:
        from ..integrity.bom import bill_of_materials
        from ..loading import finished_chain, folder_of, model_folder, starting_model

        manifest = Run.open(run).manifest()
        bom = bill_of_materials(manifest["provenance"]) if "provenance" in manifest else None
        parsed, stages, unfinished = finished_chain(run, stage)  # before anything loads
        template = parsed.chat_template()
        if (start := starting_model(stages)) is not None:  # the run's model is a distill student
            folder = folder_of(parsed, start, "student")
        else:
            folder = model_folder(run)
        if not (folder / "config.json").exists():
            raise LocaltuneError(f"{run}: its base model folder {folder} has no config.json (moved or deleted?)\n"
                                 "  fix: put the model back where the run found it, or import it again")
        name = run.name + (f"/{stage}" if stage else "")
    else:
        folder = models.resolve(target)
        name = folder.name
    fuse_record = _record(folder / FUSE_RECORD)  # a fused folder keeps its run's license and materials
    license = _record(folder / "localtune-import.json").get("license") or fuse_record.get("license")
    if run is None:
        bom = fuse_record.get("provenance")
    return Source(run, stage, folder, name, license, bom, tuple(unfinished), template)


def _record(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError as e:
        raise LocaltuneError(f"{path}: not valid JSON ({e})\n  fix: restore the file, or delete it and fuse "
                             "or import again") from None


def note_unfinished(source: Source, report) -> None:
    if source.unfinished:
        report(f"{', '.join(source.unfinished)}: not finished (still training, or stopped); left out, so this "
               "is the model of the finished stages only")


def models_config(source: Source) -> dict:
    from .. import models

    return models.read_config(source.folder)


def load_unfused(source: Source):
    from ..loading import load_for_inference

    if source.run is None:
        return load_for_inference(str(source.folder))
    return load_for_inference(str(source.run), source.stage)


def fused(source: Source, tokens: list[list[int]] | None = None):
    """(float model with every adapter folded in, tokenizer, config, parity vs base + adapters)."""
    model, tokenizer = load_unfused(source)
    tokens = tokens or prompt_tokens(tokenizer, PROMPTS)
    adapted = mlx_logits(model, tokens)
    config = fold(model, source)
    return model, tokenizer, config, parity(adapted, mlx_logits(model, tokens))


def fold(model, source: Source) -> dict:
    """Fold the adapters in (dequantizing a quantized base); returns the float model's config."""
    from .. import models

    fold_adapters(model, dequantize=models.is_quantized(model))
    config = dict(models.read_config(source.folder))
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    return config


def fuse(target: str, out: str | Path, *, quantize: int | None = None, report=print) -> FuseResult:
    """Fuse a run (or run/stage) into an MLX / Hugging Face folder `out` that mlx_lm.load opens.

    Checks the fused model against base + adapters and against the base alone: it fails, and
    writes nothing, when the fused model lost the adapters' effect (mlx-lm #1172) or drifted.
    The folder carries the base's tokenizer, chat template, generation config and license files.
    """
    from mlx_lm.utils import quantize_model, save

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LocaltuneError(f"{out}: already exists\n  fix: choose a new folder, or remove it first")
    source = resolve(target)
    if source.run is None:
        raise LocaltuneError(f"{target}: not a run directory; fuse takes RUN or RUN/stage")
    note_unfinished(source, report)
    base, tokenizer = load_unfused(Source(None, None, source.folder, "", None))
    tokens = prompt_tokens(tokenizer, PROMPTS)
    base_logits = mlx_logits(base, tokens)
    del base
    model, tokenizer = load_unfused(source)
    adapted = mlx_logits(model, tokens)
    config = fold(model, source)
    if quantize:
        model, config = quantize_model(model, config, group_size=64, bits=quantize)
    effect, drift = parity(adapted, base_logits), parity(adapted, mlx_logits(model, tokens))
    kept = 1 - drift.mean_kl / effect.mean_kl if effect.mean_kl > 0 else 1.0
    report(f"adapters vs base:  {effect.row()}")
    report(f"fused vs adapters: {drift.row()}  (adapter effect kept: {kept:.1%})")
    # folding into 16-bit weights (Metal's bf16) rounds W + BA to 8 significant bits, as --quantize 8 does
    float_limit = 1e-4 if device.policy().dtype_bytes == 4 else 1e-3
    limit = float_limit if not quantize else max(1e-3, 0.5 * effect.mean_kl)
    if drift.mean_kl > limit or (quantize and kept < 0.5):  # float: a barely-trained adapter's tiny
        # effect would make `kept` rounding noise; the drift limit alone decides
        raise LocaltuneError(f"the fused model is not base + adapters: mean KL {drift.mean_kl:.3g} to it "
                             f"(limit {limit:.3g}); {kept:.0%} of the adapters' effect kept\n"
                             "  fix: fuse without --quantize, or with --quantize 8. Nothing was written.")
    result = FuseResult(out, effect, drift, kept, quantize)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        save(tmp, str(source.folder), model, tokenizer, config, donate_model=False)
        carry_over(source.folder, tmp)
        if source.chat_template:
            set_chat_template(tmp, source.chat_template)
        (tmp / FUSE_RECORD).write_text(json.dumps({"source": str(target), **result.to_dict(),
                                                   "license": source.license,
                                                   "provenance": source.provenance}, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# Besides config and weights, a model folder carries these; the fused folder gets the base's,
# byte for byte (mlx-lm's save drops tokenizer.model, and rewrites tokenizer_config.json without
# add_bos_token or the chat template, and README.md without the license).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "tokenizer.model.v*", "spiece.model", "tekken.json", "*.tiktoken",
                   "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "additional_chat_templates")
CARRIED_FILES = TOKENIZER_FILES + ("generation_config.json", "LICENSE*", "NOTICE*", "USE_POLICY*", "README.md")
FUSE_RECORD = "localtune-fuse.json"


def _matching(folder: Path, patterns: tuple) -> set[str]:
    return {p.name for p in folder.iterdir() if any(fnmatch.fnmatch(p.name.lower(), pat.lower()) for pat in patterns)}


def carry_over(base: Path, out: Path) -> list[str]:
    """Copy the base folder's tokenizer, template, generation config, license files and model card
    into `out` as they are; returns their names. Tokenizer files mlx-lm wrote that the base did
    not have (chat_template.jinja beside a template in tokenizer_config.json) are removed, so the
    fused folder's tokenizer is the base's, file for file."""
    carried = _matching(base, CARRIED_FILES)
    stale = _matching(out, TOKENIZER_FILES) if _matching(base, TOKENIZER_FILES) else set()
    for name in carried | stale:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for name in sorted(carried):
        if (base / name).is_dir():
            shutil.copytree(base / name, out / name)
        else:
            shutil.copyfile(base / name, out / name)  # follows symlinks (the Hugging Face cache's blobs)
    return sorted(carried)


def set_chat_template(folder: Path, template: str) -> None:
    """Make `template` the folder's one chat template: tokenizer_config.json's "chat_template", read by
    transformers, mlx-lm and the GGUF writer (a chat_template.jinja or .json would take precedence)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, "chat_template": template}, indent=2, ensure_ascii=False))
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
