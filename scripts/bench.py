"""Side-by-side speed of qwen_mlx and mlx-lm: same weights, same machine, same run.

    python scripts/bench.py                       # CPU: the default model, float32 weights
    python scripts/bench.py --model M.gguf --cases chat:256,4000:16 --fuse-qkv always,same-format
    python scripts/bench.py --random 1.5B,7B --quant q4km,bf16,4bit,8bit --cases 128:128
    python scripts/bench.py --random 7B --quant bf16 --cases 128:128,4096:128 --bandwidth

Models: `--model PATH` (or the default model) is loaded by `qwen_mlx.load` (quantized weights stay
quantized on a GPU, `--quantized/--no-quantized` to choose) and, for mlx-lm, written by our
converter (`qwen_mlx.convert`, same dtype; dequantized when ours is) and opened with
`mlx_lm.load`: the same weights. `--random G --quant Q` builds mlx-lm's qwen2 with seeded random
weights at geometry G in format Q (q4km: the formats a Q4_K_M GGUF gives each matrix, see
benchlib.q4km_type) and loads the same arrays into qwen_mlx. `--fuse-qkv` adds one qwen_mlx
model per policy (qwen_mlx.model.ModelArgs.fuse_qkv: fuse q/k/v promoting mixed formats, or not),
`--promote-bits` one per setting of ModelArgs.promote_bits (e.g. 5:8: 5-bit matrices held exactly
in 8 bits), `--compile-decode on,off` one with and one without the compiled decode step
(ModelArgs.compile_decode); with several, one per combination.

Cases `P:N`: a prompt of P random tokens (or `chat`: a chat-templated request, with --model)
then N greedy tokens, each library through its own `generate_step`. prefill tok/s = prompt
tokens / time to the first token; decode tok/s = the further tokens / their time. Each case runs
once unmeasured per system, then `--rounds` rounds, the systems alternating within a round. Per
system: the median and the spread (min-max) over the rounds; the ratio is ours / mlx-lm of the
medians, and it counts ("*") when the spreads do not overlap. `--json` keeps every round.

`--bandwidth` measures the copy bandwidth of MLX (read + write) first and gives each decode as
a fraction of it: (weights read per token + KV cache read at the mean context) x tok/s.

On Linux, qwen_mlx loads OpenBLAS into the process, which then serves both libraries.
`--mlx-lm-blas bundled` runs mlx-lm in a second process without it, as mlx-lm runs when installed
on its own (the two then no longer alternate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as B  # scripts/benchlib.py (this script's directory is first on sys.path)
import qwen_mlx
import mlx.core as mx
from mlx_lm.generate import generate_step as mlx_lm_generate_step

from qwen_mlx.generation import generate_step

CHAT = "Write a Python function that checks whether a number is prime, with a docstring and three tests."


VARIANT_ENV = ("QWEN_MLX_FUSE_QKV", "QWEN_MLX_PROMOTE_BITS", "QWEN_MLX_COMPILE_DECODE")


def load_ours(path, dtype, quantized, variant=(None, None, None)):
    """qwen_mlx.load with a variant (fuse_qkv policy, promote_bits, compile_decode "1"/"0"), each None
    for the default."""
    env = {k: v for k, v in zip(VARIANT_ENV, variant) if v is not None}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return qwen_mlx.load(path, dtype=dtype, quantized=quantized)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})


def models_from_file(path, dtype, quantized, variants, tmp):
    """{system: model} for a GGUF/model path, the mlx-lm one from our converter's directory; tokenizer."""
    import mlx_lm

    from qwen_mlx.convert import convert
    from qwen_mlx.loader import is_quantized

    path = path or _default_path()
    models = {}
    for v in variants:
        models[_name(v)], tok = load_ours(path, dtype, quantized, v)
    ours = models[_name(variants[0])]
    dt = str(ours.model.norm.weight.dtype).split(".")[-1]
    if Path(path).is_dir() and is_quantized(ours):
        ref_dir = path
    else:
        ref_dir = convert(path, Path(tmp) / "mlx", dtype=dt, dequantize=not is_quantized(ours), progress=False)
    models["mlx_lm"] = mlx_lm.load(str(ref_dir))[0]
    return models, tok


def models_from_random(geometry, quant, variants):
    ours, ref = B.random_pair(geometry, quant, 0, *variants[0])
    models = {_name(variants[0]): ours}
    for v in variants[1:]:
        models[_name(v)] = B.ours_from(ref, *v)
    models["mlx_lm"] = ref
    return models, None


