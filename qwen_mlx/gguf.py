"""Read Qwen2 GGUF files: validation, an HF-style config, and weights under mlx-lm's names.

    reader = open_gguf(path)             # GGUFError (one line, names the file) on bad input
    config = gguf_config(reader, path)   # dict like a Hugging Face Qwen2 config.json
    weights = gguf_weights(reader, mx.float32, path)               # dequantized
    weights, quantization = gguf_quantized_weights(reader, mx.float16, path)  # MLX affine, see below

Dequantization is `gguf.quants.dequantize` (numpy), run over the tensors in a
thread pool. GGUF lists a tensor's dimensions innermost first (ne0 = columns),
so a GGUF [in, out] matrix is an [out, in] array, which is what mlx.nn.Linear
wants. Qwen2 GGUFs keep q/k in Hugging Face's (NeoX RoPE) order: unlike
llama's, llama.cpp's converter does not permute them, so nothing is undone here.

`gguf_quantized_weights` keeps the quantized matrices quantized in MLX's affine
format (w = scale * q + bias per group along the input dimension): repacked
exactly for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K (groups of 32), Q3_K,
IQ4_NL, IQ4_XS (8 bits) and TQ1_0/TQ2_0 (2 bits); re-quantized for Q6_K, Q2_K
and the other IQ types (table REQUANT); see docs/quantization.md.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q

ARCH = "qwen2"
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message is one line naming the file and the problem."""

    def __init__(self, path, problem: str):
        super().__init__(" ".join(f"{path}: {problem}".split()))


class _Reader(gguf.GGUFReader):
    """GGUFReader that parses ~4x faster (slices a plain ndarray view of the memory map
    instead of the np.memmap subclass) and reports reads past the end of the file."""

    def __init__(self, path):
        self.path = str(path)
        super().__init__(path)

    def _get(self, offset, dtype, count=1, override_order=None):
        data = self.__dict__.get("_plain")
        if data is None:
            data = self._plain = self.data.view(np.ndarray)
        dt, count = np.dtype(dtype), int(count)
        end = offset + dt.itemsize * count
        if end > len(data):
            raise GGUFError(self.path, f"truncated file: needs {end} bytes, has {len(data)}")
        arr = data[offset:end].view(dt)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def _path_of(reader, path=None) -> str:
    return str(path) if path is not None else getattr(reader, "path", getattr(reader.data, "filename", "<gguf>"))


