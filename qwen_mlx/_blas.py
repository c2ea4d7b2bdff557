"""Use an optimized BLAS for MLX's CPU backend when the machine has one.

MLX's Linux CPU wheel calls `cblas_sgemm` and friends. Python loads extension modules with
RTLD_NOW, so those calls are bound once, when `mlx.core` is imported: to a library already in
the global symbol scope if there is one, else to the reference BLAS the wheel bundles. Loading
OpenBLAS into the global scope *before* `mlx.core` is imported makes them go to OpenBLAS:
float32 GEMM goes from ~8 to ~250 GFLOP/s on a 2-core x86 machine. `qwen_mlx/__init__.py`
imports this module first. Loaded later, OpenBLAS cannot take over (the bindings are fixed;
checked: `import mlx.core` first, then OpenBLAS with RTLD_GLOBAL, stays at the bundled speed).
So when `mlx.core` came first, this module says so once, with the fix (a `SlowBLASWarning`),
unless OpenBLAS already provides `cblas_sgemm` to the process (LD_PRELOAD, or loaded earlier).

`QWEN_MLX_BLAS=/path/to/libopenblas.so` picks a library, `QWEN_MLX_BLAS=none` turns this off
(and the warning). `blas_name()` says what is in use (shown in the CLI's stats).
"""

import ctypes
import os
import sys
import warnings

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so.0",
    "libopenblas.so",
)
_loaded = None


class SlowBLASWarning(RuntimeWarning):
    """mlx.core was imported before qwen_mlx: MLX's CPU matmuls use the slow bundled BLAS."""


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_cblas() -> "str | None":
    """The file of the library that provides `cblas_sgemm` in the process's global symbol scope
    (what a library loaded now, like MLX, binds to first), or None if none does."""
    try:
        process = ctypes.CDLL(None)
        addr = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p).value
        info = _DlInfo()
        if not process.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
            return None
    except (AttributeError, OSError):
        return None
    return os.path.realpath(info.dli_fname.decode())


def _available() -> "str | None":
    """An OpenBLAS this machine could load (for the warning's LD_PRELOAD hint), or None."""
    for path in _CANDIDATES:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        except OSError:
            continue
        return path
    return None


def _load() -> None:
    global _loaded
    choice = os.environ.get("QWEN_MLX_BLAS", "")
    if sys.platform != "linux" or choice.lower() == "none":
        return
    if "mlx.core" in sys.modules:  # too late to load one: MLX already bound its BLAS symbols
        provider = global_cblas()
        if provider and "openblas" in os.path.basename(provider):
            _loaded = provider  # LD_PRELOAD, or loaded before mlx.core: MLX uses it
            return
        import mlx.core as mx

        path = choice or _available()
        if path and mx.default_device() == mx.cpu:
            warnings.warn(
                f"mlx.core was imported before qwen_mlx, so MLX's CPU matmuls use its bundled reference BLAS "
                f"(an order of magnitude slower in float32) instead of OpenBLAS ({path}); import qwen_mlx "
                f"before mlx.core, or run "
                f"with LD_PRELOAD={path} (QWEN_MLX_BLAS=none silences this)", SlowBLASWarning, stacklevel=2)
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
