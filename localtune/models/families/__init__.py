"""Model families: what differs per architecture between mlx-lm, Hugging Face and GGUF.

One file per family. A `Family` names its llama.cpp architecture, adds the family's keys to the
mlx-lm config built from a GGUF's metadata, changes tensor values where the two layouts differ
(llama's rotary row order, Gemma's 1 + w norms), and writes the metadata llama.cpp reads for it.
Tensor *names* are gguf-py's TensorNameMap, both ways. `support(model_type)` is one row of the
support matrix; `require` refuses a capability a family lacks, with the reason, before loading.
"""
from __future__ import annotations

import difflib

from ...errors import ModelError

CAPABILITIES = {  # matrix column -> what it means
    "load": "load an HF folder or repo id",
    "gguf_import": "GGUF import",
    "lora": "SFT LoRA",
    "qlora": "SFT QLoRA",
    "dora": "SFT DoRA",
    "dpo": "DPO",
    "ppo": "reward, PPO and GRPO heads",
    "distill": "logits distillation",
    "fuse": "fuse",
    "gguf_export": "GGUF export, verified",
    "gguf_lora": "GGUF LoRA adapter, verified",
}


def refused_everywhere(reason: str) -> dict[str, str]:
    """`limits` of a family registered only to say why it is not supported (a multimodal wrapper)."""
    return dict.fromkeys(CAPABILITIES, reason)


class Family:
    """Defaults: a llama-like decoder whose GGUF tensors equal its Hugging Face tensors."""

    name = ""  # the matrix row
    model_types: tuple[str, ...] = ()  # mlx-lm / Hugging Face model_type values
    gguf_arch: str | None = None  # llama.cpp's architecture name
    hf_class = ""  # config.json "architectures"
    plain_head = True  # logits == head(final hidden): no soft-capping or scaling after the norm
    partial_rotary = False  # rope.dimension_count may be below the head dim (import_config reads it)
    limits: dict[str, str] = {}  # capability -> why it is not supported; the rest are tested
    rope_types: tuple[str, ...] = ()  # GGUF rope.scaling.type values import_config reads itself
    f32_tensors: tuple[str, ...] = ()  # GGUF tensor names (suffixes) llama.cpp's kernels read only as float32
    chat_template: str | None = None  # for a GGUF without one (llama.cpp falls back to its built-in template)

    def import_config(self, meta: dict, get) -> dict:
        """Family keys of the mlx-lm config, from GGUF metadata (`get(key)` reads `arch.key`)."""
        return {}

    def tensor_name(self, name: str) -> str:
        """An mlx-lm module or parameter name -> the Hugging Face name gguf-py's TensorNameMap knows."""
        return name

    def from_gguf(self, name: str, w, config: dict):
        """A tensor's value as stored in GGUF -> as mlx-lm holds it (Hugging Face name)."""
        return w

    def to_gguf(self, name: str, w, config: dict):
        """Inverse of from_gguf, for export (numpy float32)."""
        return w

    def lora_b_to_gguf(self, name: str, b, config: dict):
        """A LoRA B matrix's rows follow its weight's rows: the same row order change."""
        return b

    def lora_a_to_gguf(self, name: str, a, config: dict):
        """A LoRA A matrix's columns follow its weight's columns."""
        return a

    def gguf_metadata(self, writer, config: dict) -> None:
        """Keys llama.cpp reads for this architecture beyond the common ones export writes."""

    def gguf_name(self, name: str, tokenizer_folder) -> str:
        """general.name as written (llama.cpp changes a vocabulary by some model names)."""
        return name

    # GGUF tensors that hold configuration, not weights (Phi-3's rope factors): export writes
    # `gguf_config_tensors`, import reads them with `tensor_config` and keeps them out of the weights.
    config_tensors: tuple[str, ...] = ()

    def gguf_config_tensors(self, config: dict):
        """(GGUF name, float32 numpy array) pairs of `config_tensors` for this config."""
        return ()

    def tensor_config(self, tensors: dict, config: dict) -> dict:
        """Config keys from the `config_tensors` a GGUF has (name -> numpy array)."""
        return {}

    def check_config(self, config: dict, where: str) -> None:
        """Refuse a config this family's GGUF export cannot represent (llama.cpp hard-codes it)."""

    def support(self) -> dict[str, bool | str]:
        return {cap: self.limits.get(cap, True) for cap in CAPABILITIES}


