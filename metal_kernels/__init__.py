"""Hand-written kernels for the hot ops of a Qwen2.5 layer, with plain-MLX references.

    import metal_kernels as K
    K.rms_norm(x, w, eps)                       # x [..., D]
    h, y = K.add_rms_norm(x, r, w, eps)         # h = x + r, y = rms_norm(h)
    K.rope(x, offset, base, freqs=None, mscale=1.0)              # x [B, H, L, D], NeoX
    # offset: an int, a 1-element array, or a [B] array (one start position per row; reference only)
    q, k, v = K.qkv_post(qkv, bias, n_heads, n_kv_heads, offset, base, freqs=None, mscale=1.0)
    K.swiglu(gate_up)                           # silu(gate) * up

Each op is a Metal kernel body (metal_kernels/<op>.metal) run by `mx.fast.metal_kernel` on
Apple GPUs and, through msl_compat.h, by `mx.fast.cuda_kernel` on NVIDIA GPUs; elsewhere
(and whenever the kernel is not faster, see USE) the plain-MLX reference runs.

Switches: `QWEN_MLX_KERNELS=reference` in the environment or `set_backend("reference")` force the
references; `set_backend("kernels")` (or `QWEN_MLX_KERNELS=kernels`) forces every kernel, ignoring
USE; `set_backend("auto")` is the default. `backend()` says what runs: "metal", "cuda" or
"reference". Both paths stay callable explicitly: `metal_kernels.reference.<op>`,
`metal_kernels.kernels.<op>`.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import kernels, reference
from ._core import gpu_backend

__all__ = ["rms_norm", "add_rms_norm", "rope", "qkv_post", "swiglu", "set_backend", "mode", "backend", "USE",
           "kernels", "reference"]

# Per-op opt-in: an op runs its kernel only where the kernel beat the ops it replaces, in the place
# the model calls it. Measured with scripts/bench_kernels.py on an H100 (MLX 0.32.4 CUDA, bf16,
# Qwen2.5-0.5B geometry; docs/kernels.md has the table): an MLX custom-kernel call costs 13-28 us
# per call in an uncompiled loop against 4-9 us for a built-in op, so only qkv_post (one launch for
# three) won in isolation (23 vs 34 us at decode, 21 vs 25 us at L=512), and in the decoding model
# every kernel setting, qkv_post alone included, was slower than the references. Not measured on
# Apple silicon yet: run the benchmark there before turning any of these on for Metal.
USE = {
    "rms_norm": False,      # one mx.fast.rms_norm launch already: 22 vs 6 us at decode
    "add_rms_norm": False,  # 28 vs 8 us at decode (two built-in launches beat one custom)
    "rope": False,          # one mx.fast.rope launch already: 16 vs 9 us
    "qkv_post": False,      # faster alone (23 vs 34 us) but not in the model: 283 vs 330 tok/s
    "swiglu": False,        # the compiled reference is one fused launch already: 13 vs 7 us
}

_MODES = ("auto", "reference", "kernels")
_mode = os.environ.get("QWEN_MLX_KERNELS", "auto").strip().lower() or "auto"
if _mode not in _MODES:
    raise ValueError(f"QWEN_MLX_KERNELS={_mode!r}: want one of {', '.join(_MODES)}")


def set_backend(mode: str) -> None:
    """'auto' (kernels where USE says so and a GPU is there), 'reference' (plain MLX everywhere),
    or 'kernels' (every kernel, ignoring USE: for experiments)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"set_backend({mode!r}): want one of {', '.join(_MODES)}")
    _mode = mode


def mode() -> str:
    """The mode set by `set_backend` or QWEN_MLX_KERNELS: 'auto', 'reference' or 'kernels'."""
    return _mode


def backend() -> str:
    """'metal' or 'cuda' when kernels may run (GPU back end, default device on it), else 'reference'."""
    if _mode == "reference" or mx.default_device() != mx.gpu:
        return "reference"
    return gpu_backend() or "reference"


def _use(op: str, x: mx.array) -> bool:
    return x.size > 0 and backend() != "reference" and (_mode == "kernels" or USE[op])


def rms_norm(x, weight, eps):
    return (kernels if _use("rms_norm", x) else reference).rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    return (kernels if _use("add_rms_norm", x) else reference).add_rms_norm(x, residual, weight, eps)


def _per_row(offset) -> bool:
    """An offset per batch row ([B] array, batched generation): the kernels take one offset, so the
    reference (mx.fast.rope, which takes either) runs."""
    return isinstance(offset, mx.array) and offset.size > 1


def rope(x, offset, base, freqs=None, mscale=1.0):
    impl = kernels if _use("rope", x) and not _per_row(offset) else reference
    return impl.rope(x, offset, base, freqs, mscale)


def qkv_post(qkv, bias, n_heads, n_kv_heads, offset, base, freqs=None, mscale=1.0):
    impl = kernels if _use("qkv_post", qkv) and not _per_row(offset) else reference
    return impl.qkv_post(qkv, bias, n_heads, n_kv_heads, offset, base, freqs, mscale)


def swiglu(gate_up):
    return (kernels if _use("swiglu", gate_up) else reference).swiglu(gate_up)
