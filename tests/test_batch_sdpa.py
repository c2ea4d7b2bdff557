"""metal_kernels' batch_sdpa: decode attention for a batch whose rows start at their left padding
(mlx-lm's BatchKVCache), against float64 numpy.

Each row's exact answer is float64 attention over its own positions start[b] .. n-1. Fresh seeded
inputs each run (the seed is printed). The tolerances are test_quant_sdpa's (its module docstring
argues them): the kernel's arithmetic is quant_sdpa's over its full-precision tail (float32 scores
summed d = 0, 1, ..., chunks of 128 positions, the same merge), and the key's conversion to float32
is exact here, so quant_sdpa's bound, which counts one rounding more per product, holds. The
reference (a boolean mask, then mx.fast.scaled_dot_product_attention) is checked over its rounded
operands like quant_sdpa's reference. Positions before a row's start and past n hold NaN: a kernel
that read them would fail.

CPU: the reference; the kernel body through metal_kernels.cpu_emulator; the Metal source MLX would
compile. GPU (@pytest.mark.gpu): the kernel on the device (batched generation through it is
test_batch's GPU test).
"""

import numpy as np
import pytest

import mlx.core as mx

import metal_kernels as K
from metal_kernels import _core, cpu_emulator
from metal_kernels import kernels as KK
from metal_kernels import reference as R

from test_kernels import f64, metal_source  # noqa: E402  (tests/ is on sys.path)
from test_quant_sdpa import attend, check, rng  # noqa: E402

CASES = [  # B, HKV, NREP, D, CAP, n: padding in one chunk, across chunks, a row's start in the last
    (3, 2, 7, 64, 256, 139),   # chunk; CAP not a multiple of 128; GQA 3, 7, 8 and 1; head dims 64,
    (2, 1, 3, 128, 300, 300),  # 128 and 32; a row with no padding, a row with one position
    (4, 1, 8, 32, 512, 400),
    (2, 2, 1, 64, 1024, 1000),
]


def make_case(g, dtype, B, HKV, NREP, D, cap, n):
    """Cache buffers with NaN outside each row's positions, the query, the starts (the first row
    unpadded, the last seeing one position), and each row's float64 answer."""
    start = g.integers(0, n, B)
    start[0], start[-1] = 0, n - 1
    pos = np.arange(cap)
    outside = ((pos[None] < start[:, None]) | (pos[None] >= n))[:, None, :, None]
    k, v = (mx.array(np.where(outside, np.nan, s * g.standard_normal((B, HKV, cap, D))), dtype) for s in (3.0, 1.0))
    q = mx.array(g.standard_normal((B, HKV * NREP, 1, D)), dtype)
    scale = D ** -0.5
    qs = f64(q).reshape(B, HKV, NREP, 1, D) * scale
    answers = [attend(qs[b:b + 1], f64(k)[b:b + 1, :, start[b]:n], f64(v)[b:b + 1, :, start[b]:n]) for b in range(B)]
    return q, k, v, mx.array(start, mx.int32), scale, answers


def check_rows(out, answers, dtype, what, sdpa=False):
    for b, ans in enumerate(answers):
        check(out[b:b + 1], ans, dtype, f"{what} row {b}", sdpa)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_reference_matches_float64(dtype):
    g = rng()
    for B, HKV, NREP, D, cap, n in CASES:
        q, k, v, start, scale, _ = make_case(g, dtype, B, HKV, NREP, D, cap, n)
        k, v = (mx.where(mx.isnan(a), mx.zeros_like(a), a) for a in (k, v))  # masked, but 0 * NaN = NaN
        ref = R.batch_sdpa(q, k, v, start, n, scale)
        qs = f64(mx.array(scale, dtype) * q).reshape(B, HKV, NREP, 1, D)  # its operands, as rounded
        s = np.array(start)
        answers = [attend(qs[b:b + 1], f64(k)[b:b + 1, :, s[b]:n], f64(v)[b:b + 1, :, s[b]:n]) for b in range(B)]
        check_rows(ref, answers, dtype, f"reference {dtype} n={n}", sdpa=True)


@pytest.mark.skipif(not cpu_emulator.available(), reason="no C++20 compiler for metal_kernels.cpu_emulator")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_emulated_kernel_matches_float64(dtype):
    g = rng()
    for B, HKV, NREP, D, cap, n in CASES:
        q, k, v, start, scale, answers = make_case(g, dtype, B, HKV, NREP, D, cap, n)
        out = KK.batch_sdpa(q, k, v, start, n, scale, backend="cpu-emulator")
        check_rows(out, answers, dtype, f"emulated kernel {dtype} n={n}")


def test_in_no_table():  # (its body's Metal-only names and header: test_kernels.test_body_has_no_cuda_names)
    assert "batch_sdpa" not in K.USE  # not a speed choice: see metal_kernels.runs_batch_sdpa


def test_dispatch_on_this_machine():
    keys = mx.zeros((2, 2, 256, 64))
    assert K.batch_sdpa_fits(mx.zeros((2, 14, 1, 64)), keys)
    assert not K.batch_sdpa_fits(mx.zeros((2, 14, 2, 64)), keys)  # a prefill chunk
    assert not K.batch_sdpa_fits(mx.zeros((2, 18, 1, 64)), keys)  # 9 query heads per KV head
    assert not K.batch_sdpa_fits(mx.zeros((2, 14, 1, 256)), mx.zeros((2, 2, 256, 256)))  # head dim over 128
    if mx.default_device() == mx.cpu:
        assert not K.runs_batch_sdpa()  # the reference runs on the CPU
    elif _core.gpu_backend() == "cuda":
        assert K.runs_batch_sdpa()


@pytest.mark.skipif(mx.cuda.is_available(), reason="MLX's CUDA build runs metal_kernel as CUDA")
def test_metal_source(capfd, tmp_path):
    g = np.random.default_rng(0)
    q, k, v, start, scale, _ = make_case(g, mx.float16, 2, 2, 7, 64, 256, 20)
    call = lambda q: KK.batch_sdpa(q, k, v, start, 20, scale, backend="metal", stream=mx.gpu, verbose=True)
    src = metal_source(capfd, tmp_path, call, q)
    assert "[[kernel]] void custom_kernel_qwen_batch_sdpa_" in src
    assert "template <typename T, int D, int NREP, int HKV, int SCALE>" in src  # the scale's bits
    assert "[[kernel]] void custom_kernel_qwen_quant_sdpa_merge_" in src  # the second pass
    for a in ("q", "k", "v", "start", "n"):
        assert f"* {a} [[buffer(" in src, a
    assert "* scale [[buffer(" not in src


@pytest.mark.gpu
def test_gpu_kernel_matches_float64(monkeypatch):
    monkeypatch.setattr(KK, "POISON", True)  # an output element the kernel does not write stays NaN
    g = rng()
    for dtype in (mx.bfloat16, mx.float32):
        for B, HKV, NREP, D, cap, n in CASES + [(32, 2, 7, 64, 512, 300), (4, 4, 7, 128, 9216, 9000)]:
            q, k, v, start, scale, answers = make_case(g, dtype, B, HKV, NREP, D, cap, n)
            out = KK.batch_sdpa(q, k, v, start, n, scale)
            check_rows(out, answers, dtype, f"GPU kernel {dtype} B={B} n={n}")
