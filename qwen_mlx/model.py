"""Qwen2 / Qwen2.5 as mlx.nn modules: one flat file, every size from 0.5B to 72B.

The architecture: token embedding -> N x [RMSNorm -> grouped-query attention
(q/k/v biases, NeoX RoPE, base 1e6, optional YaRN) -> residual add -> RMSNorm ->
SwiGLU MLP -> residual add] -> RMSNorm -> output projection (tied to the
embedding or not).

What shapes the code:
- q/k/v and gate/up are fused projections (`qkv_proj`, `gate_up_proj`): one
  matmul each instead of three and two. `Model.sanitize` concatenates the
  separate checkpoint weights (mlx-lm / Hugging Face names) at load time.
- The KV cache is mlx-lm's `KVCache` (preallocated in steps of 256 positions).
- The hot elementwise work goes through `metal_kernels` (`K.*`): fused
  add+RMSNorm, bias+RoPE+head-split after the q/k/v matmul, SwiGLU. Each op
  has a hand-written Metal kernel, used on a GPU only where it measured faster
  than the MLX ops it replaces (`metal_kernels.USE`), and a plain-MLX reference.
  To fuse each residual add with the norm after it, a block carries the
  residual stream as a pair (h, r) whose sum is the stream.
- `tap(name, x)` marks the named stages a researcher can capture or replace
  (`qwen_mlx.research`). Each `Model` has its own `tap_hook` (None: x passes untouched);
  `Model.__call__` makes it the one `tap` calls for the duration of that model's forward
  pass, so hooks on one model never see another model's pass.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, fields
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

import metal_kernels as K

from .quant import promote

# The `tap_hook` of the Model whose forward pass is running (None: no hook), set by `_scoped_taps`.
_TAP = contextvars.ContextVar("qwen_mlx_tap", default=None)


def tap(name: str, x: mx.array) -> mx.array:
    hook = _TAP.get()
    return x if hook is None else hook(name, x)


def _scoped_taps(forward):
    """Wrap Model.__call__: during it, `tap` calls this model's `tap_hook` (and no other's)."""

    @functools.wraps(forward)
    def call(self, *args, **kwargs):
        hook = getattr(self, "tap_hook", None)
        if hook is None and _TAP.get() is None:
            return forward(self, *args, **kwargs)
        token = _TAP.set(hook)
        try:
            return forward(self, *args, **kwargs)
        finally:
            _TAP.reset(token)

    return call


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = True
    model_type: str = "qwen2"

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = d**-0.5
        self.qkv_proj = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * d, bias=False)
        self.qkv_bias = mx.zeros(((self.n_heads + 2 * self.n_kv_heads) * d,))
        self.o_proj = nn.Linear(self.n_heads * d, args.hidden_size, bias=False)
        rope = initialize_rope(d, args.rope_theta, False, args.rope_scaling, args.max_position_embeddings)
        # What K.qkv_post needs to reproduce `rope`: the base, or YaRN's frequencies and input scale.
        # `_freqs` is mlx-lm's private name (version bounded in pyproject.toml, checked by
        # tests/test_private_names.py).
        if not isinstance(rope, nn.RoPE) and not hasattr(rope, "_freqs"):
            raise ValueError(f"unsupported rope_scaling {args.rope_scaling}")
        self._rope = {"base": getattr(rope, "base", None), "freqs": getattr(rope, "_freqs", None),
                      "mscale": getattr(rope, "mscale", 1.0)}
        if isinstance(rope, nn.RoPE) and rope.scale != 1.0:
            raise ValueError(f"unsupported rope_scaling {args.rope_scaling} (linear)")

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[KVCache] = None, name: str = "") -> mx.array:
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q, k, v = K.qkv_post(self.qkv_proj(x), self.qkv_bias, self.n_heads, self.n_kv_heads, offset, **self._rope)
        q, k, v = tap(name + "q", q), tap(name + "k", k), tap(name + "v", v)  # [B, heads, L, head_dim]
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        o = tap(name + "attn_out", o.transpose(0, 2, 1, 3).reshape(B, L, -1))
        return tap(name + "o_proj", self.o_proj(o))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(K.swiglu(self.gate_up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.eps, self.name = args.rms_norm_eps, f"layers.{index}."
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, h: mx.array, r: Optional[mx.array], mask: Any = None, cache=None):
        """The residual stream is h + r (r is None for the first layer); returns the new (h, r)."""
        if r is None:
            x = K.rms_norm(h, self.input_layernorm.weight, self.eps)
        else:
            h, x = K.add_rms_norm(r, h, self.input_layernorm.weight, self.eps)
        x = tap(self.name + "attn_norm", x)
        r = self.self_attn(x, mask, cache, self.name)
        h, x = K.add_rms_norm(r, h, self.post_attention_layernorm.weight, self.eps)
        r = tap(self.name + "mlp_out", self.mlp(tap(self.name + "mlp_norm", x)))
        if _TAP.get() is not None:  # the residual stream after this layer, materialized only when tapped
            h, r = tap(self.name + "residual", h + r), mx.zeros_like(r)
        return h, r


class Qwen2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, mask: Optional[mx.array] = None) -> mx.array:
        h, r = tap("embed", self.embed_tokens(inputs)), None
        if mask is None:
            mask = "causal" if h.shape[1] > 1 else None
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h, r = layer(h, r, mask, c)
        return tap("final_norm", K.add_rms_norm(r, h, self.norm.weight, self.norm.eps)[1])


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tap_hook = None  # (name, array) -> array, set by qwen_mlx.research for this model only

    @_scoped_taps
    def __call__(self, inputs: mx.array, cache=None, mask: Optional[mx.array] = None,
                 last_only: bool = False) -> mx.array:
        """tokens [B, L] -> logits [B, L, vocab]; `cache` from `make_cache()` makes it incremental.

        `mask` (optional) is an additive or boolean attention mask broadcastable to
        [B, heads, L, cached + L], e.g. causal and hiding left padding; default causal.
        `last_only` returns the logits of the last position only ([B, 1, vocab]), skipping
        the output projection (a quarter of the 0.5B model's FLOPs) for the others.
        """
        h = self.model(inputs, cache, mask)
        if last_only:
            h = h[:, -1:]
        return tap("logits", self.model.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h))

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint names (separate q/k/v, gate/up, mlx-lm layout) onto the fused modules."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        for i in range(self.args.num_hidden_layers):
            p = f"model.layers.{i}."
            _fuse(weights, p, [f"self_attn.{n}_proj" for n in "qkv"], "self_attn.qkv_proj", self.args.hidden_size)
            _fuse(weights, p, ["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_up_proj", self.args.hidden_size)
            if f"{p}self_attn.q_proj.bias" in weights:
                weights[f"{p}self_attn.qkv_bias"] = mx.concatenate(
                    [weights.pop(f"{p}self_attn.{n}_proj.bias") for n in "qkv"])
        return weights


def _fuse(weights: dict, prefix: str, parts: list[str], fused: str, in_dims: int) -> None:
    """Concatenate the output rows of `parts` into `fused`. Quantized parts stored in different
    formats (e.g. q/k from Q5_0, v from Q8_0) are first re-expressed, exactly, in the most bits
    and the smallest group among them."""
    if f"{prefix}{parts[0]}.weight" not in weights:
        return
    ws = [weights.pop(f"{prefix}{n}.weight") for n in parts]
    if f"{prefix}{parts[0]}.scales" not in weights:
        weights[f"{prefix}{fused}.weight"] = mx.concatenate(ws, axis=0)
        return
    ss = [weights.pop(f"{prefix}{n}.scales") for n in parts]
    bs = [weights.pop(f"{prefix}{n}.biases") for n in parts]
    fmts = [(w.shape[-1] * 32 // in_dims, in_dims // s.shape[-1]) for w, s in zip(ws, ss)]
    bits, group = max(f[0] for f in fmts), min(f[1] for f in fmts)
    if any(f != (bits, group) for f in fmts):
        ws, ss, bs = zip(*(promote(w, s, b, fb, fg, bits, group) for w, s, b, (fb, fg) in zip(ws, ss, bs, fmts)))
    for suffix, arrays in (("weight", ws), ("scales", ss), ("biases", bs)):
        weights[f"{prefix}{fused}.{suffix}"] = mx.concatenate(arrays, axis=0)
