"""MLX affine quantization maths: w = scale * q + bias per group along the input dimension.

Owns the bit packing (`pack` / `unpack`), exact re-expression in more bits or smaller
groups (`promote`, used by `Model.sanitize` to fuse q/k/v projections stored in different
formats), round-to-nearest quantization (`requantize`), the map from GGUF block formats
to MLX groups (`EXACT`: repacked exactly, `REQUANT`: re-quantized; `gguf_blocks_to_affine`),
and mlx-lm's `quantization` config section (`quantization_config`, `dequantize_weights`).
It reads no files: `qwen_mlx.gguf` hands it raw GGUF blocks. See docs/quantization.md.
"""

from __future__ import annotations

from typing import Optional

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q


def _f16(b: np.ndarray, off: int) -> np.ndarray:
    """The float16 field at byte `off` of each block [n, type_size], as float32 [n, 1]."""
    return np.ascontiguousarray(b[:, off:off + 2]).view(np.float16).astype(np.float32)


def _k_params(b):  # Q4_K / Q5_K: w = d*sc*q - dmin*m per sub-block of 32
    sc, m = gguf.quants.Q4_K.get_scale_min(b[:, 4:16])
    return _f16(b, 0) * sc.astype(np.float32), -(_f16(b, 2) * m.astype(np.float32))


def _iq4xs_params(b):  # w = d*(ls-32)*k per sub-block of 32, k in IQ4_NL's table [-127, 113]
    hi = np.ascontiguousarray(b[:, 2:4]).view(np.uint16) >> (2 * np.arange(8, dtype=np.uint16))
    lo = (b[:, 4:8, None] >> np.array([0, 4], np.uint8)).reshape(-1, 8) & np.uint8(15)
    s = _f16(b, 0) * ((lo | ((hi & 3).astype(np.uint8) << 4)).astype(np.float32) - 32)
    return s, -128 * s


# GGUF types that are MLX affine groups exactly: (bits, group_size, function of the raw blocks
# [n, type_size] giving each group's (scale, bias), broadcastable to [n, block_size // group_size]).
EXACT = {
    Q.Q4_0: (4, 32, lambda b: (_f16(b, 0), -8 * _f16(b, 0))),      # d * (q - 8)
    Q.Q4_1: (4, 32, lambda b: (_f16(b, 0), _f16(b, 2))),           # d * q + m
    Q.Q5_0: (5, 32, lambda b: (_f16(b, 0), -16 * _f16(b, 0))),     # d * (q - 16)
    Q.Q5_1: (5, 32, lambda b: (_f16(b, 0), _f16(b, 2))),           # d * q + m
    Q.Q8_0: (8, 32, lambda b: (_f16(b, 0), -128 * _f16(b, 0))),    # d * int8
    Q.Q4_K: (4, 32, _k_params),                                    # d*sc * q - dmin*m per 32
    Q.Q5_K: (5, 32, _k_params),
    # 16-element sub-blocks, but every value is d (one per 256) times an integer k in [-124, 128]:
    # d * k = -d * (128 - k) + 128 d, exact as 8 bits.
    Q.Q3_K: (8, 64, lambda b: (-_f16(b, 108), 128 * _f16(b, 108))),
    # d (per 32) times IQ4_NL's table of integers in [-127, 113]: exact as 8 bits.
    Q.IQ4_NL: (8, 32, lambda b: (_f16(b, 0), -128 * _f16(b, 0))),
    Q.IQ4_XS: (8, 32, _iq4xs_params),
    # Ternary: d * {-1, 0, 1} (TQ2_0 also 2), d per 256.
    Q.TQ1_0: (2, 64, lambda b: (_f16(b, 52), -_f16(b, 52))),
    Q.TQ2_0: (2, 64, lambda b: (_f16(b, 64), -_f16(b, 64))),
}
# Types re-quantized from their dequantized values (round to nearest on each group's min and max):
# (bits, group_size), within ~1% relative RMS of the GGUF values (see docs/quantization.md).
# Any other quantized type (IQ1_M, MXFP4, NVFP4) is dequantized. Groups are at most 64: MLX
# 0.32.4's CUDA quantized matmul fails on 8-bit group-128 float32 weights at prefill sizes.
REQUANT = {
    Q.Q6_K: (8, 64), Q.Q2_K: (6, 32),
    Q.IQ2_XXS: (8, 64), Q.IQ2_XS: (8, 64), Q.IQ2_S: (8, 64),
    Q.IQ3_XXS: (8, 64), Q.IQ3_S: (8, 64), Q.IQ1_S: (8, 64),
}


def plan(qtype, shape: tuple, requant: Optional[tuple[int, int]] = None) -> Optional[tuple[int, int]]:
    """(bits, group_size) for a GGUF tensor of type `qtype` and [out, in] `shape` in MLX, or None
    to keep it as floats. `requant=(bits, group)` also re-quantizes float matrices and non-EXACT types."""
    if len(shape) != 2:
        return None
    if qtype in EXACT:
        return EXACT[qtype][:2]
    if requant:
        return requant if shape[-1] % requant[1] == 0 else None
    return REQUANT.get(qtype)


