"""metal_kernels' quant_sdpa: decode attention over a quantized KV cache (mlx-lm's QuantizedKVCache).

The exact answer is float64 numpy over the cache dequantized in float64 from its packed integers,
scales and biases (the values the kernel computes with). Fresh seeded inputs each run (the seed is
printed). Tolerance, from the dtypes and the arithmetic, per output element
|error| <= 2^-p max|out| + (e^(2e) - 1) sum p |v - out| + w e^(2e) sum p |v| (p: the exact weights):
- 2^-p max|out|: the output rounded to the input dtype (p = 22 for float32, leaving room for the
  last division; 7 for bfloat16, one ulp: rounding alone may take half an ulp, 2^-8 |out| just above
  a power of two);
- e bounds every score's error: scores off by at most e scale each softmax weight by a factor
  within e^(+-2e), and since both sets of weights sum to 1 the output sum p v moves by at most
  (e^(2e) - 1) sum p |v - out|;
- w bounds the relative rounding of the weights and of the sums over positions.
u = 2^-24 (float32's unit roundoff). The kernel dequantizes each key in float32 (one rounding),
multiplies it by q * scale (two: scale held in float32, then the product), rounds that product,
and adds the products one after another, d = 0, 1, ...: e = u (R + 4A), A = sum_d |q_d k_d| scale,
R = the sum of the running sum's magnitudes (each addition rounds it once), both maxima over heads
and positions (not u |s|: the terms cancel, |s| can be far below A); w = 2 u (128 + N/128 + 27):
a weight's exp (at most 8 ulps), at most 128 positions summed in a chunk, the N/128 + 1 chunks
merged, the division. The reference (mlx's dequantize, then
mx.fast.scaled_dot_product_attention, which on the CPU multiplies q by scale in the input dtype,
takes the scores with a matmul, a precise softmax, and a second matmul) is checked in two steps: its
dequantized keys and values against float64 (2 u' (|s q| + |b|), u' the dtype's unit roundoff), then
its attention against float64 over exactly those operands: e = u' max|s| + (D + 1) u A (the score
rounded to the dtype after a float32 sum in any order), w = 2 u' + (N + 2) u (the weights rounded,
a float32 matmul over N positions).

CPU: the reference against mlx-lm's quantized attention and float64; the kernel body through
metal_kernels.cpu_emulator; the Metal source MLX would compile. GPU (@pytest.mark.gpu): the kernel
on the device, and the default model decoding with an 8-bit cache on the GPU.
"""

import os

import numpy as np
import pytest

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import QuantizedKVCache

import metal_kernels as K
from metal_kernels import _core, cpu_emulator
from metal_kernels import kernels as KK
from metal_kernels import reference as R

from test_kernels import f64, metal_source  # noqa: E402  (tests/ is on sys.path)


def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    return np.random.default_rng(seed)


