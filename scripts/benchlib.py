"""What the benchmark scripts share, written once: random-weight model pairs (qwen_mlx and mlx-lm
on the same weights, in one uniform format or a Q4_K_M-like mix), the decode variants the probes
compare, the pipelined greedy decode loop, and the statistics of alternating rounds.

The scripts import it from their own directory (Python puts a script's directory first on
sys.path); qwen_mlx itself is the installed package (`pip install -e .`).
"""

from __future__ import annotations

import statistics
import time

import qwen_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2 as mlx_lm_qwen2

from qwen_mlx.loader import build_model

GEOMETRIES = {  # Qwen2.5 sizes, and a tiny one to check the scripts themselves
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}
# Uniform formats (bits, group), and "q4km": each matrix in the MLX format qwen_mlx gives the GGUF
# type llama.cpp's Q4_K_M picks for it (see q4km_type).
QUANT = {"bf16": None, "f32": None, "4bit": (4, 64), "8bit": (8, 64), "q4km": "mix"}


def config(geometry: str, **extra) -> dict:
    return dict(GEOMETRIES[geometry], model_type="qwen2", vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=32768, **extra)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule (llama-quant.cpp) for the i-th v / down projection Q4_K_M keeps at Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def more_bits_layers(n: int) -> set[int]:
    """The layers whose v and down projections get Q6_K: llama.cpp counts the tensors in the file's
    order, which sorts layer numbers as strings (0, 1, 10, 11, ..., 19, 2, 20, ...). For the default
    model (24 layers) this gives layers 0 1 3 6 7 8 9 10 13 16 19 21, as its GGUF has them."""
    order = sorted(range(n), key=str)
    return {layer for rank, layer in enumerate(order) if use_more_bits(rank, n)}


