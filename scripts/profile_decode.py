"""GPU time of a decode step, kernel by kernel, from the GPU's own timeline (NVIDIA: CUPTI through
torch.profiler, which records every kernel of the process, MLX's included).

    python scripts/profile_decode.py --geometry 7B --quant bf16 --context 128,4096
    python scripts/profile_decode.py --geometry 0.5B --quant q4km --variants ours,mlx_lm --trace-dir /tmp

Per variant (`benchlib.decode_variant`: ours, ours_plain, ours_kernels, mlx_lm, as in
probe_decode.py; random weights shared by both libraries) and context: `--steps` greedy steps in the pipelined loop (one step in flight, as generate_step runs
them) under the profiler. Per step: the wall time, the span of the GPU timeline (first kernel's
start to last kernel's end), the time some kernel was running (busy), the sum of kernel durations,
the idle gaps between kernels (all, and those over 20 us: the GPU waiting for the host), and the
kernels by total time (count per step, mean duration). `--trace-dir` also writes each timeline as
a Chrome trace (chrome://tracing, ui.perfetto.dev).

Wall-clock tok/s on these machines moves by up to 40% between runs; the kernel durations move far
less, so this is the instrument for deciding whether a kernel is faster (scripts/bench.py for
the speed users get).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import benchlib as B  # scripts/benchlib.py (this script's directory is first on sys.path)
import qwen_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx


def summarize(kernels: list[tuple[str, float, float]], steps: int, big_gap_us: float = 20.0) -> dict:
    """kernels: (name, start us, duration us) of every kernel in the window -> per-step figures:
    span, busy (the union of the kernels' intervals), kernel_sum, gaps (idle time between them),
    big_gaps (idle stretches over `big_gap_us`) and their count, and `by_kernel`: name -> (count
    per step, us per step), largest first."""
    ks = sorted(kernels, key=lambda k: k[1])
    if not ks:
        return {"kernels_per_step": 0.0}
    busy = gaps = big = 0.0
    n_big = 0
    end = ks[0][1]
    for _, start, dur in ks:
        if start > end:
            gap = start - end
            gaps += gap
            if gap > big_gap_us:
                big, n_big = big + gap, n_big + 1
        busy += max(0.0, start + dur - max(start, end))
        end = max(end, start + dur)
    by = collections.defaultdict(lambda: [0, 0.0])
    for name, _, dur in ks:
        by[name][0] += 1
        by[name][1] += dur
    return {"kernels_per_step": len(ks) / steps, "span_us": (end - ks[0][1]) / steps, "busy_us": busy / steps,
            "kernel_sum_us": sum(k[2] for k in ks) / steps, "gaps_us": gaps / steps, "big_gaps_us": big / steps,
            "big_gaps_per_step": n_big / steps,
            "by_kernel": {k: (n / steps, d / steps) for k, (n, d) in sorted(by.items(), key=lambda kv: -kv[1][1])}}


def trace_kernels(path: str) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of the kernels in a Chrome trace written by torch.profiler."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events if e.get("cat") == "kernel"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", default="0.5B")
    p.add_argument("--quant", default="bf16")
    p.add_argument("--context", default="128", help="comma list of prompt lengths")
    p.add_argument("--steps", type=int, default=20, help="profiled decode steps per variant and context")
    p.add_argument("--variants", default="ours,mlx_lm")
    p.add_argument("--top", type=int, default=16, help="kernels listed per variant")
    p.add_argument("--trace-dir", default=None, help="also keep each Chrome trace here")
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    try:
        contexts = [int(c) for c in a.context.split(",")]
    except ValueError:
        p.error(f"--context {a.context!r}: want a comma list of integers")
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available() or mx.default_device() != mx.gpu:
        print("profile_decode: needs an NVIDIA GPU seen by both MLX and torch (CUPTI records the kernels)",
              file=sys.stderr)
        return 2
    torch.cuda.init()
    ours, ref = B.random_pair(a.geometry, a.quant)
    scratch = None if a.trace_dir else tempfile.TemporaryDirectory(prefix="profile_decode_")
    out_dir = a.trace_dir or scratch.name
    results = {}
    for ctx in contexts:
        for v in variants:
            step, make_cache = B.decode_variant(v, ours, ref)
            cache = make_cache()
            y = mx.random.randint(0, 150000, (ctx,)).astype(mx.uint32)
            for _ in range(4):  # the prompt, then steps that trace / warm up
                y = step(y, cache)
                mx.eval(y)
            mx.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                B.decode_loop(step, cache, y, a.steps)
                mx.synchronize()
                wall = (time.perf_counter() - t0) / a.steps * 1e6
            path = os.path.join(out_dir, f"trace_{a.geometry}_{a.quant}_{ctx}_{v}.json")
            prof.export_chrome_trace(path)
            s = summarize(trace_kernels(path), a.steps)
            s["wall_us"] = wall
            results[f"{ctx}:{v}"] = s
            print(f"== {a.geometry} {a.quant} context {ctx} {v}: wall {wall:.0f} us/step, "
                  f"{s['kernels_per_step']:.0f} kernels/step", flush=True)
            if not s["kernels_per_step"]:
                continue
            print(f"   span {s['span_us']:.0f}, busy {s['busy_us']:.0f}, kernel sum {s['kernel_sum_us']:.0f}, "
                  f"gaps {s['gaps_us']:.0f} us/step (over 20 us: {s['big_gaps_us']:.0f} in "
                  f"{s['big_gaps_per_step']:.1f})", flush=True)
            for name, (n, d) in list(s["by_kernel"].items())[:a.top]:
                print(f"   {d:8.1f} us/step {n:6.1f}/step {d / n:7.2f} us  {name[:100]}", flush=True)
    if scratch:
        scratch.cleanup()
    else:
        print(f"traces in {out_dir}")
    print(json.dumps({k: {kk: vv for kk, vv in s.items() if kk != "by_kernel"} for k, s in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
