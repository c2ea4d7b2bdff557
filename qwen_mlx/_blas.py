"""Use an optimized BLAS for MLX's CPU backend when the machine has one.

MLX's Linux CPU wheel calls `cblas_sgemm` and friends, resolved at load time
against the reference BLAS it bundles. Loading OpenBLAS into the global symbol
scope *before* `mlx.core` is imported makes those calls go to OpenBLAS instead:
float32 GEMM goes from ~8 to ~250 GFLOP/s on a 2-core x86 machine. This module
must therefore be imported before `mlx.core`; `qwen_mlx/__init__.py` does it.

`QWEN_MLX_BLAS=/path/to/libopenblas.so` picks a library, `QWEN_MLX_BLAS=none`
turns this off. `blas_name()` says what is in use (shown in the CLI's stats).
"""

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so.0",
    "libopenblas.so",
)
_loaded = None


def _load() -> None:
    global _loaded
    choice = os.environ.get("QWEN_MLX_BLAS", "")
    if sys.platform != "linux" or choice.lower() == "none":
        return
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS symbols
        return
    for path in ([choice] if choice else _CANDIDATES):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _loaded = path
        return


def blas_name() -> str:
    """The BLAS behind MLX's CPU matmuls, for the stats line."""
    if sys.platform == "darwin":
        return "Accelerate"
    return f"OpenBLAS ({_loaded})" if _loaded else "MLX's bundled reference BLAS"


_load()
