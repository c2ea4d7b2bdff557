"""Speculative decoding: draft proposals, one target forward to verify them, exact acceptance.

A round proposes up to k tokens, from the prompt-lookup n-gram index (`PromptLookup`: the tokens
that followed the latest n-gram's most recent earlier occurrence in the prompt or the output) or,
where lookup finds nothing, from a draft model sharing the target's vocabulary. The target then
runs ONE forward over [last accepted token, proposals...] and gets its distribution p_i at every
proposal and one past them. Acceptance keeps the target's output distribution exactly:

- greedy (temperature 0): accept proposal i while it equals argmax p_i; the first mismatch is
  replaced by argmax p_i, and if all match the target's next argmax is a bonus token. The output
  is plain greedy decoding's.
- sampling: speculative sampling. Proposal x_i drawn from q_i is accepted with probability
  min(1, p_i(x_i) / q_i(x_i)); the first rejected one is replaced by a sample from the residual
  normalize(max(0, p_i - q_i)); all accepted: a bonus token from p_{k+1}. Prompt-lookup proposals
  are deterministic (q_i a point mass on x_i): accept with probability p_i(x_i), else sample from
  p_i with x_i removed. p and q are the distributions the plain sampler draws from
  (`logprobs.sampling_logprobs`: repetition penalty with each position's own token history,
  then top-p / min-p / top-k, then temperature).

Rejected tokens are trimmed from the target's and the draft's KV caches (mlx-lm's
`trim_prompt_cache`) before any token of the round is handed out, so the caches stay consistent
however early the consumer stops. `SpecStats` counts proposals, acceptances and target forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, List, Optional, Sequence, Union

from . import _blas  # noqa: F401  (before mlx.core)
import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .logprobs import log_softmax, sampling_logprobs


@dataclass
class SpecStats:
    proposed: int = 0  # proposals sent to the target for verification
    accepted: int = 0  # proposals the target accepted
    forwards: int = 0  # target forward passes that produced tokens (one per round)
    lookup_rounds: int = 0  # rounds whose proposals came from prompt lookup
    draft_rounds: int = 0  # rounds whose proposals came from the draft model


class PromptLookup:
    """Proposals from earlier text: the tokens after the most recent earlier occurrence of the
    sequence's last `ngram` tokens. The n-gram index grows with the sequence (append only)."""

    def __init__(self, ngram: int):
        if ngram < 1:
            raise ValueError(f"prompt_lookup (the n-gram size) must be >= 1, got {ngram}")
        self.n = ngram
        self.index: dict = {}  # n-gram -> start of its latest occurrence that has a successor
        self.indexed = 0  # n-grams starting before this position are in the index

    def propose(self, seq: Sequence[int], k: int) -> list[int]:
        n, end = self.n, len(seq)
        for i in range(self.indexed, end - n):  # n-grams followed by at least one token
            self.index[tuple(seq[i:i + n])] = i
        self.indexed = max(self.indexed, end - n)
        i = self.index.get(tuple(seq[end - n:])) if end > n else None
        return [] if i is None or k <= 0 else list(seq[i + n:i + n + k])


def check_draft(model, tokenizer, draft_model, draft_tokenizer=None) -> None:
    """Raise ValueError (one line) unless the draft can propose tokens in the target's vocabulary:
    the same token strings at the same ids (when its tokenizer is given), and logit widths that
    cover the tokenizer (Qwen2.5 pads its logits: 151936 at 0.5B-3B, 152064 at 7B and up)."""
    n = len(tokenizer.get_vocab())
    vt, vd = model.args.vocab_size, draft_model.args.vocab_size
    if draft_tokenizer is not None:
        a, b = tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()), key=lambda t: t[1])
            tok, i = diff[0]
            raise ValueError(f"the draft model's vocabulary differs from the target's ({len(b)} vs {len(a)} tokens; "
                             f"first difference at id {i}: {tok!r})")
    if n > min(vt, vd):
        raise ValueError(f"the draft model's vocabulary does not fit the target's (logit widths {vd} and {vt}, "
                         f"tokenizer {n} tokens)")


def load_draft(path: Union[str, Path], model, tokenizer, dtype=None, quantized=None):
    """Load a draft model (a GGUF file or a converted directory) and check it against the target.
    The kernel table (process-wide) stays the target's."""
    from .loader import load

    draft, draft_tokenizer = load(path, dtype=dtype, quantized=quantized, kernel_table=False)
    check_draft(model, tokenizer, draft, draft_tokenizer)
    return draft


