"""Speculative decoding speed: prompt lookup and draft models against plain decoding and mlx-lm.

    python scripts/bench_speculative.py --cases code,chat                  # this CPU: default model
    python scripts/bench_speculative.py --cases mlx-lm --target DIR --draft DIR   # vs mlx-lm's own
    python scripts/bench_speculative.py --model /root/model.gguf --cases code --rounds 5   # GPU

Greedy throughout. Each case runs every variant once unmeasured (warm-up), then `--rounds`
rounds, the variants alternating inside each round. Reported: wall time of the whole call
(prefill included, the same for every variant of a case), new tokens per second over that
time, median and min-max over the rounds, and the ratio of medians against the case's
baseline. Every variant's text must equal the baseline's (greedy speculative decoding is exact);
a mismatch is printed.

- code: the model gets a ~60-line Python function and is asked for it back with one change;
  plain decoding vs prompt lookup.
- chat: plain chat prompts (little to look up); plain vs prompt lookup (the cost of trying).
- mlx-lm: mlx-lm's `stream_generate(..., draft_model=...)` against ours with the same target and
  draft directories (`python -m qwen_mlx.convert`), and ours with prompt lookup added.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import qwen_mlx  # noqa: E402  (loads the optimized BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from qwen_mlx.speculative import load_draft  # noqa: E402

CODE = '''def summarize_orders(orders, currency="EUR", min_total=0.0):
    """Group orders by customer and return per-customer statistics."""
    if not orders:
        return {}
    rates = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.04}
    if currency not in rates:
        raise ValueError(f"unknown currency: {currency}")
    by_customer = {}
    for order in orders:
        customer = order.get("customer")
        if customer is None:
            continue
        amount = float(order.get("amount", 0.0))
        source = order.get("currency", "EUR")
        if source not in rates:
            raise ValueError(f"unknown currency in order: {source}")
        amount = amount * rates[source] / rates[currency]
        entry = by_customer.setdefault(customer, {
            "count": 0,
            "total": 0.0,
            "largest": 0.0,
            "smallest": None,
            "items": 0,
            "first_date": None,
            "last_date": None,
        })
        entry["count"] += 1
        entry["total"] += amount
        entry["largest"] = max(entry["largest"], amount)
        if entry["smallest"] is None or amount < entry["smallest"]:
            entry["smallest"] = amount
        entry["items"] += len(order.get("items", []))
        date = order.get("date")
        if date is not None:
            if entry["first_date"] is None or date < entry["first_date"]:
                entry["first_date"] = date
            if entry["last_date"] is None or date > entry["last_date"]:
                entry["last_date"] = date
    result = {}
    for customer, entry in by_customer.items():
        if entry["total"] < min_total:
            continue
        average = entry["total"] / entry["count"]
        result[customer] = {
            "orders": entry["count"],
            "total": round(entry["total"], 2),
            "average": round(average, 2),
            "largest": round(entry["largest"], 2),
            "smallest": round(entry["smallest"], 2),
            "items": entry["items"],
            "first_date": entry["first_date"],
            "last_date": entry["last_date"],
        }
    ranked = sorted(result.items(), key=lambda kv: kv[1]["total"], reverse=True)
    for rank, (customer, stats) in enumerate(ranked, start=1):
        stats["rank"] = rank
    return dict(ranked)
'''
CODE_PROMPT = ("Here is a Python function:\n\n```python\n" + CODE + "```\n\nRename the parameter `min_total` to "
               "`minimum_total` everywhere. Reply with the complete updated function only, in one code block.")
CHAT_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain the difference between a list and a tuple in Python.",
    "What are three good habits for writing maintainable code?",
]


def chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def timed(fn):
    mx.synchronize()
    tic = time.perf_counter()
    text, n, extra = fn()
    mx.synchronize()
    return time.perf_counter() - tic, text, n, extra


def ours(model, tokenizer, ids, max_tokens, **kw):
    def run():
        text, last = "", None
        for r in qwen_mlx.stream_generate(model, tokenizer, ids, max_tokens=max_tokens, **kw):
            text, last = text + r.text, r
        acc = (f"{last.spec_accepted}/{last.spec_proposed} accepted, "
               f"{last.generation_tokens / last.spec_forwards:.2f} tok/forward") if last.spec_forwards else ""
        return text, last.generation_tokens, acc
    return run


def mlx_lm_run(model, tokenizer, ids, max_tokens, **kw):
    from mlx_lm.generate import stream_generate as mlx_lm_stream

    def run():
        text, n = "", 0
        for r in mlx_lm_stream(model, tokenizer, ids, max_tokens=max_tokens, **kw):
            text, n = text + r.text, r.generation_tokens
        return text, n, ""
    return run


def bench(name: str, variants: dict, rounds: int) -> None:
    """variants: label -> zero-argument run function; the first one is the baseline."""
    times = {k: [] for k in variants}
    texts, toks, extra = {}, {}, {}
    for r in range(rounds + 1):  # round 0 warms up
        order = list(variants) if r % 2 else list(variants)[::-1]
        for k in order:
            t, text, n, ex = timed(variants[k])
            texts[k], toks[k], extra[k] = text, n, ex
            if r:
                times[k].append(t)
    base = next(iter(variants))
    print(f"\n## {name} ({rounds} rounds, wall time per call, prefill included)")
    print("| variant | tokens | median s | min-max s | tok/s (median) | vs baseline | same text | acceptance |")
    print("|---|---|---|---|---|---|---|---|")
    mb = statistics.median(times[base])
    for k in variants:
        m = statistics.median(times[k])
        print(f"| {k} | {toks[k]} | {m:.2f} | {min(times[k]):.2f}-{max(times[k]):.2f} | {toks[k] / m:.2f} | "
              f"{mb / m:.2f}x | {'yes' if texts[k] == texts[base] else 'NO'} | {extra[k]} |", flush=True)
    for k in variants:
        if texts[k] != texts[base]:
            print(f"TEXT DIFFERS ({k}):\n{texts[k]!r}\nvs baseline:\n{texts[base]!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="GGUF or directory (default: the default model)")
    p.add_argument("--cases", default="code,chat", help="comma list of code, chat, mlx-lm")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ngram", type=int, default=3, help="prompt lookup n-gram size")
    p.add_argument("--lookup-tokens", type=int, default=10, help="proposals per round from prompt lookup")
    p.add_argument("--draft-tokens", type=int, default=3, help="proposals per round from a draft model")
    p.add_argument("--code-max-tokens", type=int, default=600)
    p.add_argument("--chat-max-tokens", type=int, default=96)
    p.add_argument("--target", help="mlx-lm case: converted target directory")
    p.add_argument("--draft", help="mlx-lm case: converted draft directory")
    p.add_argument("--mlx-lm-prompts", type=int, default=2, help="mlx-lm case: 1 = the code-editing prompt only")
    p.add_argument("--dtype", default=None)
    a = p.parse_args(argv)
    cases = a.cases.split(",")
    print(f"# bench_speculative: {time.strftime('%Y-%m-%d %H:%M')}, device {mx.default_device()}, "
          f"mlx {mx.__version__}; {' '.join(sys.argv[1:])}")
    if "code" in cases or "chat" in cases:
        model, tok = qwen_mlx.load(a.model, dtype=a.dtype)
        look = dict(prompt_lookup=a.ngram, num_draft_tokens=a.lookup_tokens)
        if "code" in cases:
            ids = chat_ids(tok, CODE_PROMPT)
            bench(f"code editing: {len(ids)}-token prompt, greedy", {
                "plain": ours(model, tok, ids, a.code_max_tokens),
                f"prompt lookup n={a.ngram} k={a.lookup_tokens}": ours(model, tok, ids, a.code_max_tokens, **look),
            }, a.rounds)
        if "chat" in cases:
            for i, text in enumerate(CHAT_PROMPTS):
                ids = chat_ids(tok, text)
                bench(f"chat prompt {i + 1}: {text!r}, greedy", {
                    "plain": ours(model, tok, ids, a.chat_max_tokens),
                    f"prompt lookup n={a.ngram} k={a.lookup_tokens}": ours(model, tok, ids, a.chat_max_tokens, **look),
                }, a.rounds)
        del model
    if "mlx-lm" in cases:
        import mlx_lm

        if not (a.target and a.draft):
            p.error("the mlx-lm case needs --target DIR and --draft DIR (python -m qwen_mlx.convert)")
        same = Path(a.draft).resolve() == Path(a.target).resolve()  # a model drafting itself: load it once
        m_ref, t_ref = mlx_lm.load(a.target)
        d_ref = m_ref if same else mlx_lm.load(a.draft)[0]
        m, t = qwen_mlx.load(a.target, dtype=a.dtype)
        d = m if same else load_draft(a.draft, m, t, dtype=a.dtype)
        k = a.draft_tokens
        for label, text, mt in [("code editing", CODE_PROMPT, a.code_max_tokens), ("chat", CHAT_PROMPTS[0], a.chat_max_tokens)][:a.mlx_lm_prompts]:
            ids = chat_ids(t, text)
            bench(f"{label} vs mlx-lm, draft model, k={k}, greedy", {
                "mlx-lm draft": mlx_lm_run(m_ref, t_ref, ids, mt, draft_model=d_ref, num_draft_tokens=k),
                "qwen_mlx draft": ours(m, t, ids, mt, draft_model=d, num_draft_tokens=k),
                f"qwen_mlx draft + lookup n={a.ngram}": ours(m, t, ids, mt, draft_model=d, num_draft_tokens=k,
                                                              prompt_lookup=a.ngram),
            }, a.rounds)


if __name__ == "__main__":
    main()
