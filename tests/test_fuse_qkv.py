"""ModelArgs.fuse_qkv / QWEN_MLX_FUSE_QKV: q/k/v fused (promoting mixed formats) or kept apart.

The promotion to the widest format is exact (docs/quantization.md), so with float32 activations
the fused and unfused models compute the same products and differ only in float32 rounding (the
matmul accumulates each output over the same 256 inputs either way, but in a different kernel):
logits of magnitude ~1 agree to ~1e-6; 1e-4 absolute is a wide margin that a wrong split (a
head shifted, a bias on the wrong rows) cannot meet, since those move logits by O(0.1).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import qwen_mlx

MIXED = dict(qtype="Q5_0", qtypes={"attn_v": "Q8_0", "ffn_down": "Q4_K"}, seed=7)  # Q4_K_M's q/k vs v


def projections(model):
    attn = model.layers[0].self_attn
    return {n: attn[n] for n in ("qkv_proj", "q_proj", "k_proj", "v_proj") if n in attn}


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    path = tiny_gguf(**MIXED)
    models = {}
    mp = pytest.MonkeyPatch()
    try:
        for policy in ("always", "same-format", "never"):
            mp.setenv("QWEN_MLX_FUSE_QKV", policy)
            models[policy] = qwen_mlx.load(path, dtype="float32", quantized=True)[0]
        mp.setenv("QWEN_MLX_FUSE_QKV", "same-format")
        models["same-format, one format"] = qwen_mlx.load(tiny_gguf(qtype="Q8_0", seed=7), dtype="float32",
                                                          quantized=True)[0]
        mp.setenv("QWEN_MLX_FUSE_QKV", "always")
        mp.setenv("QWEN_MLX_PROMOTE_BITS", "5:8,4:6")
        models["promoted"] = qwen_mlx.load(path, dtype="float32", quantized=True)[0]
    finally:
        mp.undo()
    return models


def test_structure(loaded):
    fused = projections(loaded["always"])
    assert list(fused) == ["qkv_proj"] and isinstance(fused["qkv_proj"], nn.QuantizedLinear)
    assert fused["qkv_proj"].bits == 8  # q/k promoted to v's 8 bits
    for policy in ("same-format", "never"):
        p = projections(loaded[policy])
        assert sorted(p) == ["k_proj", "q_proj", "v_proj"]
        assert [p[n].bits for n in ("q_proj", "k_proj", "v_proj")] == [5, 5, 8]  # each in its own format
    assert list(projections(loaded["same-format, one format"])) == ["qkv_proj"]  # nothing to promote: fused


def test_unfused_equals_fused(loaded):
    toks = mx.array(np.random.default_rng(1).integers(0, 283, (2, 23)))
    ref = np.array(loaded["always"](toks))
    for policy in ("same-format", "never"):
        got = np.array(loaded[policy](toks))
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        # and through the KV cache (prefill + 3 single steps)
        cache = loaded[policy].make_cache()
        steps = [loaded[policy](toks[:, :20], cache=cache)] + [loaded[policy](toks[:, i:i + 1], cache=cache)
                                                               for i in range(20, 23)]
        np.testing.assert_allclose(np.array(mx.concatenate(steps, 1)), ref, atol=1e-4, rtol=0)


def test_promoted_formats_compute_the_same(loaded):
    """promote_bits "5:8,4:6": q/k/o/gate/up (Q5_0) held in 8 bits, down (Q4_K) in 6, exactly: same
    logits (float32 rounding only, as above)."""
    layer = loaded["promoted"].layers[0]
    assert [m.bits for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                             layer.mlp.down_proj)] == [8, 8, 8, 6]
    base = loaded["always"].layers[0]
    assert [base.self_attn.o_proj.bits, base.mlp.down_proj.bits] == [5, 4]  # as stored without it
    toks = mx.array(np.random.default_rng(2).integers(0, 283, (2, 19)))
    np.testing.assert_allclose(np.array(loaded["promoted"](toks)), np.array(loaded["always"](toks)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("value", ["8:5", "5", "5:7", "x:8"])
def test_bad_promotion_is_refused(monkeypatch, tiny_gguf, value):
    monkeypatch.setenv("QWEN_MLX_PROMOTE_BITS", value)
    with pytest.raises(ValueError, match="QWEN_MLX_PROMOTE_BITS"):
        qwen_mlx.load(tiny_gguf(**MIXED), dtype="float32")


def test_bad_policy_is_refused(monkeypatch, tiny_gguf):
    monkeypatch.setenv("QWEN_MLX_FUSE_QKV", "sometimes")
    with pytest.raises(ValueError, match="QWEN_MLX_FUSE_QKV"):
        qwen_mlx.load(tiny_gguf(**MIXED), dtype="float32")