def open_gguf(path: Union[str, Path]) -> gguf.GGUFReader:
    """Open and validate a Qwen2 GGUF file; any problem raises GGUFError."""
    p = Path(path)
    if not p.exists():
        raise GGUFError(p, "no such file")
    if not p.is_file():
        raise GGUFError(p, "not a file")
    size = p.stat().st_size
    if size == 0:
        raise GGUFError(p, "empty file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(p, f"cannot read ({e.strerror})") from None
    if magic != b"GGUF":
        raise GGUFError(p, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = _Reader(p)
    except GGUFError:
        raise
    except Exception as e:  # GGUFReader's own errors on a corrupt header
        raise GGUFError(p, f"corrupt GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(p, f"truncated file: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                               f"file has {size}")
    arch = _field(reader, "general.architecture", p)
    if arch != ARCH:
        raise GGUFError(p, f"architecture is {arch!r}, only {ARCH!r} (Qwen2 / Qwen2.5) is supported")
    return reader


def _field(reader, key: str, path, default=...):
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise GGUFError(path, f"missing metadata key {key}")
        return default
    return f.contents()


def gguf_config(reader: gguf.GGUFReader, path=None) -> dict:
    """An HF/mlx-lm-style Qwen2 config dict from the GGUF metadata."""
    path = _path_of(reader, path)

    def get(key, default=...):
        return _field(reader, f"{ARCH}.{key}", path, default)

    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(path, "missing tensor token_embd.weight")
    embd = names["token_embd.weight"].shape
    if len(embd) != 2:
        raise GGUFError(path, f"token_embd.weight has {len(embd)} dimensions, expected 2")
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": int(get("embedding_length")),
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": int(get("attention.head_count")),
        "num_key_value_heads": int(get("attention.head_count_kv", None) or get("attention.head_count")),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 1_000_000.0)),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": int(embd[1]),
        "tie_word_embeddings": "output.weight" not in names,
        "rope_scaling": None,
    }
    h, nh, nkv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    if nh <= 0 or nkv <= 0 or h % nh or nh % nkv:
        raise GGUFError(path, f"inconsistent attention metadata: hidden {h}, heads {nh}, kv heads {nkv}")
    kind = get("rope.scaling.type", None)
    if kind in ("yarn", "linear"):
        scaling = {"type": kind, "rope_type": kind, "factor": _f32(get("rope.scaling.factor"))}
        if kind == "yarn":
            scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
            for key in ("beta_fast", "beta_slow"):
                if (v := get(f"rope.scaling.yarn_{key}", None)) is not None:
                    scaling[key] = _f32(v)
        config["rope_scaling"] = scaling
    elif kind not in (None, "none"):
        raise GGUFError(path, f"unsupported rope scaling type {kind!r}")
    return config


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def mlx_name(gguf_name: str, n_layers: int) -> Optional[str]:
    """mlx-lm's name for a GGUF tensor name, or None if it is not a Qwen2 tensor."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and int(m[1]) < n_layers and m[2] in _BLOCK:
        return f"model.layers.{int(m[1])}.{_BLOCK[m[2]]}"
    return None


def gguf_name(name: str) -> str:
    """The GGUF name of an mlx-lm qwen2 tensor name (inverse of `mlx_name`)."""
    top = {v: k for k, v in _TOP.items()}
    if name in top:
        return top[name]
    i, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
    return f"blk.{i}." + {v: k for k, v in _BLOCK.items()}[rest]


def expected_shapes(config: dict) -> dict[str, tuple]:
    """The [out, in] shape of every weight mlx-lm's qwen2 wants, from the config."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    return shapes


def check_tensors(reader: gguf.GGUFReader, config: dict, path=None) -> dict[str, "gguf.ReaderTensor"]:
    """Map mlx-lm names to GGUF tensors, checking names, types and shapes against the config."""
    path = _path_of(reader, path)
    want = expected_shapes(config)
    found = {}
    for t in reader.tensors:
        name = mlx_name(t.name, config["num_hidden_layers"])
        if name is None:
            raise GGUFError(path, f"unexpected tensor {t.name} ({t.tensor_type.name}) for a "
                                  f"{config['num_hidden_layers']}-layer Qwen2")
        if t.tensor_type not in FLOAT_TYPES and not _can_dequantize(t.tensor_type):
            raise GGUFError(path, f"tensor {t.name} has type {t.tensor_type.name}, which cannot be dequantized")
        shape = tuple(int(d) for d in reversed(t.shape))
        if shape != want[name]:
            raise GGUFError(path, f"tensor {t.name} has shape {list(shape)} ([out, in]), but the metadata "
                                  f"implies {list(want[name])}")
        found[name] = t
    missing = [n for n in want if n not in found]
    if missing:
        raise GGUFError(path, f"missing {len(missing)} tensor(s), e.g. {gguf_name(missing[0])} ({missing[0]})")
    return found


def _can_dequantize(qtype) -> bool:
    from gguf.quants import _type_traits

    return qtype in _type_traits


def _shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


_CHUNK = 1 << 18  # elements per job: big enough for numpy, small enough for the cache


