"""Read Qwen2 GGUF files: validation, an HF-style config, and weights under mlx-lm's names.

    reader = open_gguf(path)             # GGUFError (one line, names the file) on bad input
    config = gguf_config(reader)         # dict like a Hugging Face Qwen2 config.json (read once)
    weights = gguf_weights(reader, mx.float32)                      # dequantized
    weights, quantization = gguf_quantized_weights(reader, mx.float16)  # MLX affine, see below
    field(reader, "tokenizer.ggml.model", None)                     # any metadata value

This module owns the file format: opening and validating, metadata (`field`, the one
accessor every module uses), tensor names and shapes, and reading the tensors in a thread
pool. The reader returned by `open_gguf` knows its path (`reader.path`, used in every
error) and caches its config.

Dequantization is `gguf.quants.dequantize` (numpy), run over the tensors in a
thread pool. GGUF lists a tensor's dimensions innermost first (ne0 = columns),
so a GGUF [in, out] matrix is an [out, in] array, which is what mlx.nn.Linear
wants. Qwen2 GGUFs keep q/k in Hugging Face's (NeoX RoPE) order: unlike
llama's, llama.cpp's converter does not permute them, so nothing is undone here.

`gguf_quantized_weights` keeps the quantized matrices quantized in MLX's affine
format, with the maths of `qwen_mlx.quant`: repacked exactly for Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q5_K (groups of 32), Q3_K, IQ4_NL, IQ4_XS (8 bits) and
TQ1_0/TQ2_0 (2 bits); re-quantized for Q6_K, Q2_K and the other IQ types (table
`quant.REQUANT`); see docs/quantization.md.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q

from . import quant

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


class GGUFFile(gguf.GGUFReader):
    """A GGUFReader that knows its path (as the caller spelled it, for error messages) and
    caches its config (`gguf_config`). It overrides gguf's private `GGUFReader._get` (the one
    primitive every header read goes through) to parse ~3-4x faster, slicing a plain ndarray
    view of the memory map instead of the np.memmap subclass (the real model's 151k-token
    vocabulary: ~6 s instead of ~21 s on the 2-core CI machine), and to report reads past the
    end of the file. gguf is bounded in pyproject.toml to the versions tested, and
    tests/test_private_names.py fails by name if `_get` goes away."""

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


def path_of(reader: gguf.GGUFReader) -> str:
    """The file behind `reader`: `GGUFFile.path`, or the memory map's file for a plain GGUFReader."""
    return getattr(reader, "path", None) or str(getattr(reader.data, "filename", "<gguf>"))


def open_gguf(path: Union[str, Path]) -> GGUFFile:
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
        reader = GGUFFile(p)
    except GGUFError:
        raise
    except Exception as e:  # GGUFReader's own errors on a corrupt header
        raise GGUFError(p, f"corrupt GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(p, f"truncated file: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                               f"file has {size}")
    arch = field(reader, "general.architecture")
    if arch != ARCH:
        raise GGUFError(p, f"architecture is {arch!r}, only {ARCH!r} (Qwen2 / Qwen2.5) is supported")
    return reader


def field(reader: gguf.GGUFReader, key: str, default=...):
    """The value of metadata `key`; `default` if it is absent, or GGUFError if no default is given."""
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise GGUFError(path_of(reader), f"missing metadata key {key}")
        return default
    return f.contents()


def gguf_config(reader: gguf.GGUFReader) -> dict:
    """An HF/mlx-lm-style Qwen2 config dict from the GGUF metadata (a fresh copy each call;
    the metadata is read once per reader)."""
    cached = reader.__dict__.get("_qwen_mlx_config")
    if cached is None:
        cached = reader.__dict__["_qwen_mlx_config"] = _read_config(reader)
    return copy.deepcopy(cached)


def _read_config(reader: gguf.GGUFReader) -> dict:
    path = path_of(reader)

    def get(key, default=...):
        return field(reader, f"{ARCH}.{key}", default)

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


def check_tensors(reader: gguf.GGUFReader, config: dict) -> dict[str, "gguf.ReaderTensor"]:
    """Map mlx-lm names to GGUF tensors, checking names, types and shapes against the config."""
    path = path_of(reader)
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


@functools.lru_cache(maxsize=None)
def _can_dequantize(qtype) -> bool:
    """Whether gguf.quants.dequantize handles `qtype` (tried on one zero block: public API only)."""
    try:
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


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
    is whole GGUF blocks); columns after converting row chunks, so any block size works. A 1-D
    tensor is one row, sliced by columns."""
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


def gguf_weights(reader: gguf.GGUFReader, dtype: mx.Dtype = mx.float32,
                 progress: bool = False, shard=None) -> dict[str, mx.array]:
    """Every tensor, dequantized with gguf.quants.dequantize and cast to `dtype`, under mlx-lm's
    qwen2 names; matrices are [out_features, in_features]. `shard` as in `gguf_quantized_weights`."""
    weights, _ = gguf_quantized_weights(reader, dtype, progress=progress, quantize=False, shard=shard)
    return weights


def _quantize_jobs(t, bits: int, group: int, dtype: mx.Dtype, part=None):
    """Output arrays (q uint32, scales, biases float32) for tensor `t` (or its `part`, see `_part`),
    and the jobs that fill them (`quant.gguf_blocks_to_affine` over row chunks). A column part is
    cut from whole rows' output on group boundaries: exact, the packed codes being a bit stream."""
    (rows, cols), raw, sl = _part(t, part)
    codes, groups = slice(None), slice(None)
    if sl.start is not None:
        if sl.start % group or cols % group or cols * bits % 32:
            raise ValueError(f"{t.name}: columns {sl.start}:{sl.stop} do not fall on whole {bits}-bit groups "
                             f"of {group}; use fewer ranks or load dequantized")
        codes, groups = slice(sl.start * bits // 32, sl.stop * bits // 32), slice(sl.start // group, sl.stop // group)
    out = (np.empty((rows, cols * bits // 32), np.uint32), np.empty((rows, cols // group), np.float32),
           np.empty((rows, cols // group), np.float32))

    def fill(i, j):
        q, scale, bias = quant.gguf_blocks_to_affine(raw[i:j], t.tensor_type, bits, group, dtype)
        out[0][i:j], out[1][i:j], out[2][i:j] = q[:, codes], scale[:, groups], bias[:, groups]

    return out, _row_jobs((rows, cols), fill)


def gguf_quantized_weights(reader: gguf.GGUFReader, dtype: mx.Dtype = mx.float16,
                           requant: Optional[tuple[int, int]] = None, progress: bool = False,
                           quantize: bool = True, shard=None) -> tuple[dict[str, mx.array], Optional[dict]]:
    """Weights with the GGUF's quantized matrices kept quantized, in MLX's affine format.

    Returns (weights, quantization). A quantized matrix `X.weight` becomes `X.weight` (uint32,
    packed codes), `X.scales` and `X.biases` (`dtype`): repacked exactly for the EXACT types,
    re-quantized as `quant.REQUANT` says for the others. Every other tensor (norms, biases, float
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
    tensors = check_tensors(reader, gguf_config(reader))
    plans = {n: quant.plan(t.tensor_type, _shape(t), requant) if quantize else None for n, t in tensors.items()}
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
    return weights, quant.quantization_config({n[: -len(".weight")]: p for n, p in plans.items() if p})


def _to_dtype(x, dtype: mx.Dtype) -> mx.array:
    a = mx.array(x).astype(dtype)
    mx.eval(a)
    return a
