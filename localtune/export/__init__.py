"""Fuse a run's adapters into its base, write GGUF for llama.cpp, and prove both.

`fuse` folds every stage's adapters into the base (dequantizing a quantized base first) and
checks the fused model's next-token distributions against base + adapters. `write_gguf`
writes a GGUF file with the `gguf` package: llama.cpp's tensor names and q/k row order, the
tokenizer (SentencePiece or byte-level BPE) and chat template. `verify_gguf` loads the file in
llama.cpp (llama-cpp-python) and compares its logits, tokens and greedy text with MLX's.
"""
from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import LocaltuneError, ModelError
from ..models import families

QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")  # q4_k_m: llama.cpp's own quantizer, from an f16 file

# Prompts for the parity checks when a run has no held-out data of its own.
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "Date: 5 March 2021", "1, 2, 3, 5, 8, 13,"]


# ---------------------------------------------------------------------------------------------
# Parity: how far one model's next-token distributions are from another's.


@dataclass
class Parity:
    max_abs_logit: float
    mean_kl: float  # KL(reference || candidate), nats per position
    top1: float  # share of positions with the same argmax

    def row(self) -> str:
        return f"max |dlogit| {self.max_abs_logit:.4g} · mean KL {self.mean_kl:.3g} · top-1 {self.top1:.1%}"


def parity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Parity:
    """Compare per-prompt (T, V) logits position by position."""
    a = np.concatenate(reference).astype(np.float64)
    b = np.concatenate(candidate).astype(np.float64)
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return Parity(float(np.abs(a - b).max()), float(kl.mean()), float((a.argmax(-1) == b.argmax(-1)).mean()))


def mlx_logits(model, token_lists: list[list[int]]) -> list[np.ndarray]:
    out = []
    for tokens in token_lists:
        logits = model(mx.array(tokens)[None]).astype(mx.float32)
        out.append(np.array(logits[0]))
    return out


def prompt_tokens(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [list(tokenizer.encode(p)) for p in prompts]


# ---------------------------------------------------------------------------------------------
# Results (what the Python API returns; `--json` prints them)


@dataclass
class FuseResult:
    path: Path
    adapter_effect: Parity  # base + adapters vs the base
    fused_vs_adapters: Parity
    effect_kept: float
    quantized_bits: int | None

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


@dataclass
class ExportResult:
    path: Path
    quant: str
    tensors: dict  # GGUF tensor type -> count
    size_bytes: int
    seconds: float  # fold + write (+ quantize), not the verification
    fused_vs_adapters: Parity | None  # for a run
    verify: dict | None = None
    modelfile: Path | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path), "modelfile": str(self.modelfile) if self.modelfile else None}


# ---------------------------------------------------------------------------------------------
# Fuse


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
    from ..run import Run, is_run_dir

    path = Path(target)
    run, stage = None, None
    if is_run_dir(path):
        run = path
    elif is_run_dir(path.parent):
        run, stage = path.parent, path.name
    bom, unfinished = None, ()
    if run is not None:
        from ..integrity.bom import bill_of_materials
        from ..train.pipeline import finished_chain, folder_of, model_folder, student_stage

        manifest = Run.open(run).manifest()
        bom = bill_of_materials(manifest["provenance"]) if "provenance" in manifest else None
        parsed, stages, unfinished = finished_chain(run, stage)  # before anything loads
        if (student := student_stage(stages)) is not None:  # the run's model is the student
            folder = folder_of(parsed, student.student, "student")
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
    return Source(run, stage, folder, name, license, bom, tuple(unfinished))


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
    from ..train.pipeline import load_for_inference

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
    limit = 1e-4 if not quantize else max(1e-3, 0.5 * effect.mean_kl)
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


# ---------------------------------------------------------------------------------------------
# GGUF


def check_architecture(config: dict, where: str, capability: str = "gguf_export") -> families.Family:
    """The model's family, when it can be exported as GGUF (or as a GGUF LoRA adapter)."""
    family = families.require(config.get("model_type"), capability, where)
    family.check_config(config, where)
    return family


