"""KV caches for long contexts in bounded memory, and prompt caches on disk.

Owns:
- `cache_options(...)` -> `CacheOptions`: the checked KV settings. Quantized (`kv_bits`,
  `kv_group_size`, `quantized_kv_start`) or rotating (`max_kv_size`, `keep`), never both
  (mlx-lm's `RotatingKVCache` has no quantized form).
- `new_cache(model, opts)` builds the per-layer mlx-lm caches; `maybe_quantize(cache, opts)`
  turns full-precision layers into mlx-lm `QuantizedKVCache`s once they hold `quantized_kv_start`
  tokens (mlx-lm's `maybe_quantize_kv_cache`, same semantics as `mlx_lm.generate`). Where
  attention over a quantized cache runs through `metal_kernels.quant_sdpa` (NVIDIA GPUs), they
  become `BlockQuantizedKVCache`s: the same packed buffers, with decode tokens quantized a block
  of 128 at a time.
- Prompt-cache files: `save_prompt_cache_file` / `load_prompt_cache_file` write and read mlx-lm's
  safetensors layout (`save_prompt_cache` / `load_prompt_cache`: arrays plus string metadata, no
  pickle) with the token ids the cache holds, the KV settings, a content hash of the arrays and
  the identity of the model it was made with (`model_identity`: dtype, weight format, and a hash
  of the config, tokenizer, chat template and a sample of every weight). Loading refuses, with
  one line, a file that is not such a cache, is truncated or corrupted, or was made by another
  model, dtype or weight format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, maybe_quantize_kv_cache
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache, save_prompt_cache

import metal_kernels as K

FORMAT = "qwen-mlx prompt cache 1"
CACHE_CLASSES = ("KVCache", "QuantizedKVCache", "RotatingKVCache")
KV_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize supports
KV_GROUP_SIZES = (32, 64, 128)


class PromptCacheError(ValueError):
    """A prompt-cache file that cannot be used; the message is one line naming the file."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class CacheOptions:
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
    max_kv_size: Optional[int] = None
    keep: int = 4


def cache_options(kv_bits: Optional[int] = None, kv_group_size: int = 64,
                  quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START, max_kv_size: Optional[int] = None,
                  keep: int = 4) -> CacheOptions:
    """Check the KV settings (ValueError, one line, on a bad one) and bundle them.

    kv_bits: quantize the cache to this many bits (None: full precision), in groups of
    `kv_group_size` along the head dimension, once it holds `quantized_kv_start` tokens (mlx-lm's
    default 5000; 0 quantizes right after the first prefill chunk).
    max_kv_size: keep at most this many positions: the first `keep` and the most recent ones.
    """
    if kv_bits is not None and kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, not {kv_bits}")
    if kv_group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, not {kv_group_size}")
    if quantized_kv_start < 0:
        raise ValueError(f"quantized_kv_start must be >= 0, not {quantized_kv_start}")
    if keep < 0:
        raise ValueError(f"keep must be >= 0, not {keep}")
    if max_kv_size is not None and max_kv_size <= keep:
        raise ValueError(f"max_kv_size must be larger than keep ({keep}), not {max_kv_size}")
    if max_kv_size is not None and kv_bits is not None:
        raise ValueError("a quantized KV cache (kv_bits) cannot also be rotating (max_kv_size)")
    return CacheOptions(kv_bits, kv_group_size, quantized_kv_start, max_kv_size, keep)