def _prefill(model, cache, ids: list[int], step: int) -> None:
    for i in range(0, len(ids), step):  # only the cache is evaluated: the rest of the graph never runs
        model(mx.array(ids[i:i + step], mx.uint32)[None], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def _fit(logits: mx.array, width: int) -> mx.array:
    """Draft logits cropped or -inf padded to the target's width (the ids past the tokenizer
    are padding in Qwen2.5: never real tokens)."""
    w = logits.shape[-1]
    if w > width:
        return logits[..., :width]
    if w < width:
        return mx.pad(logits, [(0, 0)] * (logits.ndim - 1) + [(0, width - w)], constant_values=-float("inf"))
    return logits


def speculative_generate_step(
    prompt: Sequence[int],
    model,
    *,
    draft_model=None,
    num_draft_tokens: int = 3,
    prompt_lookup: int = 0,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    logits_processors: Optional[List[Callable]] = None,
    cache: Optional[list] = None,
    prefill_step_size: int = 2048,
    stats: Optional[SpecStats] = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token, logprobs) for up to `max_tokens` tokens after `prompt`, like
    `generation.generate_step`, from speculative rounds. `logprobs` is the target's processed
    log-softmax at that position (the same vector plain decoding reports). `cache`, if given, is
    the target's per-layer cache followed by the draft's (mlx-lm's convention), both holding the
    same earlier tokens. `stats` (a SpecStats) is updated in place."""
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if draft_model is None and not prompt_lookup:
        raise ValueError("speculative decoding needs a draft model or prompt_lookup")
    lookup = PromptLookup(prompt_lookup) if prompt_lookup else None
    stats = stats if stats is not None else SpecStats()
    nt = len(model.layers)
    reused = cache is not None
    cache = cache if cache is not None else model.make_cache() + (draft_model.make_cache() if draft_model else [])
    tcache, dcache = cache[:nt], cache[nt:]
    if draft_model is not None and len(dcache) != len(draft_model.layers):
        raise ValueError(f"cache has {len(cache)} layers; expected the target's {nt} then the draft's "
                         f"{len(draft_model.layers)}")
    if not can_trim_prompt_cache(cache):
        raise ValueError("speculative decoding needs a trimmable KV cache")
    width = model.args.vocab_size
    greedy = temperature <= 0
    seq = [int(t) for t in prompt]  # the ids given, then every accepted token
    # Invariant at each round's start: the target cache holds seq[:-1]; the draft cache seq[:dpos].
    _prefill(model, tcache, seq[:-1], prefill_step_size)
    dpos = 0
    if draft_model is not None:
        _prefill(draft_model, dcache, seq[:-1], prefill_step_size)
        dpos = len(seq) - 1

    def process(rows: mx.array, history: list[mx.array]) -> mx.array:
        """Logits processors per row with that row's own token history, then log-softmax."""
        if logits_processors:
            out = []
            for i, h in enumerate(history):
                row = rows[i:i + 1]
                for proc in logits_processors:
                    row = proc(h, row)
                out.append(row)
            rows = mx.concatenate(out)
        return log_softmax(rows)

    def draft(k: int):
        """k proposals from the draft model, with the log-distributions they were sampled from."""
        nonlocal dpos
        x = mx.array(seq[dpos:], mx.uint32)
        hist = mx.array(seq, mx.uint32)
        toks, qs = [], []
        for _ in range(k):
            logits = _fit(draft_model(x[None], cache=dcache, last_only=True)[:, -1], width)
            lp = process(logits, [hist])
            if greedy:
                t = mx.argmax(lp, axis=-1)
            else:
                q = sampling_logprobs(lp, temperature, top_p, top_k, min_p)
                t = mx.random.categorical(q)
                qs.append(q)
            mx.async_eval(t)
            toks.append(t)
            x, hist = t, mx.concatenate([hist, t])
        dpos = len(seq) + k - 1
        return mx.concatenate(toks), (mx.concatenate(qs) if qs else None)

    def settle() -> None:
        """Trim the draft cache back to the accepted sequence (seq[:-1])."""
        nonlocal dpos
        if draft_model is not None and dpos > len(seq) - 1:
            trim_prompt_cache(dcache, dpos - (len(seq) - 1))
            dpos = len(seq) - 1

    emitted = 0
    # Lookup proposals are as long as the last lookup round earned: a miss at position j makes the
    # next lookup propose j + 1 tokens, a full match doubles it (up to num_draft_tokens). Failed
    # lookups (frequent in free text) then verify 1-2 tokens, not num_draft_tokens + 1.
    look_k = num_draft_tokens
    try:
        while emitted < max_tokens:
            k = min(num_draft_tokens, max_tokens - emitted - 1)
            props, dtoks, qlog = [], None, None
            if lookup is not None and k > 0:
                props = lookup.propose(seq, min(k, look_k))
                if props:
                    stats.lookup_rounds += 1
                    dtoks = mx.array(props, mx.uint32)
            if not props and draft_model is not None and k > 0:
                dtoks, qlog = draft(k)
                stats.draft_rounds += 1
            kk = 0 if dtoks is None else dtoks.size
            x = mx.array(seq[-1:], mx.uint32)
            if kk:
                x = mx.concatenate([x, dtoks])
            logits = model(x[None], cache=tcache, last_only=kk == 0)[0]
            hist = [mx.array(seq, mx.uint32)]
            for i in range(kk):
                hist.append(mx.concatenate([hist[-1], dtoks[i:i + 1]]))
            lp = process(logits, hist)  # [kk + 1, vocab]: the target's processed log-probabilities
            if greedy:
                choice = mx.argmax(lp, axis=-1)
                mx.eval(choice, *([dtoks] if kk else []))
                choice, d = choice.tolist(), (dtoks.tolist() if kk else [])
                n = next((i for i in range(kk) if d[i] != choice[i]), kk)
                new = d[:n] + [choice[n]]
            else:
                n, new = _accept(lp, dtoks, qlog, kk, temperature, top_p, top_k, min_p)
            stats.proposed += kk
            stats.accepted += n
            if props:  # a lookup round: adapt the next one's length
                look_k = min(num_draft_tokens, 2 * look_k) if n == kk else n + 1
            stats.forwards += 1
            trim_prompt_cache(tcache, kk - n)  # the target holds seq[-1] and the accepted proposals
            seq.extend(new)
            settle()
            for i, t in enumerate(new):
                if emitted == max_tokens:
                    return
                emitted += 1
                yield t, lp[i]
    finally:
        if reused and draft_model is not None and dpos < len(seq) - 1:  # leave both caches at seq[:-1]
            _prefill(draft_model, dcache, seq[dpos:-1], prefill_step_size)


def residual(p: mx.array, q: mx.array) -> mx.array:
    """Where a rejected proposal is resampled from: max(0, p - q) (categorical normalizes it).
    p == q leaves no mass, but then rejection has probability 0 too: fall back to p."""
    r = mx.maximum(p - q, 0.0)
    return mx.where(r.sum(-1, keepdims=True) > 0, r, p)


def _accept(lp: mx.array, dtoks, qlog, kk: int, temperature, top_p, top_k, min_p) -> tuple[int, list[int]]:
    """Speculative sampling over one verified block: returns (accepted count, new tokens).

    lp: the target's processed log-probs at the kk + 1 positions; dtoks: the kk proposals;
    qlog: the draft's sampling log-distributions [kk, vocab], or None for deterministic
    (prompt-lookup) proposals, whose q is a point mass. All random draws of the round are made
    up front (independent of each other), then the first rejection picks which are used.
    """
    plog = sampling_logprobs(lp, temperature, top_p, top_k, min_p)  # the distribution plain sampling draws from
    bonus = mx.random.categorical(plog[kk:])
    if kk == 0:
        return 0, [bonus.item()]
    p = mx.exp(plog[:kk])
    rows = mx.arange(kk)
    pd = p[rows, dtoks]
    if qlog is None:
        q = (mx.arange(p.shape[-1])[None] == dtoks[:, None]).astype(p.dtype)
    else:
        q = mx.exp(qlog)
    qd = q[rows, dtoks]
    u = mx.random.uniform(shape=(kk,))
    accept = u * qd < pd  # u < p/q, without dividing
    resample = mx.random.categorical(mx.log(residual(p, q)))
    mx.eval(accept, resample, bonus, dtoks)
    accept, resample, d = accept.tolist(), resample.tolist(), dtoks.tolist()
    n = next((i for i in range(kk) if not accept[i]), kk)
    return n, d[:n] + [resample[n] if n < kk else bonus.item()]