def gguf_tensors(model: nn.Module, config: dict, family: families.Family):
    """(gguf name, float32 array) for every weight, in llama.cpp's names and layout."""
    import gguf
    from mlx.utils import tree_flatten

    arch = family.gguf_arch
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    for name, value in tree_flatten(model.parameters()):
        if name.endswith((".scales", ".biases")) or "rotary_emb" in name:
            raise ModelError(f"{name}: quantized or unexpected tensor in a model to export (fold and dequantize first)")
        target = names.get_name(family.tensor_name(name), try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"{name}: no GGUF tensor name for it in architecture {arch}")
        yield target, family.to_gguf(name, np.array(value.astype(mx.float32)), config)
    yield from family.gguf_config_tensors(config)


def _sentencepiece_vocab(folder: Path, vocab_size: int):
    """tokenizer.model's pieces, scores and kinds (SentencePiece's piece types are GGUF's token types)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [gguf.TokenType.UNUSED] * vocab_size
    for i, piece in enumerate(proto.pieces[:vocab_size]):
        tokens[i], scores[i], types[i] = piece.piece.encode(), piece.score, gguf.TokenType(piece.type)
    return tokens, scores, types


def _space_prefix(folder: Path) -> bool:
    """Does SentencePiece tokenization start with a "▁" (llama.cpp's add_space_prefix)?"""
    if (folder / "tokenizer.json").exists():  # what mlx-lm tokenizes with
        tj = json.loads((folder / "tokenizer.json").read_text())
        steps = [tj.get("pre_tokenizer") or {}, tj.get("normalizer") or {}]
        steps += [x for s in steps for x in s.get("pretokenizers", s.get("normalizers", []))]
        for step in steps:
            if step.get("type") == "Metaspace":
                return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
            if step.get("type") == "Prepend":
                return True
        return False
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    return proto.normalizer_spec.add_dummy_prefix


def _bpe_pre(tokenizer_json: dict, where: str) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, from its split regexes."""
    from ..models.gguf_tokenizer import _PRE_TOKENIZERS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    splits = [s["pattern"]["Regex"] for s in steps if s.get("type") == "Split" and "Regex" in s.get("pattern", {})]
    if any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps):
        splits = [r"\p{N}"] + splits
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        from ..models.gguf_tokenizer import _GPT2_SPLIT

        splits = splits + [_GPT2_SPLIT]
    for name, (known, _, _) in _PRE_TOKENIZERS.items():
        if known == splits:
            return name
    raise ModelError(f"{where}: cannot tell which llama.cpp pre-tokenizer matches this tokenizer's splits "
                     f"{splits}\n  fix: this tokenizer is not supported for GGUF export yet")


def add_tokenizer(writer, folder: Path, config: dict) -> None:
    import gguf

    tj_path = folder / "tokenizer.json"
    tc = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
    vocab_size = config["vocab_size"]
    if (folder / "tokenizer.model").exists():
        tokens, scores, types = _sentencepiece_vocab(folder, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_space_prefix(folder))
    else:
        if not tj_path.exists():
            raise ModelError(f"{folder}: no tokenizer.model or tokenizer.json to export")
        tj = json.loads(tj_path.read_text())
        if tj["model"]["type"] != "BPE":
            raise ModelError(f"{tj_path}: tokenizer model {tj['model']['type']!r}; GGUF export supports BPE")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_bpe_pre(tj, str(tj_path)))
        tokens = [f"[PAD{i}]" for i in range(vocab_size)]
        types = [gguf.TokenType.UNUSED] * vocab_size
        for text, i in tj["model"]["vocab"].items():
            if i < vocab_size:
                tokens[i], types[i] = text, gguf.TokenType.NORMAL
        writer.add_token_list(tokens)
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
        writer.add_token_merges(merges)
    added = json.loads(tj_path.read_text()).get("added_tokens", []) if tj_path.exists() else []
    ids = {}
    for t in added:
        if t["id"] < vocab_size:
            ids[t["content"]] = t["id"]
            if types[t["id"]] in (gguf.TokenType.NORMAL, gguf.TokenType.UNUSED, gguf.TokenType.USER_DEFINED):
                # a declared special token is control; SentencePiece's unknown, control and byte kinds stay
                types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_token_types([int(t) for t in types])

    def token_id(key):
        value = tc.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return ids.get(value) if value is not None else None

    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        if (i := token_id(key)) is not None:
            add(i)
    writer.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    if template := chat_template(folder, tc):
        writer.add_chat_template(template)


def chat_template(folder: Path, tokenizer_config: dict) -> str | list | None:
    """The folder's chat template: tokenizer_config.json's, else chat_template.jinja (or .json),
    where recent Hugging Face repos keep it (Qwen3, Gemma 3) and transformers reads it from."""
    if template := tokenizer_config.get("chat_template"):
        return template
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


def write_gguf(model: nn.Module, config: dict, tokenizer_folder: Path, out: str | Path, quant: str,
               name: str, license: str | None = None, extra: dict | None = None) -> dict:
    """Write `out` atomically (temp file + rename). Returns {tensor type: count}."""
    import gguf

    if quant not in QUANTS:
        raise LocaltuneError(f"--quant {quant}: not available; choose from {', '.join(QUANTS)}")
    family = check_architecture(config, str(tokenizer_folder))
    out = Path(out)
    if quant == "q4_k_m":  # gguf-py has no K-quant encoder: llama.cpp quantizes its own f16 file
        quantize = _llama_quantizer()
        fd, f16 = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".f16.tmp")
        os.close(fd)
        try:
            write_gguf(model, config, tokenizer_folder, f16, "f16", name, license, extra)
            return quantize(Path(f16), out)
        finally:
            Path(f16).unlink(missing_ok=True)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    counts: dict[str, int] = {}
    with atomic_gguf(out, family.gguf_arch) as w:
        w.add_type("model")
        w.add_name(family.gguf_name(name, Path(tokenizer_folder)))
        if license:
            w.add_license(license)
        for key, value in (extra or {}).items():
            w.add_string(key, value)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        w.add_context_length(config.get("max_position_embeddings", 2048))
        w.add_embedding_length(config["hidden_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(heads)
        w.add_head_count_kv(config.get("num_key_value_heads", heads))
        rope = config.get("rope_parameters") or {}  # transformers 5 keeps rope_theta there
        w.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
        if "head_dim" in config:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        family.gguf_metadata(w, config)
        add_tokenizer(w, Path(tokenizer_folder), config)
        for tname, array in gguf_tensors(model, config, family):
            kind = qtype
            if kind == gguf.GGMLQuantizationType.Q4_0 and tname in ("token_embd.weight", "output.weight"):
                kind = gguf.GGMLQuantizationType.Q8_0  # the vocabulary projections lose most at 4 bits
            if array.ndim <= 1 or tname.endswith(("_norm.weight", *family.f32_tensors)):  # norms; a family's
                # float-only tensors (a MoE router, Qwen3.5's conv)
                kind = gguf.GGMLQuantizationType.F32
            elif kind != gguf.GGMLQuantizationType.F16 and array.shape[-1] % 32:
                kind = gguf.GGMLQuantizationType.F16  # rows not a whole number of blocks
            if kind == gguf.GGMLQuantizationType.F32:
                w.add_tensor(tname, array.astype(np.float32))
            elif kind == gguf.GGMLQuantizationType.F16:
                w.add_tensor(tname, array.astype(np.float16))
            else:
                w.add_tensor(tname, gguf.quants.quantize(array, kind), raw_dtype=kind)
            counts[kind.name] = counts.get(kind.name, 0) + 1
    return counts


@contextlib.contextmanager
def atomic_gguf(out: Path, arch: str):
    """A GGUFWriter on a temp file beside `out`: written and renamed into place when the block ends."""
    import gguf

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        yield w
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _publish(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _publish(tmp: str, out: Path) -> None:
    """fsync, the usual permissions (mkstemp makes 0600), then rename into place."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)


def _llama_quantizer():
    try:
        import llama_cpp
    except ImportError:
        raise LocaltuneError("--quant q4_k_m uses llama.cpp's quantizer, from llama-cpp-python\n"
                             "  fix: pip install llama-cpp-python, or choose --quant q4_0 / q8_0 / f16") from None

    def quantize(src: Path, out: Path) -> dict:
        import gguf

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
        params.nthread = os.cpu_count() or 2
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        try:
            if llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), ctypes.byref(params)) != 0:
                raise LocaltuneError(f"{out}: llama.cpp's quantizer failed on {src}")
            _publish(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
        counts: dict[str, int] = {}
        for t in gguf.GGUFReader(out).tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    return quantize


# ---------------------------------------------------------------------------------------------
# Verify in llama.cpp

# f16 and q4_k_m (llama.cpp's own quantizer): absolute limits, llama.cpp vs the float MLX model,
# (max mean KL, min top-1 agreement). q8_0 and q4_0 (our encoder): no worse than llama.cpp's own
# quantizer given the same f16 weights, by REFERENCE_SLACK (KL x 1.25 + 0.005, top-1 - 4 points).
TOLERANCE = {"f16": (1e-3, 0.98), "q4_k_m": (0.15, 0.80)}  # q4_k_m: gross errors only
REFERENCE_SLACK = (1.25, 0.005, 0.04)


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_greedy(llm, tokens: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy continuation, decoding one token at a time on its KV cache."""
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def greedy(next_logits, tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    for _ in range(n):
        out.append(int(np.argmax(next_logits(out)[-1])))
    return out[len(tokens):]


def _llama(path):
    from llama_cpp import Llama

    # an F32 KV cache: the default F16 one alone limits agreement to about 1e-3
    return Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=os.cpu_count() or 2,
                 type_k=0, type_v=0)


def reference_quantization(model, config, tokenizer_folder: Path, quant: str, tokens) -> Parity:
    """How far llama.cpp's own quantizer lands from the MLX model, from the same f16 weights."""
    import gguf
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        f16, ref = Path(tmp) / "f16.gguf", Path(tmp) / f"{quant}.gguf"
        write_gguf(model, config, tokenizer_folder, f16, "f16", "reference")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
        params.nthread = os.cpu_count() or 2
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(ref).encode(), ctypes.byref(params)) != 0:
            raise LocaltuneError(f"llama.cpp's quantizer failed on {f16}")
        llm = _llama(ref)
        return parity(mlx_logits(model, tokens), [llama_logits(llm, t) for t in tokens])


def verify_gguf(path: str | Path, model, tokenizer, quant: str, config: dict | None = None,
                tokenizer_folder: Path | None = None, n_generate: int = 16, report=print,
                original: Path | None = None) -> dict:
    """Load `path` in llama.cpp; compare tokens, logits and greedy text with the MLX model, and
    the tokens with llama.cpp's of `original` (the GGUF the base was imported from), if given.

    Prints a table; raises LocaltuneError when a check is beyond the type's tolerance.
    """
    from ..models.tokenizer_check import LlamaVocab, compare

    try:
        llm = _llama(path)
    except ImportError:
        raise LocaltuneError("--verify needs llama-cpp-python\n  fix: pip install 'localtune[dev]'") from None
    tokenizer_check = compare(LlamaVocab.of(llm), tokenizer, original)
    tokens = prompt_tokens(tokenizer, PROMPTS)
    result = parity(mlx_logits(model, tokens), [llama_logits(llm, t) for t in tokens])
    same_text = 0
    for t in tokens:
        ours = greedy(lambda seq: np.array(model(mx.array(seq)[None])[0].astype(mx.float32)), t, n_generate)
        theirs = llama_greedy(llm, t, n_generate)
        same_text += ours == theirs
    if quant in TOLERANCE:
        max_kl, min_top1 = TOLERANCE[quant]
        against = "limit"
    else:
        ref = reference_quantization(model, config, tokenizer_folder, quant, tokens)
        factor, extra, points = REFERENCE_SLACK
        max_kl, min_top1 = ref.mean_kl * factor + extra, ref.top1 - points
        against = f"limit (llama.cpp's own {quant}: KL {ref.mean_kl:.3g}, top-1 {ref.top1:.1%})"
    rows = [("mean KL (nats/token)", f"{result.mean_kl:.3g}", f"<= {max_kl:.3g}"),
            ("top-1 agreement", f"{result.top1:.1%}", f">= {min_top1:.1%}"),
            ("max logit difference", f"{result.max_abs_logit:.4g}", ""),
            (f"greedy {n_generate} tokens identical", f"{same_text}/{len(tokens)} prompts",
             "all" if quant == "f16" else ""),
            *tokenizer_check.rows]
    report(f"llama.cpp vs MLX, {quant}, {len(tokens)} prompts:")
    report(f"| check | llama.cpp | {against} |\n|---|---|---|")
    for row in rows:
        report("| " + " | ".join(row) + " |")
    problems = tokenizer_check.problems[:3]  # the first few say enough
    if result.mean_kl > max_kl or result.top1 < min_top1:
        problems.append(f"mean KL {result.mean_kl:.3g} / top-1 {result.top1:.1%} is beyond {quant}'s tolerance "
                        f"(KL <= {max_kl:.3g}, top-1 >= {min_top1:.1%})")
    if quant == "f16" and same_text < len(tokens):
        problems.append(f"greedy text differs on {len(tokens) - same_text} prompts (f16 must match)")
    if problems:
        raise LocaltuneError(f"{path}: llama.cpp does not reproduce the model (the file was removed):\n  "
                             + "\n  ".join(problems))
    return {"quant": quant, **result.__dict__, "greedy_identical": same_text, "prompts": len(tokens),
            "max_kl": max_kl, "min_top1": min_top1, "tokenizer": tokenizer_check.to_dict()}


# ---------------------------------------------------------------------------------------------
# Ollama

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}<|im_start|>assistant\n")


