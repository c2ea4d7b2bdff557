"""What each operation of a batched decode step costs at B rows (host and GPU together).

    python scripts/probe_batch_ops.py --batch 1,8,32,128

Random weights (`--geometry`, bf16 on a GPU, float32 on a CPU), mlx-lm's BatchKVCache after a
`--prompt`-token prefill of B rows. Per operation (benchlib.per_call_us): `--calls` independent calls
are built, then evaluated together; the median over `--repeats` of (build time) and (build +
evaluation time) per call. Last, the whole model step as qwen_mlx.batch runs it (the padding mask, the forward of one
token per row, log-softmax and argmax over the vocabulary), built and evaluated alone, median of 10.
"""

from __future__ import annotations

import argparse
import statistics
import time

import benchlib as B  # scripts/benchlib.py (this script's directory is first on sys.path)
import qwen_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

import metal_kernels as K
from qwen_mlx.generation import log_softmax


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="0.5B")
    p.add_argument("--batch", default="1,8,32,128")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--calls", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    gpu = mx.default_device() == mx.gpu
    model, _ = B.random_pair(a.geometry, "bf16" if gpu else "f32")
    dt = mx.bfloat16 if gpu else mx.float32
    args = model.args
    hq, hkv, D = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    layer = model.model.layers[0]
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    for b in (int(x) for x in a.batch.split(",")):
        mx.random.seed(1)
        cache = [BatchKVCache([0] * b) for _ in model.model.layers]
        toks = mx.random.randint(0, args.vocab_size, (b, a.prompt)).astype(mx.uint32)
        model(toks, cache=cache, mask=cache[0].make_mask(a.prompt), last_only=True)
        mx.eval([c.state[:2] for c in cache])
        x = mx.random.normal((b, 1, args.hidden_size)).astype(dt)
        xi = mx.random.normal((b, 1, args.intermediate_size)).astype(dt)
        q = mx.random.normal((b, hq, 1, D)).astype(dt)
        k, v = cache[0].keys[..., :a.prompt + 1, :], cache[0].values[..., :a.prompt + 1, :]
        mask = cache[0].make_mask(1)
        logits = mx.random.normal((b, args.vocab_size)).astype(dt)
        qkv = mx.random.normal((b, 1, (hq + 2 * hkv) * D)).astype(dt)
        offsets = mx.array([a.prompt] * b)
        mx.eval(x, xi, q, k, v, mask, logits, qkv, offsets)
        attn, mlp = layer.self_attn, layer.mlp
        ops = {
            "x + 1 (the floor)": lambda: x + 1,
            "q/k/v projection": lambda: attn.qkv_proj(x),
            "o projection": lambda: attn.o_proj(x),
            "gate/up projection": lambda: mlp.gate_up_proj(x),
            "down projection": lambda: mlp.down_proj(xi),
            "output head": lambda: head(x),
            "SDPA, padding mask": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask),
            "SDPA, no mask": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5),
            "log-softmax + argmax": lambda: mx.argmax(log_softmax(logits), axis=-1),
            "qkv_post, per-row offsets": lambda: K.qkv_post(qkv, attn.qkv_bias, hq, hkv, offsets, args.rope_theta)[0],
            "swiglu": lambda: K.swiglu(mx.concatenate([xi, xi], -1)),
            "rms_norm": lambda: K.rms_norm(x, layer.input_layernorm.weight, args.rms_norm_eps),
            "make_mask(1)": lambda: cache[0].make_mask(1),
        }
        print(f"B={b}  (us per call: build / build + evaluation)", flush=True)
        for name, f in ops.items():
            h, t = B.per_call_us(f, a.calls, a.repeats)
            print(f"  {name:28s} {h:8.1f} / {t:9.1f}", flush=True)
        y = mx.zeros((b,), mx.uint32)
        times = []
        for _ in range(12):
            t0 = time.perf_counter()
            lo = model(y[:, None], cache=cache, mask=cache[0].make_mask(1), last_only=True)[:, -1]
            y = mx.argmax(log_softmax(lo), axis=-1)
            t1 = time.perf_counter()
            mx.eval(y)
            times.append((t1 - t0, time.perf_counter() - t0))
        times = times[2:]
        print(f"  {'whole model step, ms':28s} {statistics.median(t[0] for t in times) * 1e3:8.2f} / "
              f"{statistics.median(t[1] for t in times) * 1e3:9.2f}", flush=True)


if __name__ == "__main__":
    main()
