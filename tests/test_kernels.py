"""metal_kernels: the .metal bodies, their plain-MLX references, and float64 numpy math.

CPU (always): the bodies use no CUDA name; each builds as a Metal kernel (MLX prints the
complete Metal source under mx.export_function, even without a Mac) with the expected
signature; each reference equals float64 numpy on fresh random inputs; each body, compiled
as C++ by metal_kernels.cpu_emulator, equals float64 numpy and its reference (skipped
without a C++20 compiler); the backend switches.
GPU (@pytest.mark.gpu, run on the device machine): each kernel, with outputs poisoned to NaN
before it runs, equals its reference and float64 numpy at decode and prefill shapes.

Tolerances. u is the unit roundoff of the dtype: one rounding to it is off by at most u
relative: bfloat16 2^-8 (8 significant bits), float16 2^-11, float32 2^-24; for float32 we
take 2^-21, since the float32 arithmetic in between (sums of D squares, exp, cos) costs a
few ulps more than the single final rounding. An op that rounds r times to the dtype is off
by about r*u relative; we allow 4u relative to |exact| + a magnitude `mag` that covers
cancellation (RoPE: the pair's length sqrt(x1^2 + x2^2); the bias add in qkv_post: |bias|)
and values that underflow. RoPE angles pos/freqs[i] are float32: their rounding moves the
angle by up to ~2^-24 * pos radians, i.e. the output by that times the pair's length, which
we add (4x) for every dtype (it matters for float32 only).
"""

from __future__ import annotations

import os
import re
import shutil
import secrets
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qwen_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx

import metal_kernels as K
from metal_kernels import _core, cpu_emulator
from metal_kernels import kernels as KK
from metal_kernels import reference as R

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
U = {mx.float32: 2.0**-21, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}
MSL_TYPE = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t"}
HQ, HKV, HD = 14, 2, 64  # Qwen2.5-0.5B: 14 query heads, 2 KV heads, head dim 64


# ---------------------------------------------------------------- helpers
def rng():
    seed = secrets.randbits(32)
    return np.random.default_rng(seed), seed


def mxa(a, dtype):
    return mx.array(np.asarray(a, dtype=np.float32)).astype(dtype)


def f64(a):
    return np.array(a.astype(mx.float32)).astype(np.float64)


def check(out, exact, dtype, mag=0.0, extra=0.0, k=4.0, what=""):
    """|out - exact| <= k u (|exact| + mag) + extra, elementwise; also: out is all finite (not poisoned)."""
    o = f64(out)
    assert o.shape == exact.shape, (what, o.shape, exact.shape)
    assert np.isfinite(o).all(), f"{what}: non-finite values (an element left unwritten?)"
    err = np.abs(o - exact)
    tol = k * U[dtype] * (np.abs(exact) + mag) + extra
    bad = err > tol
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} off, worst err {err[bad].max():.3g} "
                           f"(tol there {tol[bad][np.argmax(err[bad])]:.3g})")


def pair_len(x):
    """sqrt(x1^2 + x2^2) of each rotated pair (i, i + D/2), broadcast to both halves."""
    h = x.shape[-1] // 2
    m = np.sqrt(x[..., :h] ** 2 + x[..., h:] ** 2)
    return np.concatenate([m, m], -1)


# float64 numpy versions of the math
def np_rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_rope(x, pos0, freqs, mscale=1.0):
    D = x.shape[-1]
    L = x.shape[-2]
    x = x * mscale
    ang = (pos0 + np.arange(L))[:, None] / freqs[None, :]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], -1)


def np_freqs(base, D):
    return base ** (np.arange(0, D, 2, dtype=np.float64) / D)


def np_qkv(qkv, bias, hq, hkv, pos0, freqs, mscale=1.0):
    B, L, F = qkv.shape
    nh = hq + 2 * hkv
    h = (qkv + bias).reshape(B, L, nh, -1).transpose(0, 2, 1, 3)
    b = np.broadcast_to(np.abs(bias).reshape(1, nh, 1, -1), h.shape)
    q, k, v = h[:, :hq], h[:, hq:hq + hkv], h[:, hq + hkv:]
    mags = [pair_len(t) * mscale + pair_len(bt) * mscale for t, bt in
            ((q, b[:, :hq]), (k, b[:, hq:hq + hkv]), (v, b[:, hq + hkv:]))]
    return (np_rope(q, pos0, freqs, mscale), np_rope(k, pos0, freqs, mscale), v), mags