class BlockQuantizedKVCache(QuantizedKVCache):
    """mlx-lm's `QuantizedKVCache` (same packed buffers, state and trimming) that stores decode
    tokens a block at a time: a one-token update writes the token's keys and values, unrounded,
    into a tail of `block` (128) positions, and the tail is quantized into the packed buffers when
    it is full, before a longer update (a prefill chunk), and before `state`, `trim` or `plain`.

    Why: per decode step and layer, mlx-lm's update quantizes keys and values (two `mx.quantize`)
    and writes six slices; on an H200 that host work, not the GPU, made quantized decoding half as
    fast as bfloat16 (docs/benchmarks.md). Here a step writes two slices. Quantization groups run
    along the head dimension, so a token quantized with its block is stored exactly as mlx-lm
    stores it alone; attention (`tail()`, `metal_kernels.quant_sdpa`) reads the tail unrounded.
    One-token updates return the packed buffers unsliced (attention needs `tail()` besides)."""

    block = 128

    def __init__(self, group_size: int = 64, bits: int = 8):
        super().__init__(group_size=group_size, bits=bits)
        self.tail_keys = self.tail_values = None
        self.tail_n = 0

    @classmethod
    def of(cls, c: QuantizedKVCache) -> "BlockQuantizedKVCache":
        """The same cache (its buffers, not a copy) as a BlockQuantizedKVCache."""
        b = cls(group_size=c.group_size, bits=c.bits)
        b.keys, b.values, b.offset = c.keys, c.values, c.offset
        return b

    def plain(self) -> QuantizedKVCache:
        """The same cache (after `flush`) as mlx-lm's QuantizedKVCache: what prompt-cache files hold."""
        self.flush()
        c = QuantizedKVCache(group_size=self.group_size, bits=self.bits)
        c.keys, c.values, c.offset = self.keys, self.values, self.offset
        return c

    def flush(self) -> None:
        """Quantize the tail into the packed buffers."""
        if self.tail_n:
            n, self.tail_n = self.tail_n, 0
            self.offset -= n
            super().update_and_fetch(self.tail_keys[..., :n, :], self.tail_values[..., :n, :])

    def update_and_fetch(self, keys, values):
        if keys.shape[2] != 1 or self.keys is None:
            self.flush()
            return super().update_and_fetch(keys, values)
        if self.tail_keys is None or self.tail_keys.shape != (*keys.shape[:2], self.block, keys.shape[3]):
            self.flush()
            self.tail_keys = mx.zeros((*keys.shape[:2], self.block, keys.shape[3]), keys.dtype)
            self.tail_values = mx.zeros((*values.shape[:2], self.block, values.shape[3]), values.dtype)
        elif self.tail_n == self.block:
            self.flush()
        self.tail_keys[..., self.tail_n:self.tail_n + 1, :] = keys
        self.tail_values[..., self.tail_n:self.tail_n + 1, :] = values
        self.tail_n += 1
        self.offset += 1
        return self.keys, self.values

    def tail(self):
        """(keys, values, n) of the unquantized tail for attention, or None when it is empty; the
        packed buffers then hold the first `offset - n` positions."""
        return (self.tail_keys, self.tail_values, self.tail_n) if self.tail_n else None

    @property
    def state(self):
        self.flush()
        return super().state

    @state.setter
    def state(self, v):
        self.tail_n = 0
        QuantizedKVCache.state.fset(self, v)

    def trim(self, n):
        self.flush()
        return super().trim(n)

    @property
    def nbytes(self):
        return super().nbytes + sum(a.nbytes for a in (self.tail_keys, self.tail_values) if a is not None)


def _blocked(cache: list) -> None:
    """Where quantized attention runs through metal_kernels.quant_sdpa, mlx-lm QuantizedKVCache
    layers become BlockQuantizedKVCache (in place; the same buffers)."""
    if K.runs_quant_sdpa():
        for i, c in enumerate(cache):
            if type(c) is QuantizedKVCache:
                cache[i] = BlockQuantizedKVCache.of(c)


def new_cache(model, opts: Optional[CacheOptions] = None) -> list:
    """Empty per-layer caches for `opts`: rotating with `max_kv_size`, else full precision (a
    quantized cache starts full precision and is converted by `maybe_quantize`, as in mlx-lm)."""
    opts = opts or CacheOptions()
    if opts.kv_bits is not None and model.args.head_dim % opts.kv_group_size:
        raise ValueError(f"kv_group_size {opts.kv_group_size} does not divide the head size {model.args.head_dim}")
    return model.make_cache(max_kv_size=opts.max_kv_size, keep=opts.keep)


def maybe_quantize(cache: list, opts: Optional[CacheOptions]) -> None:
    """Replace, in place, each full-precision layer holding >= quantized_kv_start tokens by its
    quantized form (no-op without kv_bits)."""
    if opts is not None and opts.kv_bits is not None:
        maybe_quantize_kv_cache(cache, opts.quantized_kv_start, opts.kv_group_size, opts.kv_bits)
        _blocked(cache)


def cache_nbytes(cache: list) -> int:
    """Bytes held by the caches' arrays (preallocated capacity included)."""
    return sum(c.nbytes for c in cache)


