"""Perplexity (a sliding window, or llama.cpp's chunks), and batched forward passes over prompts
of different lengths.

    python -m qwen_mlx.perplexity --model PATH --file TEXT [--context 512] [--stride S] [--dtype D]
    python -m qwen_mlx.perplexity --model PATH --file TEXT --llama-cpp [--context 512]

The windows (default) are Hugging Face's recipe ("Perplexity of fixed-length models"): windows
of `context` tokens starting every `stride` tokens; each window scores only the tokens no earlier
window scored, each conditioned on everything before it in its window. With stride < context
every token but the first is scored exactly once (with stride == context, the first token of
each window has no context and is skipped, as in that recipe); perplexity = exp(mean NLL).

`--llama-cpp` is llama.cpp's `llama-perplexity` (tools/perplexity/perplexity.cpp, `perplexity()`),
the number people publish: the tokens are cut into non-overlapping chunks of `context` tokens
(a tail shorter than a chunk is dropped); in each chunk, evaluated on its own, the tokens at
positions context//2 + 1 .. context - 1 are scored (context - 1 - context//2 per chunk). A BOS
token replaces each chunk's first token only where the tokenizer adds one (Qwen's does not). The
± is llama.cpp's too: ppl * sqrt(var(NLL) / (count - 1)).
"""

from __future__ import annotations

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


def chunks(n: int, context: int) -> list[tuple[int, int, int]]:
    """llama.cpp's chunks over n tokens, as (begin, end, first scored position) like `windows`."""
    if context < 2:
        raise ValueError(f"the context must be at least 2 tokens, not {context}")
    if n < context:
        raise ValueError(f"need at least one chunk of {context} tokens, have {n}")
    return [(c * context, (c + 1) * context, c * context + context // 2 + 1) for c in range(n // context)]


def chunk_nlls(model, tokens: Sequence[int], context: int = 512, bos: Optional[int] = None,
               progress: bool = False) -> np.ndarray:
    """Negative log-likelihood (nats) of each token llama.cpp's `llama-perplexity` scores (see
    `chunks`); `bos`, if given, replaces the first token of every chunk (llama.cpp does that when
    the vocabulary adds a BOS token)."""
    from tqdm import tqdm

    tokens = [int(t) for t in tokens]
    nlls = []
    for begin, end, first in tqdm(chunks(len(tokens), context), desc="perplexity", unit="chunk",
                                  disable=not progress):
        chunk = tokens[begin:end]
        if bos is not None:
            chunk[0] = bos
        logprobs = log_softmax(model(mx.array([chunk]))[0, first - begin - 1: end - begin - 1])
        nlls.append(-np.array(mx.take_along_axis(logprobs, mx.array(chunk[first - begin:])[:, None], axis=-1)[:, 0]))
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


def added_bos(tokenizer) -> Optional[int]:
    """The BOS id when the tokenizer prepends one to plain text (llama.cpp's add_bos), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    plain, special = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a", add_special_tokens=True)
    return bos if bos is not None and special[:1] == [bos] and plain[:1] != [bos] else None


def main(argv=None) -> int:
    from .cli import ArgumentParser, runtime_error
    from .loader import DTYPES, load

    ap = ArgumentParser(prog="python -m qwen_mlx.perplexity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a .gguf file or converted model directory (default: the default model)")
    ap.add_argument("--file", required=True, help="a UTF-8 text file")
    ap.add_argument("--context", type=int, default=512, help="window or chunk length in tokens (default 512)")
    ap.add_argument("--stride", type=int, help="window step in tokens (default context // 2)")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="llama.cpp's llama-perplexity: non-overlapping chunks, each scored on its second half")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on a CPU, bfloat16 on a GPU")
    args = ap.parse_args(argv)
    if args.context < 2:
        ap.error(f"--context must be at least 2, not {args.context}")
    if args.llama_cpp and args.stride is not None:
        ap.error("--stride does not apply to --llama-cpp (its chunks do not overlap)")
    stride = args.stride or args.context // 2
    if not args.llama_cpp and not 1 <= stride <= args.context:
        ap.error(f"--stride must be between 1 and the context ({args.context}), not {stride}")
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
        model, tokenizer = load(args.model, args.dtype)
        if args.context > model.args.max_position_embeddings:
            raise ValueError(f"--context {args.context} is over the model's {model.args.max_position_embeddings}")
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if args.llama_cpp:
            nlls = chunk_nlls(model, tokens, args.context, added_bos(tokenizer), progress=True)
        else:
            nlls = token_nlls(model, tokens, args.context, stride, progress=True)
    except (OSError, ValueError) as e:
        return runtime_error(e)
    nll = nlls.astype(np.float64)
    ppl = float(np.exp(nll.mean()))
    if args.llama_cpp:
        err = ppl * np.sqrt(max(nll.var(), 0.0) / max(nll.size - 1, 1))
        print(f"perplexity {ppl:.4f} +/- {err:.4f}  (mean NLL {nll.mean():.4f} nats over {nll.size} tokens; "
              f"llama.cpp chunks: {len(tokens) // args.context} of {args.context} tokens, second halves scored)")
    else:
        print(f"perplexity {ppl:.4f}  (mean NLL {nll.mean():.4f} nats over {nll.size} tokens; "
              f"context {args.context}, stride {stride})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