def _families() -> list[Family]:
    from . import gemma, gemma4, llama, mistral3, phi, qwen, qwen35, smollm

    return [*llama.FAMILIES, *qwen.FAMILIES, *gemma.FAMILIES, *gemma4.FAMILIES, *qwen35.FAMILIES, *phi.FAMILIES,
            *smollm.FAMILIES, *mistral3.FAMILIES]


FAMILIES: list[Family] = _families()
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_BY_GGUF = {f.gguf_arch: f for f in FAMILIES if f.gguf_arch}


def family(model_type: str | None) -> Family | None:
    return _BY_TYPE.get(model_type or "")


def by_gguf_arch(arch: str | None) -> Family | None:
    return _BY_GGUF.get(arch or "")


def nearest(name: str | None, names) -> str:
    """' (did you mean X?)' or ''."""
    close = difflib.get_close_matches(str(name), list(names), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def supported(capability: str) -> list[str]:
    return [t for f in FAMILIES for t in f.model_types if f.support()[capability] is True]


def require(model_type: str | None, capability: str, where: str) -> Family:
    """The family of `model_type`, or a ModelError naming what is supported and the reason."""
    fam = family(model_type)
    if fam is None:
        names = supported(capability)
        raise ModelError(f"{where}: architecture {model_type!r} is not supported for {CAPABILITIES[capability]}; "
                         f"supported: {', '.join(names)}{nearest(model_type, names)}\n"
                         "  fix: see `localtune models check MODEL` and the support matrix in docs/models.md")
    reason = fam.support()[capability]
    if reason is not True:
        raise ModelError(f"{where}: {CAPABILITIES[capability]} is not supported for {fam.name} ({model_type}): "
                         f"{reason}\n  fix: see the support matrix in docs/models.md")
    return fam


# A stage's method -> the matrix column it needs (SFT's columns follow its adapter and base).
def stage_capabilities(stage, quantized: bool, method_capability: str | None) -> list[str]:
    """The matrix columns a stage needs: its way of tuning, and its method's column (Method.capability)."""
    adapter = getattr(getattr(stage, "adapter", None), "type", "lora")
    tuning = {"dora": "dora", "full": "load"}.get(adapter, "qlora" if quantized else "lora")
    return [tuning] + ([method_capability] if method_capability else [])


def require_known(model_type: str | None, capability: str, where: str) -> None:
    """Refuse what a registry family lacks; a model_type outside the registry is mlx-lm's to run."""
    if family(model_type) is not None:
        require(model_type, capability, where)


def matrix_markdown() -> str:
    """docs/models.md's support matrix: a row per family, a column per capability."""
    head = "| family (model_type) | " + " | ".join(CAPABILITIES.values()) + " |"
    rows = [head, "|" + "---|" * (len(CAPABILITIES) + 1)]
    notes: list[str] = []  # one note per distinct reason of a family
    for fam in FAMILIES:
        cells = []
        for cap, value in fam.support().items():
            if value is True:
                cells.append("yes")
                continue
            note = f"{fam.name}: {value}"
            if note not in notes:
                notes.append(note)
            cells.append(f"no [{notes.index(note) + 1}]")
        rows.append(f"| {fam.name} ({', '.join(fam.model_types)}) | " + " | ".join(cells) + " |")
    return "\n".join(rows + [""] + [f"[{i}] {n}  " for i, n in enumerate(notes, 1)]).rstrip() + "\n"
