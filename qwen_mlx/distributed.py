"""Tensor parallelism over `mx.distributed`: one model split across the ranks of a group.

The ranks are processes started by `mlx.launch` (docs/distributed.md): Macs over the ring or
JACCL backends, NVIDIA GPUs over NCCL, or local processes over ring for testing. This module owns:

- `shard_model(model, group)` (also `Model.shard`): Megatron-style tensor parallelism with MLX's
  own layers (`mlx.nn.layers.distributed.shard_linear`), as mlx-lm's `qwen2.Model.shard`. Each
  rank keeps its share of the query heads, KV heads and MLP columns; `o_proj` and `down_proj`
  become sharded-to-all layers, i.e. one `all_sum` after each. Our fused matrices are split per
  segment: `qkv_proj` rows (and `qkv_bias`) as [q heads | k heads | v heads], `gate_up_proj` rows
  as [gate | up], so each rank gets its q, k and v heads and its gate and up halves.
- `weight_part` / `slice_checkpoint`: which slice of each checkpoint tensor a rank reads, so that
  `load` builds each rank from its own slices only (~1/N of the layer weights, plus the
  embedding, norms and head, which every rank keeps whole).
- `check_shardable`: the one-line error for head counts that do not divide by N (raised before
  any collective, on every rank).
- `resolve_group`, `sync_seed`, `rank_prefix`, `silence_other_ranks`, `broadcast`, `follow`:
  launching, identical sampling on every rank, rank-0-only output, and the hook a front end
  (the HTTP server) uses to drive the other ranks.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers import distributed as tp
from mlx.nn.layers.distributed import shard_inplace, shard_linear

ROW_SHARDED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # all-to-sharded: output rows
COLUMN_SHARDED = ("o_proj", "down_proj")  # sharded-to-all: input columns, then all_sum
_LAYER_TENSOR = re.compile(r"model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)")


def resolve_group(shard: Union[None, bool, "mx.distributed.Group"] = None) -> Optional["mx.distributed.Group"]:
    """The group `load(shard=...)` splits the model over, or None for a whole model.
    None: the launcher's group (`mx.distributed.init()`) if it has more than one rank;
    False: never shard; True: the launcher's group; a Group: that group."""
    if shard is False:
        return None
    group = mx.distributed.init() if shard in (None, True) else shard
    return group if group.size() > 1 else None


def rank_prefix(group: Optional["mx.distributed.Group"] = None) -> str:
    """'rank r/N: ' under a multi-rank launch, else '' (for error messages)."""
    group = group or mx.distributed.init()
    return f"rank {group.rank()}/{group.size()}: " if group.size() > 1 else ""


def check_shardable(config: dict, n: int) -> None:
    """Raise ValueError (one line) unless the heads and MLP width divide by `n` ranks."""
    nh, nkv, f = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    if nh % n or nkv % n or f % n:
        raise ValueError(f"cannot split the model over {n} ranks: its {nh} query heads, {nkv} KV heads "
                         f"and intermediate size {f} must all divide by {n}")


def weight_part(name: str, shape: tuple, rank: int, n: int) -> Optional[tuple[int, int, int]]:
    """(axis, start, stop) of checkpoint tensor `name` (mlx-lm name, [out, in] float shape) that
    `rank` of `n` holds, or None if every rank holds all of it. q/k/v (and their biases) and
    gate/up are cut along the output rows: head h's rows are [h*head_dim, (h+1)*head_dim), so a
    contiguous block of rows is a contiguous block of heads. o_proj and down_proj along the input
    columns."""
    m = _LAYER_TENSOR.fullmatch(name)
    if m is None:
        return None
    if m[1] in ROW_SHARDED:
        axis = 0
    elif m[1] in COLUMN_SHARDED and m[2] == "weight":
        axis = 1
    else:
        return None
    k = shape[axis] // n
    return axis, rank * k, (rank + 1) * k