def _round_to(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """float32 `x` rounded to `dtype` (round to nearest even), still as float32."""
    if dtype == mx.float16:
        return x.astype(np.float16).astype(np.float32)
    if dtype == mx.bfloat16:
        u = np.ascontiguousarray(x, np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)
    return x


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit codes [rows, cols] (uint8) -> MLX's packing, uint32 [rows, cols*bits/32]:
    a little-endian bit stream, element i in bits [i*bits, (i+1)*bits)."""
    rows = q.shape[0]
    if bits == 8:
        return np.ascontiguousarray(q).reshape(rows, -1).view(np.uint32)
    v = (q.reshape(rows, -1, 8).astype(np.uint64) << (np.arange(8, dtype=np.uint64) * np.uint64(bits))).sum(
        -1, dtype=np.uint64)  # 8 codes -> `bits` bytes
    return np.ascontiguousarray(v.view(np.uint8).reshape(rows, -1, 8)[..., :bits]).reshape(rows, -1).view(np.uint32)


def unpack(w: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack`: uint32 [rows, cols*bits/32] -> uint8 codes [rows, cols]."""
    rows = w.shape[0]
    b = np.ascontiguousarray(w).view(np.uint8).reshape(rows, -1, bits)
    if bits == 8:
        return b.reshape(rows, -1)
    v = np.zeros(b.shape[:2] + (8,), np.uint8)
    v[..., :bits] = b
    v = v.view(np.uint64)  # [rows, n, 1]: 8 codes each
    return ((v >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64((1 << bits) - 1)).astype(
        np.uint8).reshape(rows, -1)


def affine_format(weight: mx.array, scales: mx.array, in_dims: int) -> tuple[int, int]:
    """(bits, group size) of an MLX-quantized matrix with `in_dims` inputs, from its packed shapes."""
    return weight.shape[-1] * 32 // in_dims, in_dims // scales.shape[-1]


def promote(weight: mx.array, scales: mx.array, biases: mx.array, bits: int, group: int, to_bits: int,
            to_group: int) -> tuple[mx.array, mx.array, mx.array]:
    """The same MLX affine-quantized matrix with more bits and/or smaller groups, exactly (every
    `bits`-bit code is a `to_bits`-bit code; a group splits into groups sharing its scale and bias).
    E.g. to concatenate q/k/v projections quantized differently: promote all to the most bits and
    the smallest group."""
    if to_bits < bits or group % to_group:
        raise ValueError(f"cannot promote {bits}-bit group {group} to {to_bits}-bit group {to_group} exactly")
    if (to_bits, to_group) == (bits, group):
        return weight, scales, biases
    q = pack(unpack(np.array(weight), bits), to_bits)
    r = group // to_group
    return mx.array(q), mx.repeat(scales, r, axis=-1), mx.repeat(biases, r, axis=-1)


def affine_codes(w: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """q = round((w - bias) / scale) in [0, 2^bits - 1] for w [..., groups, G], scale/bias [..., groups]."""
    s = scale[..., None]
    q = np.divide(w - bias[..., None], s, out=np.zeros(w.shape, np.float32), where=s != 0)
    return np.clip(np.rint(q), 0, (1 << bits) - 1).astype(np.uint8)


def requantize(w: np.ndarray, bits: int, dtype: mx.Dtype = mx.float32):
    """Round-to-nearest affine quantization of w [..., groups, G] on each group's min and max,
    with the scale and bias rounded to `dtype` first. Returns (codes, scales, biases)."""
    lo, hi = w.min(-1), w.max(-1)
    scale, bias = _round_to((hi - lo) / ((1 << bits) - 1), dtype), _round_to(lo, dtype)
    return affine_codes(w, scale, bias, bits), scale, bias


def gguf_blocks_to_affine(raw: np.ndarray, qtype, bits: int, group: int, dtype: mx.Dtype):
    """Rows of raw GGUF blocks (uint8 [rows, row_bytes]) of type `qtype` -> MLX affine
    (packed codes uint32 [rows, cols*bits/32], scales, biases float32 [rows, cols/group], the
    latter rounded to `dtype`): the file's own scales and biases for the EXACT types, else
    `requantize` of the dequantized values."""
    rows = raw.shape[0]
    w = gguf.quants.dequantize(raw, qtype).reshape(rows, -1, group)
    if qtype in EXACT:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        params = EXACT[qtype][2](raw.reshape(-1, type_size))
        scale, bias = (np.broadcast_to(p, (p.shape[0], block // group)).reshape(rows, -1) for p in params)
        q = affine_codes(w, scale, bias, bits)
        scale, bias = _round_to(scale, dtype), _round_to(bias, dtype)
    else:
        q, scale, bias = requantize(w, bits, dtype)
    return pack(q.reshape(rows, -1), bits), scale, bias


def quantization_config(modules: dict[str, tuple[int, int]]) -> Optional[dict]:
    """mlx-lm's "quantization" section for {module path: (bits, group_size)}: the most common
    kind as the default, with an entry for every module that differs."""
    if not modules:
        return None
    kinds = list(modules.values())
    bits, group = max(set(kinds), key=kinds.count)
    config = {"group_size": group, "bits": bits, "mode": "affine"}
    config.update({m: {"group_size": g, "bits": b} for m, (b, g) in modules.items() if (b, g) != (bits, group)})
    return config


def dequantize_weights(weights: dict, q: dict) -> dict:
    """Replace each quantized `X.weight`/`X.scales`/`X.biases` by the float `X.weight`, with the
    format from mlx-lm's `quantization` config section (per-module entries override)."""
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".scales")]:
        p = key[: -len(".scales")]
        fmt = q.get(p) if isinstance(q.get(p), dict) else q
        out[f"{p}.weight"] = mx.dequantize(out[f"{p}.weight"], out.pop(key), out.pop(f"{p}.biases"),
                                           group_size=fmt["group_size"], bits=fmt["bits"])
    return out
