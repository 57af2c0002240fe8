"""localtune: adapt language models on your own machine."""
from .device import preload_blas

preload_blas()  # must run before the first `import mlx` (see device.py)

__version__ = "0.1.0"