def model_identity(model: nn.Module, tokenizer) -> dict[str, str]:
    """What a prompt cache must be used with: compute dtype, weight format and a sha256 over the
    config, the tokenizer's vocabulary and chat template, and the first row of every weight."""
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    h = hashlib.sha256(json.dumps(asdict(model.args), sort_keys=True).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    for name, p in tree_flatten(model.parameters()):
        h.update(name.encode())
        h.update(_bytes(p[:1] if p.ndim > 1 else p))
    return {"model": h.hexdigest()[:32], "dtype": str(model.model.norm.weight.dtype).split(".")[-1],
            "weights": "quantized" if quantized else "dequantized"}


def _bytes(a: mx.array) -> bytes:
    a = mx.contiguous(a)
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()


def _content_hash(cache: list) -> str:
    h = hashlib.sha256()
    for name, a in tree_flatten([c.state for c in cache]):
        h.update(name.encode())
        h.update(_bytes(a) if isinstance(a, mx.array) else repr(a).encode())
    return h.hexdigest()[:32]


def save_prompt_cache_file(path, cache: list, tokens: Sequence[int], model, tokenizer,
                           opts: Optional[CacheOptions] = None, extra: Optional[dict[str, str]] = None) -> None:
    """Write `cache` (holding exactly `tokens`) to the safetensors file `path`, with the model's
    identity, `opts` and the string metadata `extra`. Written to a temporary name, then renamed."""
    if any(c.offset != len(tokens) for c in cache):
        raise ValueError(f"the cache holds {cache[0].offset} tokens, not the {len(tokens)} given")
    cache = [c.plain() if isinstance(c, BlockQuantizedKVCache) else c for c in cache]  # mlx-lm's classes
    mx.eval([c.state for c in cache])
    meta = dict(extra or {})
    meta.update(model_identity(model, tokenizer), format=FORMAT, tokens=json.dumps([int(t) for t in tokens]),
                kv=json.dumps(asdict(opts or CacheOptions())), content=_content_hash(cache))
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.safetensors")
    try:
        save_prompt_cache(str(tmp), cache, meta)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path) -> dict[str, str]:
    """The string metadata of a prompt-cache file (header only; the arrays are not read)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise PromptCacheError(path, "no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            flat = f.metadata() or {}
    except Exception as e:  # not safetensors, truncated, bad header
        raise PromptCacheError(path, f"not a readable safetensors file ({e})") from None
    meta = {k[2:]: v for k, v in flat.items() if k.startswith("0.")}
    if meta.get("format") != FORMAT:
        raise PromptCacheError(path, f"not a qwen-mlx prompt cache (no '{FORMAT}' marker)")
    meta["classes"] = [v for k, v in flat.items() if k.startswith("1.")]
    return meta


def load_prompt_cache_file(path, model, tokenizer) -> tuple[list, list[int], CacheOptions, dict[str, str]]:
    """Read a file from `save_prompt_cache_file` for `model` -> (cache, tokens, opts, metadata).

    Refused (PromptCacheError, one line): not a safetensors prompt cache; made by another model,
    dtype or weight format; truncated, or arrays that do not match their content hash.
    """
    meta = read_metadata(path)
    ours = model_identity(model, tokenizer)
    for key, what in (("dtype", "dtype"), ("weights", "weight format")):
        if meta.get(key) != ours[key]:
            raise PromptCacheError(path, f"made with {what} {meta.get(key)}, this model runs with {ours[key]}")
    if meta.get("model") != ours["model"]:
        raise PromptCacheError(path, "made by another model (config, tokenizer or weights differ)")
    classes = meta["classes"]
    if len(classes) != len(model.layers) or any(c not in CACHE_CLASSES for c in classes):
        raise PromptCacheError(path, f"{len(classes)} cache layers of types {sorted(set(classes))}, "
                                     f"expected {len(model.layers)} of {', '.join(CACHE_CLASSES)}")
    try:
        tokens = [int(t) for t in json.loads(meta["tokens"])]
        opts = CacheOptions(**json.loads(meta["kv"]))
        cache = load_prompt_cache(str(path))
    except Exception as e:
        raise PromptCacheError(path, f"damaged prompt cache ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if _content_hash(cache) != meta.get("content"):
        raise PromptCacheError(path, "damaged prompt cache (the arrays do not match their content hash)")
    if any(c.offset != len(tokens) for c in cache):
        raise PromptCacheError(path, f"damaged prompt cache (layers hold {cache[0].offset} tokens, metadata {len(tokens)})")
    return cache, tokens, opts, meta


def continuation(cached: Sequence[int], ids: Sequence[int], path="the prompt cache") -> list[int]:
    """The tokens of `ids` after the cached prefix; ValueError (one line) when `cached` is not a
    proper prefix of `ids`."""
    if len(ids) <= len(cached) or list(ids[:len(cached)]) != list(cached):
        first = next((i for i, (a, b) in enumerate(zip(cached, ids)) if a != b), min(len(cached), len(ids)))
        raise ValueError(f"{path}: its {len(cached)} tokens are not a prefix of the prompt's {len(ids)} tokens "
                         f"(first difference at token {first})")
    return list(ids[len(cached):])
