"""The custom-kernel path: each function always runs its .metal body (Metal, or CUDA via msl_compat.h).

Same signatures as `metal_kernels.reference`, plus keyword-only:
  backend: 'metal' or 'cuda' (default: the GPU back end MLX has), or 'cpu-emulator' (the body
           compiled as C++ and run on the CPU by metal_kernels.cpu_emulator: for tests);
  stream:  where the kernel runs (default: the default stream);
  verbose: print the complete generated source (MLX prints it from C++ to fd 1).
Setting `POISON = True` fills every output with NaN before the kernel runs
(MLX's `init_value`), so an element the kernel fails to write shows up; it
costs one fill per output, so it is for tests only.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx

from . import _core

POISON = False


def _run(name, inputs, input_names, output_names, call, backend=None, stream=None, verbose=False):
    """Run kernel `name`; `call` is its per-shape arguments (template, grid, threadgroup, output shapes
    and dtypes), computed once per shape by the `_args_*` functions below."""
    backend = backend or _core.gpu_backend()
    if backend == "cpu-emulator":
        return _emulate(name, inputs, input_names, output_names, *call)
    if backend is None:
        raise RuntimeError("metal_kernels.kernels needs a GPU (Metal or CUDA); use metal_kernels.reference")
    kernel = _core.get_kernel(name, input_names, output_names, backend)
    template, grid, threadgroup, out_shapes, out_dtypes = call
    kw = {"stream": stream} if stream is not None else {}
    return kernel(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                  output_shapes=out_shapes, output_dtypes=out_dtypes, verbose=verbose,
                  init_value=float("nan") if POISON else None, **kw)


def _as(a, dtype):
    return a if a.dtype == dtype else a.astype(dtype)


# Per-shape call arguments, computed once: a decode step calls each op with the same shapes in every
# layer, so the Python side of a call is a cache look-up, the inputs, and MLX's own call.
@lru_cache(maxsize=512)
def _args_norm(shape, dtype, n_out, eps):
    D = shape[-1]
    tg = _core.row_threads(D)
    rows = math.prod(shape[:-1])
    return ([("T", dtype), ("D", D), ("TG", tg), ("EPS", _core.f32_bits(eps))], (rows * tg, 1, 1), (tg, 1, 1),
            [shape] * n_out, [dtype] * n_out)


@lru_cache(maxsize=512)
def _args_rope(shape, dtype, mscale):
    B, H, L, D = shape
    n = B * H * L * (D // 2)
    return ([("T", dtype), ("D", D), ("MSCALE", _core.f32_bits(mscale))],
            (_core.round_up(max(n, 1), _core.TG), 1, 1), (_core.TG, 1, 1), [shape], [dtype])


@lru_cache(maxsize=512)
def _args_qkv_post(shape, dtype, bias_dtype, n_heads, n_kv_heads, mscale):
    B, L, F = shape
    nh = n_heads + 2 * n_kv_heads
    D = F // nh
    n = B * L * nh * (D // 2)
    return ([("T", dtype), ("BT", bias_dtype), ("D", D), ("HQ", n_heads), ("HKV", n_kv_heads),
             ("MSCALE", _core.f32_bits(mscale))],
            (_core.round_up(max(n, 1), _core.TG), 1, 1), (_core.TG, 1, 1),
            [(B, n_heads, L, D), (B, n_kv_heads, L, D), (B, n_kv_heads, L, D)], [dtype] * 3)


@lru_cache(maxsize=512)
def _args_swiglu(shape, dtype):
    I = shape[-1] // 2
    n = math.prod(shape[:-1]) * I
    return ([("T", dtype), ("I", I)], (_core.round_up(max(n, 1), _core.TG), 1, 1), (_core.TG, 1, 1),
            [(*shape[:-1], I)], [dtype])


QSDPA_CHUNK = 128  # cache positions per threadgroup of quant_sdpa = its threads (CH in its body)


@lru_cache(maxsize=512)
def _args_quant_sdpa(q_shape, dtype, kv_shape, bits, group_size, scale):
    B, HQ, L, D = q_shape
    _, HKV, CAP, _ = kv_shape
    nc = -(-CAP // QSDPA_CHUNK) + 1  # and the tail's
    return ([("T", dtype), ("D", D), ("NREP", HQ // HKV), ("BITS", bits), ("GS", group_size),
             ("SCALE", _core.f32_bits(scale))],
            (B * HKV * nc * QSDPA_CHUNK, 1, 1), (QSDPA_CHUNK, 1, 1), [(B, HQ, nc, D), (B, HQ, nc), (B, HQ, nc)],
            [mx.float32] * 3)


@lru_cache(maxsize=512)
def _args_quant_sdpa_merge(q_shape, dtype):
    B, HQ, L, D = q_shape
    return [("T", dtype), ("D", D)], (B * HQ * (D // 32) * 256, 1, 1), (256, 1, 1), [(B, HQ, 1, D)], [dtype]


@lru_cache(maxsize=512)
def _args_batch_sdpa(q_shape, dtype, kv_shape, scale):
    B, HQ, L, D = q_shape
    _, HKV, CAP, _ = kv_shape
    nc = -(-CAP // QSDPA_CHUNK)
    return ([("T", dtype), ("D", D), ("NREP", HQ // HKV), ("HKV", HKV),
             ("SCALE", _core.f32_bits(scale))],
            (B * HKV * nc * QSDPA_CHUNK, 1, 1), (QSDPA_CHUNK, 1, 1), [(B, HQ, nc, D), (B, HQ, nc), (B, HQ, nc)],
            [mx.float32] * 3)


DSDPA_TG = 256  # threads per threadgroup of decode_sdpa (8 SIMD-groups)


def decode_sdpa_chunk(B, HKV, CAP, D, itemsize):
    """decode_sdpa's cache positions per threadgroup: 64 or 32 where that still gives at least 264
    threadgroups (two per multiprocessor of an H200), else the smallest the layout allows (16, or
    256 / pieces per row)."""
    for ch in (64, 32):
        if B * HKV * -(-CAP // ch) >= 264:
            return ch
    return max(16, DSDPA_TG * 16 // (D * itemsize))


@lru_cache(maxsize=512)
def _args_decode_sdpa(q_shape, dtype, kv_shape, scale):
    B, HQ, L, D = q_shape
    _, HKV, CAP, _ = kv_shape
    ch = decode_sdpa_chunk(B, HKV, CAP, D, dtype.size)
    nc = -(-CAP // ch)
    return ([("T", dtype), ("D", D), ("NREP", HQ // HKV), ("HKV", HKV), ("CH", ch),
             ("SCALE", _core.f32_bits(scale))],
            (B * HKV * nc * DSDPA_TG, 1, 1), (DSDPA_TG, 1, 1), [(B, HQ, nc, D), (B, HQ, nc), (B, HQ, nc)],
            [mx.float32] * 3)


# The norms and swiglu take any leading dimensions (the bodies multiply them out): no reshapes.
def rms_norm(x, weight, eps, **kw):
    (y,) = _run("rms_norm", [x, _as(weight, x.dtype)], ("x", "w"), ("y",),
                _args_norm(tuple(x.shape), x.dtype, 1, float(eps)), **kw)
    return y


def add_rms_norm(x, residual, weight, eps, **kw):
    h, y = _run("add_rms_norm", [x, _as(residual, x.dtype), _as(weight, x.dtype)],
                ("x", "r", "w"), ("h", "y"), _args_norm(tuple(x.shape), x.dtype, 2, float(eps)), **kw)
    return h, y


def _freqs(base, freqs, D):
    return _core.base_freqs(float(base), D) if freqs is None else _as(freqs, mx.float32)


def rope(x, offset, base, freqs=None, mscale=1.0, **kw):
    (out,) = _run("rope", [x, _freqs(base, freqs, x.shape[-1]), _core.pos_array(offset)],
                  ("x", "freqs", "pos0"), ("out",), _args_rope(tuple(x.shape), x.dtype, float(mscale)), **kw)
    return out


def qkv_post(qkv, bias, n_heads, n_kv_heads, offset, base, freqs=None, mscale=1.0, **kw):
    D = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    return tuple(_run(
        "qkv_post", [qkv, bias, _freqs(base, freqs, D), _core.pos_array(offset)],
        ("qkv", "bias", "freqs", "pos0"), ("q", "k", "v"),
        _args_qkv_post(tuple(qkv.shape), qkv.dtype, bias.dtype, n_heads, n_kv_heads, float(mscale)), **kw))


def swiglu(gate_up, **kw):
    (out,) = _run("swiglu", [gate_up], ("gate_up",), ("out",), _args_swiglu(tuple(gate_up.shape), gate_up.dtype), **kw)
    return out


_DT = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16", mx.int32: "int32", mx.uint32: "uint32"}


def _emulate(name, inputs, input_names, output_names, template, grid, threadgroup, out_shapes, out_dtypes):
    import numpy as np

    from . import cpu_emulator

    def to_np(a):
        return ("bfloat16", np.array(a.view(mx.uint16))) if a.dtype == mx.bfloat16 else np.array(a)

    outs = cpu_emulator.run(
        name, [(n, to_np(a)) for n, a in zip(input_names, inputs)],
        [(n, tuple(s), _DT[d]) for n, s, d in zip(output_names, out_shapes, out_dtypes)],
        [(n, _DT[v] if isinstance(v, mx.Dtype) else v) for n, v in template], grid[0], threadgroup[0])
    return [mx.array(o).view(mx.bfloat16) if d == mx.bfloat16 else mx.array(o) for o, d in zip(outs, out_dtypes)]


@lru_cache(maxsize=8)
def _no_tail(B, HKV, D, dtype):
    t = mx.zeros((B, HKV, 1, D), dtype)
    mx.eval(t)
    return t, t, 0


def quant_sdpa(q, keys, values, n, scale, bits, group_size, mask=None, tail=None, body="quant_sdpa", **kw):
    """Decode attention (q [B, HQ, 1, D]) over the first `n` positions of a quantized cache's buffers
    (`keys`, `values`: mlx-lm QuantizedKVCache's (packed, scales, biases), [B, HKV, CAP, ...]) and
    the first nt positions of `tail` = (keys, values, nt) in q's dtype ([B, HKV, <= 128, D]; None:
    none): the kernel's per-chunk partial sums, then quant_sdpa_merge. `mask` must be None (one
    query row sees all positions). `body`: the first pass's file, metal_kernels/<body>.metal (a
    variant with the same inputs and outputs: scripts/probe_attention.py compares them)."""
    if mask is not None or q.shape[2] != 1:
        raise ValueError("the quant_sdpa kernel takes one query position and no mask")
    tk, tv, nt = tail if tail is not None else _no_tail(q.shape[0], keys[0].shape[1], q.shape[-1], q.dtype)
    if tk.shape[2] > QSDPA_CHUNK:
        raise ValueError(f"the quant_sdpa kernel takes a tail of at most {QSDPA_CHUNK} positions")
    part = _run(body, [q, keys[0], _as(keys[1], q.dtype), _as(keys[2], q.dtype), values[0],
                               _as(values[1], q.dtype), _as(values[2], q.dtype), _core.i32_scalar(int(n)),
                               _as(tk, q.dtype), _as(tv, q.dtype), _core.i32_scalar(int(nt))],
                ("q", "kw", "ks", "kb", "vw", "vs", "vb", "n", "tk", "tv", "nt"), ("o", "m", "l"),
                _args_quant_sdpa(tuple(q.shape), q.dtype, tuple(keys[0].shape), bits, group_size, float(scale)), **kw)
    (out,) = _run("quant_sdpa_merge", list(part), ("o", "m", "l"), ("out",),
                  _args_quant_sdpa_merge(tuple(q.shape), q.dtype), **kw)
    return out


def batch_sdpa(q, keys, values, start, n, scale, **kw):
    """Decode attention (q [B, HQ, 1, D]) of a batch whose row b sees positions start[b] .. n-1 of the
    cache buffers `keys`, `values` [B, HKV, CAP, D] (mlx-lm BatchKVCache's keys / values and
    left_padding): the kernel's per-chunk partial sums, then quant_sdpa_merge."""
    if q.shape[2] != 1:
        raise ValueError("the batch_sdpa kernel takes one query position")
    part = _run("batch_sdpa", [q, _as(keys, q.dtype), _as(values, q.dtype), _as(start, mx.int32),
                               _core.i32_scalar(int(n))],
                ("q", "k", "v", "start", "n"), ("o", "m", "l"),
                _args_batch_sdpa(tuple(q.shape), q.dtype, tuple(keys.shape), float(scale)), **kw)
    (out,) = _run("quant_sdpa_merge", list(part), ("o", "m", "l"), ("out",),
                  _args_quant_sdpa_merge(tuple(q.shape), q.dtype), **kw)
    return out