def np_swiglu(gu):
    i = gu.shape[-1] // 2
    g, u = gu[..., :i], gu[..., i:]
    return g / (1 + np.exp(-g)) * u


def yarn(D=HD, base=1e6):
    from mlx_lm.models.rope_utils import YarnRoPE

    r = YarnRoPE(D, max_position_embeddings=131072, base=base, scaling_factor=4.0,
                 original_max_position_embeddings=32768)
    return r._freqs, float(r.mscale)


def angle_extra(x64, pos_max, mscale=1.0):
    return 4 * 2.0**-24 * pos_max * pair_len(x64) * mscale


# ------------------------------------------------------- op cases (shared by CPU, emulator, GPU)
def case_rms(impl, dtype, shape, g):
    x64 = g.standard_normal(shape) * 2.0
    w64 = 1 + 0.2 * g.standard_normal(shape[-1])
    x, w = mxa(x64, dtype), mxa(w64, dtype)
    y = impl.rms_norm(x, w, 1e-6)
    check(y, np_rms(f64(x), f64(w), 1e-6), dtype, mag=1e-3, what=f"rms_norm {dtype} {shape}")
    return y


def case_add_rms(impl, dtype, shape, g):
    x, r = mxa(g.standard_normal(shape), dtype), mxa(3 * g.standard_normal(shape), dtype)
    w = mxa(1 + 0.2 * g.standard_normal(shape[-1]), dtype)
    h, y = impl.add_rms_norm(x, r, w, 1e-5)
    h64 = f64(x) + f64(r)
    check(h, h64, dtype, mag=1e-3, k=1, what=f"add_rms_norm h {dtype} {shape}")
    check(y, np_rms(h64, f64(w), 1e-5), dtype, mag=1e-3, what=f"add_rms_norm y {dtype} {shape}")
    return h, y


def case_rope(impl, dtype, shape, offset, g, yarn_scaled=False):
    x = mxa(g.standard_normal(shape), dtype)
    D, L = shape[-1], shape[-2]
    if yarn_scaled:
        freqs, mscale = yarn(D)
        out = impl.rope(x, offset, None, freqs=freqs, mscale=mscale)
        fr = np.array(freqs).astype(np.float64)
    else:
        mscale = 1.0
        out = impl.rope(x, offset, 1e6)
        fr = np_freqs(1e6, D)
    pos0 = int(np.array(offset).reshape(-1)[0]) if isinstance(offset, mx.array) else offset
    x64 = f64(x)
    check(out, np_rope(x64, pos0, fr, mscale), dtype, mag=pair_len(x64) * mscale,
          extra=angle_extra(x64, pos0 + L, mscale), what=f"rope {dtype} {shape} offset {pos0} yarn {yarn_scaled}")
    return out


def case_qkv(impl, dtype, B, L, offset, g, hq=HQ, hkv=HKV, D=HD, bias_dtype=None, yarn_scaled=False):
    nh = hq + 2 * hkv
    qkv = mxa(g.standard_normal((B, L, nh * D)), dtype)
    bias = mxa(0.5 * g.standard_normal(nh * D), bias_dtype or dtype)
    if yarn_scaled:
        freqs, mscale = yarn(D)
        outs = impl.qkv_post(qkv, bias, hq, hkv, offset, None, freqs=freqs, mscale=mscale)
        fr = np.array(freqs).astype(np.float64)
    else:
        mscale = 1.0
        outs = impl.qkv_post(qkv, bias, hq, hkv, offset, 1e6)
        fr = np_freqs(1e6, D)
    pos0 = int(np.array(offset).reshape(-1)[0]) if isinstance(offset, mx.array) else offset
    exact, mags = np_qkv(f64(qkv), f64(bias), hq, hkv, pos0, fr, mscale)
    for name, o, e, m in zip("qkv", outs, exact, mags):
        extra = angle_extra(m, pos0 + L) if name != "v" else 0.0
        check(o, e, dtype, mag=m, extra=extra,
              what=f"qkv_post {name} {dtype} bias {bias.dtype} B{B} L{L} offset {pos0} yarn {yarn_scaled}")
    return outs