def _chatml(messages: list[dict]) -> str:
    """What CHATML renders in Ollama (system messages included), in Python."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_modelfile(tokenizer, gguf_name: str) -> str:
    """A Modelfile for `ollama create`: FROM the GGUF, TEMPLATE, SYSTEM default, stop tokens.

    The chat template is translated when it is ChatML; the translation is checked by rendering
    both on sample conversations. Anything else raises: write TEMPLATE by hand.
    """
    def render(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos + "<|im_start|>"):  # llama.cpp adds BOS itself
            return text[len(bos):]
        return text

    system = None
    alone = render([{"role": "user", "content": "Hi"}])
    if alone.startswith("<|im_start|>system\n"):  # a default system prompt
        system = alone[len("<|im_start|>system\n"):alone.index("<|im_end|>")]
    samples = [[{"role": "user", "content": "Hi"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
               [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}]]
    for messages in samples:
        with_default = messages if messages[0]["role"] == "system" or system is None else \
            [{"role": "system", "content": system}] + messages
        if render(messages) != _chatml(with_default):
            raise LocaltuneError("--ollama: this chat template is not ChatML, and only ChatML is translated to "
                                 "Ollama's TEMPLATE\n  fix: export without --ollama and write the Modelfile's "
                                 "TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md)")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{CHATML}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in ("<|im_end|>", "<|im_start|>"):
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The scripting entry point (the CLI's `export` calls it)


def export_gguf(target: str, out: str | Path, quant: str = "f16", verify: bool = False,
                ollama: bool = False, report=print) -> ExportResult:
    """RUN, RUN/stage or a model reference -> a GGUF file at `out`; with `verify`, checked in
    llama.cpp (a file that fails is removed, and LocaltuneError raised); with `ollama`, also a
    Modelfile beside it."""
    import time

    t0 = time.perf_counter()
    source = resolve(target)
    check_architecture(models_config(source), str(source.folder))  # before anything loads or is written
    note_unfinished(source, report)
    model, tokenizer, config, drift = fused(source)
    modelfile = ollama_modelfile(tokenizer, Path(out).name) if ollama else None  # refuses before writing
    if source.run is not None:
        report(f"fused vs adapters: {drift.row()}")
    name, extra = source.metadata(report)
    counts = write_gguf(model, config, source.folder, out, quant, name, source.license, extra)
    result = ExportResult(Path(out), quant, counts, Path(out).stat().st_size, time.perf_counter() - t0,
                          drift if source.run is not None else None)
    report(f"{out}: {sum(counts.values())} tensors ({', '.join(f'{n} {k}' for k, n in counts.items())}), "
           f"{result.size_bytes / 1e6:.0f} MB in {result.seconds:.1f}s")
    if verify:
        try:
            from ..models.gguf_import import imported_from

            result.verify = verify_gguf(out, model, tokenizer, quant, config, source.folder, report=report,
                                        original=imported_from(source.folder))
        except LocaltuneError:
            Path(out).unlink(missing_ok=True)  # never leave a file that failed its check
            raise
    if modelfile:
        result.modelfile = Path(out).with_name("Modelfile")
        fd, tmp = tempfile.mkstemp(dir=result.modelfile.parent, prefix=".Modelfile.")
        with os.fdopen(fd, "w") as f:
            f.write(modelfile)
        _publish(tmp, result.modelfile)
        report(f"{result.modelfile}: ollama create NAME -f {result.modelfile}")
    return result
