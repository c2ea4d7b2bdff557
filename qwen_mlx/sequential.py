"""A one-sequence-at-a-time generation engine with the interface of `qwen_mlx.batch.BatchGenerator`.

The server's scheduler drives an engine through `insert` / `remove` / `step` / `has_work`
(see docs/server.md). This engine runs the waiting sequences one after another, first come first
served, each through `stream_generate`; `step` advances the running one by one token. It is the
stand-in for the batched engine: same calls, same responses, no batching.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

from .generation import stream_generate


@dataclass
class BatchResponse:
    uid: int
    token: int
    text: str
    logprob: float
    top_logprobs: Optional[list]
    finish_reason: Optional[str]
    prompt_tokens: int
    generation_tokens: int
    cache: Optional[list] = None


class SequentialGenerator:
    def __init__(self, model, tokenizer, *, max_batch: int = 1, prefill_step_size: int = 2048):
        self.model, self.tokenizer, self.prefill_step_size = model, tokenizer, prefill_step_size
        self._uids = itertools.count()
        self._waiting: OrderedDict[int, dict] = OrderedDict()
        self._running = None  # (uid, generator, cache, tokens the cache held at the start, return_cache)

    def insert(self, prompt: list[int], *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, repetition_penalty: Optional[float] = None,
               seed: Optional[int] = None, stop: Sequence[str] = (), top_logprobs: int = 0,
               cache: Optional[list] = None, return_cache: bool = False) -> int:
        uid = next(self._uids)
        self._waiting[uid] = dict(prompt=list(prompt), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                  stop=tuple(stop), top_logprobs=top_logprobs, cache=cache, return_cache=return_cache)
        return uid

    def remove(self, uid: int) -> None:
        self._waiting.pop(uid, None)
        if self._running and self._running[0] == uid:
            self._running[1].close()
            self._running = None

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def step(self) -> list[BatchResponse]:
        if self._running is None:
            if not self._waiting:
                return []
            uid, kw = self._waiting.popitem(last=False)
            cache = kw.pop("cache") or self.model.make_cache()
            want_cache = kw.pop("return_cache")
            gen = stream_generate(self.model, self.tokenizer, kw.pop("prompt"), cache=cache,
                                  prefill_step_size=self.prefill_step_size, **kw)
            self._running = (uid, gen, cache, cache[0].offset, want_cache)
        uid, gen, cache, start, want_cache = self._running
        try:
            r = next(gen, None)
        except BaseException:
            self._running = None
            raise
        if r is None:  # stream_generate always ends with a finishing response; this is a safeguard
            self._running = None
            return []
        out = BatchResponse(uid, r.token, r.text, r.logprob, r.top_logprobs, r.finish_reason,
                            r.prompt_tokens, r.generation_tokens)
        if r.finish_reason is not None:
            gen.close()
            self._running = None
            if want_cache:
                # The decode loop may have fed the last token already; the contract: all but the last.
                excess = cache[0].offset - (start + r.prompt_tokens + r.generation_tokens - 1)
                for c in cache:
                    c.trim(max(excess, 0))
                out.cache = cache
        return [out]
