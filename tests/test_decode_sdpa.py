"""metal_kernels' decode_sdpa: a decode step's attention over plain KV cache buffers (read in place,
every row over positions 0 .. n-1), against float64 numpy; and the compiled decode step that runs it.

Fresh seeded inputs each run (the seed is printed). The tolerances are test_quant_sdpa's (its module
docstring argues them), with the kernel's own summation: a score is summed by TPR = 256 / chunk
threads, each over its 16-byte pieces sub, sub + TPR, ... in order, the TPR sums then meeting
pairwise (`running_sums(lanes=TPR, piece=16 bytes)` bounds the partial sums), and the chunk
(16-64 positions, `decode_sdpa_chunk`) sets how many partial results the merge combines. Positions
past n hold NaN: a kernel that read them would fail.

CPU: the kernel body through metal_kernels.cpu_emulator (every chunk size the dispatch picks), the
dispatch. GPU (@pytest.mark.gpu): the kernel on the device, and the model's compiled decode steps
through it against the float64 numpy forward.
"""

import numpy as np
import pytest

import mlx.core as mx

import metal_kernels as K
from metal_kernels import _core, cpu_emulator
from metal_kernels import kernels as KK

from test_batch_sdpa import check_rows  # noqa: E402  (tests/ is on sys.path)
from test_kernels import f64  # noqa: E402
from test_quant_sdpa import attend, rng  # noqa: E402


def make_case(g, dtype, B, HKV, NREP, D, cap, n):
    """Cache buffers [B, HKV, cap, D] with NaN from position n on, the query, the scale."""
    outside = (np.arange(cap) >= n)[None, None, :, None]
    k, v = (mx.array(np.where(outside, np.nan, s * g.standard_normal((B, HKV, cap, D))), dtype) for s in (3.0, 1.0))
    return k, v, mx.array(g.standard_normal((B, HKV * NREP, 1, D)), dtype), D ** -0.5