def _name(variant):
    fuse, promote, compiled = variant
    return " ".join(["qwen_mlx"] + ([f"fuse_qkv={fuse}"] if fuse else []) +
                    ([f"promote={promote or 'none'}"] if promote is not None else []) +
                    ([f"compile_decode={'on' if compiled == '1' else 'off'}"] if compiled is not None else []))


def _default_path():
    from qwen_mlx.fetch import default_model_path

    return default_model_path()


def run_once(system: str, model, prompt: mx.array, n_gen: int) -> tuple[float, float]:
    fn = generate_step if system.startswith("qwen_mlx") else (
        lambda p, m, **k: (t for t, _ in mlx_lm_generate_step(p, m, **k)))
    mx.synchronize()
    tic = time.perf_counter()
    gen = fn(prompt, model, max_tokens=n_gen + 1)
    next(gen)
    t_first = time.perf_counter() - tic
    tic = time.perf_counter()
    n = sum(1 for _ in gen)
    t_rest = time.perf_counter() - tic
    return prompt.size / t_first, n / t_rest


def bench_case(models: dict, prompt: mx.array, n_gen: int, rounds: int) -> dict:
    """{system: {"prefill": spread, "decode": spread, "peak_gb": max}} over alternating rounds."""
    for system, model in models.items():  # warm-up at the same shapes (kernel compilation, allocator)
        run_once(system, model, prompt, n_gen)
    raw = {s: {"prefill": [], "decode": [], "peak_gb": 0.0} for s in models}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # alternate who goes first
        for system in order:
            mx.clear_cache()
            mx.reset_peak_memory()
            pre, dec = run_once(system, models[system], prompt, n_gen)
            raw[system]["prefill"].append(pre)
            raw[system]["decode"].append(dec)
            raw[system]["peak_gb"] = max(raw[system]["peak_gb"], mx.get_peak_memory() / 1e9)
    return {s: {"prefill": B.spread(v["prefill"]), "decode": B.spread(v["decode"]), "peak_gb": v["peak_gb"]}
            for s, v in raw.items()}


def make_prompt(spec: str, tokenizer, vocab: int) -> mx.array:
    if spec == "chat":
        if tokenizer is None:
            raise SystemExit("bench.py: a 'chat' case needs a model with a tokenizer (--model)")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True)
        return mx.array(ids, dtype=mx.uint32)
    mx.random.seed(int(spec))
    return mx.random.randint(0, min(vocab, 151000), (int(spec),)).astype(mx.uint32)


def fmt(s: dict) -> str:
    return f"{s['median']:8.1f} [{s['min']:.0f}-{s['max']:.0f}]"