def slice_checkpoint(weights: dict, quantization: dict, rank: int, n: int) -> dict:
    """This rank's slices of a directory checkpoint's (lazily loaded) tensors. Quantized matrices
    (`X.weight` uint32, `X.scales`, `X.biases`) are cut on the same rows, or on whole groups of
    columns. Each slice is evaluated at once, so only one full tensor is ever in memory."""
    out = {}
    for name, w in weights.items():
        base, kind = name.rsplit(".", 1)
        fmt = None
        if f"{base}.scales" in weights and kind in ("weight", "scales", "biases"):
            fmt = quantization.get(base) if isinstance(quantization.get(base), dict) else quantization
            packed = weights[f"{base}.weight"]
            shape = (packed.shape[0], packed.shape[1] * 32 // fmt["bits"])
            part = weight_part(f"{base}.weight", shape, rank, n)
        else:
            part = weight_part(name, tuple(w.shape), rank, n)
        if part is None:
            out[name] = w
            continue
        axis, start, stop = part
        if axis == 1 and fmt is not None:
            g, bits = fmt["group_size"], fmt["bits"]
            if start % g or (stop - start) * bits % 32:
                raise ValueError(f"{base}: columns {start}:{stop} do not fall on whole {bits}-bit groups of {g}; "
                                 f"use fewer ranks")
            per = bits / 32 if kind == "weight" else 1 / g
            start, stop = int(start * per), int(stop * per)
        index = (slice(start, stop),) if axis == 0 or w.ndim == 1 else (slice(None), slice(start, stop))
        out[name] = mx.contiguous(w[index])
        mx.eval(out[name])
    return out


def shard_model(model: nn.Module, group: Optional["mx.distributed.Group"] = None) -> nn.Module:
    """Split `model` (a `qwen_mlx.model.Model`, float or quantized) across `group` in place and
    return it. Works on a loaded model (each rank then drops the other ranks' slices) and on a
    not yet evaluated one (what `load` does before loading each rank's own slices). Call
    `mx.eval(model.parameters())` afterwards to materialize the slices."""
    group = group or mx.distributed.init()
    n = group.size()
    if n == 1:
        return model
    args = model.args
    check_shardable(vars(args), n)
    d = args.head_dim
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.o_proj, m.down_proj):
            if isinstance(lin, nn.QuantizedLinear) and (lin.weight.shape[1] * 32 // lin.bits // n) % lin.group_size:
                raise ValueError(f"cannot split a {lin.bits}-bit layer with groups of {lin.group_size} "
                                 f"over {n} ranks: its input size does not divide into whole groups")
        qkv = [a.n_heads * d, (a.n_heads + a.n_kv_heads) * d]  # where q ends and k ends
        shard_inplace(a, lambda path, w: (0, qkv) if path == "qkv_bias" else None, group=group)
        a.qkv_proj = shard_linear(a.qkv_proj, "all-to-sharded", segments=qkv, group=group)
        a.o_proj = shard_linear(a.o_proj, "sharded-to-all", group=group)
        a.n_heads, a.n_kv_heads = a.n_heads // n, a.n_kv_heads // n
        if a._key_scale is not None:  # key smoothing's factors (for the taps): this rank's kv heads
            a._key_scale = a._key_scale[group.rank() * a.n_kv_heads:(group.rank() + 1) * a.n_kv_heads]
        m.gate_up_proj = shard_linear(m.gate_up_proj, "all-to-sharded", segments=2, group=group)
        m.down_proj = shard_linear(m.down_proj, "sharded-to-all", group=group)
    return model


def sync_seed(group: "mx.distributed.Group") -> int:
    """Seed MLX's random generator on every rank with one seed drawn on rank 0, so that sampling
    (same logits, same random draws) picks the same tokens everywhere. A rank that sampled a
    different token would run a different number of steps and leave the others waiting."""
    mine = int.from_bytes(os.urandom(4), "little") >> 1 if group.rank() == 0 else 0
    seed = int(mx.distributed.all_sum(mx.array(mine, mx.int32), group=group).item())
    mx.random.seed(seed)
    return seed


def silence_other_ranks(group: Optional["mx.distributed.Group"] = None) -> bool:
    """From now on, ranks other than 0 write their stdout and stderr to /dev/null (errors can still
    go to `sys.__stderr__`). Returns whether this is rank 0."""
    group = group or mx.distributed.init()
    if group.rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return group.rank() == 0


def broadcast(obj: Any = None, group: Optional["mx.distributed.Group"] = None) -> Any:
    """Rank 0's JSON-serializable `obj`, on every rank (the others pass anything, e.g. None).
    A collective: every rank of the group must call it."""
    group = group or mx.distributed.init()
    if group.size() == 1:
        return obj
    data = json.dumps(obj).encode() if group.rank() == 0 else b""
    size = int(mx.distributed.all_sum(mx.array(len(data), mx.int32), group=group).item())
    buf = mx.array(np.frombuffer(data, np.uint8)) if group.rank() == 0 else mx.zeros((size,), mx.uint8)
    return json.loads(bytes(np.array(mx.distributed.all_sum(buf, group=group))).decode())


def follow(run: Callable[[Any], Any], group: Optional["mx.distributed.Group"] = None) -> None:
    """The loop of the ranks other than 0 behind a front end on rank 0: receive each request
    rank 0 broadcasts (`broadcast(request)`) and call `run(request)` (the same generation rank 0
    runs, output discarded), until rank 0 broadcasts None."""
    group = group or mx.distributed.init()
    while (request := broadcast(None, group)) is not None:
        run(request)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` has been split by `shard_model`."""
    kinds = (tp.AllToShardedLinear, tp.ShardedToAllLinear, tp.QuantizedAllToShardedLinear,
             tp.QuantizedShardedToAllLinear)
    return any(isinstance(m, kinds) for _, m in model.named_modules())