def case_swiglu(impl, dtype, shape, g):
    gu = mxa(2 * g.standard_normal(shape), dtype)
    out = impl.swiglu(gu)
    check(out, np_swiglu(f64(gu)), dtype, mag=1e-3, what=f"swiglu {dtype} {shape}")
    return out


# ================================================================ CPU tests
CUDA_NAMES = re.compile(r"__global__|__device__|__shared__|__syncthreads|__syncwarp|threadIdx|blockIdx|blockDim|"
                        r"gridDim|warpSize|__half|__nv_bfloat16|__shfl|atomicAdd|__forceinline__|cuda", re.I)


@pytest.mark.parametrize("name", sorted(f.stem for f in _core.DIR.glob("*.metal")))  # every body, table or not
def test_body_has_no_cuda_names(name):
    text = _core.metal_file(name).read_text()
    found = sorted(set(m.group(0) for m in CUDA_NAMES.finditer(text)))
    assert not found, f"{name}.metal uses CUDA names {found}: bodies must stay Metal (msl_compat.h maps them)"
    header, body = _core.load_source(name)
    assert header.startswith("// " + name), f"{name}.metal: comment header first"


def metal_source(capfd, tmp_path, fn, *args):
    """The Metal source MLX generates for the kernel call(s) in fn (printed from C++ with verbose=True)."""
    capfd.readouterr()
    mx.export_function(str(tmp_path / "k.mlxfn"), fn, *args)
    out = capfd.readouterr().out
    assert "Generated source code for" in out
    return out


METAL_CASES = {  # op -> (call with backend='metal', expected input/output names, attributes, template)
    "rms_norm": (lambda x, dt: KK.rms_norm(x.reshape(3, 896), mx.ones((896,), dt), 1e-6, **METAL),
                 ["x", "w"], ["y"], ["threadgroup_position_in_grid", "thread_index_in_threadgroup",
                                         "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup"],
                 "template <typename T, int D, int TG, int EPS>", "896, 224, 897988541"),
    "add_rms_norm": (lambda x, dt: KK.add_rms_norm(x.reshape(3, 896), x.reshape(3, 896), mx.ones((896,), dt),
                                                   1e-6, **METAL),
                     ["x", "r", "w"], ["h", "y"], ["threadgroup_position_in_grid", "thread_index_in_simdgroup"],
                     "template <typename T, int D, int TG, int EPS>", "896, 224, 897988541"),
    "rope": (lambda x, dt: KK.rope(x.reshape(1, 6, 7, 64), 255, 1e6, **METAL),
             ["x", "freqs", "pos0"], ["out"], ["thread_position_in_grid"],
             "template <typename T, int D, int MSCALE>", "64, 1065353216"),
    "qkv_post": (lambda x, dt: KK.qkv_post(x.reshape(1, 2, 18 * 64)[:, :, :], mx.zeros((18 * 64,), mx.float16),
                                           14, 2, 255, 1e6, **METAL),
                 ["qkv", "bias", "freqs", "pos0"], ["q", "k", "v"], ["thread_position_in_grid"],
                 "template <typename T, typename BT, int D, int HQ, int HKV, int MSCALE>",
                 "float16_t, 64, 14, 2, 1065353216"),
    "swiglu": (lambda x, dt: KK.swiglu(x.reshape(3, 2, 448), **METAL),
               ["gate_up"], ["out"], ["thread_position_in_grid"], "template <typename T, int I>", "224"),
}
METAL = dict(backend="metal", stream=mx.gpu, verbose=True)


