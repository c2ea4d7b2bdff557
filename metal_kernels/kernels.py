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

import mlx.core as mx

from . import _core

POISON = False


def _run(name, inputs, input_names, output_names, template, grid, threadgroup, out_shapes, out_dtypes,
         backend=None, stream=None, verbose=False):
    backend = backend or _core.gpu_backend()
    if backend == "cpu-emulator":
        return _emulate(name, inputs, input_names, output_names, template, grid, threadgroup, out_shapes, out_dtypes)
    if backend is None:
        raise RuntimeError("metal_kernels.kernels needs a GPU (Metal or CUDA); use metal_kernels.reference")
    kernel = _core.get_kernel(name, tuple(input_names), tuple(output_names), backend)
    kw = {"stream": stream} if stream is not None else {}
    return kernel(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                  output_shapes=out_shapes, output_dtypes=out_dtypes, verbose=verbose,
                  init_value=float("nan") if POISON else None, **kw)


def rms_norm(x, weight, eps, **kw):
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    tg = _core.row_threads(D)
    (y,) = _run("rms_norm", [x2, weight.astype(x.dtype), _core.f32_scalar(eps)], ("x", "w", "eps"), ("y",),
                [("T", x.dtype), ("D", D), ("TG", tg)], (x2.shape[0] * tg, 1, 1), (tg, 1, 1),
                [x2.shape], [x.dtype], **kw)
    return y.reshape(x.shape)


def add_rms_norm(x, residual, weight, eps, **kw):
    D = x.shape[-1]
    x2, r2 = x.reshape(-1, D), residual.astype(x.dtype).reshape(-1, D)
    tg = _core.row_threads(D)
    h, y = _run("add_rms_norm", [x2, r2, weight.astype(x.dtype), _core.f32_scalar(eps)], ("x", "r", "w", "eps"),
                ("h", "y"), [("T", x.dtype), ("D", D), ("TG", tg)], (x2.shape[0] * tg, 1, 1), (tg, 1, 1),
                [x2.shape, x2.shape], [x.dtype, x.dtype], **kw)
    return h.reshape(x.shape), y.reshape(x.shape)


def _freqs(base, freqs, D):
    return _core.base_freqs(float(base), D) if freqs is None else freqs.astype(mx.float32)


def rope(x, offset, base, freqs=None, mscale=1.0, **kw):
    B, H, L, D = x.shape
    n = B * H * L * (D // 2)
    (out,) = _run("rope", [x, _freqs(base, freqs, D), _core.pos_array(offset), _core.f32_scalar(mscale)],
                  ("x", "freqs", "pos0", "mscale"), ("out",), [("T", x.dtype), ("D", D)],
                  (_core.round_up(max(n, 1), _core.TG), 1, 1), (_core.TG, 1, 1), [x.shape], [x.dtype], **kw)
    return out


def qkv_post(qkv, bias, n_heads, n_kv_heads, offset, base, freqs=None, mscale=1.0, **kw):
    B, L, F = qkv.shape
    nh = n_heads + 2 * n_kv_heads
    D = F // nh
    n = B * L * nh * (D // 2)
    return tuple(_run(
        "qkv_post", [qkv, bias, _freqs(base, freqs, D), _core.pos_array(offset), _core.f32_scalar(mscale)],
        ("qkv", "bias", "freqs", "pos0", "mscale"), ("q", "k", "v"),
        [("T", qkv.dtype), ("BT", bias.dtype), ("D", D), ("HQ", n_heads), ("HKV", n_kv_heads)],
        (_core.round_up(max(n, 1), _core.TG), 1, 1), (_core.TG, 1, 1),
        [(B, n_heads, L, D), (B, n_kv_heads, L, D), (B, n_kv_heads, L, D)], [qkv.dtype] * 3, **kw))


def swiglu(gate_up, **kw):
    I = gate_up.shape[-1] // 2
    g2 = gate_up.reshape(-1, 2 * I)
    n = g2.shape[0] * I
    (out,) = _run("swiglu", [g2], ("gate_up",), ("out",), [("T", gate_up.dtype), ("I", I)],
                  (_core.round_up(max(n, 1), _core.TG), 1, 1), (_core.TG, 1, 1), [(g2.shape[0], I)],
                  [gate_up.dtype], **kw)
    return out.reshape(*gate_up.shape[:-1], I)


_DT = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16", mx.int32: "int32"}


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
