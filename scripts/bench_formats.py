"""How fast MLX's matmul is in each weight format, at the shapes of Qwen2.5's layers.

    python scripts/bench_formats.py --geometry 0.5B,7B --rows 1,2048

For each layer matrix of a geometry (fused q/k/v, o, fused gate/up, down, output head), each
format (bf16, and MLX affine quantization at (bits, group) for the formats qwen_mlx repacks GGUF
types into: 4/32 Q4_K/Q4_0, 5/32 Q5_0/Q5_K, 8/32 Q8_0, 8/64 Q6_K, and 4/64, 6/32 for comparison)
and each number of rows (1: a decode step, 2048: a prefill chunk): `--calls` independent matmuls
evaluated together (each its own launch, as in a model), medians of `--rounds`. Prints µs per
call and the weight bytes read per second. At one row a small matrix costs what a launch costs
(host encoding and launch, not bandwidth), which the per-call time then shows.

Issue 12 asks which of the real file's formats is slow in MLX's kernels; the same matrix held
exactly in more bits (5 -> 8) is an option (`qwen_mlx.quant.promote`) if a format is slow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import benchlib as B  # scripts/benchlib.py (this script's directory is first on sys.path)
import mlx.core as mx

FORMATS = ["bf16", "4/32", "4/64", "5/32", "6/32", "8/32", "8/64"]


def shapes(geometry: str) -> dict[str, tuple[int, int]]:
    c = B.config(geometry)
    h, f, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d
    return {"qkv": (qkv, h), "o": (h, h), "gate_up": (2 * f, h), "down": (h, f), "head": (c["vocab_size"], h)}


def time_format(fmt: str, out_dim: int, in_dim: int, rows: int, calls: int, rounds: int) -> dict:
    mx.random.seed(0)
    w = (mx.random.normal((out_dim, in_dim)) * 0.02).astype(mx.bfloat16)
    x = mx.random.normal((rows, in_dim)).astype(mx.bfloat16)
    if fmt == "bf16":
        fn, nbytes = (lambda: x @ w.T), w.nbytes
    else:
        bits, group = map(int, fmt.split("/"))
        wq, s, b = mx.quantize(w, group_size=group, bits=bits)
        mx.eval(wq, s, b)
        fn, nbytes = (lambda: mx.quantized_matmul(x, wq, s, b, True, group, bits)), wq.nbytes + s.nbytes + b.nbytes
    mx.eval(w, x)
    mx.eval([fn() for _ in range(calls)])  # compile and allocate
    ts = []
    for _ in range(rounds):
        outs = [fn() for _ in range(calls)]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        ts.append((time.perf_counter() - t0) / calls)
    t = statistics.median(ts)
    return dict(us=t * 1e6, min_us=min(ts) * 1e6, max_us=max(ts) * 1e6, weight_bytes=nbytes, gbps=nbytes / t / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="0.5B")
    p.add_argument("--rows", default="1,2048")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--calls", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    print(f"device: {mx.default_device()}, mlx {mx.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    rows_out = []
    for g in a.geometry.split(","):
        for name, (o, i) in shapes(g).items():
            for rows in map(int, a.rows.split(",")):
                line = [f"{g:5} {name:8} {o:6}x{i:<6} rows {rows:5}"]
                for fmt in a.formats.split(","):
                    calls = a.calls if rows == 1 else max(4, a.calls // 8)
                    try:
                        r = time_format(fmt, o, i, rows, calls, a.rounds)
                    except Exception as e:  # noqa: BLE001  (a format MLX has no kernel for at this shape)
                        line.append(f"{fmt} failed ({str(e)[:60]})")
                        continue
                    rows_out.append(dict(geometry=g, matrix=name, shape=[o, i], rows=rows, format=fmt, **r))
                    line.append(f"{fmt} {r['us']:7.1f} us {r['gbps']:5.0f} GB/s")
                print(" | ".join(line), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=str(mx.default_device()), mlx=mx.__version__, rows=rows_out), f, indent=1)


if __name__ == "__main__":
    main()