def np_dequant(packed, scales, biases, bits, group_size):
    """float64 values of an MLX affine-quantized array [..., D*bits/32] (low bits first), and the
    magnitudes |scale * q| + |bias| their float rounding is relative to."""
    per = 32 // bits
    w = np.array(packed).astype(np.uint64)
    q = np.stack([(w >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], axis=-1)
    q = q.reshape(*w.shape[:-1], -1).astype(np.float64)
    f = lambda a: np.repeat(np.array(a.astype(mx.float32)).astype(np.float64), group_size, axis=-1)
    return q * f(scales) + f(biases), np.abs(q * f(scales)) + np.abs(f(biases))


def running_sums(prod, lanes=1, piece=1):
    """The magnitudes of every partial sum formed while adding prod's last axis (D terms): one after
    another (lanes = 1), or split over `lanes` lanes (a power of 2) that each add theirs one after
    another and then meet pairwise; lane j takes the pieces of `piece` consecutive terms numbered
    j, j + lanes, j + 2 lanes, ..."""
    d = prod.shape[-1]
    part = prod.reshape(*prod.shape[:-1], d // (lanes * piece), lanes, piece)
    part = np.moveaxis(part, -2, -3).reshape(*prod.shape[:-1], lanes, d // lanes)  # [..., lane, its terms]
    r = np.abs(np.cumsum(part, -1)).sum((-2, -1))
    tot = part.sum(-1)
    while tot.shape[-1] > 1:
        tot = tot[..., 0::2] + tot[..., 1::2]
        r = r + np.abs(tot).sum(-1)
    return r


def attend(qs, k, v, lanes=1, piece=1, chunk=128):
    """float64 attention of the scaled queries qs [B, HKV, NREP, 1, D] over k, v [B, HKV, N, D]: the
    output [B, HKV*NREP, 1, D] and the sizes the tolerances need (the module docstring). `lanes`,
    `piece`, `chunk`: how the kernel sums a score (`running_sums`) and how many positions it takes
    per chunk (R and w follow)."""
    B, HKV, NREP, _, D = qs.shape
    s = np.einsum("bhrld,bhnd->bhrln", qs, k)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhrln,bhnd->bhrld", p, v)
    a = r = 0.0
    dev, mav = np.zeros_like(o), np.zeros_like(o)
    for j in range(0, k.shape[2], 1024):  # [b, h, r, l, n, d], 1024 positions at a time
        prod, pj = qs[..., None, :] * k[:, :, None, None, j:j + 1024, :], p[..., j:j + 1024]
        a, r = max(a, np.abs(prod).sum(-1).max()), max(r, running_sums(prod, lanes, piece).max())
        dev += np.einsum("bhrln,bhrlnd->bhrld", pj, np.abs(v[:, :, None, None, j:j + 1024] - o[..., None, :]))
        mav += np.einsum("bhrln,bhnd->bhrld", pj, np.abs(v[:, :, j:j + 1024]))
    out, dev, mav = (x.reshape(B, HKV * NREP, 1, D) for x in (o, dev, mav))
    return out, dict(s=np.abs(s).max(), a=a, r=r, dev=dev, mav=mav, n=k.shape[2], d=D, chunk=chunk)


def make_case(g, dtype, B, HKV, NREP, D, bits, gs, n, nt=0):
    """A QuantizedKVCache holding n random positions, a full-precision tail (capacity 128, as
    qwen_mlx.kv_cache.BlockQuantizedKVCache's) holding nt more (None if 0), a decode query, and the
    float64 answer over all n + nt positions (attend's)."""
    cache = QuantizedKVCache(group_size=gs, bits=bits)
    kv = [mx.array(s * g.standard_normal((B, HKV, n, D)), dtype) for s in (3.0, 1.0)]
    cache.update_and_fetch(*kv)
    q = mx.array(g.standard_normal((B, HKV * NREP, 1, D)), dtype)
    scale = D ** -0.5
    k, v = (np_dequant(*(a[..., :n, :] for a in t), bits, gs)[0] for t in (cache.keys, cache.values))
    tail = None
    if nt:
        tail = tuple(mx.array(s * g.standard_normal((B, HKV, 128, D)), dtype) for s in (3.0, 1.0)) + (nt,)
        k, v = (np.concatenate([a, f64(t[..., :nt, :])], axis=2) for a, t in ((k, tail[0]), (v, tail[1])))
    return q, cache, scale, attend(f64(q).reshape(B, HKV, NREP, 1, D) * scale, k, v), tail


U = {mx.float32: 2.0 ** -24, mx.bfloat16: 2.0 ** -8}  # unit roundoff


def tolerance(answer, dtype, sdpa=False):
    """Per output element, the kernel's tolerance or (sdpa) the reference's attention step's
    (module docstring)."""
    exact, z = answer
    u, ud = 2.0 ** -24, U[dtype]
    if sdpa:
        e, w = ud * z["s"] + (z["d"] + 1) * u * z["a"], 2 * ud + (z["n"] + 2) * u
    else:
        e, w = u * (z["r"] + 4 * z["a"]), 2 * u * (128 + z["n"] // z["chunk"] + 27)
    grow = np.expm1(2 * e)  # how far the weights move, relative
    return 2.0 ** -P[dtype] * np.abs(exact).max() + grow * z["dev"] + w * (1 + grow) * z["mav"]


def check(out, answer, dtype, what, sdpa=False):
    exact, got = answer[0], f64(out)
    assert out.dtype == dtype and got.shape == exact.shape, what
    err, tol = np.abs(got - exact), tolerance(answer, dtype, sdpa)
    i = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.isfinite(got).all() and (err <= tol).all(), f"{what}: error {err[i]:.3g} > {tol[i]:.3g} at {i}"


CASES = [  # B, HKV, NREP, D, bits, group, n, tail: one chunk; several with empty chunks; 2-bit; GQA 7 and 8;
    (1, 2, 7, 64, 4, 32, 37, 0),   # head dims 64, 128, 32 (16, 32 and 8 threads per V row in the kernel;
    (2, 1, 3, 128, 8, 64, 300, 5),  # 2, 4 and 1 merge threadgroups per head); tails empty, partial,
    (1, 2, 8, 128, 2, 64, 5, 128),  # full; 67 chunks: the merge's loop of eight chunks at a time
    (1, 1, 1, 32, 4, 32, 1, 1),
    (1, 1, 2, 32, 8, 32, 8300, 3),
]
P = {mx.float32: 22, mx.bfloat16: 7}


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_reference_matches_float64_and_mlx_lm(dtype):
    g = rng()
    for B, HKV, NREP, D, bits, gs, n, nt in CASES:
        q, cache, scale, exact, tail = make_case(g, dtype, B, HKV, NREP, D, bits, gs, n, nt)
        what = f"reference {dtype} {bits}-bit n={n} tail {nt}"
        ref = R.quant_sdpa(q, cache.keys, cache.values, cache.offset, scale, bits, gs, tail=tail)
        # its two steps: dequantize (to the dtype), then attention over exactly those operands
        kv = []
        for t in (cache.keys, cache.values):
            parts = tuple(a[..., :n, :] for a in t)
            want, mag = np_dequant(*parts, bits, gs)
            got = f64(mx.dequantize(*parts, group_size=gs, bits=bits).astype(dtype))
            assert (np.abs(got - want) <= 2 * U[dtype] * mag).all(), what + " dequantized"
            kv.append(got)
        if nt:
            kv = [np.concatenate([a, f64(t[..., :nt, :])], axis=2) for a, t in zip(kv, tail)]
        qs = f64(mx.array(scale, dtype) * q).reshape(B, HKV, NREP, 1, D)
        check(ref, attend(qs, *kv), dtype, what, sdpa=True)
        k, v = (tuple(a[..., :n, :] for a in t) for t in (cache.keys, cache.values))
        theirs = scaled_dot_product_attention(q + 0, k, v, cache=cache, scale=scale, mask=None)  # scales q in place
        if dtype == mx.float32 and not nt:
            assert np.abs(np.array(theirs) - np.array(ref)).max() <= 1e-5 * np.abs(exact[0]).max()


def test_reference_takes_a_causal_prefill_chunk():
    """L > 1 with mlx-lm's "causal" mask (what a quantized cache gets while prefilling on CUDA)."""
    g = rng()
    cache = QuantizedKVCache(group_size=64, bits=8)
    cache.update_and_fetch(*(mx.array(g.standard_normal((1, 2, 40, 64)), mx.float32) for _ in range(2)))
    q = mx.array(g.standard_normal((1, 4, 6, 64)), mx.float32)
    ref = R.quant_sdpa(q, cache.keys, cache.values, 40, 0.125, 8, 64, mask="causal")
    k, v = (tuple(a[..., :40, :] for a in t) for t in (cache.keys, cache.values))
    theirs = scaled_dot_product_attention(q + 0, k, v, cache=cache, scale=0.125, mask="causal")
    assert np.abs(np.array(theirs) - np.array(ref)).max() <= 1e-5


def test_in_no_table():  # (its body's Metal-only names and header: test_kernels.test_body_has_no_cuda_names)
    assert "quant_sdpa" not in K.USE  # not a speed choice: see metal_kernels.runs_quant_sdpa


def test_dispatch_on_this_machine():
    q = mx.zeros((1, 14, 1, 64))
    keys = (mx.zeros((1, 2, 256, 8), mx.uint32), mx.zeros((1, 2, 256, 2)), mx.zeros((1, 2, 256, 2)))
    assert K.quant_sdpa_fits(q, keys, 4, None)
    assert not K.quant_sdpa_fits(q, keys, 6, None) and not K.quant_sdpa_fits(q, keys, 4, "causal")
    assert not K.quant_sdpa_fits(mx.zeros((1, 14, 2, 64)), keys, 4, None)
    assert not K.quant_sdpa_fits(mx.zeros((1, 18, 1, 64)), keys, 4, None)  # 9 query heads per KV head
    assert not K.quant_sdpa_fits(mx.zeros((1, 14, 1, 256)), keys, 4, None)  # head dim over 128
    if mx.default_device() == mx.cpu:
        assert not K.runs_quant_sdpa()  # mlx-lm's quantized attention runs on the CPU
    elif _core.gpu_backend() == "cuda":
        assert K.runs_quant_sdpa()




@pytest.mark.skipif(not cpu_emulator.available(), reason="no C++20 compiler for metal_kernels.cpu_emulator")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_emulated_kernel_matches_float64(dtype):
    g = rng()
    for B, HKV, NREP, D, bits, gs, n, nt in CASES:
        q, cache, scale, exact, tail = make_case(g, dtype, B, HKV, NREP, D, bits, gs, n, nt)
        out = KK.quant_sdpa(q, cache.keys, cache.values, cache.offset, scale, bits, gs, tail=tail,
                            backend="cpu-emulator")
        check(out, exact, dtype, f"emulated kernel {dtype} {bits}-bit n={n} tail {nt}")


@pytest.mark.skipif(mx.cuda.is_available(), reason="MLX's CUDA build runs metal_kernel as CUDA")
def test_metal_source(capfd, tmp_path):
    g = np.random.default_rng(0)
    q, cache, scale, _, _ = make_case(g, mx.float16, 1, 2, 7, 64, 4, 64, 20)
    call = lambda q: KK.quant_sdpa(q, cache.keys, cache.values, 20, scale, 4, 64, backend="metal",
                                   stream=mx.gpu, verbose=True)
    src = metal_source(capfd, tmp_path, call, q)
    assert "[[kernel]] void custom_kernel_qwen_quant_sdpa_" in src
    assert "template <typename T, int D, int NREP, int BITS, int GS, int SCALE>" in src  # the scale's bits
    assert "[[kernel]] void custom_kernel_qwen_quant_sdpa_merge_" in src  # the second pass
    assert "* scale [[buffer(" not in src
    for a in ("q", "kw", "ks", "kb", "vw", "vs", "vb", "n", "tk", "tv", "nt"):
        assert f"* {a} [[buffer(" in src, a
    assert "const constant int* kw_shape" in src or "kw_shape [[buffer(" in src


GPU_CASES = [(mx.bfloat16, c) for c in CASES[:2] + [(1, 4, 7, 128, 4, 64, 9000, 77), (1, 4, 7, 128, 8, 64, 33000, 0)]] + [
    (mx.float32, c) for c in CASES[2:]]  # each (dtype, shape) compiles once on CUDA (~10-20 s each)


@pytest.mark.gpu
def test_gpu_kernel_matches_float64(monkeypatch):
    monkeypatch.setattr(KK, "POISON", True)  # an output element the kernel does not write stays NaN
    g = rng()
    for dtype, (B, HKV, NREP, D, bits, gs, n, nt) in GPU_CASES:
        q, cache, scale, exact, tail = make_case(g, dtype, B, HKV, NREP, D, bits, gs, n, nt)
        out = KK.quant_sdpa(q, cache.keys, cache.values, cache.offset, scale, bits, gs, tail=tail)
        check(out, exact, dtype, f"GPU kernel {dtype} {bits}-bit n={n} tail {nt}")
        assert K.runs_quant_sdpa() == (_core.gpu_backend() == "cuda")


@pytest.mark.gpu
@pytest.mark.real_model
def test_gpu_default_model_decodes_with_a_quantized_cache(default_model):
    """The default model as users get it on a GPU (bfloat16, native quantized weights), the prompts
    of test_real_model teacher-forced one token per step (decode, so the kernel runs on CUDA) on an
    8-bit cache (groups of 64, quantized from the first token) and on the full bfloat16 cache. 8-bit
    keys and values (error <= half a step of range/255 per group) move the logits by about as much
    as bfloat16's own rounding of K and V does, so the argmax may differ only where the full cache's
    top two logits are within two bfloat16 steps of each other (a near-tie; H200, 2026-12-03: two of
    144 steps, gaps 0 and 1 step), and it agrees at >= 97% of the steps (the CPU float32 test: 282/282)."""
    import qwen_mlx
    from qwen_mlx.kv_cache import cache_options, maybe_quantize, new_cache
    from real_prompts import N_NEW, PROMPTS, prompt_ids

    model, tok = qwen_mlx.load(default_model)
    agree = total = 0
    gaps = []
    for prompt, chat in PROMPTS:
        ids = prompt_ids(tok, prompt, chat)
        kv = cache_options(kv_bits=8, kv_group_size=64, quantized_kv_start=0)
        full, quant = new_cache(model), new_cache(model, kv)
        a, b = model(mx.array([ids]), cache=full), model(mx.array([ids]), cache=quant)
        maybe_quantize(quant, kv)
        for _ in range(N_NEW // 2):
            ta, tb = int(mx.argmax(a[0, -1])), int(mx.argmax(b[0, -1]))
            agree, total = agree + (ta == tb), total + 1
            if ta != tb:  # the full cache's top two logits, and bfloat16's spacing at the top one
                top = np.sort(np.array(a[0, -1].astype(mx.float32)))[-2:]
                gaps.append((float(top[1] - top[0]), 2.0 ** (np.floor(np.log2(abs(top[1]))) - 7)))
            a, b = model(mx.array([[ta]]), cache=full), model(mx.array([[ta]]), cache=quant)
    print(f"GPU 8-bit KV decode: {agree}/{total} argmax matches with the bfloat16 cache; top-2 gaps of the "
          f"bfloat16 cache's logits where they differ: {gaps}")
    assert agree / total >= 0.97, f"{agree}/{total}"
    assert all(gap <= 2 * ulp for gap, ulp in gaps), f"a flip away from a near-tie: (gap, ulp) {gaps}"
