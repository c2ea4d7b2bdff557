"""GPU time of decode attention over a quantized KV cache: metal_kernels.quant_sdpa (both passes)
against bf16 `mx.fast.scaled_dot_product_attention`, and optionally variants of the kernel body.

    python scripts/probe_attention.py                       # 7B heads, 32,768 positions, 4- and 8-bit
    python scripts/probe_attention.py --variant my.metal    # also a modified quant_sdpa body

Needs a GPU. Host and GPU time overlap in a loop of independent calls, so a plain timing shows the
host's cost. Here each call is fed the previous call's output (the attention output has the query's
shape), so the calls run one after another on the GPU; the chain is timed at `--context` cache
positions and at 128, and the difference (less the difference in graph-building time) is the GPU
time the extra positions cost. Per case the fastest of `--repeats` chains of `--calls` calls.
A variant is a .metal file with quant_sdpa's inputs, outputs, template and grid (copied next to the
shipped bodies for the run, under its file name, then removed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import qwen_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx

from metal_kernels import _core
from metal_kernels import kernels as KK


def chain(step, q, calls: int) -> tuple[float, float]:
    """(host us, total us) per call of `calls` chained calls of step."""
    x = q
    for _ in range(3):
        x = step(x)
    mx.eval(x)
    mx.synchronize()
    t0 = time.perf_counter()
    x = q
    for _ in range(calls):
        x = step(x)
    t1 = time.perf_counter()
    mx.eval(x)
    mx.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--bits", default="4,8")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--heads", default="28,4", help="query heads, KV heads (default: 7B)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--variant", action="append", default=[], help="a modified quant_sdpa .metal body")
    p.add_argument("--calls", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default=None, help="cpu-emulator: check the script on a CPU (timings meaningless)")
    a = p.parse_args()
    if _core.gpu_backend() is None and a.backend != "cpu-emulator":
        sys.exit("probe_attention.py: needs a GPU (Metal or CUDA); MLX has none here")
    hq, hkv = (int(x) for x in a.heads.split(","))
    D, dt, scale = a.head_dim, mx.bfloat16, a.head_dim ** -0.5
    copied = []
    for v in a.variant:
        dst = _core.metal_file(Path(v).stem)
        if dst.exists():
            sys.exit(f"probe_attention.py: {dst.name} would replace a shipped kernel; rename the variant")
        shutil.copy(v, dst)
        copied.append(dst)
    try:
        q = mx.random.normal((1, hq, 1, D)).astype(dt)
        tail = (mx.random.normal((1, hkv, 128, D)).astype(dt), mx.random.normal((1, hkv, 128, D)).astype(dt), 64)
        kernels = ["quant_sdpa"] + [Path(v).stem for v in a.variant]
        for bits in (int(b) for b in a.bits.split(",")):
            res = {}
            for n in (128, a.context):
                cap = (n // 256 + 1) * 256
                K = mx.random.normal((1, hkv, cap, D)).astype(dt)
                V = mx.random.normal((1, hkv, cap, D)).astype(dt)
                keys, values = mx.quantize(K, a.group_size, bits), mx.quantize(V, a.group_size, bits)
                mx.eval(q, K, V, keys, values, tail[:2])
                kw = {"backend": a.backend} if a.backend else {}
                steps = {k: lambda x, k=k: KK.quant_sdpa(x, keys, values, n - 64, scale, bits, a.group_size,
                                                        tail=tail, body=k, **kw) for k in kernels}
                steps["bf16 sdpa"] = lambda x: mx.fast.scaled_dot_product_attention(
                    x, K[..., :n, :], V[..., :n, :], scale=scale)
                for k, step in steps.items():  # used before the next n rebinds K, V, n
                    runs = [chain(step, q, a.calls) for _ in range(a.repeats)]
                    res[k, n] = (min(r[0] for r in runs), min(r[1] for r in runs))
            for k in steps:
                (h0, t0), (h1, t1) = res[k, 128], res[k, a.context]
                print(f"{bits}-bit cache  {k:14s} per call: {t0:7.1f} us at 128, {t1:7.1f} us at {a.context}"
                      f"  -> GPU time of the extra positions ~{t1 - t0 - (h1 - h0):6.1f} us", flush=True)
    finally:
        for c in copied:
            c.unlink()


if __name__ == "__main__":
    main()
