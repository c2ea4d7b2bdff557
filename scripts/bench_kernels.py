"""Microbenchmark of metal_kernels: each kernel vs the plain-MLX ops it replaces (its reference).

    python scripts/bench_kernels.py [--json out.json] [--calls 200] [--repeats 7] [--no-model]
    python scripts/bench_kernels.py --host     # host µs per call: our wrapper vs MLX's custom-kernel call

Needs a GPU (Metal or CUDA). Qwen2.5-0.5B geometry (hidden 896, ffn 4864, 14/2 heads, head dim
64), bfloat16, at a decode shape (B=1, L=1) and a prefill shape (B=1, L=512).

Per op and shape, µs per call: `calls` calls are queued (each on the same inputs, outputs kept)
and evaluated together, so host time (graph building, encoding, launches) and GPU time overlap
as they do in a decode loop; the median of `repeats` such runs. "eager" calls the op directly;
"compiled" calls an `mx.compile`d function that does it. "launches" counts the kernels in the
op's graph (nodes that are not views: reshape/transpose/slice/broadcast are free).
Then, unless --no-model: a random-weight 0.5B model (qwen_mlx) decoding greedily with each
backend setting (all references, all kernels, each kernel alone), in tokens/s, interleaved,
best of `--model-repeats`; and the same model's 512-token prefill.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import benchlib as B  # scripts/benchlib.py (this script's directory is first on sys.path)
import qwen_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx

import metal_kernels as K
from metal_kernels import kernels as KK, reference as R

HIDDEN, FFN, HQ, HKV, HD, EPS, BASE = 896, 4864, 14, 2, 64, 1e-6, 1e6
VIEWS = {"Reshape", "Transpose", "Slice", "Split", "Broadcast", "ExpandDims", "Squeeze", "Flatten", "Unflatten",
         "AsStrided"}


def inputs(L: int, dt=mx.bfloat16):
    r = lambda *s: mx.random.normal(s).astype(dt)  # noqa: E731
    nh = HQ + 2 * HKV
    a = dict(x=r(1, L, HIDDEN), res=r(1, L, HIDDEN), w=1 + 0.1 * r(HIDDEN), q=r(1, HQ, L, HD),
             qkv=r(1, L, nh * HD), bias=r(nh * HD), gate_up=r(1, L, 2 * FFN))
    mx.eval(a)
    return a


def ops(a, offset):
    """name -> (kernel fn, reference fn, args): the op as the model calls it."""
    return {
        "rms_norm": (KK.rms_norm, R.rms_norm, (a["x"], a["w"], EPS)),
        "add_rms_norm": (KK.add_rms_norm, R.add_rms_norm, (a["x"], a["res"], a["w"], EPS)),
        "rope": (KK.rope, R.rope, (a["q"], offset, BASE)),
        "qkv_post": (KK.qkv_post, R.qkv_post, (a["qkv"], a["bias"], HQ, HKV, offset, BASE)),
        "swiglu": (KK.swiglu, R.swiglu, (a["gate_up"],)),
    }


def compiled(fn, args):
    """fn with its array arguments as inputs of an mx.compile'd function (the rest fixed)."""
    pos = [i for i, v in enumerate(args) if isinstance(v, mx.array)]

    def f(*arrays):
        full = list(args)
        for i, v in zip(pos, arrays):
            full[i] = v
        return fn(*full)

    cf = mx.compile(f)
    arrays = [args[i] for i in pos]
    return lambda: cf(*arrays)


# Calls per decoded token in qwen_mlx's model (24 layers): the first layer's input norm is a plain
# rms_norm, every other norm follows a residual add (47 in the layers + the final norm).
CALLS_PER_TOKEN = {"rms_norm": 1, "add_rms_norm": 48, "qkv_post": 24, "swiglu": 24}


def per_token_launches(rows) -> dict:
    """Kernel launches per decoded token spent in these ops: all references, all kernels, the USE table."""
    n = {r["op"]: r for r in rows if r["shape"] == "decode" and "error" not in r}
    if not all(op in n for op in CALLS_PER_TOKEN):
        return {}
    count = lambda pick: sum(c * n[op][f"{pick(op)}_launches"] for op, c in CALLS_PER_TOKEN.items())  # noqa: E731
    return {"reference": count(lambda op: "reference"), "kernels": count(lambda op: "kernel"),
            "use_table": count(lambda op: "kernel" if K.USE[op] else "reference")}


def launches(fn) -> int:
    out = fn()
    path = Path("/tmp/_bench_kernels.dot")
    mx.export_to_dot(str(path), *(out if isinstance(out, tuple) else (out,)))
    labels = [line.split('label ="')[1].split('"')[0] for line in path.read_text().splitlines() if "label =" in line]
    return sum(lb not in VIEWS for lb in labels)


def bench_ops(calls, repeats):
    rows = []
    for shape, L in (("decode", 1), ("prefill", 512)):
        a = inputs(L)
        for name, (kern, ref, op_args) in ops(a, 300).items():
            row = dict(op=name, shape=shape, L=L)
            try:
                for path, fn in (("kernel", kern), ("reference", ref)):
                    call = lambda fn=fn: fn(*op_args)  # noqa: E731
                    row[f"{path}_launches"] = launches(call)
                    row[f"{path}_us"] = B.per_call_us(call, calls, repeats)[1]
                    row[f"{path}_compiled_us"] = B.per_call_us(compiled(fn, op_args), calls, repeats)[1]
            except Exception as e:  # noqa: BLE001  (report it, go on with the other ops)
                row["error"] = repr(e)
                rows.append(row)
                print(f"{name:13s} {shape:8s} FAILED: {e!r}", flush=True)
                continue
            row["speedup"] = row["reference_us"] / row["kernel_us"]
            row["speedup_compiled"] = row["reference_compiled_us"] / row["kernel_compiled_us"]
            rows.append(row)
            print(f"{name:13s} {shape:8s} kernel {row['kernel_us']:8.1f} us ({row['kernel_launches']} launches) | "
                  f"reference {row['reference_us']:8.1f} us ({row['reference_launches']}) | x{row['speedup']:.2f} | "
                  f"compiled: {row['kernel_compiled_us']:7.1f} vs {row['reference_compiled_us']:7.1f} "
                  f"x{row['speedup_compiled']:.2f}", flush=True)
    return rows