def decode_sdpa(q, keys, values, n, scale, **kw):
    """Decode attention (q [B, HQ, 1, D], bfloat16 or float32) over positions 0 .. n-1 of the cache
    buffers `keys`, `values` [B, HKV, CAP, D] (mlx-lm KVCache's, read in place), laid out for one
    sequence's decode step (decode_sdpa.metal): the kernel's per-chunk partial sums, then
    quant_sdpa_merge. `n`: an int, or an int32 array of one element (best in device memory: see
    _core.f32_bits)."""
    if q.shape[2] != 1:
        raise ValueError("the decode_sdpa kernel takes one query position")
    if q.dtype not in (mx.bfloat16, mx.float32):
        raise ValueError(f"the decode_sdpa kernel takes bfloat16 or float32, not {q.dtype}")
    n = _as(n.reshape(1), mx.int32) if isinstance(n, mx.array) else _core.i32_scalar(int(n))
    part = _run("decode_sdpa", [q, _as(keys, q.dtype), _as(values, q.dtype), n], ("q", "k", "v", "n"), ("o", "m", "l"),
                _args_decode_sdpa(tuple(q.shape), q.dtype, tuple(keys.shape), float(scale)), **kw)
    (out,) = _run("quant_sdpa_merge", list(part), ("o", "m", "l"), ("out",),
                  _args_quant_sdpa_merge(tuple(q.shape), q.dtype), **kw)
    return out
