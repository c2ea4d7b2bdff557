"""Tensor-parallel speed and memory: prefill and decode tok/s and each rank's memory, qwen-mlx's
`Model.shard` beside mlx-lm's `qwen2.Model.shard`, alternating rounds in the same processes.

Runs as one process (N = 1) or as N ranks under `mlx.launch` (any backend: ring, jaccl, nccl);
rank 0 prints. Every rank builds only its own slices: from a GGUF file (`load`, per-rank reads)
or from random weights at a Qwen2.5 geometry (`--random 7b`: each rank fills just its shard, so
the 72B geometry needs ~68 GiB per GPU over two, never the whole model on one).

    # this CPU: 1 process x 1 thread, then 2 ranks x 1 thread (docs/benchmarks.md)
    OPENBLAS_NUM_THREADS=1 python scripts/bench_distributed.py --model default
    OPENBLAS_NUM_THREADS=1 mlx.launch --backend ring --hosts 127.0.0.1 -n 2 -- \\
        python scripts/bench_distributed.py --model default
    # two NVIDIA GPUs over NCCL (one GPU: drop the launcher)
    mlx.launch --backend nccl --hosts 127.0.0.1 -n 2 -- python scripts/bench_distributed.py --random 7b --dtype bfloat16

mlx-lm's model gets the same weights: from the GGUF it is loaded whole and then sharded (mlx-lm
has no per-rank GGUF reader), from --random it is built the same way as ours. Its memory is
measured separately from ours (each model's active memory after building it).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qwen_mlx  # noqa: E402,F401  (BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from qwen_mlx.distributed import silence_other_ranks  # noqa: E402
from qwen_mlx.loader import default_dtype  # noqa: E402

GEOMETRIES = {  # Qwen2.5 configs (hidden, layers, intermediate, heads, kv heads, vocab, tied)
    "tiny": (256, 2, 512, 4, 2, 512, True),
    "0.5b": (896, 24, 4864, 14, 2, 151936, True),
    "7b": (3584, 28, 18944, 28, 4, 152064, False),
    "72b": (8192, 80, 29568, 64, 8, 152064, False),
}


def geometry_config(name: str) -> dict:
    h, n, f, nh, nkv, v, tied = GEOMETRIES[name]
    return {"model_type": "qwen2", "hidden_size": h, "num_hidden_layers": n, "intermediate_size": f,
            "num_attention_heads": nh, "num_key_value_heads": nkv, "vocab_size": v, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "max_position_embeddings": 32768, "tie_word_embeddings": tied}


def fill_random(model: nn.Module, dtype, seed: int) -> None:
    """Replace every (already sharded, not yet evaluated) parameter by random values of its local
    shape, one layer at a time, so no rank ever holds more than its shard."""
    mx.random.seed(seed)

    def rnd(a):
        return (mx.ones(a.shape, dtype) if a.ndim == 1 else 0.02 * mx.random.normal(a.shape)).astype(dtype)

    for layer in model.layers:
        layer.update(tree_map(rnd, layer.parameters()))
        mx.eval(layer.parameters())
    rest = {k: v for k, v in model.parameters().items()}
    rest["model"] = {k: v for k, v in rest["model"].items() if k != "layers"}
    model.update(tree_map(rnd, rest))
    mx.eval(model.parameters())


def build(impl: str, a, group):
    """(model, generate_step) for impl 'qwen-mlx' or 'mlx-lm'."""
    dtype = getattr(mx, a.dtype) if a.dtype else default_dtype()
    if impl == "qwen-mlx":
        from qwen_mlx.generation import generate_step
        from qwen_mlx.model import Model, ModelArgs

        if a.random:
            model = Model(ModelArgs.from_dict(geometry_config(a.random)))
            model.shard(group)
            fill_random(model, dtype, 0)
        else:
            model, _ = qwen_mlx.load(None if a.model == "default" else a.model, dtype=dtype, quantized=a.quantized)
        return model, generate_step
    from mlx_lm.generate import generate_step
    from mlx_lm.models import qwen2

    if a.random:
        model = qwen2.Model(qwen2.ModelArgs.from_dict(geometry_config(a.random)))
        model.shard(group)
        fill_random(model, dtype, 0)
        return model, generate_step
    from qwen_mlx.fetch import default_model_path
    from qwen_mlx.gguf import gguf_config, gguf_quantized_weights, open_gguf

    path = default_model_path() if a.model == "default" else a.model
    reader = open_gguf(path)
    weights, q = gguf_quantized_weights(reader, dtype, path, quantize=bool(a.quantized))
    model = qwen2.Model(qwen2.ModelArgs.from_dict(gguf_config(reader, path)))
    if q:
        nn.quantize(model, q["group_size"], q["bits"], class_predicate=lambda p, m: q.get(p, f"{p}.scales" in weights))
    model.load_weights(list(model.sanitize(weights).items()))
    del weights
    model.shard(group)
    mx.eval(model.parameters())
    return model, generate_step


def one_round(model, step, prompt, gen: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy generation."""
    tic = time.perf_counter()
    n = 0
    for n, _ in enumerate(step(prompt, model, max_tokens=gen), 1):
        if n == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    return prompt.size / (first - tic), (n - 1) / (end - first)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="GGUF file or model directory ('default': the default model)")
    src.add_argument("--random", choices=GEOMETRIES, help="random weights at this Qwen2.5 geometry")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--quantized", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--impl", choices=["both", "qwen-mlx", "mlx-lm"], default="both")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()

    group = mx.distributed.init()
    rank0 = silence_other_ranks(group)
    impls = ["qwen-mlx", "mlx-lm"] if a.impl == "both" else [a.impl]
    models, memory = {}, {}
    for impl in impls:
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        models[impl] = build(impl, a, group)
        memory[impl] = {"weights_gb": (mx.get_active_memory() - before) / 1e9, "build_peak_gb": mx.get_peak_memory() / 1e9}
    vocab = models[impls[0]][0].args.vocab_size
    prompt = mx.random.randint(0, min(vocab, 150000), (a.prompt_tokens,), key=mx.random.key(1)).astype(mx.uint32)
    rates = {impl: [] for impl in impls}
    for impl in impls:  # warm-up
        one_round(*models[impl], prompt, 4)
    mx.reset_peak_memory()
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    for _ in range(a.rounds):  # alternating rounds
        for impl in impls:
            rates[impl].append(one_round(*models[impl], prompt, a.gen_tokens))
    cores = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)  # CPU seconds per second: threads busy
    run_peak = mx.get_peak_memory() / 1e9
    # every rank's memory, gathered to rank 0
    mine = mx.array([[memory[i]["weights_gb"] for i in impls] + [memory[i]["build_peak_gb"] for i in impls]
                     + [cores, run_peak]])
    allm = mx.distributed.all_gather(mine, group=group).tolist() if group.size() > 1 else mine.tolist()
    if not rank0:
        return
    k = len(impls)
    result = {"ranks": group.size(), "device": str(mx.default_device()), "source": a.model or f"random {a.random}",
              "dtype": a.dtype, "quantized": a.quantized, "prompt_tokens": a.prompt_tokens,
              "gen_tokens": a.gen_tokens, "rounds": a.rounds, "per_rank_memory_gb": {}, "impls": {}}
    for j, impl in enumerate(impls):
        pre, dec = [r[0] for r in rates[impl]], [r[1] for r in rates[impl]]
        result["impls"][impl] = {"prefill_tps": statistics.median(pre), "prefill_range": [min(pre), max(pre)],
                                 "decode_tps": statistics.median(dec), "decode_range": [min(dec), max(dec)]}
        result["per_rank_memory_gb"][impl] = [{"weights": round(m[j], 3), "build_peak": round(m[k + j], 3)}
                                              for m in allm]
    result["per_rank_run_peak_gb"] = [round(m[-1], 3) for m in allm]
    result["per_rank_cpu_busy"] = [round(m[-2], 2) for m in allm]  # CPU seconds per wall second
    if len(impls) == 2:
        ours, theirs = result["impls"]["qwen-mlx"], result["impls"]["mlx-lm"]
        result["decode_ratio_vs_mlx_lm"] = ours["decode_tps"] / theirs["decode_tps"]
        result["prefill_ratio_vs_mlx_lm"] = ours["prefill_tps"] / theirs["prefill_tps"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
