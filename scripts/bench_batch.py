"""Batched generation: qwen_mlx's `batch_generate` beside mlx-lm's `batch_generate`, same run.

    python scripts/bench_batch.py --batch 1,8 --prompt-len 32 --gen 32        # CPU: the default model
    python scripts/bench_batch.py --random 0.5B,7B:32 --model /root/model.gguf --batch 1,8,32,128 \\
        --tokenizer /root/model.gguf --json out.json                           # GPU

Each case (model, batch size B) runs B random prompts of `--prompt-len` tokens, `--gen` greedy
new tokens each (EOS ignored by both libraries, so both generate exactly B x gen tokens), with
each library's defaults (mlx-lm decodes at most 32 sequences at a time; qwen_mlx gets
max_batch=B). Reported per case, median over `--rounds` rounds (the two libraries alternate,
the order swapping each round; one short unmeasured warm-up per case first) with the spread
(min-max):
- decode tok/s: each library's own statistic, generated tokens / time in decode steps;
- end-to-end tok/s: B x gen / wall time of the whole call (prefill included);
- ours B / ours B=1: aggregate decode against our own single sequence;
- peak GB: MLX peak memory during the call (weights included).

Models: `--random GEOMETRY[:GEN]` (random weights, bf16 on a GPU, float32 on a CPU; GEN overrides
--gen for that geometry) and/or `--model PATH` (a GGUF: ours through qwen_mlx.load; mlx-lm gets
the same weights: quantized, through our converter's mlx-lm directory, or dequantized to --dtype).
Random-weight models need a tokenizer (`--tokenizer`, a GGUF; default: --model or the default model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import qwen_mlx  # noqa: E402  (loads the optimized BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import batch_generate as mlx_lm_batch_generate  # noqa: E402

from benchlib import GEOMETRIES, random_pair  # noqa: E402  (scripts/ is on sys.path: the script's own folder)
from qwen_mlx.batch import batch_generate  # noqa: E402
from qwen_mlx.loader import is_quantized  # noqa: E402
from qwen_mlx.tokenizer import load_tokenizer  # noqa: E402


def real_pair(path: str, dtype: str, quantized: bool, tmp: str):
    """(ours, mlx-lm model, tokenizer) from a GGUF: mlx-lm loads our converter's directory of the same
    weights (kept quantized, or dequantized to `dtype`, as ours)."""
    from mlx_lm.utils import load as mlx_lm_load
    from qwen_mlx.convert import convert

    ours, tok = qwen_mlx.load(path, dtype=dtype, quantized=quantized)
    out = convert(path, Path(tmp) / "converted", dtype=dtype, dequantize=not quantized, progress=False)
    return ours, mlx_lm_load(str(out))[0], tok


def run(lib: str, model, tok, prompts: list, gen: int, B: int) -> dict:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    if lib == "ours":
        stats = batch_generate(model, tok, prompts, max_tokens=gen, max_batch=B).stats
        n = stats.generation_tokens
    else:
        r = mlx_lm_batch_generate(model, tok, prompts, max_tokens=gen, return_token_ids=True)
        stats, n = r.stats, sum(map(len, r.token_ids))
    wall = time.perf_counter() - tic
    assert n == B * gen, f"{lib} generated {n} tokens, expected {B * gen}"
    return dict(decode_tps=stats.generation_tps, e2e_tps=n / wall, peak_gb=mx.get_peak_memory() / 1e9)


def med(xs):
    return statistics.median(xs), min(xs), max(xs)


def bench_model(label, ours, ref, tok, batches, plen, gen, rounds, rng_seed=0):
    rows = []
    libs = {"ours": ours, "mlx_lm": ref}
    for B in batches:
        vocab = min(151000, ours.args.vocab_size)  # ordinary tokens (Qwen's specials start at 151643)
        prompts = mx.random.randint(0, vocab, (B, plen), key=mx.random.key(rng_seed + B)).tolist()
        warm = {}
        for lib, m in libs.items():  # warm-up: kernels, allocator, compiled shapes
            tic = time.perf_counter()
            run(lib, m, tok, prompts, min(gen, 4), B)
            warm[lib] = time.perf_counter() - tic
        print(f"  ({label}, B={B}: warm-up ours {warm['ours']:.1f} s, mlx-lm {warm['mlx_lm']:.1f} s)", flush=True)
        res = {lib: [] for lib in libs}
        for r in range(rounds):
            for lib in (libs if r % 2 == 0 else reversed(list(libs))):
                res[lib].append(run(lib, libs[lib], tok, prompts, gen, B))
        row = dict(model=label, B=B, prompt=plen, gen=gen, rounds=rounds, warmup_s=warm)
        for lib in libs:
            for k in ("decode_tps", "e2e_tps", "peak_gb"):
                row[f"{lib}_{k}"] = med([x[k] for x in res[lib]])
            row[f"{lib}_rounds"] = res[lib]  # every round, as measured
        rows.append(row)
        one = next(x for x in rows if x["model"] == label and x["B"] == 1) if 1 in batches else None
        d, m_ = row["ours_decode_tps"], row["mlx_lm_decode_tps"]
        e, me = row["ours_e2e_tps"], row["mlx_lm_e2e_tps"]
        vs1 = f"{d[0] / one['ours_decode_tps'][0]:6.1f}x" if one else "     -"
        print(f"{label:26} {B:4d} | {d[0]:8.1f} [{d[1]:.0f}-{d[2]:.0f}] / {m_[0]:8.1f} [{m_[1]:.0f}-{m_[2]:.0f}] "
              f"({d[0] / m_[0]:5.2f}x) | {e[0]:8.1f} / {me[0]:8.1f} ({e[0] / me[0]:5.2f}x) | {vs1} | "
              f"{row['ours_peak_gb'][0]:6.2f} / {row['mlx_lm_peak_gb'][0]:6.2f}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", default=None, help="comma list of GEOMETRY[:GEN] (random weights): " +
                   ",".join(GEOMETRIES))
    p.add_argument("--model", default=None, help="a GGUF file (default when --random is not given: the default model)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--quantized", action=argparse.BooleanOptionalAction, default=None,
                   help="--model kept quantized (default on a GPU) or dequantized to --dtype (default on a CPU)")
    p.add_argument("--tokenizer", default=None, help="GGUF whose tokenizer the random models use")
    p.add_argument("--batch", default="1,8,32,128", help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    gpu = mx.default_device() == mx.gpu
    dtype = a.dtype or ("bfloat16" if gpu else "float32")
    quantized = gpu if a.quantized is None else a.quantized
    batches = [int(b) for b in a.batch.split(",")]
    from qwen_mlx.fetch import default_model_path

    model_path = a.model or (None if a.random else str(default_model_path()))
    print(f"device: {mx.default_device()}, mlx {mx.__version__}, BLAS: {qwen_mlx._blas.blas_name()}, "
          f"{time.strftime('%Y-%m-%d')}, prompt {a.prompt_len}, gen {a.gen}, {a.rounds} rounds, medians [min-max]")
    print(f"{'model':26} {'B':>4} | {'decode tok/s ours / mlx-lm (x)':>45} | {'end-to-end tok/s (x)':>29} | "
          f"{'vs B=1':>7} | peak GB ours / mlx-lm")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if model_path:
            ours, ref, tok = real_pair(model_path, dtype, quantized, tmp)
            tok.eos_token_ids = []  # both generate exactly `gen` tokens
            label = f"{Path(model_path).name[:14]} {'q' if is_quantized(ours) else dtype}"
            rows += bench_model(label, ours, ref, tok, batches, a.prompt_len, a.gen, a.rounds)
            del ours, ref
        if a.random:
            tok = load_tokenizer(a.tokenizer or model_path or str(default_model_path()))
            tok.eos_token_ids = []
            for spec in a.random.split(","):
                g, _, gen = spec.partition(":")
                ours, ref = random_pair(g, "bf16" if gpu else "f32")
                rows += bench_model(f"{g} {'bf16' if gpu else 'f32'} (random)", ours, ref, tok, batches,
                                    a.prompt_len, int(gen or a.gen), a.rounds)
                del ours, ref
                mx.clear_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=str(mx.default_device()), mlx=mx.__version__,
                                                date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:], rows=rows),
                                           indent=1))


if __name__ == "__main__":
    main()
