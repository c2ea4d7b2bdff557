"""Where a `BatchGenerator` decode step's time goes, at B rows, against the bare model step.

    python scripts/probe_batch_step.py --batch 8,32,128

Random weights (`--geometry`, bf16 on a GPU, float32 on a CPU). B random prompts of `--prompt`
tokens are inserted and run until every row decodes; then, at that state (medians of `--steps`):
- the generator's step as `batch_generate` runs it (pipelined: the next forward is launched before
  the last tokens are read), and the same step followed by `mx.synchronize()` (alone), with the
  host time inside it split into building the forward's graph and reporting (tokens to text);
- the generator's own forward (`_forward`: model, log-softmax, argmax) on its live cache, built
  then evaluated alone; the bare model + argmax on that cache with its padding mask and without;
  and the same bare step on a fresh `BatchKVCache` of the same rows and length (one prefill, no
  joins). The cache is trimmed back after each of these, so all run at the same length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import benchlib as B  # scripts/benchlib.py (this script's directory is first on sys.path)
import qwen_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from qwen_mlx.batch import BatchGenerator
from qwen_mlx.tokenizer import load_tokenizer


def med_ms(xs):
    return statistics.median(xs) * 1e3


def timed(obj, name, acc):
    f = getattr(obj, name)

    def g(*a, **k):
        t0 = time.perf_counter()
        r = f(*a, **k)
        acc.append(time.perf_counter() - t0)
        return r
    setattr(obj, name, g)


def bare(model, cache, y, mask):
    lo = model(y[:, None], cache=cache, mask=cache[0].make_mask(1) if mask else None, last_only=True)[:, -1]
    return mx.argmax(lo, axis=-1)


def alone(f, cache, steps):
    """(build ms, build + eval ms) medians of f() evaluated alone, the cache trimmed back each time."""
    hs, ts = [], []
    for i in range(steps + 2):
        mx.synchronize()
        t0 = time.perf_counter()
        out = f()
        t1 = time.perf_counter()
        mx.eval(out)
        mx.synchronize()
        t2 = time.perf_counter()
        for c in cache:
            c.trim(1)
        if i >= 2:
            hs.append(t1 - t0)
            ts.append(t2 - t0)
    return med_ms(hs), med_ms(ts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="0.5B")
    p.add_argument("--batch", default="8,32,128")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokenizer", default=None, help="a GGUF (default: the default model)")
    a = p.parse_args()
    gpu = mx.default_device() == mx.gpu
    model, _ = B.random_pair(a.geometry, "bf16" if gpu else "f32")
    from qwen_mlx.fetch import default_model_path
    tok = load_tokenizer(a.tokenizer or str(default_model_path()))
    tok.eos_token_ids = []
    print(f"device: {mx.default_device()}, mlx {mx.__version__}, {a.geometry}, prompt {a.prompt}; ms, medians "
          f"of {a.steps}", flush=True)
    for b in (int(x) for x in a.batch.split(",")):
        prompts = mx.random.randint(0, 151000, (b, a.prompt), key=mx.random.key(b)).tolist()
        gen = BatchGenerator(model, tok, max_batch=b)
        for pr in prompts:
            gen.insert(pr, max_tokens=100_000)
        while gen.waiting or gen.group or len(gen.rows) < b:
            gen.step()
        for _ in range(8):
            gen.step()
        fw, rep = [], []
        timed(gen, "_forward", fw)
        timed(gen, "_report", rep)
        piped = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            gen.step()
            piped.append(time.perf_counter() - t0)
        fw_p, rep_p = med_ms(fw), med_ms(rep)
        fw.clear(), rep.clear()
        sync = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            gen.step()
            mx.synchronize()
            sync.append(time.perf_counter() - t0)
        gen.__dict__.pop("_forward"), gen.__dict__.pop("_report")
        mx.eval(gen.out.tokens)
        c0 = gen.cache[0]
        print(f"B={b}: KV length {c0.size()} (buffer {c0.keys.shape[2]}), left padding "
              f"{sorted(set(c0.left_padding.tolist()))}", flush=True)
        print(f"  generator step, pipelined          {med_ms(piped):7.2f}   (inside: forward build {fw_p:.2f}, "
              f"report {rep_p:.2f})", flush=True)
        print(f"  generator step + synchronize       {med_ms(sync):7.2f}   (forward build {med_ms(fw):.2f}, "
              f"report {med_ms(rep):.2f})", flush=True)
        y = gen.out.tokens
        rows = {
            "generator _forward, alone": lambda: gen._forward(gen.rows, y, gen.cache).tokens,
            "bare model + argmax, with mask": lambda: bare(model, gen.cache, y, True),
            "bare model + argmax, no mask": lambda: bare(model, gen.cache, y, False),
        }
        for name, f in rows.items():
            h, t = alone(f, gen.cache, a.steps)
            print(f"  {name:34s} {t:7.2f}   (build {h:.2f})", flush=True)
        fresh = [BatchKVCache([0] * b) for _ in model.model.layers]
        toks = mx.array(prompts, mx.uint32)
        model(toks, cache=fresh, mask=fresh[0].make_mask(a.prompt), last_only=True)
        for _ in range(c0.size() - a.prompt):
            bare(model, fresh, y, True)
        mx.eval([c.state[:2] for c in fresh])
        for name, m in (("with mask", True), ("no mask", False)):
            h, t = alone(lambda: bare(model, fresh, y, m), fresh, a.steps)
            print(f"  fresh cache, bare step, {name:10s} {t:7.2f}   (build {h:.2f})", flush=True)
        del gen, fresh
        mx.clear_cache()


if __name__ == "__main__":
    main()
