"""Batched generation: many sequences decoded together, joining and leaving a running batch.

    from qwen_mlx import batch_generate
    out = batch_generate(model, tokenizer, ["Write quicksort.", "Name three primes."], max_tokens=64)
    out.texts, out.tokens, out.logprobs, out.finish_reasons, out.stats

    gen = BatchGenerator(model, tokenizer, max_batch=32)     # continuous batching, one step at a time
    uid = gen.insert(tokenizer.encode("def f("), max_tokens=64, temperature=0.7, seed=1)
    while gen.has_work():
        for r in gen.step(): ...                             # a BatchResponse per sequence and token

The ideas are mlx-lm's BatchGenerator, the cache is mlx-lm's BatchKVCache:
- Waiting sequences are prefilled in groups of up to `prefill_batch`: all prompt tokens but the
  last, right-padded, one chunk of `prefill_step_size` columns per `step()`, so the running
  sequences wait at most one chunk. The group's per-layer BatchKVCache is merged from each
  sequence's prefix cache (if any); `finalize()` then moves the right padding to the left.
- The group joins the decode batch (`BatchKVCache.extend`); its last prompt tokens are its rows'
  first decode inputs. Each row has its own RoPE position (`BatchKVCache.offset`, a [B] array,
  taken by `K.qkv_post`) and the attention mask hides each row's left padding (`make_mask`).
- A decode step launches the forward of the next tokens (`mx.async_eval`) before it reads back the
  previous step's tokens and turns them into text, so host work overlaps the device's.
- Rows that finish (EOS, stop string, max_tokens, context) are dropped and the cache compacted
  (`BatchKVCache.filter`), so a long straggler does not carry dead rows.
- Sampling per row: mlx-lm's top-p / min-p / top-k filters, then categorical sampling with the
  row's own PRNG key (`mx.random.key(seed)`, split once per token, as `mx.random.seed(seed)` does
  for `stream_generate`): a seeded sequence's tokens do not depend on the rest of the batch.
  Greedy rows share one argmax. Repetition penalty: mlx-lm's processor on each row's history.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from . import _blas  # noqa: F401  (before mlx.core)
import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from .generation import TextStream, _context_length, encode_prompt, log_softmax


@dataclass
class BatchResponse:
    uid: int
    token: int                 # the new token id (for a finished sequence: the last token)
    text: str                  # new text segment (UTF-8 safe, stop strings held back / cut)
    logprob: float             # log-probability of `token` under the processed distribution
    top_logprobs: Optional[list]  # [(token, logprob)] of the k most likely, if asked for
    finish_reason: Optional[str]  # None while going, "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    generation_tokens: int
    cache: Optional[list] = None  # finishing response of insert(..., return_cache=True): the per-layer
                                  # KVCache of prompt + generated tokens except the last


@dataclass
class BatchStats:
    prompt_tokens: int = 0
    prompt_time: float = 0.0      # s in prefill (chunks and each group's first forward)
    generation_tokens: int = 0
    generation_time: float = 0.0  # s in decode steps
    peak_memory: float = 0.0      # GB

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time else 0.0


class _Seq:
    """One sequence: its settings, sampler state and text stream."""

    def __init__(self, uid, prompt, tokenizer, *, prefix, max_tokens, temperature, top_p, top_k, min_p,
                 repetition_penalty, seed, stop, top_logprobs, return_cache):
        self.uid, self.prompt, self.prefix, self.return_cache = uid, prompt, prefix, return_cache
        self.prompt_tokens = (prefix[0].offset if prefix else 0) + len(prompt)
        self.max_tokens, self.temperature, self.top_logprobs = max_tokens, temperature, top_logprobs
        # the chain of mlx-lm's make_sampler, in its order
        self.filters = ([lambda x: apply_top_p(x, top_p)] if 0 < top_p < 1 else []) + \
            ([lambda x: apply_min_p(x, min_p)] if min_p else []) + ([lambda x: apply_top_k(x, top_k)] if top_k > 0 else [])
        self.key = mx.random.key(seed) if temperature > 0 else None
        self.processors = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else []
        self.history = mx.array(prompt, mx.uint32) if self.processors else None
        self.text = TextStream(tokenizer, stop)
        self.n, self.done = 0, False

    def sample(self, logprobs: mx.array) -> mx.array:
        """[1, vocab] log-probabilities -> [1] token."""
        if self.key is None:
            return mx.argmax(logprobs, axis=-1)
        for f in self.filters:
            logprobs = f(logprobs)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=sub)


@dataclass
class _Out:
    """A launched decode step: per row the token, its log-probability, all log-probabilities."""
    tokens: mx.array    # [B] uint32
    logprob: mx.array   # [B] float32
    logprobs: mx.array  # [B, vocab] float32

    def take(self, idx: mx.array) -> "_Out":
        return _Out(self.tokens[idx], self.logprob[idx], self.logprobs[idx])

    @staticmethod
    def cat(a: "_Out", b: "_Out") -> "_Out":
        return _Out(*(mx.concatenate([x, y]) for x, y in ((a.tokens, b.tokens), (a.logprob, b.logprob),
                                                          (a.logprobs, b.logprobs))))


class _Group:
    """Sequences being prefilled together: right-padded prompts (but the last token), merged caches."""

    def __init__(self, model, rows: list[_Seq]):
        self.rows = rows
        prefixes = [s.prefix or model.make_cache() for s in rows]
        self.cache = [BatchKVCache.merge([p[i] for p in prefixes]) for i in range(len(prefixes[0]))]
        lengths = [len(s.prompt) - 1 for s in rows]
        self.width, self.pos = max(lengths), 0
        pad = [self.width - n for n in lengths]
        if self.width:
            self.tokens = mx.array([s.prompt[:-1] + [0] * p for s, p in zip(rows, pad)], mx.uint32)
            for c in self.cache:
                c.prepare(right_padding=pad)
        self.last = mx.array([s.prompt[-1] for s in rows], mx.uint32)


class BatchGenerator:
    """Continuous batching: `insert` sequences at any time, call `step` until `has_work()` is False.

    Not thread-safe: call it from one thread. `max_batch` bounds the decode batch; prefill runs in
    groups of up to `prefill_batch` sequences, `prefill_step_size` tokens per row and step.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 32, prefill_step_size: int = 512,
                 prefill_batch: int = 8):
        if max_batch < 1 or prefill_step_size < 1 or prefill_batch < 1:
            raise ValueError("max_batch, prefill_step_size and prefill_batch must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_step_size, self.prefill_batch = max_batch, prefill_step_size, prefill_batch
        self.waiting: deque[_Seq] = deque()
        self.group: Optional[_Group] = None
        self.rows: list[_Seq] = []           # the decode batch, in row order
        self.cache: Optional[list] = None    # its per-layer BatchKVCache
        self.out: Optional[_Out] = None      # its launched, not yet reported step
        self.stats = BatchStats()
        self._next_uid, self._steps = 0, 0

    def insert(self, prompt: Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
               repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
               stop: Sequence[str] = (), top_logprobs: int = 0, cache: Optional[list] = None,
               return_cache: bool = False) -> int:
        """Queue a sequence (token ids; with `cache`, a per-layer KVCache holding a prefix, `prompt`
        is the rest; the cache is copied, not changed) -> its uid. Settings as `stream_generate`."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
        for bad, rule in ((temperature < 0, "temperature must be >= 0"), (not 0 < top_p <= 1, "top_p must be in (0, 1]"),
                          (top_k < 0, "top_k must be >= 0"), (not 0 <= min_p < 1, "min_p must be in [0, 1)"),
                          (top_logprobs < 0, "top_logprobs must be >= 0"),
                          (repetition_penalty is not None and repetition_penalty <= 0, "repetition_penalty must be > 0")):
            if bad:
                raise ValueError(rule)
        if isinstance(stop, str):
            stop = [stop]
        used, limit = (cache[0].offset if cache else 0) + len(prompt), _context_length(self.model)
        if used >= limit:
            raise ValueError(f"the prompt has {used} tokens, leaving no room in the model's context of {limit} tokens")
        if seed is None and temperature > 0:  # drawn from MLX's global generator: mx.random.seed makes it repeatable
            seed = int(mx.random.randint(0, 2**31 - 1, ()).item())
        seq = _Seq(self._next_uid, prompt, self.tokenizer, prefix=cache, max_tokens=min(max_tokens, limit - used),
                   temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed, stop=stop, top_logprobs=top_logprobs,
                   return_cache=return_cache)
        self.waiting.append(seq)
        self._next_uid += 1
        return seq.uid

    def has_work(self) -> bool:
        return bool(self.rows or self.group or self.waiting)

    def remove(self, uid: int) -> None:
        """Cancel a sequence (no more responses); frees its rows."""
        self.waiting = deque(s for s in self.waiting if s.uid != uid)
        for s in self.group.rows if self.group else []:
            s.done |= s.uid == uid  # dropped when the group joins
        if any(s.uid == uid for s in self.rows):
            self._keep([i for i, s in enumerate(self.rows) if s.uid != uid])

    def step(self) -> list[BatchResponse]:
        """One decode step of the running sequences and/or one prefill chunk of waiting ones."""
        responses = []
        if self.rows:
            tic = time.perf_counter()
            current, self.out = self.out, self._forward(self.rows, self.out.tokens, self.cache)
            mx.async_eval(self.out.tokens, self.out.logprob)
            responses = self._report(current)
            self._keep([i for i, s in enumerate(self.rows) if not s.done])
            self.stats.generation_time += time.perf_counter() - tic
            self.stats.generation_tokens += len(responses)
        if self.group or (self.waiting and len(self.rows) < self.max_batch):
            tic = time.perf_counter()
            self._prefill()
            self.stats.prompt_time += time.perf_counter() - tic
        self._steps += 1
        if self._steps % 256 == 0:
            mx.clear_cache()
        self.stats.peak_memory = max(self.stats.peak_memory, mx.get_peak_memory() / 1e9)
        return responses

    def _forward(self, rows: list[_Seq], inputs: mx.array, cache: list) -> _Out:
        """Launch (lazily) one decode step: feed `inputs` [B], sample each row's next token."""
        logits = self.model(inputs[:, None], cache=cache, mask=cache[0].make_mask(1), last_only=True)[:, -1]
        if any(s.processors for s in rows):
            parts = []
            for i, s in enumerate(rows):
                row = logits[i:i + 1]
                for proc in s.processors:
                    row = proc(s.history, row)
                parts.append(row)
            logits = mx.concatenate(parts)
        logprobs = log_softmax(logits)
        if all(s.key is None for s in rows):
            tokens = mx.argmax(logprobs, axis=-1)
        else:
            tokens = mx.concatenate([s.sample(logprobs[i:i + 1]) for i, s in enumerate(rows)])
        for i, s in enumerate(rows):
            if s.processors:
                s.history = mx.concatenate([s.history, tokens[i:i + 1]])
        return _Out(tokens, mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0], logprobs)

    def _report(self, out: _Out) -> list[BatchResponse]:
        tokens, logprob = out.tokens.tolist(), out.logprob.tolist()
        responses = []
        for i, s in enumerate(self.rows):
            s.n += 1
            text, finish = s.text.add(tokens[i], last=s.n >= s.max_tokens)
            top, cache = None, None
            if s.top_logprobs:
                k = min(s.top_logprobs, out.logprobs.shape[-1])
                idx = mx.argpartition(-out.logprobs[i], k - 1)[:k]
                top = sorted(zip(idx.tolist(), out.logprobs[i][idx].tolist()), key=lambda t: -t[1])
            if finish:
                s.done = True
                if s.return_cache:
                    cache = self._extract(i, s.prompt_tokens + s.n - 1)
            responses.append(BatchResponse(s.uid, tokens[i], text, logprob[i], top, finish, s.prompt_tokens, s.n,
                                           cache))
        return responses

    def _extract(self, row: int, length: int) -> list:
        """Row `row`'s cache as per-layer KVCaches, cut to its first `length` positions."""
        caches = [c.extract(row) for c in self.cache]
        for c in caches:
            c.trim(c.offset - length)
        return caches

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows of the decode batch; compact its cache."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.out = None
            return
        idx = mx.array(keep, mx.int32)
        for c in self.cache:
            c.filter(idx)
        self.out = self.out.take(idx)

    def _prefill(self) -> None:
        """Start a group if there is room, run one chunk of it; a fully prefilled group joins."""
        if self.group is None:
            n = min(self.prefill_batch, self.max_batch - len(self.rows), len(self.waiting))
            self.group = _Group(self.model, [self.waiting.popleft() for _ in range(n)])
        g = self.group
        if g.pos < g.width:
            chunk = g.tokens[:, g.pos:g.pos + self.prefill_step_size]
            self.model(chunk, cache=g.cache, mask=g.cache[0].make_mask(chunk.shape[1]), last_only=True)
            mx.eval([c.state for c in g.cache])
            g.pos += chunk.shape[1]
            if g.pos < g.width:
                return
        for c in g.cache:
            c.finalize()
        out = self._forward(g.rows, g.last, g.cache)
        mx.async_eval(out.tokens, out.logprob)
        self.stats.prompt_tokens += sum(len(s.prompt) for s in g.rows)
        self.group = None
        keep = [i for i, s in enumerate(g.rows) if not s.done]  # drop rows removed while prefilling
        if not keep:
            return
        if len(keep) < len(g.rows):
            idx = mx.array(keep, mx.int32)
            for c in g.cache:
                c.filter(idx)
            out = out.take(idx)
        rows = [g.rows[i] for i in keep]
        if self.rows:
            for c, new in zip(self.cache, g.cache):
                c.extend(new)
            self.rows, self.out = self.rows + rows, _Out.cat(self.out, out)
        else:
            self.rows, self.cache, self.out = rows, g.cache, out


