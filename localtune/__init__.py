"""localtune: adapt language models on your own machine."""
from .device import preload_blas

preload_blas()  # must run before the first `import mlx` (see device.py)

__version__ = "0.1.0"


def __getattr__(name):  # `from localtune import fuse, export_gguf, export_lora` without loading MLX at import
    if name in ("fuse", "export_gguf"):
        from . import export

        return getattr(export, name)
    if name == "export_lora":
        from .export import lora

        return lora.export_lora
    raise AttributeError(f"module 'localtune' has no attribute {name!r}")
