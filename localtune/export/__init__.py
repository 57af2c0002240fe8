"""Fuse a run's adapters into its base, write GGUF for llama.cpp, and prove both.

fuse.py      what to export (`resolve`), folding the adapters in, `fuse` to an MLX / Hugging Face folder
gguf.py      the GGUF writer (names and layout via the model families, tokenizer, quant types), `export_gguf`
verify.py    parity of two models' logits; llama.cpp loading a GGUF back, judged by TOLERANCE / REFERENCE_SLACK
modelfile.py the Ollama Modelfile
lora.py      a run's adapters as one GGUF LoRA adapter (`export_lora`)

`from localtune.export import X` gives the public names below. Note that the attribute `fuse` of this
package is the function; the module is `localtune.export.fuse` in `sys.modules` (`from .fuse import ...`).
"""
from .fuse import CARRIED_FILES, FUSE_RECORD, FuseResult, Source, carry_over, fold, fuse, fused, resolve
from .gguf import QUANTS, ExportResult, chat_template, check_architecture, export_gguf, write_gguf
from .modelfile import ollama_modelfile
from .verify import (
    PROMPTS,
    REFERENCE_SLACK,
    TOLERANCE,
    Parity,
    llama_logits,
    mlx_logits,
    open_llama,
    parity,
    prompt_tokens,
    verify_gguf,
)

__all__ = ["CARRIED_FILES", "FUSE_RECORD", "PROMPTS", "QUANTS", "REFERENCE_SLACK", "TOLERANCE", "ExportResult",
           "FuseResult", "Parity", "Source", "carry_over", "chat_template", "check_architecture", "export_gguf",
           "fold", "fuse", "fused", "llama_logits", "mlx_logits", "ollama_modelfile", "open_llama", "parity",
           "prompt_tokens", "resolve", "verify_gguf", "write_gguf"]