def describe(row: dict, bandwidth: float | None) -> list[str]:
    lines = []
    for system, r in row["results"].items():
        if system == "mlx_lm":
            continue
        parts = [f"{row['model']:26} {row['case']:>9} {system:28}"]
        for k in ("prefill", "decode"):
            ratio = row["ratios"][system][k]
            parts.append(f"{k} {fmt(r[k])} / {fmt(row['results']['mlx_lm'][k])} = {ratio['ratio']:5.2f}x"
                         f"{'*' if ratio['counts'] else ' '}")
        if bandwidth and "bytes_per_token" in row:
            parts.append(f"decode at {row['bandwidth_fraction'][system]:.0%} of copy bw")
        lines.append(" | ".join(parts))
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF or model dir (default: the default model)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the device's)")
    p.add_argument("--quantized", action=argparse.BooleanOptionalAction, default=None,
                   help="with --model: keep quantized weights quantized (default: on a GPU)")
    p.add_argument("--random", default=None, help="comma list of geometries with random weights: tiny,0.5B,1.5B,7B")
    p.add_argument("--quant", default="bf16", help="with --random: comma list of bf16,f32,4bit,8bit,q4km")
    p.add_argument("--cases", default="128:128,2048:16,4096:128",
                   help="comma list of prompt:new_tokens; prompt is a length or 'chat'")
    p.add_argument("--fuse-qkv", default=None,
                   help="comma list of qwen_mlx q/k/v fusion policies to compare: always,same-format,never")
    p.add_argument("--promote-bits", default=None,
                   help="comma list of qwen_mlx promote_bits settings to compare (ModelArgs.promote_bits), "
                        "'none' for the formats as stored (default: ModelArgs' default, 5:8 on CUDA): none,5:8")
    p.add_argument("--compile-decode", default=None,
                   help="comma list of on/off: qwen_mlx with and without compiled decode steps (ModelArgs.compile_decode)")
    p.add_argument("--rounds", "--repeats", type=int, default=5, help="measured rounds (default 5)")
    p.add_argument("--bandwidth", action="store_true", help="measure MLX's copy bandwidth; decode as a fraction")
    p.add_argument("--json", default=None, help="write the results (with every round) here")
    p.add_argument("--mlx-lm-blas", choices=["same", "bundled"], default="same",
                   help="bundled: run mlx-lm in a separate process with MLX's own BLAS")
    p.add_argument("--only", choices=["qwen_mlx", "mlx_lm"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if a.compile_decode and set(a.compile_decode.split(",")) - {"on", "off"}:
        p.error("--compile-decode takes on, off or on,off")
    variants = [(f, "" if pb == "none" else pb, None if c is None else "1" if c == "on" else "0")
                for f in (a.fuse_qkv.split(",") if a.fuse_qkv else [None])
                for pb in (a.promote_bits.split(",") if a.promote_bits else [None])
                for c in (a.compile_decode.split(",") if a.compile_decode else [None])]
    theirs = None
    if a.mlx_lm_blas == "bundled" and a.only is None:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            argv = [x for x in sys.argv[1:] if x not in ("--mlx-lm-blas", "bundled")]
            if "--json" in argv:
                i = argv.index("--json")
                del argv[i:i + 2]
            subprocess.run([sys.executable, __file__, *argv, "--only", "mlx_lm", "--json", f.name],
                           check=True, env=dict(os.environ, QWEN_MLX_BLAS="none"), stdout=subprocess.DEVNULL)
            theirs = json.loads(Path(f.name).read_text())
        print(f"mlx-lm ran in its own process, BLAS: {theirs['blas']}")

    info = dict(device=str(mx.default_device()), mlx=mx.__version__, blas=qwen_mlx._blas.blas_name(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), argv=sys.argv[1:])
    try:
        info["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception:  # noqa: BLE001  (older MLX, or no GPU)
        pass
    if not a.only:
        print(f"device: {info['device']}, mlx {info['mlx']}, BLAS: {info['blas']}, {info['date']}", flush=True)
    bandwidth = B.copy_bandwidth() if a.bandwidth and not a.only else None
    if bandwidth:
        print(f"MLX copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s", flush=True)
    info["copy_bandwidth_Bps"] = bandwidth

    tmp = tempfile.TemporaryDirectory()
    suites = []
    if a.random:
        for g in a.random.split(","):
            for q in a.quant.split(","):
                suites.append((f"{g} {q} (random)", B.config(g),
                               lambda g=g, q=q: models_from_random(g, q, variants)))
    else:
        suites.append((f"{Path(a.model).name if a.model else 'default model'}", None,
                       lambda: models_from_file(a.model, a.dtype, a.quantized, variants, tmp.name)))
    rows = []
    try:
        for label, cfg, make in suites:
            models, tokenizer = make()
            if a.only:
                models = {s: m for s, m in models.items() if s.startswith(a.only)}
            elif a.mlx_lm_blas == "bundled":
                models.pop("mlx_lm")
            cfg = cfg or models[next(iter(models))].args.__dict__
            some = next(iter(models.values()))
            itemsize = (mx.float32 if some.model.norm.weight.dtype == mx.float32 else mx.bfloat16).size
            for case in a.cases.split(","):
                spec, ngen = case.split(":")
                prompt = make_prompt(spec, tokenizer, cfg["vocab_size"])
                res = bench_case(models, prompt, int(ngen), a.rounds)
                row = dict(model=label, case=case, prompt_tokens=int(prompt.size), gen=int(ngen), results=res)
                if theirs is not None:
                    res["mlx_lm"] = next(x["results"]["mlx_lm"] for x in theirs["rows"]
                                         if x["model"] == label and x["case"] == case)
                if not a.only:
                    row["ratios"] = {s: {k: {"ratio": r[k]["median"] / res["mlx_lm"][k]["median"],
                                             "counts": B.counts(r[k], res["mlx_lm"][k])}
                                         for k in ("prefill", "decode")}
                                     for s, r in res.items() if s != "mlx_lm"}
                    row["bytes_per_token"] = {
                        s: B.weight_bytes(m) + B.kv_bytes_per_position(cfg, itemsize) * (prompt.size + int(ngen) / 2)
                        for s, m in models.items()}
                    if bandwidth:
                        row["bandwidth_fraction"] = {s: row["bytes_per_token"][s] * res[s]["decode"]["median"]
                                                     / bandwidth for s in res if s in models}
                    for line in describe(row, bandwidth):
                        print(line, flush=True)
                rows.append(row)
            del models
            mx.clear_cache()
    finally:
        tmp.cleanup()
    if a.json:
        Path(a.json).write_text(json.dumps(dict(info, rows=rows), indent=1))


if __name__ == "__main__":
    main()