class PromptError(ValueError):
    """A bad prompt or setting in a batch: `index` is the prompt's, `reason` says what is wrong."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"prompt {index}: {reason}")
        self.index, self.reason = index, reason


@dataclass
class BatchResult:
    texts: list[str]
    tokens: list[list[int]]          # generated token ids (the EOS token included when it ended one)
    logprobs: list[list[float]]      # the log-probability of each generated token
    finish_reasons: list[str]
    prompt_tokens: list[int]
    stats: BatchStats


def stream_batch_generate(model, tokenizer, prompts: Sequence[Union[str, Sequence[int]]], *,
                          overrides: Optional[Sequence[dict]] = None, max_batch: int = 32,
                          prefill_step_size: int = 512, prefill_batch: int = 8, stats: Optional[BatchStats] = None,
                          **settings) -> Iterator[BatchResponse]:
    """Yield BatchResponses (uid = the prompt's index) as `prompts` are generated in one batch.

    `settings` are `BatchGenerator.insert`'s (max_tokens, temperature, top_p, top_k, min_p,
    repetition_penalty, seed, stop, top_logprobs), for every prompt; `overrides[i]` (a dict of the
    same) overrides them for prompt i. A common `seed` gives prompt i the seed `seed + i`. All
    prompts are checked at the call, before anything runs; a bad one raises PromptError (a ValueError).
    `stats`, if given, is filled in as the run goes.
    """
    if overrides is not None and len(overrides) != len(prompts):
        raise ValueError(f"{len(overrides)} overrides for {len(prompts)} prompts")
    gen = BatchGenerator(model, tokenizer, max_batch=max_batch, prefill_step_size=prefill_step_size,
                         prefill_batch=prefill_batch)
    if stats is not None:
        gen.stats = stats
    seed = settings.pop("seed", None)
    for i, p in enumerate(prompts):
        kw = dict(settings, **({} if seed is None else {"seed": seed + i}), **(overrides[i] if overrides else {}))
        try:
            gen.insert(encode_prompt(tokenizer, p), **kw)
        except (ValueError, TypeError) as e:
            raise PromptError(i, str(e)) from None

    def run():
        mx.reset_peak_memory()
        while gen.has_work():
            yield from gen.step()

    return run()


def batch_generate(model, tokenizer, prompts: Sequence[Union[str, Sequence[int]]], *, progress: bool = False,
                   **kwargs) -> BatchResult:
    """Generate a continuation of each prompt (a string or token ids), all in one batch.

    kwargs as `stream_batch_generate`; `progress` shows a tqdm bar (sequences done, aggregate tok/s).
    """
    from tqdm import tqdm

    n = len(prompts)
    texts, tokens, logprobs = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
    finish, prompt_tokens, stats = [""] * n, [0] * n, BatchStats()
    responses = stream_batch_generate(model, tokenizer, prompts, stats=stats, **kwargs)
    tic = time.perf_counter()
    with tqdm(total=n, unit="seq", disable=not progress) as bar:
        for r in responses:
            texts[r.uid] += r.text
            tokens[r.uid].append(r.token)
            logprobs[r.uid].append(r.logprob)
            if r.finish_reason:
                finish[r.uid], prompt_tokens[r.uid] = r.finish_reason, r.prompt_tokens
                bar.set_postfix_str(f"{stats.generation_tokens / (time.perf_counter() - tic):.1f} tok/s", refresh=False)
                bar.update(1)
    return BatchResult(texts, tokens, logprobs, finish, prompt_tokens, stats)