def q4km_type(kind: str, layer: int, n_layers: int, in_dim: int) -> str:
    """The GGUF type of a Q4_K_M file's matrix: Q4_K, or Q6_K for the output (or the tied embedding)
    and for v / down in `more_bits_layers`; where the input dimension is not a multiple of 256
    (K-quant blocks), llama.cpp falls back to Q5_0 for Q4_K and Q8_0 for Q6_K (the 0.5B model's
    q/k/v/o/gate/up and its output)."""
    more = kind in ("v", "down") and layer in more_bits_layers(n_layers)
    t = "Q6_K" if kind == "output" or more else "Q4_K"
    return {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[t] if in_dim % 256 else t


def q4km_formats(cfg: dict) -> dict:
    """mlx-lm module path -> (bits, group) of the Q4_K_M-like mix, in qwen_mlx's MLX formats for the types."""
    from qwen_mlx.quant import EXACT, REQUANT  # GGUF type -> (bits, group, ...) of qwen_mlx's repack
    from gguf import GGMLQuantizationType as Q

    def fmt(t):
        return (EXACT.get(Q[t]) or REQUANT[Q[t]])[:2]

    n, h, f = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    out = {}
    for i in range(n):
        p = f"model.layers.{i}."
        for kind, name, in_dim in (("q", "self_attn.q_proj", h), ("k", "self_attn.k_proj", h),
                                   ("v", "self_attn.v_proj", h), ("o", "self_attn.o_proj", h),
                                   ("gate", "mlp.gate_proj", h), ("up", "mlp.up_proj", h),
                                   ("down", "mlp.down_proj", f)):
            out[p + name] = fmt(q4km_type(kind, i, n, in_dim))
    tied = cfg["tie_word_embeddings"]
    out["model.embed_tokens"] = fmt(q4km_type("output" if tied else "embed", 0, n, h))
    if not tied:
        out["lm_head"] = fmt(q4km_type("output", 0, n, h))
    return out


def random_pair(geometry: str, quant: str, seed: int = 0, fuse_qkv: str | None = None,
                promote_bits: str | None = None, compile_decode: str | None = None):
    """(qwen_mlx model, mlx-lm model) with the same random weights: mlx-lm's qwen2 initialized with
    `seed`, cast to bfloat16 (float32 for "f32"), quantized as `quant` says, and the same arrays
    loaded into qwen_mlx (`fuse_qkv`, `promote_bits`, `compile_decode` "1"/"0": see
    qwen_mlx.model.ModelArgs)."""
    cfg = config(geometry)
    dtype = mx.float32 if quant == "f32" else mx.bfloat16
    mx.random.seed(seed)
    ref = mlx_lm_qwen2.Model(mlx_lm_qwen2.ModelArgs.from_dict(cfg))
    ref.set_dtype(dtype)
    if quant == "q4km":
        formats = q4km_formats(cfg)
        nn.quantize(ref, class_predicate=lambda path, m: (
            {"bits": formats[path][0], "group_size": formats[path][1]} if path in formats else False))
    elif QUANT[quant]:
        bits, group = QUANT[quant]
        nn.quantize(ref, group_size=group, bits=bits)
    mx.eval(ref.parameters())
    return ours_from(ref, fuse_qkv, promote_bits, compile_decode), ref


def ours_from(ref, fuse_qkv: str | None = None, promote_bits: str | None = None, compile_decode: str | None = None):
    """A qwen_mlx model on the weights of mlx-lm's qwen2 model `ref` (the same arrays where unfused)."""
    cfg = {k: v for k, v in vars(ref.args).items() if v is not None}
    if fuse_qkv:
        cfg["fuse_qkv"] = fuse_qkv
    if promote_bits is not None:
        cfg["promote_bits"] = promote_bits
    if compile_decode is not None:
        cfg["compile_decode"] = compile_decode != "0"
    return build_model(cfg, dict(tree_flatten(ref.parameters())), ref.model.norm.weight.dtype)


def greedy_step(model, ours: bool):
    """step(y, cache) -> the next token (1-D) after the 1-D tokens y, as each library's generate_step
    computes it (qwen_mlx: last position only, float32 log-softmax; mlx-lm: all positions' logits)."""
    if ours:
        from qwen_mlx.generation import log_softmax

        def step(y, cache):
            return mx.argmax(log_softmax(model(y[None], cache=cache, last_only=True)[:, -1, :]), axis=-1)
    else:
        def step(y, cache):
            return mx.argmax(model(y[None], cache=cache)[:, -1, :], axis=-1)
    return step


DECODE_VARIANTS = ("mlx_lm", "ours", "ours_plain", "ours_kernels")


def decode_variant(variant: str, ours, ref):
    """(step, make_cache) for one of DECODE_VARIANTS: mlx_lm (its qwen2 model `ref`), ours (qwen_mlx
    `ours` as shipped), ours_plain (without the compiled decode step, ModelArgs.compile_decode off),
    ours_kernels (every metal_kernels kernel forced on). Sets the kernel mode and compile_decode of
    `ours` for the run that follows (variants alternate)."""
    if variant == "mlx_lm":
        from mlx_lm.models.cache import make_prompt_cache

        return greedy_step(ref, ours=False), lambda: make_prompt_cache(ref)
    if variant not in DECODE_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: want one of {', '.join(DECODE_VARIANTS)}")
    import metal_kernels as K

    K.set_backend("kernels" if variant == "ours_kernels" else "auto")
    ours.model.compile_decode = variant != "ours_plain"
    return greedy_step(ours, ours=True), ours.make_cache


def decode_loop(step, cache, y: mx.array, n: int) -> float:
    """tok/s of n greedy steps after token y, one step in flight (as generate_step runs it)."""
    mx.synchronize()
    tic = time.perf_counter()
    mx.async_eval(y)
    for _ in range(n):
        nxt = step(y, cache)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    return n / (time.perf_counter() - tic)


def per_call_us(fn, calls: int, repeats: int) -> tuple[float, float]:
    """(build, build + evaluation) microseconds per call of fn: `calls` calls are built (outputs
    kept), then evaluated together, so host and GPU time overlap as in a decode loop; medians over
    `repeats` such runs."""
    mx.eval(fn())
    build, total = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = [fn() for _ in range(calls)]
        built = time.perf_counter()
        mx.eval(outs)
        build.append((built - t) / calls * 1e6)
        total.append((time.perf_counter() - t) / calls * 1e6)
        del outs
    return statistics.median(build), statistics.median(total)


def spread(values: list[float]) -> dict:
    """median, min, max and the raw rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": list(values)}


def counts(a: dict, b: dict) -> bool:
    """A ratio counts when the two spreads (min-max over the rounds) do not overlap."""
    return a["min"] > b["max"] or a["max"] < b["min"]


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter but an untied embedding table (of which
    a step reads one row)."""
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", True)
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if tied or "embed_tokens" not in k)


def kv_bytes_per_position(cfg: dict, itemsize: int) -> int:
    """Bytes of K and V cached per token position over all layers."""
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * itemsize


def copy_bandwidth(gb: float | None = None, repeats: int = 10) -> float:
    """Bytes/s of a plain MLX copy (read + write) of a `gb`-GB float32 array (default 4 on a GPU,
    0.25 on a CPU): best of `repeats`."""
    gb = gb or (0.25 if mx.default_device() == mx.cpu else 4.0)
    x = mx.random.normal((int(gb * 1e9) // 4,))
    mx.eval(x)
    best = 0.0
    for _ in range(repeats):
        mx.synchronize()
        tic = time.perf_counter()
        y = mx.abs(x)  # one elementwise kernel: reads and writes every byte once, as a copy does
        mx.eval(y)
        best = max(best, 2 * x.nbytes / (time.perf_counter() - tic))
        del y
    del x
    mx.clear_cache()
    return best
