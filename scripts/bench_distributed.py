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
    # two NVIDIA GPUs over NCCL against one (issue 19); --save/--compare check the outputs agree
    python scripts/bench_distributed.py --random 7b --dtype float32 --save /tmp/one.npz
    mlx.launch --backend nccl --hosts 127.0.0.1 -n 2 -- python scripts/bench_distributed.py \
        --random 7b --dtype float32 --save /tmp/two.npz
    python scripts/bench_distributed.py --compare /tmp/one.npz /tmp/two.npz
    # 72B bf16 (~70 GiB per GPU over two): one implementation per run, they do not fit together
    mlx.launch --backend nccl --hosts 127.0.0.1 -n 2 -- python scripts/bench_distributed.py \
        --random 72b --dtype bfloat16 --impl qwen-mlx

--random weights are the same for any number of ranks (each tensor from its own fixed key; each
rank evaluates one full tensor at a time and keeps its slice). mlx-lm's model gets the same
weights, loaded its own way: lazily whole, then `shard()`, then evaluated (from a GGUF: loaded
whole through `qwen_mlx.gguf`, then sharded; mlx-lm has no GGUF reader). Each model's memory is
its active memory after building it; the run peak covers both.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import qwen_mlx  # noqa: E402,F401  (BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from qwen_mlx.distributed import silence_other_ranks, weight_part  # noqa: E402
from qwen_mlx.gguf import expected_shapes  # noqa: E402
from qwen_mlx.loader import build_model, default_dtype  # noqa: E402

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


def random_weights(config: dict, dtype) -> dict:
    """{mlx-lm name: lazy random array} at the config's shapes, each tensor from its own fixed key:
    the same full weights whatever the number of ranks, so runs over 1 and N devices compare."""
    out = {}
    for i, (name, shape) in enumerate(expected_shapes(config).items()):
        w = mx.random.normal(shape, key=mx.random.key(i))
        if name.endswith("norm.weight"):
            w = 1 + 0.1 * w
        elif name.endswith(".bias"):
            w = 0.5 * w
        elif "embed_tokens" not in name:
            w = 0.02 * w
        out[name] = w.astype(dtype)
    return out


def build(impl: str, a, group):
    """(model, generate_step) for impl 'qwen-mlx' or 'mlx-lm', split over `group`. mlx-lm's
    generate_step is wrapped to wait for its own stream at the end: it leaves one step in flight
    there, whose all_sums would otherwise pair, in a different order on each rank, with those of
    whatever runs next on the default stream (wrong logits, different on each rank)."""
    dtype = getattr(mx, a.dtype) if a.dtype else default_dtype()
    n, rank = group.size(), group.rank()
    if impl == "qwen-mlx":
        from qwen_mlx.generation import generate_step

        if not a.random:
            model, _ = qwen_mlx.load(None if a.model == "default" else a.model, dtype=dtype, quantized=a.quantized)
            return model, generate_step
        weights = {}  # this rank's slices, as `load` reads them: one full tensor in memory at a time
        for name, w in random_weights(config := geometry_config(a.random), dtype).items():
            if n > 1 and (part := weight_part(name, w.shape, rank, n)):
                axis, start, stop = part
                w = mx.contiguous(w[start:stop] if axis == 0 else w[:, start:stop])
            weights[name] = w
            mx.eval(w)
        return build_model(config, weights, dtype, group if n > 1 else None), generate_step
    from mlx_lm.generate import generate_step as mlx_lm_step, generation_stream
    from mlx_lm.models import qwen2

    def generate_step(*args, **kwargs):
        yield from mlx_lm_step(*args, **kwargs)
        mx.synchronize(generation_stream)

    if a.random:  # mlx-lm's way: lazy full weights, shard(), then evaluate (layer by layer)
        config = geometry_config(a.random)
        model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
        model.load_weights(list(random_weights(config, dtype).items()))
        if n > 1:
            model.shard(group)
        for layer in model.layers:
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
        return model, generate_step
    from qwen_mlx.fetch import default_model_path
    from qwen_mlx.gguf import gguf_config, gguf_quantized_weights, open_gguf

    path = default_model_path() if a.model == "default" else a.model
    reader = open_gguf(path)
    weights, q = gguf_quantized_weights(reader, dtype, quantize=bool(a.quantized))
    model = qwen2.Model(qwen2.ModelArgs.from_dict(gguf_config(reader)))
    if q:
        nn.quantize(model, q["group_size"], q["bits"], class_predicate=lambda p, m: q.get(p, f"{p}.scales" in weights))
    model.load_weights(list(model.sanitize(weights).items()))
    del weights
    if n > 1:
        model.shard(group)
    mx.eval(model.parameters())
    return model, generate_step


def reference_outputs(model, step, prompt, gen: int) -> dict:
    """The prompt's last-position logits (float32) and `gen` greedy tokens, for --save."""
    logits = model(prompt[None])[0, -1].astype(mx.float32)
    tokens = [int(t) for t, _ in step(prompt, model, max_tokens=gen)]
    return {"logits": np.array(logits), "tokens": np.array(tokens)}


def compare(a_path: str, b_path: str) -> None:
    """Print, per implementation, whether two --save files agree: greedy tokens, logit error."""
    a, b = np.load(a_path), np.load(b_path)
    for impl in sorted({k.split("/")[0] for k in a.files} & {k.split("/")[0] for k in b.files}):
        la, lb = a[f"{impl}/logits"], b[f"{impl}/logits"]
        ta, tb = a[f"{impl}/tokens"], b[f"{impl}/tokens"]
        same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        print(json.dumps({"impl": impl, "tokens_identical": bool(same is None and len(ta) == len(tb)),
                          "first_different_token": same, "n_tokens": len(ta),
                          "max_abs_logit_diff": float(np.abs(la - lb).max()),
                          "max_abs_logit": float(np.abs(la).max())}))


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
    src.add_argument("--random", choices=GEOMETRIES, help="random weights at this Qwen2.5 geometry (the "
                     "same weights for any number of ranks)")
    src.add_argument("--compare", nargs=2, metavar=("A.npz", "B.npz"), help="compare two --save files and exit")
    p.add_argument("--save", help="rank 0 saves each implementation's prompt logits and greedy tokens here (npz)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--quantized", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--impl", choices=["both", "qwen-mlx", "mlx-lm"], default="both")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    if a.compare:
        return compare(*a.compare)

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
    saved = {}
    for impl in impls:  # warm-up (and the outputs to --save)
        one_round(*models[impl], prompt, 4)
        if a.save:
            saved.update({f"{impl}/{k}": v for k, v in reference_outputs(*models[impl], prompt, a.gen_tokens).items()})
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
    if a.save:
        np.savez(a.save, **saved)


if __name__ == "__main__":
    main()
