"""Hand-written kernels for the hot ops of a Qwen2.5 layer, with plain-MLX references.

    import metal_kernels as K
    K.rms_norm(x, w, eps)                       # x [..., D]
    h, y = K.add_rms_norm(x, r, w, eps)         # h = x + r, y = rms_norm(h)
    K.rope(x, offset, base, freqs=None, mscale=1.0)              # x [B, H, L, D], NeoX
    # offset: an int, a 1-element array, or a [B] array (one start position per row; reference only)
    q, k, v = K.qkv_post(qkv, bias, n_heads, n_kv_heads, offset, base, freqs=None, mscale=1.0)
    K.swiglu(gate_up)                           # silu(gate) * up
    K.quant_sdpa(q, keys, values, n, scale, bits, group_size, mask=None, tail=None)  # attention over a quantized KV cache
    K.batch_sdpa(q, keys, values, start, n, scale)  # decode attention, row b over positions start[b] .. n-1
    K.decode_sdpa(q, keys, values, n, scale)    # decode attention over positions 0 .. n-1 of cache buffers

Each op is a Metal kernel body (metal_kernels/<op>.metal) run by `mx.fast.metal_kernel` on
Apple GPUs and, through msl_compat.h, by `mx.fast.cuda_kernel` on NVIDIA GPUs; elsewhere
(and wherever the kernel is not faster: `USE`, per op and per number of rows) the plain-MLX
reference runs.

Switches: `QWEN_MLX_KERNELS=reference` in the environment or `set_backend("reference")` force the
references; `set_backend("kernels")` (or `QWEN_MLX_KERNELS=kernels`) forces every kernel, ignoring
USE; `set_backend("auto")` is the default: `USE` decides, per op and per call's number of token rows
(decode vs prefill); `set_table` replaces it (`qwen_mlx.tune` writes a table per machine, `load()`
applies it), `describe()` says what runs and why. `backend()` says what runs: "metal", "cuda" or
"reference". Both paths stay callable explicitly: `metal_kernels.reference.<op>`,
`metal_kernels.kernels.<op>`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import mlx.core as mx

from . import kernels, reference
from ._core import gpu_backend

__all__ = ["rms_norm", "add_rms_norm", "rope", "qkv_post", "swiglu", "quant_sdpa", "runs_quant_sdpa", "batch_sdpa", "runs_batch_sdpa", "decode_sdpa", "runs_decode_sdpa", "decode_sdpa_fits", "compiled_decode",
           "IN_COMPILED_DECODE", "set_backend", "mode", "backend", "USE",
           "SHIPPED", "shipped", "set_table", "reset_table", "describe", "kernels", "reference"]

# When each op runs its kernel: op -> None (never) or (min_rows, max_rows), the kernel running for calls
# over `rows` token rows (batch x length) with min_rows <= rows < max_rows (max_rows None: no bound).
# A decode step has rows = batch size; a prefill chunk, its length. The shipped defaults per back end
# (docs/kernels.md has the evidence); `qwen_mlx.tune` measures a machine and `qwen_mlx.loader.load`
# applies its table (`set_table`).
SHIPPED = {
    # H100 and H200 (MLX 0.32.4 CUDA, bf16, 0.5B): a custom-kernel call costs 11-28 us of host time
    # against 4-9 us for a built-in op; no kernel was faster in the decoding model or at a 512-row prefill.
    "cuda": {"rms_norm": None, "add_rms_norm": None, "rope": None, "qkv_post": None, "swiglu": None},
    # Apple GPUs, unmeasured here: the fused kernels (one launch for two) at prefill sizes only, after
    # MLX issue #4259 (M3, float16, a fused add+RMSNorm metal_kernel vs add then mx.fast.rms_norm:
    # 0.73x at 1 row, 1.08x at 512, 1.21x at 4096). Run `python -m qwen_mlx.tune` on the machine.
    "metal": {"rms_norm": None, "add_rms_norm": (512, None), "rope": None, "qkv_post": (512, None),
              "swiglu": None},
}


def shipped() -> dict:
    """The shipped defaults of this machine's back end (CUDA's where there is no GPU: all off)."""
    return SHIPPED.get(gpu_backend() or "", SHIPPED["cuda"])


_SHIPPED_SOURCE = f"shipped defaults for {gpu_backend() or 'no GPU'}"
_version = 0  # bumped whenever what dispatch decides may change (set_table, set_backend)


def _changed() -> None:
    global _version
    _version += 1


def version() -> int:
    """A number that changes whenever the table or the mode does: code that fixed dispatch's
    decisions in advance (a compiled function traced through these ops) must redo it then."""
    return _version

USE: dict = dict(shipped())
_table_source = _SHIPPED_SOURCE


def rule(value):
    """A USE entry as (min_rows, max_rows) or None; True / False (the old on/off form) mean always / never."""
    if value is None or value is False:
        return None
    if value is True:
        return (1, None)
    lo, hi = value
    return (int(lo), None if hi is None else int(hi))


def set_table(table: dict, source: str) -> None:
    """Replace USE by `table` (op -> rule, every op named); `source` says where it came from (for describe)."""
    global _table_source
    missing = set(USE) - set(table)
    if missing:
        raise ValueError(f"kernel table from {source} lacks {', '.join(sorted(missing))}")
    USE.update({op: rule(table[op]) for op in USE})
    _table_source = source
    _changed()


def table_source() -> str:
    """Where the current USE came from (shipped defaults, a tuned table's path, ...)."""
    return _table_source


def reset_table() -> None:
    """The shipped defaults of this machine's back end."""
    set_table(shipped(), _SHIPPED_SOURCE)


def describe_rule(value) -> str:
    r = rule(value)
    if r is None:
        return "off"
    lo, hi = r
    if hi is None:
        return "on" if lo <= 1 else f"on at >= {lo} rows"
    return f"on at {lo} row" if hi == lo + 1 and lo == 1 else f"on at {lo}..{hi - 1} rows"


def describe() -> list:
    """One line per op: what runs, and why (the mode, the back end, the table's source)."""
    b = backend()
    if b == "reference":
        why = "QWEN_MLX_KERNELS=reference / set_backend('reference')" if _mode == "reference" else "no GPU back end"
        return [f"kernels: all off ({why}); the plain-MLX references run"]
    if _mode == "kernels":
        return [f"kernels: all on ({b}; forced by set_backend('kernels') / QWEN_MLX_KERNELS=kernels)"]
    line = f"kernels ({b}, {_table_source}): " + ", ".join(f"{op} {describe_rule(v)}" for op, v in USE.items())
    inside = [*IN_COMPILED_DECODE.get(b, ()), *(["decode_sdpa"] if runs_decode_sdpa() else [])]
    return [line + (f"; in compiled decode steps also {', '.join(inside)}" if inside and _mode == "auto" else "")]


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
    _changed()


def mode() -> str:
    """The mode set by `set_backend` or QWEN_MLX_KERNELS: 'auto', 'reference' or 'kernels'."""
    return _mode


def backend() -> str:
    """'metal' or 'cuda' when kernels may run (GPU back end, default device on it), else 'reference'."""
    if _mode == "reference" or mx.default_device() != mx.gpu:
        return "reference"
    return gpu_backend() or "reference"


# Inside a compiled decode step (qwen_mlx.model's decode segments) a kernel call costs no host time
# per step (MLX replays the traced graph), only GPU time; there, in mode 'auto', these ops run
# their kernels whatever USE says: on an H200 each took less GPU time inside 7B decode steps than
# the built-in ops it replaces (docs/kernels.md, "Small arrays" and the table after "USE"). USE
# decides everywhere else.
IN_COMPILED_DECODE = {"cuda": ("rms_norm", "add_rms_norm", "qkv_post", "swiglu"), "metal": ()}
_in_decode = False


@contextmanager
def compiled_decode():
    """Around the tracing of a compiled decode step: the ops of IN_COMPILED_DECODE run their kernels."""
    global _in_decode
    old, _in_decode = _in_decode, True
    try:
        yield
    finally:
        _in_decode = old


def _use(op: str, x: mx.array, rows: int | None = None) -> bool:
    """Whether `op` runs its kernel for `x` over `rows` token rows (None: all but x's last axis)."""
    if _in_decode and _mode == "auto" and op in IN_COMPILED_DECODE.get(gpu_backend() or "", ()):
        return x.size != 0 and backend() != "reference"
    # The common answer first, before asking MLX for the device: this runs five times per layer
    # per decode step, and at 0.5B a step is bound by such host work.
    if _mode == "reference" or (_mode == "auto" and not USE[op]) or x.size == 0 or backend() == "reference":
        return False
    if _mode == "kernels":
        return True
    r, rows = rule(USE[op]), _rows(x) if rows is None else rows
    return r is not None and r[0] <= rows and (r[1] is None or rows < r[1])


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1] if x.size else 0


