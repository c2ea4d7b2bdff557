"""Key smoothing (`qwen_mlx.model.smooth_keys`, on by default): outlier key channels scaled down and
their query channels up by powers of two at load.

Powers of two scale exactly in float32 and bfloat16, RoPE rotates channel pairs sharing one factor
and each product q_i s * k_i / s is the same number, so logits must be *bit-identical* with and
without it (assert_array_equal, no tolerance), for float and quantized weights. What it changes is
the keys' range: a quantized KV cache must then be more accurate. A small random Qwen2 gets
Qwen2.5-like key biases (a few RoPE pairs at ~100-150, the rest ~0.1, as the default model's
layers 0-1: docs/architecture.md)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2

from qwen_mlx.kv_cache import cache_options, maybe_quantize, new_cache
from qwen_mlx.loader import build_model
from qwen_mlx.research import capture

CFG = dict(model_type="qwen2", hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
           tie_word_embeddings=True)
D = 64  # head dim


def outlier_weights(quantize: bool, seed: int = 3) -> dict:
    mx.random.seed(seed)
    ref = qwen2.Model(qwen2.ModelArgs.from_dict(CFG))
    rng = np.random.default_rng(seed)
    for layer in ref.model.layers:
        b = np.array(layer.self_attn.k_proj.bias)
        qw, qb = np.array(layer.self_attn.q_proj.weight), np.array(layer.self_attn.q_proj.bias)
        for head, ch in ((0, 3), (1, 9), (1, 12)):  # RoPE pairs (ch, ch + D/2) of a kv head
            b[head * D + ch] = rng.uniform(100, 150) * rng.choice([-1, 1])
            b[head * D + ch + D // 2] = rng.uniform(20, 60) * rng.choice([-1, 1])
            for r in (2 * head * D + ch, 2 * head * D + ch + D // 2):  # and small queries there, as trained
                for q_head in (0, D):  # (2 query heads per kv head) models learn them: else one
                    qw[r + q_head] *= 0.02  # channel's constant would swamp every score
                    qb[r + q_head] *= 0.02
        layer.self_attn.k_proj.bias = mx.array(b)
        layer.self_attn.q_proj.weight, layer.self_attn.q_proj.bias = mx.array(qw), mx.array(qb)
        layer.self_attn.k_proj.weight = layer.self_attn.k_proj.weight * 4  # keys of scale ~1 besides the bias
    if quantize:
        nn.quantize(ref, group_size=32, bits=8)
    return dict(tree_flatten(ref.parameters()))


def pair(dtype, quantize):
    w = outlier_weights(quantize)
    return (build_model(dict(CFG, smooth_keys=True), dict(w), dtype),
            build_model(dict(CFG, smooth_keys=False), dict(w), dtype))


def run(model, toks, kv=None):
    """Logits of a 40-token prefill, then 6 single cached steps."""
    cache = new_cache(model, kv)
    out = [model(toks[:, :40], cache=cache)]
    maybe_quantize(cache, kv)
    for i in range(40, 46):
        out.append(model(toks[:, i:i + 1], cache=cache))
        maybe_quantize(cache, kv)
    return np.array(mx.concatenate(out, axis=1).astype(mx.float32))


@pytest.mark.parametrize("dtype,quantize", [(mx.float32, False), (mx.bfloat16, False), (mx.float32, True),
                                            (mx.bfloat16, True)])
def test_smoothing_leaves_logits_bit_identical(dtype, quantize):
    smooth, plain = pair(dtype, quantize)
    scales = [layer.self_attn._key_scale for layer in smooth.layers]
    assert all(s is not None and s.max() >= 8 for s in scales)  # the outliers were scaled (not vacuous)
    assert all(layer.self_attn._key_scale is None for layer in plain.layers)
    toks = mx.array(np.random.default_rng(7).integers(0, 300, (2, 46)))
    np.testing.assert_array_equal(run(smooth, toks), run(plain, toks))


def test_taps_show_the_unscaled_queries_and_keys():
    """Research taps see q and k as transformers computes them, smoothing or not (bit-equal)."""
    smooth, plain = pair(mx.float32, False)
    toks = mx.array(np.random.default_rng(8).integers(0, 300, (1, 12)))
    got = []
    for m in (smooth, plain):
        with capture(m, ["layers.0.q", "layers.0.k"]) as acts:
            mx.eval(m(toks))
        got.append({k: np.array(v) for k, v in acts.items()})
    for name in ("layers.0.q", "layers.0.k"):
        np.testing.assert_array_equal(got[0][name], got[1][name])
    assert np.abs(got[1]["layers.0.k"]).max() > 50  # the outliers are really in the keys


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_is_closer_to_full_precision_with_smoothing(bits):
    """8-bit and 4-bit KV in groups of 64 (one group = a whole head, so an outlier pair sets the
    step of 62 other channels): the logits' RMS error against the full-precision
    cache must fall at least 4x when the outliers (~100-150, against ~1-4 for the rest) shrink to
    ~4 (median + 1) x 4. The quantization step shrinks ~8-32x with them, so 4x is a conservative
    bound; a smoothing that did nothing (or was undone before the cache) gives 1x."""
    smooth, plain = pair(mx.float32, False)
    toks = mx.array(np.random.default_rng(9).integers(0, 300, (2, 46)))
    full = run(plain, toks)
    kv = cache_options(kv_bits=bits, kv_group_size=64, quantized_kv_start=0)
    err = [np.sqrt(np.mean((run(m, toks, kv) - full) ** 2)) for m in (smooth, plain)]
    print(f"{bits}-bit KV, RMS logit error: smoothed {err[0]:.2e}, plain {err[1]:.2e}")
    assert err[0] * 4 < err[1], err


class _Group:  # what shard_model asks of a group while splitting (size, rank); no collective runs here
    def __init__(self, rank: int):
        self._rank = rank

    def size(self) -> int:
        return 2

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("rank", [0, 1])
def test_sharding_a_smoothed_model_keeps_its_kv_heads_factors(rank):
    """`model.shard()` after loading: each rank keeps the smoothing factors of its own kv heads (the
    taps unscale with them); loading with `shard` skips smoothing altogether."""
    from qwen_mlx.distributed import shard_model

    model = build_model(dict(CFG, smooth_keys=True), outlier_weights(False), mx.float32)
    full = [layer.self_attn._key_scale.copy() for layer in model.layers]
    shard_model(model, _Group(rank))
    for layer, f in zip(model.layers, full):
        assert layer.self_attn.n_kv_heads == 1
        np.testing.assert_array_equal(layer.self_attn._key_scale, f[rank:rank + 1])
