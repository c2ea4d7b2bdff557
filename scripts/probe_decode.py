"""Where a decoded token's time goes: graph building (Python), encoding (MLX host), GPU wait.

    python scripts/probe_decode.py --geometry 0.5B --quant bf16

Variants: mlx_lm (its qwen2 model), ours (qwen_mlx as shipped), ours_plain (qwen_mlx without the
compiled decode step, ModelArgs.compile_decode off), ours_kernels (qwen_mlx with every
metal_kernels kernel forced on). Per step, run synchronously:
build = time to build the graph of one step in Python, encode = time of mx.async_eval on it (MLX's
host-side encoding and launch), wait = mx.synchronize after. Then tok/s of the pipelined loop (one
step in flight, as generate_step runs it). Best of --repeats, variants alternated.
"""

from __future__ import annotations

import argparse
import json
import time

import benchlib as B  # scripts/benchlib.py (this script's directory is first on sys.path)
import qwen_mlx  # noqa: F401
import mlx.core as mx


def run(step, make_cache, n_prompt: int, n_gen: int) -> dict:
    cache = make_cache()
    y = mx.random.randint(0, 151000, (n_prompt,)).astype(mx.uint32)
    y = step(y, cache)
    mx.eval(y)
    y = step(y, cache)  # one decode step unmeasured
    mx.eval(y)
    # decomposition, synchronous steps
    tb = te = tw = 0.0
    n = 32
    for _ in range(n):
        t0 = time.perf_counter()
        y = step(y, cache)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.synchronize()
        t3 = time.perf_counter()
        tb, te, tw = tb + t1 - t0, te + t2 - t1, tw + t3 - t2
    tps = B.decode_loop(step, cache, y, n_gen)  # pipelined loop
    return dict(build_us=tb / n * 1e6, encode_us=te / n * 1e6, wait_us=tw / n * 1e6, tps=tps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="0.5B")
    p.add_argument("--quant", default="bf16")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--variants", default="mlx_lm,ours")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    ours, ref = B.random_pair(a.geometry, a.quant)
    res = {}
    for _ in range(a.repeats):
        for v in a.variants.split(","):
            try:
                r = run(*B.decode_variant(v, ours, ref), a.prompt, a.gen)
            except Exception as e:  # noqa: BLE001
                print(f"{v}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            best = res.get(v)
            if best is None or r["tps"] > best["tps"]:
                res[v] = r
    for v, r in res.items():
        print(f"{a.geometry} {a.quant} {v:11} build {r['build_us']:7.0f} us  encode {r['encode_us']:7.0f} us"
              f"  wait {r['wait_us']:7.0f} us  | pipelined {r['tps']:7.1f} tok/s", flush=True)
    if "mlx_lm" in res:
        print("  ratios over mlx_lm: " + ", ".join(f"{v} {r['tps'] / res['mlx_lm']['tps']:.2f}x"
                                                  for v, r in res.items() if v != "mlx_lm"), flush=True)
    print(json.dumps(dict(geometry=a.geometry, quant=a.quant, prompt=a.prompt, gen=a.gen, res=res)))


if __name__ == "__main__":
    main()
