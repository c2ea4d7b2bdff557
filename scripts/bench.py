"""Side-by-side speed of qwen_mlx and mlx-lm: same weights, same machine, same run.

    python scripts/bench.py                       # CPU: the default model, float32 weights
    python scripts/bench.py --random 0.5B,7B --quant bf16,4bit,8bit    # GPU: random weights

Each library runs its own `generate_step` (greedy) on the same prompt: prefill
tok/s = prompt tokens / time to the first token; decode tok/s = further tokens /
their time. The two alternate, each case runs once unmeasured, then `--repeats`
times, and the best run is kept. The ratio column is qwen_mlx / mlx-lm.

On Linux, qwen_mlx loads OpenBLAS into the process, which then serves both
libraries. `--mlx-lm-blas bundled` runs mlx-lm in a second process without it,
as mlx-lm runs when installed on its own (the two then no longer alternate).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qwen_mlx  # noqa: E402,F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import generate_step as mlx_lm_generate_step  # noqa: E402
from mlx_lm.models import qwen2 as mlx_lm_qwen2  # noqa: E402

from qwen_mlx.generation import generate_step  # noqa: E402
from qwen_mlx.loader import build_model  # noqa: E402

GEOMETRIES = {  # Qwen2.5 sizes, and a tiny one to check the script itself
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}
QUANT = {"bf16": None, "4bit": (4, 64), "8bit": (8, 64), "f32": None}


def pair_from_random(geometry: str, quant: str):
    cfg = dict(GEOMETRIES[geometry], model_type="qwen2", vocab_size=151936, rms_norm_eps=1e-6,
               rope_theta=1e6, max_position_embeddings=32768)
    dtype = mx.float32 if quant == "f32" else mx.bfloat16
    ref = mlx_lm_qwen2.Model(mlx_lm_qwen2.ModelArgs.from_dict(cfg))
    ref.set_dtype(dtype)
    if QUANT[quant]:
        bits, group = QUANT[quant]
        nn.quantize(ref, group_size=group, bits=bits)
        cfg["quantization"] = {"group_size": group, "bits": bits}
    mx.eval(ref.parameters())
    ours = build_model(cfg, dict(tree_flatten(ref.parameters())), dtype)
    return ours, ref


def pair_from_model(path: str | None, dtype: str):
    ours, _ = qwen_mlx.load(path, dtype=dtype)
    from qwen_mlx.gguf import gguf_config, gguf_weights, open_gguf
    from qwen_mlx.fetch import default_model_path

    reader = open_gguf(path or default_model_path())
    cfg = gguf_config(reader)
    ref = mlx_lm_qwen2.Model(mlx_lm_qwen2.ModelArgs.from_dict(cfg))
    ref.load_weights(list(ref.sanitize(gguf_weights(reader, getattr(mx, dtype))).items()))
    mx.eval(ref.parameters())
    return ours, ref


def run_once(step_fn, model, prompt: mx.array, n_gen: int) -> tuple[float, float]:
    mx.synchronize()
    tic = time.perf_counter()
    gen = step_fn(prompt, model, max_tokens=n_gen + 1)
    next(gen)
    t_first = time.perf_counter() - tic
    tic = time.perf_counter()
    n = sum(1 for _ in gen)
    t_rest = time.perf_counter() - tic
    return prompt.size / t_first, n / t_rest


def bench_pair(ours, ref, prompt_len: int, n_gen: int, repeats: int) -> dict:
    prompt = mx.random.randint(0, 151000, (prompt_len,)).astype(mx.uint32)
    res = {}
    fns = {"qwen_mlx": (lambda p, m, **k: generate_step(p, m, **k), ours),
           "mlx_lm": (lambda p, m, **k: (t for t, _ in mlx_lm_generate_step(p, m, **k)), ref)}
    fns = {k: v for k, v in fns.items() if v[1] is not None}
    for name, (fn, model) in fns.items():  # warm-up at the same shapes (kernel compilation, allocator)
        run_once(fn, model, prompt, n_gen)
    for _ in range(repeats):
        for name, (fn, model) in fns.items():
            mx.clear_cache()
            mx.reset_peak_memory()
            pre, dec = run_once(fn, model, prompt, n_gen)
            best = res.setdefault(name, {"prefill_tps": 0.0, "decode_tps": 0.0, "peak_gb": 0.0})
            best["prefill_tps"] = max(best["prefill_tps"], pre)
            best["decode_tps"] = max(best["decode_tps"], dec)
            best["peak_gb"] = max(best["peak_gb"], mx.get_peak_memory() / 1e9)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF or model dir (default: the default model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--random", default=None, help="comma list of geometries with random weights: 0.5B,1.5B,7B")
    p.add_argument("--quant", default="bf16", help="with --random: comma list of bf16,4bit,8bit,f32")
    p.add_argument("--cases", default="128:128,2048:16,4096:128",
                   help="comma list of prompt_len:new_tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--mlx-lm-blas", choices=["same", "bundled"], default="same",
                   help="bundled: run mlx-lm in a separate process with MLX's own BLAS")
    p.add_argument("--only", choices=["qwen_mlx", "mlx_lm"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mlx_lm_blas == "bundled" and a.only is None:
        import os
        import subprocess
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            argv = [x for x in sys.argv[1:] if x not in ("--mlx-lm-blas", "bundled")]
            if "--json" in argv:
                i = argv.index("--json")
                del argv[i:i + 2]
            subprocess.run([sys.executable, __file__, *argv, "--only", "mlx_lm", "--json", f.name],
                           check=True, env=dict(os.environ, QWEN_MLX_BLAS="none"), stdout=subprocess.DEVNULL)
            theirs = json.loads(Path(f.name).read_text())
        print(f"mlx-lm ran in its own process, BLAS: {theirs['blas']}")

    pairs = []
    if a.random:
        for g in a.random.split(","):
            for q in a.quant.split(","):
                pairs.append((f"{g} {q} (random)", lambda g=g, q=q: pair_from_random(g, q)))
    else:
        pairs.append((f"{a.model or 'default model'} {a.dtype}", lambda: pair_from_model(a.model, a.dtype)))
    rows = []
    if not a.only:
        print(f"device: {mx.default_device()}, mlx {mx.__version__}, BLAS: {qwen_mlx._blas.blas_name()}")
    hdr = f"{'model':28} {'prompt':>6} {'gen':>4} | {'prefill tok/s ours / mlx-lm (x)':>34} | {'decode tok/s ours / mlx-lm (x)':>32} | peak GB"
    if not a.only:
        print(hdr)
    for label, make in pairs:
        ours, ref = make()
        ours, ref = (None if a.only == "mlx_lm" else ours), (None if a.only == "qwen_mlx" else ref)
        if a.mlx_lm_blas == "bundled" and a.only is None:
            ref = None
        for case in a.cases.split(","):
            plen, ngen = map(int, case.split(":"))
            r = bench_pair(ours, ref, plen, ngen, a.repeats)
            if a.only:
                rows.append(dict(model=label, prompt=plen, gen=ngen, **r))
                continue
            if "mlx_lm" not in r:  # measured in the other process
                r["mlx_lm"] = next(x["mlx_lm"] for x in theirs["rows"]
                                   if x["model"] == label and x["prompt"] == plen and x["gen"] == ngen)
            o, m = r["qwen_mlx"], r["mlx_lm"]
            row = dict(model=label, prompt=plen, gen=ngen, ours=o, mlx_lm=m,
                       prefill_ratio=o["prefill_tps"] / m["prefill_tps"], decode_ratio=o["decode_tps"] / m["decode_tps"])
            rows.append(row)
            print(f"{label:28} {plen:6d} {ngen:4d} | {o['prefill_tps']:9.1f} / {m['prefill_tps']:9.1f} ({row['prefill_ratio']:5.2f}x)"
                  f"     | {o['decode_tps']:8.1f} / {m['decode_tps']:8.1f} ({row['decode_ratio']:5.2f}x)    "
                  f"| {o['peak_gb']:.2f} / {m['peak_gb']:.2f}", flush=True)
        del ours, ref
        mx.clear_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=str(mx.default_device()), mlx=mx.__version__,
                                                blas=qwen_mlx._blas.blas_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
