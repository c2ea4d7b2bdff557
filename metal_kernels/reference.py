"""Plain-MLX reference implementations: the CPU path, and what the kernels must equal.

Each function has the same signature and rounding points as its kernel.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """x [..., D], weight [D] -> x * rsqrt(mean(x^2) + eps) * weight (float32 accumulation), in x's dtype."""
    return mx.fast.rms_norm(x, weight.astype(x.dtype), eps)


def add_rms_norm(x: mx.array, residual: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """h = x + residual (in x's dtype), y = rms_norm(h, weight, eps) -> (h, y)."""
    h = x + residual.astype(x.dtype)
    return h, mx.fast.rms_norm(h, weight.astype(x.dtype), eps)


def rope(x: mx.array, offset, base: float | None, freqs: mx.array | None = None, mscale: float = 1.0) -> mx.array:
    """NeoX RoPE of x [B, H, L, D] at positions offset..offset+L-1 (offset: int, 1-element int32 array,
    or [B] int array: row b starts at offset[b], as mlx-lm's BatchKVCache.offset).

    With `freqs` (YaRN), x is first multiplied by `mscale`, as mlx-lm's YarnRoPE does.
    """
    if mscale != 1.0:
        x = x * mscale
    if isinstance(offset, mx.array) and offset.size == 1:
        offset = offset.reshape(())
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=None if freqs is not None else base,
                        scale=1.0, offset=offset, freqs=freqs)


def qkv_post(qkv: mx.array, bias: mx.array, n_heads: int, n_kv_heads: int, offset, base: float | None,
             freqs: mx.array | None = None, mscale: float = 1.0) -> tuple[mx.array, mx.array, mx.array]:
    """qkv [B, L, (n_heads + 2 n_kv_heads) D] (the fused projection, no bias) -> q [B, n_heads, L, D],
    k, v [B, n_kv_heads, L, D]: bias added (cast to qkv's dtype), RoPE on q and k."""
    B, L, _ = qkv.shape
    nh = n_heads + 2 * n_kv_heads
    h = qkv + bias.astype(qkv.dtype)
    # one position (decode): [B, 1, nh, D] and [B, nh, 1, D] are the same memory, no transpose node
    h = h.reshape(B, nh, 1, -1) if L == 1 else h.reshape(B, L, nh, -1).transpose(0, 2, 1, 3)
    qk, v = mx.split(h, [n_heads + n_kv_heads], axis=1)  # one node for two views (slices: one each)
    q, k = mx.split(rope(qk, offset, base, freqs, mscale), [n_heads], axis=1)  # one launch for q and k
    return q, k, v


@mx.compile
def _swiglu(gate_up: mx.array) -> mx.array:
    gate, up = mx.split(gate_up, 2, axis=-1)
    return (nn.silu(gate.astype(mx.float32)) * up.astype(mx.float32)).astype(gate_up.dtype)


def swiglu(gate_up: mx.array) -> mx.array:
    """gate_up [..., 2I] -> silu(gate) * up [..., I] (gate = first I, up = last I), silu in float32.

    Compiled, so on a GPU it is one fused elementwise kernel (as mlx-lm's compiled swiglu).
    """
    return _swiglu(gate_up)


def quant_sdpa(q: mx.array, keys: tuple, values: tuple, n: int, scale: float, bits: int, group_size: int,
               mask=None, tail=None) -> mx.array:
    """Attention of q [B, HQ, L, D] over the first `n` positions of a quantized KV cache's buffers
    (`keys`, `values`: mlx-lm QuantizedKVCache's (packed, scales, biases), [B, HKV, CAP, ...]),
    followed by the first nt positions of `tail` = (keys, values, nt) (full precision, [B, HKV, T, D];
    None: none): dequantized to q's dtype, then `mx.fast.scaled_dot_product_attention` (which takes
    the grouped heads and `mask` as mlx-lm passes it: None, "causal" or an array)."""
    k, v = (mx.dequantize(*(a[..., :n, :] for a in t), group_size=group_size, bits=bits).astype(q.dtype)
            for t in (keys, values))
    if tail is not None and tail[2]:
        k, v = (mx.concatenate([a, t[..., :tail[2], :].astype(q.dtype)], axis=2) for a, t in ((k, tail[0]), (v, tail[1])))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def batch_sdpa(q: mx.array, keys: mx.array, values: mx.array, start: mx.array, n: int, scale: float) -> mx.array:
    """Decode attention of q [B, HQ, 1, D] for a batch whose row b attends to positions start[b] .. n-1
    of the cache buffers `keys`, `values` [B, HKV, CAP, D] (mlx-lm BatchKVCache's, `start` its
    left_padding): `mx.fast.scaled_dot_product_attention` with the padding as a boolean mask."""
    mask = (mx.arange(n)[None] >= start.reshape(-1, 1))[:, None, None, :]
    return mx.fast.scaled_dot_product_attention(q, keys[..., :n, :], values[..., :n, :], scale=scale, mask=mask)


def decode_sdpa(q: mx.array, keys: mx.array, values: mx.array, n, scale: float) -> mx.array:
    """Decode attention of q [B, HQ, 1, D] over positions 0 .. n-1 of the cache buffers `keys`,
    `values` [B, HKV, CAP, D]: `mx.fast.scaled_dot_product_attention` over their first n positions;
    for n an int32 array of one element (the compiled decode step's), over all CAP with the others
    masked (they must be finite, as mlx-lm's zero-filled buffers are)."""
    if isinstance(n, mx.array):
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale,
                                                    mask=mx.arange(keys.shape[2]) < n.reshape(1))
    return mx.fast.scaled_dot_product_attention(q, keys[..., :n, :], values[..., :n, :], scale=scale)
