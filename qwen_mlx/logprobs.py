"""Log-probabilities: the accurate float32 log-softmax and the distribution a sampler draws from.

`log_softmax` is what generation reports and samples from (exact to ~1e-6 over Qwen's 152k
vocabulary). `sampling_logprobs` turns those (processed) log-probabilities into the log of the
distribution that mlx-lm's `make_sampler` with the same settings draws from: its top-p, min-p
and top-k masks in `make_sampler`'s order, then the temperature. Speculative decoding needs that
distribution explicitly (acceptance ratios p/q and residuals), where plain decoding only samples.
"""

from __future__ import annotations

from . import _blas  # noqa: F401  (before mlx.core)
import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


def log_softmax(logits: mx.array, block: int = 256) -> mx.array:
    """float32 log-softmax over the last axis, exact to ~1e-6 even for a 152k vocabulary.

    On the CPU the exponentials are summed in blocks of `block`, then the block sums: MLX's CPU
    reduction accumulates one float32 sum sequentially, and `mx.logsumexp` over Qwen's 151936
    logits is off by up to ~1e-3 (perplexity by ~0.03%); blocked, the error is ~1e-6. A GPU's
    `mx.logsumexp` reduces in parallel (a few hundred terms per thread, then a tree) and is as
    exact, in one launch instead of the blocked version's seven: at 0.5B a decode step is bound by
    the host's per-launch work, so the difference counts there.
    """
    x = logits.astype(mx.float32)
    if mx.default_device() == mx.gpu:
        return x - mx.logsumexp(x, axis=-1, keepdims=True)
    x = x - mx.stop_gradient(x.max(axis=-1, keepdims=True))
    e = mx.exp(x)
    if pad := -x.shape[-1] % block:
        e = mx.pad(e, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    s = e.reshape(*e.shape[:-1], -1, block).sum(-1).sum(-1, keepdims=True)
    return x - mx.log(s)


def sampling_logprobs(logprobs: mx.array, temperature: float, top_p: float = 1.0, top_k: int = 0,
                      min_p: float = 0.0) -> mx.array:
    """log of the distribution `make_sampler(temp=temperature, top_p, min_p, top_k)` samples from,
    given the processed `logprobs` [..., vocab] it would be called with (temperature > 0).

    make_sampler masks with top-p (when 0 < top_p < 1), then min-p, then top-k, and draws from
    `categorical(masked / temperature)`; this returns `log_softmax(masked / temperature)`.
    """
    if temperature <= 0:
        raise ValueError("sampling_logprobs needs temperature > 0 (greedy has no distribution to match)")
    x = logprobs
    if 0 < top_p < 1.0:
        x = apply_top_p(x, top_p)
    if min_p != 0.0:
        x = apply_min_p(x, min_p, 1)
    if top_k > 0:
        x = apply_top_k(x, top_k)
    return log_softmax(x * (1.0 / temperature))
