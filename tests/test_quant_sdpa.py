"""metal_kernels' quant_sdpa: decode attention over a quantized KV cache (mlx-lm's QuantizedKVCache).

The exact answer is float64 numpy over the cache dequantized in float64 from its packed integers,
scales and biases (the values the kernel computes with). Fresh seeded inputs each run (the seed is
printed). Tolerance, from the dtypes: |error| <= 2^-p max|out| (the output rounded to the input dtype:
p = 22 for float32, leaving room for float32 accumulation; 7 for bfloat16, one ulp: rounding alone
may take half an ulp, 2^-8 |out| just above a power of two) + 2 u max|s| max|v|: a
score error of u |s| scales the softmax weights by up to e^(u|s|), which moves the output by at most
twice that times max|v|. The kernel computes scores in float32 (u = 2^-21: 8 units of roundoff for
a dot product summed in partial sums); the reference (dequantize to the input dtype, then
mx.fast.scaled_dot_product_attention) rounds K and V to the input dtype and, on the CPU, the scores
too (u = 2^-8 in bfloat16).

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

from test_kernels import CUDA_NAMES, metal_source  # noqa: E402  (tests/ is on sys.path)


def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    return np.random.default_rng(seed)


def np_dequant(packed, scales, biases, bits, group_size):
    """float64 values of an MLX affine-quantized array [..., D*bits/32] (low bits first)."""
    per = 32 // bits
    w = np.array(packed).astype(np.uint64)
    q = np.stack([(w >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], axis=-1)
    q = q.reshape(*w.shape[:-1], -1).astype(np.float64)
    f = lambda a: np.repeat(np.array(a.astype(mx.float32)).astype(np.float64), group_size, axis=-1)
    return q * f(scales) + f(biases)


def make_case(g, dtype, B, HKV, NREP, D, bits, gs, n, nt=0):
    """A QuantizedKVCache holding n random positions, a full-precision tail (capacity 128, as
    qwen_mlx.kv_cache.BlockQuantizedKVCache's) holding nt more (None if 0), a decode query, and the
    float64 answer over all n + nt positions."""
    cache = QuantizedKVCache(group_size=gs, bits=bits)
    kv = [mx.array(s * g.standard_normal((B, HKV, n, D)), dtype) for s in (3.0, 1.0)]
    cache.update_and_fetch(*kv)
    q = mx.array(g.standard_normal((B, HKV * NREP, 1, D)), dtype)
    scale = D ** -0.5
    k, v = (np_dequant(*(a[..., :n, :] for a in t), bits, gs) for t in (cache.keys, cache.values))
    tail = None
    if nt:
        tail = tuple(mx.array(s * g.standard_normal((B, HKV, 128, D)), dtype) for s in (3.0, 1.0)) + (nt,)
        f64 = lambda a: np.array(a[..., :nt, :].astype(mx.float32)).astype(np.float64)
        k, v = np.concatenate([k, f64(tail[0])], axis=2), np.concatenate([v, f64(tail[1])], axis=2)
    qq = np.array(q.astype(mx.float32)).astype(np.float64).reshape(B, HKV, NREP, 1, D)
    s = np.einsum("bhrld,bhnd->bhrln", qq, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    exact = np.einsum("bhrln,bhnd->bhrld", p / p.sum(-1, keepdims=True), v).reshape(B, HKV * NREP, 1, D)
    return q, cache, scale, (exact, np.abs(s).max() * np.abs(v).max()), tail  # sv: the scores' term (docstring)


def check(out, answer, dtype, what, score_u=2.0 ** -21):
    exact, sv = answer
    got = np.array(out.astype(mx.float32)).astype(np.float64)
    assert out.dtype == dtype and got.shape == exact.shape, what
    err, tol = np.abs(got - exact).max(), 2.0 ** -P[dtype] * np.abs(exact).max() + 2 * score_u * sv
    assert np.isfinite(got).all() and err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


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
        ref = R.quant_sdpa(q, cache.keys, cache.values, cache.offset, scale, bits, gs, tail=tail)
        check(ref, exact, dtype, f"reference {dtype} {bits}-bit n={n} tail {nt}",
              score_u=2.0 ** -21 if dtype == mx.float32 else 2.0 ** -8)
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


def test_body_is_metal_and_in_no_table():
    text = _core.metal_file("quant_sdpa").read_text()
    found = sorted(set(m.group(0) for m in CUDA_NAMES.finditer(text)))
    assert not found, f"quant_sdpa.metal uses CUDA names {found}"
    assert _core.load_source("quant_sdpa")[0].startswith("// quant_sdpa")
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
    assert "template <typename T, int D, int NREP, int BITS, int GS>" in src
    assert "[[kernel]] void custom_kernel_qwen_quant_sdpa_merge_" in src  # the second pass
    for a in ("q", "kw", "ks", "kb", "vw", "vs", "vb", "n", "tk", "tv", "nt", "scale"):
        assert f"* {a} [[buffer(" in src, a
    assert "const constant int* kw_shape" in src or "kw_shape [[buffer(" in src


GPU_CASES = [(mx.bfloat16, c) for c in CASES[:2] + [(1, 4, 7, 128, 4, 64, 9000, 77), (1, 4, 7, 128, 8, 64, 33000, 0)]] + [
    (mx.float32, c) for c in CASES[2:]]  # each (dtype, shape) compiles once on CUDA (~10-20 s each)


@pytest.mark.gpu
def test_gpu_kernel_matches_float64():
    old, KK.POISON = KK.POISON, True  # an output element the kernel does not write stays NaN
    try:
        g = rng()
        for dtype, (B, HKV, NREP, D, bits, gs, n, nt) in GPU_CASES:
            q, cache, scale, exact, tail = make_case(g, dtype, B, HKV, NREP, D, bits, gs, n, nt)
            out = KK.quant_sdpa(q, cache.keys, cache.values, cache.offset, scale, bits, gs, tail=tail)
            check(out, exact, dtype, f"GPU kernel {dtype} {bits}-bit n={n} tail {nt}")
            assert K.runs_quant_sdpa() == (_core.gpu_backend() == "cuda")
    finally:
        KK.POISON = old


@pytest.mark.gpu
@pytest.mark.real_model
def test_gpu_default_model_decodes_with_a_quantized_cache(default_model):
    """The default model as users get it on a GPU (bfloat16, native quantized weights), the prompts
    of test_real_model teacher-forced one token per step (decode, so the kernel runs on CUDA) on an
    8-bit cache (groups of 64, quantized from the first token) and on the full bfloat16 cache: the
    argmax agrees at >= 99% of the steps (the CPU float32 test: 282/282)."""
    import qwen_mlx
    from qwen_mlx.kv_cache import cache_options, maybe_quantize, new_cache
    from real_prompts import N_NEW, PROMPTS, prompt_ids

    model, tok = qwen_mlx.load(default_model)
    agree = total = 0
    for prompt, chat in PROMPTS:
        ids = prompt_ids(tok, prompt, chat)
        kv = cache_options(kv_bits=8, kv_group_size=64, quantized_kv_start=0)
        full, quant = new_cache(model), new_cache(model, kv)
        a, b = model(mx.array([ids]), cache=full), model(mx.array([ids]), cache=quant)
        maybe_quantize(quant, kv)
        for _ in range(N_NEW // 2):
            ta, tb = int(mx.argmax(a[0, -1])), int(mx.argmax(b[0, -1]))
            agree, total = agree + (ta == tb), total + 1
            a, b = model(mx.array([[ta]]), cache=full), model(mx.array([[ta]]), cache=quant)
    print(f"GPU 8-bit KV decode: {agree}/{total} argmax matches with the bfloat16 cache")
    assert agree / total >= 0.99, f"{agree}/{total}"
