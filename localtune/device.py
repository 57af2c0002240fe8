"""Fast BLAS before mlx, and per-device choices (compute dtype, QLoRA path).

The Linux `mlx[cpu]` wheel links a slow reference BLAS. libmlx resolves its
`cblas_*` symbols at load time, so a library loaded earlier with RTLD_GLOBAL
(MKL from PyPI's `mkl`, or a system OpenBLAS) takes them over. This module must
therefore run before the first `import mlx`: `localtune/__init__.py` calls
`preload_blas()`.
"""
from __future__ import annotations

import ctypes
import glob
import os
import site
import sys
import time

_state = {"blas": None, "warned": False}


def _candidates() -> list[str]:
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None) or ""])
    found = []
    for prefix in prefixes:
        if prefix:
            found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
    found += ["libopenblas.so.0", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
              "/usr/lib/aarch64-linux-gnu/libopenblas.so.0"]
    return found


def blas_library_path() -> str | None:
    """The fast BLAS we would load, or None (for LD_PRELOAD in benchmarks)."""
    for path in _candidates():
        if os.path.isabs(path) and os.path.exists(path):
            return path
    return None


def preload_blas() -> str | None:
    """Load MKL (or OpenBLAS) globally before mlx; returns the library used, or None."""
    if _state["blas"] is not None or sys.platform != "linux":
        return _state["blas"]
    if os.environ.get("LOCALTUNE_BLAS") == "reference":  # benchmarks: measure the slow path
        _state["blas"] = "reference"
        return None
    if "mlx.core" in sys.modules:
        return None  # too late to rebind; doctor reports it
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if hasattr(lib, "MKL_Set_Threading_Layer"):
            # Pin Intel OpenMP now: if GNU OpenMP loads first (llama_cpp does), MKL picks it and spins.
            lib.MKL_Set_Threading_Layer(0)
        _state["blas"] = path
        return path
    return None


def blas_in_use() -> str | None:
    return _state["blas"] if _state["blas"] != "reference" else None


def warn_if_slow_blas(echo) -> None:
    """Say once, with the fix, when Linux training will run on the reference BLAS."""
    if sys.platform == "linux" and not blas_in_use() and not _state["warned"]:
        _state["warned"] = True
        echo("warning: no fast BLAS found; MLX's CPU matmuls will be ~20x slower.\n"
             "  fix: pip install mkl   (x86_64)   or   apt install libopenblas0   (aarch64)")


def is_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def compute_dtype():
    """fp32 on CPU (bf16/fp16 matmuls run at ~3 GFLOP/s there); bf16 on Metal."""
    import mlx.core as mx

    return mx.bfloat16 if is_gpu() else mx.float32


def memory_limit_bytes() -> int:
    import mlx.core as mx

    if is_gpu():
        info = mx.metal.device_info() if hasattr(mx, "metal") else mx.device_info()
        return int(info.get("max_recommended_working_set_size", info.get("memory_size", 0)))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory() -> int:
    """MLX's own allocator high-water mark (tracked on CPU and Metal alike)."""
    import mlx.core as mx

    return mx.get_peak_memory()


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    dt = (time.perf_counter() - t0) / repeats
    return 2 * n**3 / dt / 1e9


def describe() -> dict:
    import mlx.core as mx

    return {
        "device": "gpu (Metal)" if is_gpu() else "cpu",
        "mlx": mx.__version__,
        "blas": blas_in_use() or ("Accelerate" if sys.platform == "darwin" else "reference (slow)"),
        "compute_dtype": str(compute_dtype()).replace("mlx.core.", ""),
        "memory_limit_gb": round(memory_limit_bytes() / 2**30, 1),
    }