@pytest.mark.skipif(mx.cuda.is_available(), reason="MLX's CUDA build runs metal_kernel as CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(METAL_CASES))
def test_metal_source(name, dtype, capfd, tmp_path):
    call, ins, outs, attrs, template, inst = METAL_CASES[name]
    n = 3 * 896 if name != "qkv_post" else 2 * 18 * 64
    src = metal_source(capfd, tmp_path, lambda x: call(x, dtype), mx.zeros((n,), dtype))
    t = MSL_TYPE[dtype]
    assert re.search(rf"\[\[kernel\]\] void custom_kernel_qwen_{name}_[0-9a-f]{{10}}_", src)
    assert template in src
    for a in ins:
        assert re.search(rf"const (device|constant) \w+\* {a} \[\[buffer\(\d+\)\]\]", src), a
    for o in outs:
        assert re.search(rf"\n  device {t}\* {o} \[\[buffer\(\d+\)\]\]", src), o
    for a in attrs:
        assert re.search(rf"uint3? {a} \[\[{a}\]\]", src), a
    assert re.search(rf"template \[\[host_name\(\"custom_kernel_qwen_{name}_\w+\"\)\]\] \[\[kernel\]\] "
                     rf"decltype\(.*<{t}, {re.escape(inst)}>\)", src)
    header, body = _core.kernel_source(name, "metal")
    assert body.strip() in src and header.strip() in src
    assert _core.used_common(body).strip() in src, "the common.h helpers a body uses are in its source"
    if name in ("rope", "qkv_post"):
        assert src.index("METAL_FUNC RotatedPair rope_pair") < src.index("[[kernel]]")
    else:
        assert "rope_pair" not in src, "a helper the body does not call is left out"
    raw_header, raw_body = _core.load_source(name)
    assert raw_header.splitlines()[0] not in src and "// ---- body ----" not in src, "no comments reach MLX"


# What common.h owns is written there only: a body that re-implements it fails here.
SHARED_CODE = {"simd_sum(": "threadgroup_sum", "threadgroup_barrier(": "threadgroup_sum",
               "metal::precise::cos(": "rope_pair", "metal::precise::sin(": "rope_pair"}


@pytest.mark.parametrize("name", _core.KERNEL_NAMES)
def test_shared_device_code_in_one_place(name):
    header, body = _core.load_source(name)
    for code, helper in SHARED_CODE.items():
        assert code not in body, f"{name}.metal writes {code}...: call common.h's {helper} instead"
        assert code in _core.common_header()
    if name in ("rms_norm", "add_rms_norm"):
        assert "threadgroup_sum<TG>(" in body
    if name in ("rope", "qkv_post"):
        assert "rope_pair(" in body


def test_common_header_on_every_back_end():
    found = sorted(set(m.group(0) for m in CUDA_NAMES.finditer(_core.common_header())))
    assert not found, f"common.h uses CUDA names {found}: it must stay Metal (msl_compat.h maps them)"
    for name in _core.KERNEL_NAMES:
        body = _core.kernel_source(name, "metal")[1]
        common = _core.used_common(body)
        assert _core.full_header(name, "metal").startswith(common)
        cuda = _core.full_header(name, "cuda")
        # on CUDA the helpers must come after msl_compat.h's METAL_FUNC and before its `#define device`
        # (which would turn __device__ into an empty attribute)
        assert cuda.index("#define METAL_FUNC __device__") < cuda.index(common) < cuda.index("#define device\n")
    # the header travels with the package (pyproject's package-data)
    pyproject = (Path(_core.DIR).parent / "pyproject.toml").read_text()
    assert re.search(r'^metal_kernels = \[.*"\*\.h".*\]', pyproject, re.M)


def test_sources_carry_no_comments_and_only_used_definitions():
    """MLX copies and hashes a kernel's whole source on every call: no prose, and of common.h and
    msl_compat.h only what the body uses (directly or through another kept definition)."""
    for name in _core.KERNEL_NAMES:
        for backend in ("metal", "cuda"):
            header, body = _core.kernel_source(name, backend)
            assert "//" not in header + body, (name, backend)
        header, body = _core.kernel_source(name, "cuda")
        uses_simd = "simd_sum" in header.split("threadgroup_sum", 1)[-1] or "simd_sum(" in body
        assert ("U simd_sum(" in header) == uses_simd, name
        assert "simd_max" not in header and "simd_broadcast" not in header  # no body uses them
        assert ("float cos(" in header) == (name in ("rope", "qkv_post")), name
        full = len(_core.compat_header()) + len(_core.common_header()) + sum(map(len, _core.load_source(name)))
        assert len(header + body) < 0.6 * full, (name, len(header + body), full)
    # pruning follows what a kept definition itself uses
    text = ("head\n// @provides a\nint a = b;\n// @provides b\nint b = 1;\n// @provides c\nint c;\n")
    assert _core.prune(text, "x = a") == "head\nint a = b;\nint b = 1;\n"
    assert _core.minify("int x;  // note\n\n// only a comment\n  y();\n") == "int x;\n  y();\n"


# Enough of CUDA for g++ to parse msl_compat.h + common.h + a body (declarations only: nothing runs).
CUDA_STUBS = r"""
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#define __device__
#define __forceinline__ inline
#define __shared__ static
struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; operator uint3() const { return {x, y, z}; } };
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
inline void __syncthreads() {}
inline void __syncwarp() {}
template <typename U> U __shfl_xor_sync(unsigned, U x, int) { return x; }
template <typename U> U __shfl_sync(unsigned, U x, int) { return x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
struct __nv_bfloat16 { __nv_bfloat16() = default; __nv_bfloat16(float) {} operator float() const { return 0; } };
"""

CUDA_CASES = {  # op -> (inputs, outputs, template)
    "rms_norm": (["x", "w"], ["y"], "using T = __nv_bfloat16; constexpr int D = 896; constexpr int TG = 224; constexpr int EPS = 897988541;"),
    "add_rms_norm": (["x", "r", "w"], ["h", "y"],
                     "using T = __nv_bfloat16; constexpr int D = 896; constexpr int TG = 224; constexpr int EPS = 897988541;"),
    "rope": (["x", "freqs", "pos0"], ["out"], "using T = __nv_bfloat16; constexpr int D = 64; constexpr int MSCALE = 1065353216;"),
    "qkv_post": (["qkv", "bias", "freqs", "pos0"], ["q", "k", "v"],
                 "using T = __nv_bfloat16; using BT = float; constexpr int D = 64; constexpr int HQ = 14; "
                 "constexpr int HKV = 2; constexpr int MSCALE = 1065353216;"),
    "swiglu": (["gate_up"], ["out"], "using T = __nv_bfloat16; constexpr int I = 4864;"),
}


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("name", _core.KERNEL_NAMES)
def test_pruned_cuda_source_parses(name, tmp_path):
    """What goes to mx.fast.cuda_kernel, after pruning, still declares everything the body names:
    msl_compat.h's kept parts + common.h's + the body, parsed by g++ against CUDA stubs (the GPU
    tests compile it with NVRTC for real)."""
    header, body = _core.kernel_source(name, "cuda")
    ins, outs, consts = CUDA_CASES[name]
    params = [f"const int* {n}" if n == "pos0" else f"const float* {n}" for n in ins]
    params = [p.replace("float", "T") if p.split()[-1] in ("x", "r", "w", "qkv", "gate_up") else p for p in params]
    params += [f"const int* {n}_shape, const int {n}_ndim" for n in ins] + [f"T* {n}" for n in outs]
    src = (CUDA_STUBS + header + "namespace mlx::core::cu {\n" + consts + f"\nvoid custom_kernel({', '.join(params)}) {{\n{body}\n}}\n}}\n")
    if name == "qkv_post":  # the bias has its own type
        src = src.replace("const float* bias", "const BT* bias")
    (tmp_path / "k.cpp").write_text(src)
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", str(tmp_path / "k.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_vs_float64(dtype):
    g, seed = rng()
    print("seed", seed)
    case_rms(R, dtype, (2, 7, 896), g)
    case_rms(R, dtype, (1, 1, 100), g)
    case_add_rms(R, dtype, (2, 5, 100), g)
    case_rope(R, dtype, (2, 3, 7, 64), 255, g)
    case_rope(R, dtype, (1, 2, 5, 64), mx.array([257], mx.int32), g, yarn_scaled=True)
    case_qkv(R, dtype, 2, 7, 256, g)
    case_qkv(R, dtype, 1, 1, 255, g, bias_dtype=mx.float16, yarn_scaled=True)
    case_swiglu(R, dtype, (2, 3, 200), g)


needs_cxx = pytest.mark.skipif(not cpu_emulator.available(), reason="no C++20 compiler for metal_kernels.cpu_emulator")


class Emulated:
    """metal_kernels.kernels with backend='cpu-emulator': the real wrappers and bodies, run on the CPU."""

    def __getattr__(self, op):
        return lambda *a, **kw: getattr(KK, op)(*a, backend="cpu-emulator", **kw)


@needs_cxx
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_bodies(dtype):
    g, seed = rng()
    print("seed", seed)
    E = Emulated()
    for shape in [(1, 1, 896), (2, 3, 100), (1, 2, 3584)]:
        case_rms(E, dtype, shape, g)
        case_add_rms(E, dtype, shape, g)
    for shape, off in [((1, 14, 1, 64), 256), ((2, 2, 7, 64), mx.array([255], mx.int32)), ((1, 1, 3, 128), 0)]:
        case_rope(E, dtype, shape, off, g)
    case_rope(E, dtype, (1, 2, 3, 64), 257, g, yarn_scaled=True)
    for B, L, off in [(1, 1, 257), (2, 7, 0)]:
        case_qkv(E, dtype, B, L, off, g, bias_dtype=mx.float16)
    case_qkv(E, dtype, 1, 3, 256, g, hq=4, hkv=1, D=128, yarn_scaled=True)
    case_swiglu(E, dtype, (2, 3, 200), g)
    case_swiglu(E, dtype, (1, 1, 2 * 4864), g)
    # and the bodies agree with the references (same rounding points)
    x = mxa(g.standard_normal((2, 3, 100)), dtype)
    w = mxa(1 + 0.1 * g.standard_normal(100), dtype)
    check(E.rms_norm(x, w, 1e-6), f64(R.rms_norm(x, w, 1e-6)), dtype, mag=1e-3, k=2, what="emulated vs reference")


def test_backend_switches():
    assert K.backend() in ("metal", "cuda", "reference")
    old = K._mode
    try:
        K.set_backend("reference")
        assert K.backend() == "reference"
        x = mx.ones((2, 8))
        assert mx.array_equal(K.rms_norm(x, mx.ones((8,)), 1e-6), R.rms_norm(x, mx.ones((8,)), 1e-6))
        K.set_backend("auto")
        with pytest.raises(ValueError):
            K.set_backend("fast")
    finally:
        K.set_backend(old)
    env = dict(os.environ, QWEN_MLX_KERNELS="reference",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = subprocess.run([sys.executable, "-c", "import qwen_mlx, metal_kernels as K; print(K.backend())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "reference"
    assert set(K.USE) == set(_core.KERNEL_NAMES)


def test_cpu_is_reference():
    if mx.default_device() == mx.gpu:
        pytest.skip("default device is a GPU")
    assert K.backend() == "reference"
    with pytest.raises(RuntimeError):
        KK.rms_norm(mx.ones((2, 8)), mx.ones((8,)), 1e-6)


def test_kernel_objects_built_once():
    a = _core.get_kernel("swiglu", ("gate_up",), ("out",), "metal")
    assert a is _core.get_kernel("swiglu", ("gate_up",), ("out",), "metal")
    assert _core.f32_bits(1e-6) == 897988541  # 1e-6's float32 bits (0x358637BD)
    assert struct.unpack("<f", struct.pack("<i", _core.f32_bits(0.0884)))[0] == np.float32(0.0884)
    with pytest.raises(ValueError, match="non-negative"):
        _core.f32_bits(-1.0)
    assert _core.base_freqs(1e6, 64) is _core.base_freqs(1e6, 64)
    assert _core.pos_array(5) is _core.pos_array(5)


# ================================================================ GPU tests
@pytest.fixture
def poisoned(monkeypatch):
    """Outputs filled with NaN before each kernel runs: an unwritten element fails check()."""
    monkeypatch.setattr(KK, "POISON", True)


def ref_match(out, ref, dtype, mag=0.0, extra=0.0, what=""):
    """Kernel vs reference. Both round where the unfused ops round, but their float32 parts differ
    in the last bits (sum order, rsqrt, cos), so an intermediate rounding to the dtype may land on
    the neighbouring value (one ulp, <= 2u relative) and the final one too: 4u."""
    check(out, f64(ref), dtype, mag=mag, extra=extra, k=4.0, what=what + " vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 896), (1, 7, 896), (2, 128, 896), (1, 515, 896), (1, 1, 100), (2, 7, 100),
                                   (1, 3, 3584), (1, 2, 8192)])
def test_gpu_norms(dtype, shape, poisoned):
    g, seed = rng()
    print("seed", seed)
    case_rms(KK, dtype, shape, g)
    case_add_rms(KK, dtype, shape, g)
    x, r = mxa(2 * g.standard_normal(shape), dtype), mxa(g.standard_normal(shape), dtype)
    w = mxa(1 + 0.2 * g.standard_normal(shape[-1]), dtype)
    ref_match(KK.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6), dtype, mag=1e-3, what="rms_norm")
    (h, y), (hr, yr) = KK.add_rms_norm(x, r, w, 1e-6), R.add_rms_norm(x, r, w, 1e-6)
    ref_match(h, hr, dtype, mag=1e-3, what="add_rms_norm h")
    ref_match(y, yr, dtype, mag=1e-3, what="add_rms_norm y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,offset", [((1, 14, 1, 64), 0), ((1, 2, 1, 64), 255), ((2, 14, 7, 64), 256),
                                          ((1, 14, 128, 64), 257), ((1, 14, 515, 64), 0), ((2, 4, 7, 128), 1000)])
@pytest.mark.parametrize("as_array", [False, True])
def test_gpu_rope(dtype, shape, offset, as_array, poisoned):
    g, seed = rng()
    print("seed", seed)
    off = mx.array([offset], mx.int32) if as_array else offset
    for yarn_scaled in (False, True):
        case_rope(KK, dtype, shape, off, g, yarn_scaled=yarn_scaled)
    x = mxa(g.standard_normal(shape), dtype)
    x64 = f64(x)
    ref_match(KK.rope(x, off, 1e6), R.rope(x, off, 1e6), dtype, mag=pair_len(x64),
              extra=angle_extra(x64, offset + shape[-2]), what="rope")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,L,offset", [(1, 1, 0), (1, 1, 255), (1, 1, 256), (2, 1, 257), (1, 7, 255), (2, 128, 0),
                                        (1, 515, 257)])
