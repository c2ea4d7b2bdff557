"""Long-context decoding with full-precision, 8-bit and 4-bit KV caches: qwen_mlx beside mlx-lm.

    python scripts/bench_kv.py                                  # GPU: 7B geometry, 32k context
    python scripts/bench_kv.py --geometry tiny --weights f32 --kv-group-size 32 --context 1024 --gen 16  # CPU

Both libraries get the same random weights (scripts/benchlib.py's `random_pair`) and the same
random prompt of `--context` tokens. For each KV setting (full = the compute dtype, bf16 on a GPU; 8-bit; 4-bit;
quantized from the start, `quantized_kv_start=0`, groups of `--kv-group-size` 64) each library prefills the prompt
once with its own `generate_step` (chunks of 2048); the peak memory of that prefill (above what was
allocated before it) is recorded, and after 4 warm-up tokens the KV cache bytes (allocated
capacity, as decoding holds it: a block cache's full-precision tail included). Then rounds alternate over every
(setting, library): `--gen` tokens are decoded from the prefilled cache, timed from the first
token to the last, and the cache is trimmed back, so every round decodes at the same context.
Medians over `--rounds` rounds with the min-max spread; ratios are against mlx-lm and the full-precision KV.
Last, `build ms`: the host time of building (not running) one decode step's graph at that context,
median of 20: what bounds decode where the host is slower than the device (a quantized cache adds
operations per layer: mx.quantize and six slice updates to store a token, and the attention's own).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchlib import GEOMETRIES, random_pair  # noqa: E402  (scripts/ is on sys.path: the script's own folder)

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step as mlx_lm_generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import qwen_mlx  # noqa: E402
from qwen_mlx.generation import generate_step  # noqa: E402
from qwen_mlx.kv_cache import cache_nbytes, cache_options, new_cache  # noqa: E402

SETTINGS = {"full": None, "8bit": 8, "4bit": 4}  # full: the compute dtype (bf16 on a GPU)


def steps(lib, model, kv_bits, group):
    """(make_cache, step(prompt, cache, max_tokens) -> token iterator) for one library and KV setting."""
    if lib == "qwen_mlx":
        kv = cache_options(kv_bits=kv_bits, kv_group_size=group, quantized_kv_start=0)
        return (lambda: new_cache(model, kv),
                lambda p, c, n: (t for t, _ in generate_step(p, model, max_tokens=n, cache=c, kv=kv)))
    kw = dict(kv_bits=kv_bits, kv_group_size=group, quantized_kv_start=0) if kv_bits else {}
    return (lambda: make_prompt_cache(model),
            lambda p, c, n: (int(t) for t, _ in mlx_lm_generate_step(p, model, max_tokens=n, prompt_cache=c, **kw)))


def decode_tps(step, cache, last: int, n: int) -> float:
    start = cache[0].offset
    mx.synchronize()
    gen = step(mx.array([last], mx.uint32), cache, n + 1)
    next(gen)
    tic = time.perf_counter()
    k = sum(1 for _ in gen)
    tps = k / (time.perf_counter() - tic)
    for c in cache:
        c.trim(c.offset - start)
    return tps


def build_ms(model, cache, last: int, reps: int = 20) -> float:
    """Host milliseconds to build (not run) one decode step's graph on this cache: the part of a step
    that grows with the number of operations, and that bounds decode when the host is slower than the
    device. Each built step is evaluated and trimmed off again, so the cache keeps its length."""
    y = mx.array([[last]], mx.uint32)
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        logits = model(y, cache=cache)
        times.append(time.perf_counter() - tic)
        try:
            mx.eval(logits, [c.state for c in cache])
        finally:
            for c in cache:
                c.trim(1)
    return 1e3 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="7B", choices=list(GEOMETRIES))
    p.add_argument("--weights", default="bf16", help="bf16 | 4bit | 8bit | f32 (f32: float32 compute, for a CPU)")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--gen", type=int, default=64, help="tokens decoded per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--settings", default="full,8bit,4bit")
    p.add_argument("--kv-group-size", type=int, default=64, help="(the tiny geometry's head size is 32)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    print(f"device: {mx.default_device()}, mlx {mx.__version__}, geometry {a.geometry}, weights {a.weights}, "
          f"context {a.context}, {a.gen} tokens x {a.rounds} rounds", flush=True)
    ours, ref = random_pair(a.geometry, a.weights)
    models = {"qwen_mlx": ours, "mlx_lm": ref}
    prompt = mx.random.randint(0, 151000, (a.context,), key=mx.random.key(0)).astype(mx.uint32)
    cases = {}  # (setting, lib) -> dict(step, cache, last token, kv bytes, peak), or None if it failed
    errors = {}  # (setting, lib) -> the first line of its error
    for s in a.settings.split(","):
        for lib, model in models.items():
            make, step = steps(lib, model, SETTINGS[s], a.kv_group_size)
            mx.synchronize()
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            try:
                cache = make()
                last = next(step(prompt, cache, 1))
                mx.synchronize()
                for c in cache:  # leave exactly the prompt in the cache
                    c.trim(c.offset - a.context)
                cases[s, lib] = dict(step=step, cache=cache, last=last, peak=mx.get_peak_memory() - base, tps=[])
                decode_tps(step, cache, last, 4)  # warm-up at this context
                cases[s, lib]["kv_bytes"] = cache_nbytes(cache)  # as decoding holds it (a block cache's tail too)
            except Exception as e:  # e.g. mlx-lm's quantized attention on CUDA (MLX 0.32.4 lacks the matmul)
                cache = cases[s, lib] = None
                errors[s, lib] = str(e).splitlines()[0][:200]
                print(f"{s:5} {lib:9}: fails: {errors[s, lib]}", flush=True)
                continue
            print(f"prefilled {s:5} {lib:9}: KV {cases[s, lib]['kv_bytes'] / 1e6:.2f} MB, "
                  f"prefill peak +{cases[s, lib]['peak'] / 1e9:.2f} GB", flush=True)
    for _ in range(a.rounds):
        for key, c in cases.items():
            if c is not None:
                c["tps"].append(decode_tps(c["step"], c["cache"], c["last"], a.gen))
    for (s, lib), c in cases.items():
        if c is not None:
            c["build_ms"] = build_ms(models[lib], c["cache"], c["last"])
    rows = []
    print(f"\n{'KV':5} {'library':9} | {'KV MB':>8} {'vs full':>7} | {'prefill peak GB':>15} | "
          f"{'decode tok/s median [min-max]':>30} | {'vs full':>7} | {'build ms':>8} | {'vs mlx-lm':>9}")
    for (s, lib), c in cases.items():
        if c is None:
            rows.append(dict(kv=s, library=lib, error=errors[s, lib]))
            print(f"{s:5} {lib:9} | fails: {errors[s, lib]}")
            continue
        med = statistics.median(c["tps"])
        bf = cases.get(("full", lib))
        other = cases[s, "mlx_lm"]
        row = dict(kv=s, library=lib, kv_gb=c["kv_bytes"] / 1e9, prefill_peak_gb=c["peak"] / 1e9,
                   decode_tps=c["tps"], decode_median=med, build_ms=c["build_ms"],
                   kv_vs_full=c["kv_bytes"] / bf["kv_bytes"] if bf else None,
                   decode_vs_full=med / statistics.median(bf["tps"]) if bf else None,
                   decode_vs_mlx_lm=med / statistics.median(other["tps"]) if other else None)
        rows.append(row)
        print(f"{s:5} {lib:9} | {row['kv_gb'] * 1e3:8.2f} {row['kv_vs_full'] or 0:6.1%} | {row['prefill_peak_gb']:15.2f} | "
              f"{med:10.1f} [{min(c['tps']):7.1f}-{max(c['tps']):7.1f}]   | {row['decode_vs_full'] or 0:6.2f}x | "
              f"{c['build_ms']:8.2f} | "
              + (f"{row['decode_vs_mlx_lm']:8.2f}x" if other else "  (mlx-lm fails)"))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=str(mx.default_device()), mlx=mx.__version__, args=vars(a),
                                                blas=qwen_mlx._blas.blas_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
