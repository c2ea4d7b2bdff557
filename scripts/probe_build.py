"""Python's share of a decode step: the time to build one step's graph, ours against mlx-lm's.

    python scripts/probe_build.py --geometry 0.5B --quant q4km --stub-fast

At 0.5B a decode step on a GPU is bound by host work (docs/benchmarks.md): building the graph in
Python, then MLX encoding it. This times the building alone, without evaluating anything, so it
runs anywhere. Each measured build starts from the same evaluated cache (a shallow copy, its
buffers re-sliced so that no graph grows), the libraries alternate build by build, and a round's
figure is the 10th percentile of its builds; the median and spread over --rounds are printed.

On a CPU MLX builds each `mx.fast` op (rms_norm, rope, attention) as its fallback composition of
plain ops; on a GPU it is one node. `--stub-fast` replaces those three by one elementwise op of the
same shape, so that the CPU measures what a GPU host builds (both libraries call the same ones).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import benchlib as B  # scripts/benchlib.py (this script's directory is first on sys.path)
import qwen_mlx  # noqa: F401
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache


def stub_fast_ops() -> None:
    mx.fast.rms_norm = lambda x, weight, eps: x * weight
    mx.fast.rope = lambda x, *args, **kwargs: -x
    mx.fast.scaled_dot_product_attention = lambda q, k, v, **kwargs: -q


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", default="0.5B", choices=list(B.GEOMETRIES))
    p.add_argument("--quant", default="q4km", help="bf16, f32, 4bit, 8bit or q4km (scripts/benchlib.py)")
    p.add_argument("--stub-fast", action="store_true", help="one node per mx.fast op, as on a GPU")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--builds", type=int, default=60, help="builds per library per round")
    a = p.parse_args(argv)
    if a.stub_fast:
        stub_fast_ops()
    ours, ref = B.random_pair(a.geometry, a.quant)
    steps = {"qwen_mlx": (B.greedy_step(ours, True), ours.make_cache),
             "mlx_lm": (B.greedy_step(ref, False), lambda: make_prompt_cache(ref))}
    start = {}
    for name, (step, make_cache) in steps.items():
        cache = make_cache()
        y = step(mx.array([1, 2, 3, 4], mx.uint32), cache)
        mx.eval(y, [c.state for c in cache])
        start[name] = (y, cache)
    rounds = {name: [] for name in steps}
    gc.disable()  # a collection inside one build would be noise
    try:
        for _ in range(a.rounds):
            times = {name: [] for name in steps}
            for _ in range(a.builds):
                for name, (step, _) in steps.items():
                    y, cache = start[name]
                    fresh = [copy.copy(c) for c in cache]
                    for c in fresh:  # new array objects: the step's slice updates must not chain onto `cache`
                        c.keys, c.values = c.keys[:, :], c.values[:, :]
                    t = time.perf_counter()
                    step(y, fresh)
                    times[name].append(time.perf_counter() - t)
            for name in steps:
                rounds[name].append(sorted(times[name])[len(times[name]) // 10] * 1e6)
    finally:
        gc.enable()
    out = {name: B.spread(r) for name, r in rounds.items()}  # microseconds
    print(f"{a.geometry} {a.quant} build per decode step{' (mx.fast stubbed)' if a.stub_fast else ''}, "
          f"device {mx.default_device()}:")
    for name, r in out.items():
        print(f"  {name:9s} {r['median']:7.0f} us [{r['min']:.0f}-{r['max']:.0f}]")
    print(f"  qwen_mlx / mlx_lm: {out['qwen_mlx']['median'] / out['mlx_lm']['median']:.2f}")
    return out


if __name__ == "__main__":
    main()
