"""Sliding-window perplexity, and batched forward passes over prompts of different lengths.

    python -m qwen_mlx.perplexity --model PATH --file TEXT [--context 512] [--stride S] [--dtype D]

The windows are Hugging Face's recipe ("Perplexity of fixed-length models"): windows of
`context` tokens starting every `stride` tokens; each window scores only the tokens no earlier
window scored, each conditioned on everything before it in its window. With stride < context
every token but the first is scored exactly once (with stride == context, the first token of
each window has no context and is skipped, as in that recipe); perplexity = exp(mean NLL).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import _blas  # noqa: F401  (before mlx.core)
import mlx.core as mx
import numpy as np

from .generation import log_softmax  # noqa: F401  (re-exported: the accurate float32 log-softmax)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), not {stride}")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


def token_nlls(model, tokens: Sequence[int], context: int = 512, stride: Optional[int] = None,
               progress: bool = False) -> np.ndarray:
    """Negative log-likelihood (nats) of each token the sliding windows score (see `windows`)."""
    from tqdm import tqdm

    tokens = [int(t) for t in tokens]
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to score")
    nlls = []
    for begin, end, first in tqdm(windows(len(tokens), context, stride or context // 2),
                                  desc="perplexity", unit="window", disable=not progress):
        logprobs = log_softmax(model(mx.array([tokens[begin:end]]))[0, first - begin - 1: end - begin - 1])
        nlls.append(-np.array(mx.take_along_axis(logprobs, mx.array(tokens[first:end])[:, None], axis=-1)[:, 0]))
    return np.concatenate(nlls)


def perplexity(model, tokens: Sequence[int], context: int = 512, stride: Optional[int] = None,
               progress: bool = False) -> float:
    """exp(mean NLL) of tokens[1:] with the sliding windows (stride defaults to context // 2)."""
    return float(np.exp(token_nlls(model, tokens, context, stride, progress).astype(np.float64).mean()))


def padding_mask(lengths: Sequence[int]) -> mx.array:
    """Boolean attention mask [B, 1, L, L] (True = may attend) for left-padded rows: causal, and
    hiding each row's pad keys. A pad query sees only itself (its output is thrown away; an
    all-hidden row would give NaN)."""
    L = max(lengths)
    pad = mx.array([L - n for n in lengths])[:, None, None, None]
    i, j = mx.arange(L)[:, None], mx.arange(L)[None]
    return ((j <= i) & (j >= pad)) | (i == j)


def batch_logits(model, prompts: Sequence[Sequence[int]], pad_id: int = 0) -> list[mx.array]:
    """One forward over prompts of different lengths -> their logits, [L_i, vocab] each.

    Rows are left-padded and masked with `padding_mask`. Real tokens then sit at positions
    shifted by the row's padding; RoPE makes attention scores depend only on relative
    positions, so the result equals running each prompt alone (up to rounding).
    """
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    tokens = mx.array([[pad_id] * (L - len(p)) + [int(t) for t in p] for p in prompts])
    logits = model(tokens, mask=padding_mask(lengths))
    return [logits[b, L - n:] for b, n in enumerate(lengths)]


def main(argv=None) -> int:
    from .loader import DTYPES, load

    ap = argparse.ArgumentParser(prog="python -m qwen_mlx.perplexity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a .gguf file or converted model directory (default: the default model)")
    ap.add_argument("--file", required=True, help="a UTF-8 text file")
    ap.add_argument("--context", type=int, default=512, help="window length in tokens (default 512)")
    ap.add_argument("--stride", type=int, help="window step in tokens (default context // 2)")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on a CPU, bfloat16 on a GPU")
    args = ap.parse_args(argv)
    stride = args.stride or args.context // 2
    try:
        if args.context < 2:
            raise ValueError(f"--context must be at least 2, not {args.context}")
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
        model, tokenizer = load(args.model, args.dtype)
        if args.context > model.args.max_position_embeddings:
            raise ValueError(f"--context {args.context} is over the model's {model.args.max_position_embeddings}")
        tokens = tokenizer.encode(text, add_special_tokens=False)
        nlls = token_nlls(model, tokens, args.context, stride, progress=True)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"perplexity {np.exp(nlls.astype(np.float64).mean()):.4f}  (mean NLL {nlls.mean():.4f} nats over "
          f"{nlls.size} tokens; context {args.context}, stride {stride})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