def rms_norm(x, weight, eps):
    return (kernels if _use("rms_norm", x) else reference).rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    return (kernels if _use("add_rms_norm", x) else reference).add_rms_norm(x, residual, weight, eps)


def _per_row(offset) -> bool:
    """An offset per batch row ([B] array, batched generation): the kernels take one offset, so the
    reference (mx.fast.rope, which takes either) runs."""
    return isinstance(offset, mx.array) and offset.size > 1


def rope(x, offset, base, freqs=None, mscale=1.0):
    impl = kernels if _use("rope", x, x.shape[0] * x.shape[2]) and not _per_row(offset) else reference
    return impl.rope(x, offset, base, freqs, mscale)


def qkv_post(qkv, bias, n_heads, n_kv_heads, offset, base, freqs=None, mscale=1.0):
    impl = kernels if _use("qkv_post", qkv, qkv.shape[0] * qkv.shape[1]) and not _per_row(offset) else reference
    return impl.qkv_post(qkv, bias, n_heads, n_kv_heads, offset, base, freqs, mscale)


def swiglu(gate_up):
    return (kernels if _use("swiglu", gate_up) else reference).swiglu(gate_up)


# Attention over a quantized KV cache is not a table entry: on CUDA it must run here (MLX 0.32.4's CUDA
# back end has no quantized matmul for mlx-lm's quantized attention), the kernel at decode and the
# dequantizing reference otherwise; on Metal mlx-lm's path (MLX's quantized matmuls) runs unless
# set_backend('kernels') forces the kernel; on the CPU mlx-lm's path runs.
def runs_quant_sdpa() -> bool:
    """Whether attention over a quantized KV cache goes through `quant_sdpa` (else mlx-lm's
    quantized_scaled_dot_product_attention)."""
    if mx.default_device() != mx.gpu:
        return False
    g = gpu_backend()
    return g == "cuda" or (g == "metal" and _mode == "kernels")