def test_gpu_qkv_post(dtype, B, L, offset, poisoned):
    g, seed = rng()
    print("seed", seed)
    case_qkv(KK, dtype, B, L, offset, g)
    case_qkv(KK, dtype, B, L, mx.array([offset], mx.int32), g, bias_dtype=mx.float16)
    case_qkv(KK, dtype, B, L, offset, g, bias_dtype=mx.float32, yarn_scaled=True)
    if L <= 7:
        case_qkv(KK, dtype, B, L, offset, g, hq=28, hkv=4, D=128)  # Qwen2.5-7B geometry
    nh = HQ + 2 * HKV
    qkv = mxa(g.standard_normal((B, L, nh * HD)), dtype)
    bias = mxa(0.5 * g.standard_normal(nh * HD), mx.float16)
    for name, o, r in zip("qkv", KK.qkv_post(qkv, bias, HQ, HKV, offset, 1e6),
                          R.qkv_post(qkv, bias, HQ, HKV, offset, 1e6)):
        m = pair_len(f64(r))
        ref_match(o, r, dtype, mag=m, extra=angle_extra(m, offset + L), what=f"qkv_post {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 2 * 4864), (1, 7, 2 * 4864), (2, 128, 2 * 4864), (1, 515, 2 * 4864),
                                   (2, 7, 200), (1, 1, 2 * 18944)])