def model_bench(tokens: int, repeats: int, prompt: int = 512):
    """Random-weight 0.5B qwen_mlx model: greedy decode tok/s and prefill time per backend setting."""
    model = B.random_pair("0.5B", "bf16")[0]
    step = B.greedy_step(model, ours=True)

    def decode_tps():
        cache = model.make_cache()
        y = step(mx.arange(1, 33), cache)
        mx.eval(y)
        return B.decode_loop(step, cache, step(y, cache), tokens)

    def prefill_ms():
        cache = model.make_cache()
        t = time.perf_counter()
        mx.eval(step(mx.arange(1, prompt + 1), cache))
        return (time.perf_counter() - t) * 1e3

    settings = {"reference": set(), "kernels (all)": None}
    for op in CALLS_PER_TOKEN:  # the ops the model calls (it does RoPE inside qkv_post)
        settings[f"only {op}"] = {op}
    saved_use, saved_mode = dict(K.USE), K._mode
    res = {s: {"decode_tok_s": [], "prefill_ms": []} for s in settings}
    try:
        for _ in range(repeats):
            for s, ops_on in settings.items():
                if ops_on is None:
                    K.set_backend("kernels")
                else:
                    K.set_backend("auto")
                    K.USE.update({op: op in ops_on for op in K.USE})
                decode_tps()  # warm-up (compiles kernels, grows the cache)
                res[s]["decode_tok_s"].append(decode_tps())
                prefill_ms()
                res[s]["prefill_ms"].append(prefill_ms())
    finally:
        K.USE.update(saved_use)
        K.set_backend(saved_mode)
    out = []
    for s, r in res.items():
        row = dict(setting=s, decode_tok_s=max(r["decode_tok_s"]), prefill_ms=min(r["prefill_ms"]),
                   decode_all=r["decode_tok_s"], prefill_all=r["prefill_ms"])
        out.append(row)
        print(f"model {s:20s} decode {row['decode_tok_s']:7.1f} tok/s   prefill({prompt}) {row['prefill_ms']:7.1f} ms",
              flush=True)
    return out


def host_split(calls: int = 2000, repeats: int = 7) -> dict:
    """Host time per call spent building each op's graph node at the decode shape, split into ours (the
    wrapper: reshapes, casts, argument look-ups) and MLX's (the custom-kernel call: source string,
    template formatting, the node), next to the built-in reference ops. Ours is timed with MLX's call
    replaced by a stub that returns ready outputs, so it runs without a GPU too; MLX's part needs one.
    Median of `repeats` runs of `calls` calls each, µs per call; nothing is evaluated."""
    a = inputs(1)
    gpu = K._core.gpu_backend()
    outs = {}

    def stub(name, input_names, output_names, backend):
        def call(inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw):
            return [outs.setdefault((tuple(s), d), mx.zeros(s, d)) for s, d in zip(output_shapes, output_dtypes)]
        return call

    def per_call(fn, args):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            ts.append((time.perf_counter() - t) / calls * 1e6)
        return statistics.median(ts)

    res = {}
    real = K._core.get_kernel
    for name, (kern, ref, args) in ops(a, 300).items():
        row = {"reference_build_us": per_call(ref, args)}
        K._core.get_kernel = stub
        try:
            row["ours_us"] = per_call(lambda *x: kern(*x, backend=gpu or "cuda"), args)
        finally:
            K._core.get_kernel = real
        if gpu:
            row["total_us"] = per_call(kern, args)
            row["mlx_us"] = row["total_us"] - row["ours_us"]
        res[name] = row
        print(f"host {name:13s} " + "  ".join(f"{k} {v:6.2f}" for k, v in row.items()), flush=True)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--host", action="store_true",
                   help="only the host cost per call, ours vs MLX's (ours also runs without a GPU)")
    p.add_argument("--model-tokens", type=int, default=100)
    p.add_argument("--model-repeats", type=int, default=3)
    args = p.parse_args()
    if args.host:
        result = dict(host=host_split(), mlx=mx.__version__, backend=K._core.gpu_backend())
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    if K._core.gpu_backend() is None:
        sys.exit("bench_kernels.py needs a GPU (Metal or CUDA); --host runs without one")
    info = dict(mlx=mx.__version__, backend=K._core.gpu_backend(), python=platform.python_version(),
                device=str(mx.default_device()))
    try:
        info["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception:  # noqa: BLE001  (older MLX)
        pass
    print(json.dumps(info), flush=True)
    mx.random.seed(0)
    result = dict(info=info, args=vars(args), ops=bench_ops(args.calls, args.repeats))
    result["launches_per_token"] = per_token_launches(result["ops"])
    print("launches per decoded token in these ops:", result["launches_per_token"], flush=True)
    if not args.no_model:
        try:
            result["model"] = model_bench(args.model_tokens, args.model_repeats)
        except Exception as e:  # noqa: BLE001  (the model is another module; keep the op numbers)
            result["model_error"] = repr(e)
            print("model benchmark failed:", repr(e), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
