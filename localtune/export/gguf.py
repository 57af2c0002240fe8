"""The GGUF writer: llama.cpp's tensor names and layout (through the model families), metadata,
the tokenizer (SentencePiece or byte-level BPE) and chat template, and the quantization types.

`export_gguf` is the entry point: resolve, fold, write, and (with `verify`) check in llama.cpp.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import LocaltuneError, ModelError
from ..models import families
from ..run.files import atomic_path, atomic_write
from .fuse import fused, models_config, note_unfinished, resolve
from .modelfile import ollama_modelfile
from .verify import Parity, verify_gguf

QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")  # q4_k_m: llama.cpp's own quantizer, from an f16 file


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
    from ..models.gguf_tokenizer import PRE_TOKENIZERS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    splits = [s["pattern"]["Regex"] for s in steps if s.get("type") == "Split" and "Regex" in s.get("pattern", {})]
    if any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps):
        splits = [r"\p{N}"] + splits
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        from ..models.gguf_tokenizer import GPT2_SPLIT

        splits = splits + [GPT2_SPLIT]
    for name, (known, _, _) in PRE_TOKENIZERS.items():
        if known == splits:
            return name
    raise ModelError(f"{where}: cannot tell which llama.cpp pre-tokenizer matches this tokenizer's splits "
                     f"{splits}\n  fix: this tokenizer is not supported for GGUF export yet")


def add_tokenizer(writer, folder: Path, config: dict, template: str | None = None) -> None:
    import gguf

    tj_path = folder / "tokenizer.json"
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
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
    if template := template or chat_template(folder, tc):
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
               name: str, license: str | None = None, extra: dict | None = None,
               chat_template: str | None = None) -> dict:
    """Write `out` atomically (temp file + rename). Returns {tensor type: count}. `chat_template`
    replaces the tokenizer folder's (a run's [model] chat_template)."""
    import gguf

    if quant not in QUANTS:
        raise LocaltuneError(f"--quant {quant}: not available; choose from {', '.join(QUANTS)}")
    family = check_architecture(config, str(tokenizer_folder))
    out = Path(out)
    if quant == "q4_k_m":  # gguf-py has no K-quant encoder: llama.cpp quantizes its own f16 file
        quantize = llama_quantizer()
        fd, f16 = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".f16.tmp")
        os.close(fd)
        try:
            write_gguf(model, config, tokenizer_folder, f16, "f16", name, license, extra, chat_template)
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
        add_tokenizer(w, Path(tokenizer_folder), config, chat_template)
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

    with atomic_path(out, shared=True) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        yield w
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def llama_quantizer():
    """llama.cpp's own quantizer (llama-cpp-python): quantize(f16 GGUF, out, file type) -> {tensor type: count}."""
    try:
        import llama_cpp
    except ImportError:
        raise LocaltuneError("--quant q4_k_m uses llama.cpp's quantizer, from llama-cpp-python\n"
                             "  fix: pip install llama-cpp-python, or choose --quant q4_0 / q8_0 / f16") from None

    def quantize(src: Path, out: Path, ftype=None) -> dict:
        import gguf

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(gguf.LlamaFileType.MOSTLY_Q4_K_M if ftype is None else ftype)
        params.nthread = os.cpu_count() or 2
        with atomic_path(out, shared=True) as tmp:
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise LocaltuneError(f"{out}: llama.cpp's quantizer failed on {src}")
        counts: dict[str, int] = {}
        for t in gguf.GGUFReader(out).tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    return quantize


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
    counts = write_gguf(model, config, source.folder, out, quant, name, source.license, extra,
                        source.chat_template)
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
        atomic_write(result.modelfile, modelfile, shared=True)
        report(f"{result.modelfile}: ollama create NAME -f {result.modelfile}")
    return result