def test_gpu_swiglu(dtype, shape, poisoned):
    g, seed = rng()
    print("seed", seed)
    case_swiglu(KK, dtype, shape, g)
    gu = mxa(2 * g.standard_normal(shape), dtype)
    ref_match(KK.swiglu(gu), R.swiglu(gu), dtype, mag=1e-3, what="swiglu")


@pytest.mark.gpu
def test_gpu_dispatch_and_compile():
    """The top-level functions use the kernels when forced, and the kernels run inside mx.compile."""
    assert K.backend() in ("metal", "cuda")
    g, _ = rng()
    dt = mx.bfloat16
    qkv = mxa(g.standard_normal((1, 1, 18 * 64)), dt)
    bias = mxa(g.standard_normal(18 * 64), dt)
    x = mxa(g.standard_normal((1, 1, 896)), dt)
    w = mxa(g.standard_normal(896), dt)
    old = K._mode
    try:
        K.set_backend("kernels")
        a = K.qkv_post(qkv, bias, HQ, HKV, 300, 1e6)
        b = KK.qkv_post(qkv, bias, HQ, HKV, 300, 1e6)
        for u, v in zip(a, b):
            assert mx.array_equal(u, v)
        step = mx.compile(lambda x, r: K.add_rms_norm(x, r, w, 1e-6)[1])
        assert mx.array_equal(step(x, x), KK.add_rms_norm(x, x, w, 1e-6)[1])
        K.set_backend("reference")
        for u, v in zip(K.qkv_post(qkv, bias, HQ, HKV, 300, 1e6), R.qkv_post(qkv, bias, HQ, HKV, 300, 1e6)):
            assert mx.array_equal(u, v)
    finally:
        K.set_backend(old)