def _row_jobs(shape, fn) -> list:
    """Jobs fn(i, j) over row chunks of an array of `shape`."""
    rows, step = (shape[0], max(1, _CHUNK // shape[-1])) if len(shape) > 1 else (1, 1)
    return [(fn, i, min(i + step, rows)) for i in range(0, rows, step)]


_SHARED = None


def _shares_memory() -> bool:
    """Whether numpy views of evaluated MLX arrays write through to them (on the CPU and
    with unified memory they do); checked once with a sentinel."""
    global _SHARED
    if _SHARED is None:
        a = mx.zeros((4,), mx.float32)
        mx.eval(a)
        try:
            v = np.array(a, copy=False)
            v[1] = 1.0
            _SHARED = bool(v.flags.c_contiguous) and a[1].item() == 1.0
        except (ValueError, TypeError):
            _SHARED = False
    return _SHARED


def _part(t, part: Optional[tuple[int, int, int]]):
    """(shape, raw rows, column slice) of the part (axis, start, stop) of tensor `t` that one rank
    of a tensor-parallel group holds (None: all of it). Rows are sliced in the raw data (each row
    is whole GGUF blocks); columns after dequantizing, so any block size works. A 1-D tensor is
    one row, sliced by columns."""
    shape, raw = _shape(t), t.data.reshape(-1, t.data.shape[-1])
    if part is None:
        return shape, raw, slice(None)
    axis, start, stop = part
    if axis == 0 and len(shape) == 2:
        return (stop - start, shape[1]), raw[start:stop], slice(None)
    return shape[:-1] + (stop - start,), raw, slice(start, stop)


def _dequantize_jobs(t, part=None):
    """A float32 array for tensor `t` (or its `part`, see `_part`) and the jobs that dequantize into
    it: straight into an MLX array's buffer where numpy views share its memory (saves a copy of the
    model), else numpy."""
    shape, raw, cols = _part(t, part)
    if _shares_memory():
        out = mx.zeros(shape, mx.float32)
        mx.eval(out)
        view = np.array(out, copy=False)
    else:
        out = view = np.empty(shape, np.float32)
    rows = view.reshape(-1, shape[-1])

    def fill(i, j):
        rows[i:j] = gguf.quants.dequantize(raw[i:j], t.tensor_type)[:, cols]

    return out, _row_jobs(shape, fill)


def _run(jobs: dict[str, list], progress: bool) -> None:
    """Run every tensor's jobs in a thread pool (numpy releases the GIL), with a bar over tensors."""
    from tqdm import tqdm

    with ThreadPoolExecutor(_workers()) as pool:
        futures = {n: [pool.submit(*job) for job in js] for n, js in jobs.items()}
        for n in tqdm(futures, desc="tensors", unit="tensor", disable=not progress, leave=False):
            for f in futures[n]:
                f.result()


def gguf_weights(reader: gguf.GGUFReader, dtype: mx.Dtype = mx.float32, path=None,
                 progress: bool = False, shard=None) -> dict[str, mx.array]:
    """Every tensor, dequantized with gguf.quants.dequantize and cast to `dtype`, under mlx-lm's
    qwen2 names; matrices are [out_features, in_features]. `shard` as in `gguf_quantized_weights`."""
    weights, _ = gguf_quantized_weights(reader, dtype, path, progress=progress, quantize=False, shard=shard)
    return weights


# ---- MLX affine quantization: w = scale * q + bias per group along the input dimension -----------

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


def _quantize_jobs(t, bits: int, group: int, dtype: mx.Dtype, part=None):
    """Output arrays (q uint32, scales, biases float32) for tensor `t` (or its `part`, see `_part`),
    and the jobs that fill them."""
    (rows, cols), raw, sl = _part(t, part)
    g = slice(None) if sl.start is None else slice(sl.start // group, sl.stop // group)
    if sl.start is not None and (sl.start % group or cols % group or cols * bits % 32):
        raise ValueError(f"{t.name}: columns {sl.start}:{sl.stop} do not fall on whole {bits}-bit groups "
                         f"of {group}; use fewer ranks or load dequantized")
    out = (np.empty((rows, cols * bits // 32), np.uint32), np.empty((rows, cols // group), np.float32),
           np.empty((rows, cols // group), np.float32))
    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    exact = EXACT.get(t.tensor_type)

    def fill(i, j):
        w = gguf.quants.dequantize(raw[i:j], t.tensor_type).reshape(j - i, -1, group)[:, g]
        if exact:  # the file's own scales and biases, and the codes they imply
            params = exact[2](raw[i:j].reshape(-1, type_size))
            scale, bias = (np.broadcast_to(p, (p.shape[0], block // group)).reshape(j - i, -1)[:, g] for p in params)
            q = affine_codes(w, scale, bias, bits)
            scale, bias = _round_to(scale, dtype), _round_to(bias, dtype)
        else:
            q, scale, bias = requantize(w, bits, dtype)
        out[0][i:j], out[1][i:j], out[2][i:j] = pack(q.reshape(j - i, -1), bits), scale, bias

    return out, _row_jobs((rows, cols), fill)


def gguf_quantized_weights(reader: gguf.GGUFReader, dtype: mx.Dtype = mx.float16, path=None,
                           requant: Optional[tuple[int, int]] = None, progress: bool = False,
                           quantize: bool = True, shard=None) -> tuple[dict[str, mx.array], Optional[dict]]:
    """Weights with the GGUF's quantized matrices kept quantized, in MLX's affine format.

    Returns (weights, quantization). A quantized matrix `X.weight` becomes `X.weight` (uint32,
    packed codes), `X.scales` and `X.biases` (`dtype`): repacked exactly for the EXACT types,
    re-quantized as REQUANT says for the others. Every other tensor (norms, biases, float
    matrices, types in neither table) is dequantized and cast to `dtype`, as in `gguf_weights`.
    `requant=(bits, group_size)` re-quantizes the non-EXACT types and the float matrices too.
    `quantization` is mlx-lm's config section: {"group_size": G, "bits": B, "mode": "affine"} for
    the commonest kind, plus {"<module path>": {"group_size": g, "bits": b}} for each module that
    differs (e.g. "model.layers.0.mlp.down_proj"); None when nothing is quantized. Load it as
    mlx-lm does: nn.quantize(model, G, B, class_predicate=lambda p, m: quantization.get(p,
    f"{p}.scales" in weights)), then model.load_weights(list(weights.items())).
    `shard(name, [out, in] shape)` -> (axis, start, stop) or None reads only that part of each
    tensor (one tensor-parallel rank's slice, see qwen_mlx.distributed); None reads everything.
    """
    path = _path_of(reader, path)
    tensors = check_tensors(reader, gguf_config(reader, path), path)
    plans = {n: _plan(t, requant) if quantize else None for n, t in tensors.items()}
    outs, jobs = {}, {}
    for n, t in tensors.items():
        part = shard(n, _shape(t)) if shard else None
        outs[n], jobs[n] = _quantize_jobs(t, *plans[n], dtype, part) if plans[n] else _dequantize_jobs(t, part)
    _run(jobs, progress)
    weights = {}
    for n, out in outs.items():
        if plans[n] is None:
            weights[n] = out if isinstance(out, mx.array) and dtype == mx.float32 else _to_dtype(out, dtype)
            continue
        base = n[: -len(".weight")]
        weights[n] = mx.array(out[0])
        weights[base + ".scales"], weights[base + ".biases"] = _to_dtype(out[1], dtype), _to_dtype(out[2], dtype)
        outs[n] = None  # free the numpy copies as we go
    return weights, quantization_config({n[: -len(".weight")]: p for n, p in plans.items() if p})


def _plan(t, requant: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
    """(bits, group_size) for tensor `t` in MLX, or None to keep it as floats."""
    if len(t.shape) != 2:
        return None
    if t.tensor_type in EXACT:
        return EXACT[t.tensor_type][:2]
    if requant:
        return requant if int(t.shape[0]) % requant[1] == 0 else None
    return REQUANT.get(t.tensor_type)


def _to_dtype(x, dtype: mx.Dtype) -> mx.array:
    a = mx.array(x).astype(dtype)
    mx.eval(a)
    return a


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