def _decode_attention_fits(q, n_kv_heads) -> bool:
    """The shapes the decode attention kernels (quant_sdpa, batch_sdpa) take: one query position,
    head dim 32, 64 or 128 (every Qwen2.5), at most 8 query heads per KV head."""
    hq, d = q.shape[1], q.shape[-1]
    return q.shape[2] == 1 and d in (32, 64, 128) and hq % n_kv_heads == 0 and hq // n_kv_heads <= 8


def quant_sdpa_fits(q, keys, bits, mask) -> bool:
    """Whether the quant_sdpa kernel takes this call: a decode shape (`_decode_attention_fits`), no
    mask, 2/4/8-bit."""
    return mask is None and bits in (2, 4, 8) and _decode_attention_fits(q, keys[0].shape[1])


def quant_sdpa(q, keys, values, n, scale, bits, group_size, mask=None, tail=None):
    kernel = _mode != "reference" and runs_quant_sdpa()
    impl = kernels if kernel and q.size and quant_sdpa_fits(q, keys, bits, mask) else reference
    return impl.quant_sdpa(q, keys, values, n, scale, bits, group_size, mask, tail)


# Batched decode attention with left padding is not a table entry either: on CUDA, MLX 0.32.4 has no
# fused attention for a query with an array mask (its fallback, matmuls and a softmax, cost 2-9x the
# unmasked kernel at B = 8-128 on an H200), so the kernel runs there; on Metal MLX's vector kernel
# takes the mask (the reference runs unless set_backend('kernels')); on the CPU the reference runs.
def runs_batch_sdpa() -> bool:
    """Whether padded batched decode attention goes through the `batch_sdpa` kernel: where quant_sdpa's
    kernel runs, unless set_backend('reference')."""
    return _mode != "reference" and runs_quant_sdpa()


def batch_sdpa_fits(q, keys) -> bool:
    """Whether the batch_sdpa kernel takes this call: a decode shape (`_decode_attention_fits`)."""
    return _decode_attention_fits(q, keys.shape[1])


def batch_sdpa(q, keys, values, start, n, scale):
    impl = kernels if runs_batch_sdpa() and q.size and batch_sdpa_fits(q, keys) else reference
    return impl.batch_sdpa(q, keys, values, start, n, scale)


# One sequence's decode attention on a plain KV cache is a speed choice against MLX's own fused
# kernels (its vector kernel; cuDNN from 256 positions): on CUDA the decode_sdpa kernel measured
# faster inside 7B bfloat16 decode steps (docs/kernels.md), so it runs there; on Metal only under
# set_backend('kernels'); on the CPU never.
def runs_decode_sdpa() -> bool:
    """Whether a compiled decode step's attention goes through the `decode_sdpa` kernel."""
    if _mode == "reference" or mx.default_device() != mx.gpu:
        return False
    g = gpu_backend()
    return g == "cuda" or (g == "metal" and _mode == "kernels")


def decode_sdpa_fits(q, keys) -> bool:
    """Whether the decode_sdpa kernel takes this call: a decode shape (`_decode_attention_fits`) in
    bfloat16 or float32 (its 16-byte key loads)."""
    return q.dtype in (mx.bfloat16, mx.float32) and keys.dtype == q.dtype and _decode_attention_fits(q, keys.shape[1])


def decode_sdpa(q, keys, values, n, scale):
    """Attention of q [B, HQ, 1, D] over the first n positions of the cache buffers `keys`,
    `values` [B, HKV, CAP, D] (mlx-lm KVCache's, read in place)."""
    if runs_decode_sdpa() and q.size and decode_sdpa_fits(q, keys):
        return kernels.decode_sdpa(q, keys, values, n, scale)
    return reference.decode_sdpa(q, keys, values, n, scale)