def answers_for(q, k, v, n, scale, dtype):
    """Each row's float64 answer with the tolerance sizes of the kernel's summation order."""
    B, HQ, _, D = q.shape
    HKV = k.shape[1]
    ch = KK.decode_sdpa_chunk(B, HKV, k.shape[2], D, dtype.size)
    qs = f64(q).reshape(B, HKV, HQ // HKV, 1, D) * scale
    return [attend(qs[b:b + 1], f64(k)[b:b + 1, :, :n], f64(v)[b:b + 1, :, :n], lanes=256 // ch,
                   piece=16 // dtype.size, chunk=ch) for b in range(B)], ch


# (B, HKV, NREP, D, capacity, n): chunks of 16 (D 128), 32 (D 64, bfloat16) and 64 (>= 264 threadgroups)
CASES = [(2, 2, 7, 64, 256, 139), (1, 4, 7, 128, 300, 270), (2, 2, 2, 32, 128, 77)]


@pytest.mark.skipif(not cpu_emulator.available(), reason="no C++20 compiler for metal_kernels.cpu_emulator")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_emulated_kernel_matches_float64(dtype):
    g = rng()
    cases = CASES + ([(4, 4, 7, 128, 1100, 1000)] if dtype == mx.bfloat16 else [])
    chunks = set()
    for B, HKV, NREP, D, cap, n in cases:
        k, v, q, scale = make_case(g, dtype, B, HKV, NREP, D, cap, n)
        answers, ch = answers_for(q, k, v, n, scale, dtype)
        chunks.add(ch)
        out = KK.decode_sdpa(q, k, v, n, scale, backend="cpu-emulator")
        check_rows(out, answers, dtype, f"emulated kernel {dtype} B={B} D={D} n={n} chunk {ch}")
    assert chunks == ({16, 32, 64} if dtype == mx.bfloat16 else {16, 32})


def test_dispatch_on_this_machine():
    keys = mx.zeros((1, 2, 256, 64), mx.bfloat16)
    q = mx.zeros((1, 14, 1, 64), mx.bfloat16)
    assert K.decode_sdpa_fits(q, keys)
    assert not K.decode_sdpa_fits(q.astype(mx.float16), keys.astype(mx.float16))  # 16-byte bfloat16/float32 loads
    assert not K.decode_sdpa_fits(mx.zeros((1, 14, 2, 64), mx.bfloat16), keys)  # a prefill chunk
    assert "decode_sdpa" not in K.USE  # see metal_kernels.runs_decode_sdpa
    with pytest.raises(ValueError, match="one query position"):
        KK.decode_sdpa(mx.zeros((1, 14, 2, 64), mx.bfloat16), keys, keys, 3, 0.125)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        KK.decode_sdpa(q.astype(mx.float16), keys, keys, 3, 0.125)
    if mx.default_device() == mx.cpu:
        assert not K.runs_decode_sdpa()  # MLX's attention runs on the CPU
        g = np.random.default_rng(0)
        k, v, q, scale = make_case(g, mx.float32, 1, 2, 7, 64, 256, 100)
        k, v = (mx.where(mx.isnan(a), mx.zeros_like(a), a) for a in (k, v))
        ref = mx.fast.scaled_dot_product_attention(q, k[..., :100, :], v[..., :100, :], scale=scale)
        assert mx.array_equal(K.decode_sdpa(q, k, v, 100, scale), ref)
    elif _core.gpu_backend() == "cuda":
        assert K.runs_decode_sdpa()


@pytest.mark.gpu
def test_gpu_kernel_matches_float64(monkeypatch):
    monkeypatch.setattr(KK, "POISON", True)  # an output element the kernel does not write stays NaN
    g = rng()
    for dtype in (mx.bfloat16, mx.float32):
        for B, HKV, NREP, D, cap, n in CASES + [(4, 4, 7, 128, 1100, 1000), (1, 4, 7, 128, 4352, 4100),
                                                (1, 4, 7, 128, 256, 129), (8, 4, 7, 64, 1024, 900),
                                                (1, 2, 7, 64, 9216, 9000)]:
            k, v, q, scale = make_case(g, dtype, B, HKV, NREP, D, cap, n)
            answers, ch = answers_for(q, k, v, n, scale, dtype)
            # n as an int, and as the model passes it: a view into a 16-byte device array
            for nn in (n, (mx.array([n - 1, n - 1, 0, 0], mx.int32) + 1)[1:2]):
                out = KK.decode_sdpa(q, k, v, nn, scale)
                check_rows(out, answers, dtype, f"GPU kernel {dtype} B={B} D={D} n={n} chunk {ch}")


@pytest.mark.gpu
def test_gpu_compiled_decode_through_the_kernel(tiny_gguf):
    """The model's compiled decode steps with their attention in decode_sdpa (CUDA) match the float64
    numpy forward to the forward test's tolerance (float32, 2 layers of width 256), across the
    cache's growth past 256 positions (a new capacity: another chunk size and grid)."""
    import qwen_mlx
    from test_model_generate import numpy_qwen2

    if not K.runs_decode_sdpa():
        pytest.skip("decode_sdpa runs on CUDA (or Metal under set_backend('kernels'))")
    path = tiny_gguf(qtype="Q4_K", tied=True, seed=11)
    model, _ = qwen_mlx.load(path, dtype="float32")
    toks = np.random.default_rng().integers(0, 283, 270)
    ref = numpy_qwen2(path, toks)
    cache = model.make_cache()
    model(mx.array(toks[None, :250]), cache=cache)
    calls = []
    real = KK.decode_sdpa
    KK.decode_sdpa = lambda *a, **kw: calls.append(a[3]) or real(*a, **kw)  # counts traced calls
    try:
        for i in range(250, 270):
            step = np.array(model(mx.array(toks[None, i:i + 1]), cache=cache)[0, 0])
            np.testing.assert_allclose(step, ref[i], atol=1e-4, rtol=1e-4)
    finally:
        KK.decode_sdpa = real
    # traced once per layer for capacity 256 and once more at 512: the attention ran in the kernel
    assert len(calls) == 2 * len(model.layers), len(calls)


def test_whole_step_writes_the_cache_and_matches_float64(tiny_gguf, monkeypatch):
    """The one-call decode step (on CUDA, where decode_sdpa takes the attention), run here with the
    attention's plain-MLX reference over the whole buffers (masked past n): logits match the
    float64 numpy forward (the forward test's tolerance) across the cache's growth past 256
    positions, and the cache holds what the segmented path writes there (same ops, float32)."""
    import qwen_mlx
    import qwen_mlx.model as M
    from test_model_generate import numpy_qwen2

    path = tiny_gguf(qtype="Q4_K", tied=True, seed=13)
    model, _ = qwen_mlx.load(path, dtype="float32")
    toks = np.random.default_rng().integers(0, 283, 270)
    ref = numpy_qwen2(path, toks)
    caches = {}
    for whole in (True, False):
        monkeypatch.setattr(M, "_kernel_attention", (lambda keys, attn: keys is not None) if whole else
                            (lambda keys, attn: False))
        cache = caches[whole] = model.make_cache()
        model(mx.array(toks[None, :250]), cache=cache)
        for i in range(250, 270):
            step = np.array(model(mx.array(toks[None, i:i + 1]), cache=cache)[0, 0])
            np.testing.assert_allclose(step, ref[i], atol=1e-4, rtol=1e-4)
    for a, b in zip(caches[True], caches[False]):
        assert a.offset == b.offset == 270 and a.keys.shape == b.keys.shape == (1, a.keys.shape[1], 512, a.keys.shape[3])
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            np.testing.assert_allclose(np.array(x[..., :270, :]), np.array(y[..., :270, :]), atol=1e-5, rtol=1e-5)


def test_step_positions_follow_the_cache():
    """Qwen2Model._positions: [offset, offset + 1] for each step, made on the device from the previous
    step's when steps follow each other, and from the host when they do not (a new cache)."""
    import qwen_mlx.model as M

    inner = M.Qwen2Model(M.ModelArgs(model_type="qwen2", hidden_size=64, num_hidden_layers=1,
                                     intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                     rms_norm_eps=1e-6, vocab_size=32))
    for offset in (5, 6, 7, 3, 4, 100):
        st = inner._positions(offset)
        assert st.dtype == mx.int32 and st.shape == (4,) and st.tolist()[:2] == [offset, offset + 1]


def test_whole_step_replays_no_weight_transpose(monkeypatch, tmp_path):
    """In the one-call step, each unquantized projection multiplies by its weight's transpose made
    once per compilation (model.Linear), not by a transpose node per step: with compilation off (so
    the step's graph can be inspected) the graph has 4 fewer transpose nodes per layer (q/k/v, o,
    gate/up, down) than with plain mlx.nn.Linear calls, and the logits are the same bits."""
    import re

    import mlx.nn as nn
    from mlx.utils import tree_map

    import qwen_mlx.model as M

    monkeypatch.setattr(M, "_kernel_attention", lambda keys, attn: keys is not None)
    g = rng()
    layers = int(g.integers(2, 5))
    model = M.Model(M.ModelArgs(hidden_size=64, num_hidden_layers=layers, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    model.update(tree_map(lambda p: mx.array(0.2 * g.standard_normal(p.shape), p.dtype), model.parameters()))
    prompt, nxt = mx.array(g.integers(0, 50, (1, 5))), mx.array(g.integers(0, 50, (1, 1)))
    dot = tmp_path / "step.dot"

    def step():
        cache = model.make_cache()
        model(prompt, cache=cache)
        model.model.reset_compiled()
        mx.disable_compile()
        try:
            out = model(nxt, cache=cache)
        finally:
            mx.enable_compile()
        mx.export_to_dot(str(dot), out)
        return np.array(out), len(re.findall(r'label ="Transpose"', dot.read_text()))

    ours, ours_nodes = step()
    monkeypatch.setattr(M.Linear, "__call__", nn.Linear.__call__)
    plain, plain_nodes = step()
    assert plain_nodes - ours_nodes == 4 * layers
    np.testing.assert_array_equal(ours, plain)
