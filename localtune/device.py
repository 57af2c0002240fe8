"""Fast BLAS before mlx, and the device policy: every CPU-versus-Metal choice in one place.

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
from dataclasses import asdict, dataclass

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
    """Whether MLX runs on Metal: a fact about the machine (memory limit), not a choice (see `policy`)."""
    import mlx.core as mx

    return mx.default_device() == mx.gpu


POLICY_VARIABLE = "LOCALTUNE_DEVICE_POLICY"


@dataclass(frozen=True)
class Policy:
    """Every choice localtune makes differently on the CPU and on Metal. Code reads these fields and
    never asks the device, so `LOCALTUNE_DEVICE_POLICY=metal` runs the Metal branches on a CPU
    (slowly, but each branch executes: that is how CI tests what a Mac runs)."""

    name: str
    compute_dtype: str  # float weights and activations; bf16/fp16 matmuls run at ~3 GFLOP/s on the CPU
    dequantize_qlora: bool  # a 4-bit base dequantizes into fp32 matmuls (the CPU's quantized kernel is ~50x slower)
    compile_qlora_step: bool  # compile forward/backward over those dequantizing layers: ~12% faster, ~15% more memory
    fused_kernels: bool  # mlx-lm's fused loss kernels (distill: forward KL, JSD 0.5); mlx-lm falls back off Metal
    dequantize_rollouts: bool  # PPO samples from an fp32 copy of a dequantizing base (recipe's dequantize_rollouts)

    def dtype(self):
        import mlx.core as mx

        return getattr(mx, self.compute_dtype)

    @property
    def dtype_bytes(self) -> int:
        """Bytes per float weight or activation, for the memory planner."""
        return 2 if self.compute_dtype in ("bfloat16", "float16") else 4


POLICIES = {
    "cpu": Policy("cpu", compute_dtype="float32", dequantize_qlora=True, compile_qlora_step=False,
                  fused_kernels=False, dequantize_rollouts=True),
    "metal": Policy("metal", compute_dtype="bfloat16", dequantize_qlora=False, compile_qlora_step=True,
                    fused_kernels=True, dequantize_rollouts=False),
}


def policy() -> Policy:
    """The device's policy, or the one LOCALTUNE_DEVICE_POLICY names (read at every call)."""
    from .errors import LocaltuneError

    forced = os.environ.get(POLICY_VARIABLE, "").strip().lower()
    if forced in ("", "auto"):
        return POLICIES["metal" if is_gpu() else "cpu"]
    if forced not in POLICIES:
        raise LocaltuneError(f"{POLICY_VARIABLE}={os.environ[POLICY_VARIABLE]!r} is not a device policy; "
                             f"expected one of {', '.join(POLICIES)} or auto\n"
                             f"  fix: unset {POLICY_VARIABLE} (the device decides) or set it to one of those")
    return POLICIES[forced]


def policy_forced() -> bool:
    return os.environ.get(POLICY_VARIABLE, "").strip().lower() not in ("", "auto")


def compute_dtype():
    """The policy's dtype: fp32 on CPU, bf16 on Metal."""
    return policy().dtype()


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
        "compute_dtype": policy().compute_dtype,
        "policy": {**asdict(policy()), "forced": policy_forced()},
        "memory_limit_gb": round(memory_limit_bytes() / 2**30, 1),
    }
