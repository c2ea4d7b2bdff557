"""Text generation: `generate_step` (tokens) and `stream_generate` / `generate` (text).

The decode loop keeps one step in flight: while the host hands token t to the
caller, the GPU already computes token t+1 (`mx.async_eval`). Sampling and the
repetition penalty are mlx-lm's (`make_sampler`, `make_logits_processors`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator, List, Optional, Sequence, Union

from . import _blas  # noqa: F401  (before mlx.core)
import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .kv_cache import DEFAULT_QUANTIZED_KV_START, CacheOptions, cache_options, maybe_quantize, new_cache
from .logprobs import log_softmax  # noqa: F401  (re-exported)
from .speculative import SpecStats, speculative_generate_step


@dataclass
class GenerationResponse:
    text: str  # the new text segment (may be empty while a multi-byte character is incomplete)
    token: int
    logprob: float  # log-probability of `token` under the (processed) model distribution
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None  # "stop" (EOS or stop string), "length", or None while going
    top_logprobs: Optional[list] = None  # [(token, logprob)] of the k most likely, when asked for
    spec_proposed: Optional[int] = None  # speculative decoding only: proposals verified so far,
    spec_accepted: Optional[int] = None  # how many of them the target accepted,
    spec_forwards: Optional[int] = None  # and target forward passes (tokens per forward: generation_tokens / this)


class TextStream:
    """The text of one generated sequence, token by token: UTF-8 safe (the tokenizer's streaming
    detokenizer), stopping at EOS tokens and at stop strings (cut before the string; a tail that
    could still grow into one is held back until it cannot)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.eos = set(tokenizer.eos_token_ids)
        self.stop = [s for s in stop if s]
        self.held = ""  # text held back because it may be the start of a stop string

    def add(self, token: int, last: bool = False) -> tuple[str, Optional[str]]:
        """The new text segment after `token`, and the finish reason: "stop" (EOS or a stop
        string), "length" when `last` (the final token allowed), else None."""
        if token in self.eos:
            self.detok.finalize()
            return self.held + self.detok.last_segment, "stop"
        self.detok.add_token(token)
        if last:
            self.detok.finalize()
        held = self.held + self.detok.last_segment
        hit = min((i for i in (held.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.held = ""
            return held[:hit], "stop"
        # emit all but the longest tail that could still grow into a stop string
        keep = 0 if last else max((k for s in self.stop for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        text, self.held = held[: len(held) - keep], held[len(held) - keep:]
        return text, "length" if last else None


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None,
    cache: Optional[list] = None,
    prefill_step_size: int = 2048,
    kv: Optional[CacheOptions] = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token, logprobs) for up to `max_tokens` new tokens after the 1-D `prompt`.

    The prompt is prefilled in chunks of `prefill_step_size`; `cache` (from
    `model.make_cache()`) may already hold earlier tokens and is extended.
    `kv` (`qwen_mlx.kv_cache.cache_options`): quantized or rotating KV cache.
    """
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    cache = cache if cache is not None else new_cache(model, kv)
    tokens = prompt if logits_processors else None

    def step(y):
        nonlocal tokens
        logits = model(y[None], cache=cache, last_only=True)[:, -1, :]
        maybe_quantize(cache, kv)
        if logits_processors:
            for proc in logits_processors:
                logits = proc(tokens, logits)
        logprobs = log_softmax(logits)
        t = sampler(logprobs)
        if logits_processors:
            tokens = mx.concatenate([tokens, t])
        return t, logprobs.squeeze(0)

    y = prompt
    while y.size > prefill_step_size:
        model(y[:prefill_step_size][None], cache=cache)
        maybe_quantize(cache, kv)
        mx.eval([c.state for c in cache])
        y = y[prefill_step_size:]
        mx.clear_cache()
    y, logprobs = step(y)
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs


def _context_length(model) -> int:
    """max_position_embeddings, or YaRN's factor x original context when larger (as vLLM does)."""
    args, rs = model.args, model.args.rope_scaling or {}
    if (rs.get("type") or rs.get("rope_type")) == "yarn":
        return max(args.max_position_embeddings,
                   int(rs["factor"] * rs.get("original_max_position_embeddings", args.max_position_embeddings)))
    return args.max_position_embeddings


def encode_prompt(tokenizer, prompt: Union[str, Sequence[int]]) -> list[int]:
    return [int(t) for t in prompt] if not isinstance(prompt, str) else tokenizer.encode(prompt, add_special_tokens=False)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    cache: Optional[list] = None,
    top_logprobs: int = 0,
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    max_kv_size: Optional[int] = None,
    draft_model=None,
    num_draft_tokens: int = 3,
    prompt_lookup: int = 0,
) -> Generator[GenerationResponse, None, None]:
    """Stream the continuation of `prompt` (a string, used as is, or token ids).

    Greedy when temperature is 0. Stops at the model's EOS tokens, at any of the
    `stop` strings (which are not included in the text), at `max_tokens`, or at
    the model's context length. Pass `cache=model.make_cache()` to keep the KV
    cache across calls (the prompt is then only the new tokens).
    `kv_bits` / `kv_group_size` / `quantized_kv_start` quantize the KV cache and `max_kv_size`
    makes it a rotating window, as in mlx-lm (`qwen_mlx.kv_cache.cache_options`).

    Speculative decoding (same output distribution, see `qwen_mlx.speculative`): `draft_model`
    (a loaded model sharing the tokenizer) proposes `num_draft_tokens` tokens per target
    forward; `prompt_lookup=n` proposes them from the latest n-gram's earlier occurrence. With a
    draft model, a reused `cache` is the target's layers then the draft's.
    """
    kv = cache_options(kv_bits, kv_group_size, quantized_kv_start, max_kv_size)
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    used = (cache[0].offset if cache else 0) + len(ids)
    limit = _context_length(model)
    if used > limit:
        raise ValueError(f"the prompt has {used} tokens, over the model's context of {limit} tokens")
    max_tokens = min(max_tokens, limit - used)
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=0.0 if top_p >= 1.0 else top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else None
    text_stream = TextStream(tokenizer, stop)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps, n = 0.0, 0

    def response(text, token, logprobs, finish):
        gen_time = time.perf_counter() - tic
        top = None
        if top_logprobs:
            idx = mx.argpartition(-logprobs, top_logprobs - 1)[:top_logprobs]
            top = sorted(zip(idx.tolist(), logprobs[idx].tolist()), key=lambda t: -t[1])
        return GenerationResponse(text, token, logprobs[token].item(), len(ids), prompt_tps, n,
                                  n / gen_time if gen_time > 0 else 0.0, mx.get_peak_memory() / 1e9, finish, top,
                                  *((spec.proposed, spec.accepted, spec.forwards) if spec is not None else ()))

    spec = SpecStats() if draft_model is not None or prompt_lookup else None
    if spec is not None:
        if kv.kv_bits is not None or kv.max_kv_size is not None:
            raise ValueError("speculative decoding needs the full-precision KV cache (no kv_bits or max_kv_size)")
        gen = speculative_generate_step(
            ids, model, draft_model=draft_model, num_draft_tokens=num_draft_tokens, prompt_lookup=prompt_lookup,
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            logits_processors=processors, cache=cache, prefill_step_size=prefill_step_size, stats=spec)
    else:
        gen = generate_step(mx.array(ids, mx.uint32), model, max_tokens=max_tokens, sampler=sampler,
                            logits_processors=processors, cache=cache, prefill_step_size=prefill_step_size, kv=kv)
    for token, logprobs in gen:
        if n == 0:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        n += 1
        text, finish = text_stream.add(token, last=n == max_tokens)
        yield response(text, token, logprobs, finish)
        if finish:
            return


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """The whole continuation as a string (kwargs as for `stream_generate`)."""
    text = ""
    for r in stream_generate(model, tokenizer, prompt, **kwargs):
        text += r.text
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
    return text
