"""Prompt-cache reuse for the server: KV caches of earlier requests, looked up by token prefix.

    pc = PromptCache(max_bytes=1 << 30, max_entries=8)
    cache, rest, cached = pc.fetch(ids)        # a copy of the longest cached prefix (or None)
    ... generate from `rest` with `cache` ...
    pc.store(tokens, cache)                     # tokens: exactly what `cache` holds

The bookkeeping (a token trie per model, least-recently-used eviction under an entry count and a
byte budget, trimming a longer cached sequence back to the shared prefix) is mlx-lm's
`LRUPromptCache`; this wrapper adds the two rules the engine needs: at least one prompt token is
always left to feed (the model must produce the next token's logits), and `store` takes the
tokens the cache holds, which it checks against the cache's offset.
"""

from __future__ import annotations

from typing import Optional

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache


class PromptCache:
    """LRU store of per-layer KV caches keyed by the token sequence each holds."""

    def __init__(self, max_bytes: int = 1 << 30, max_entries: int = 8, key: str = "model"):
        self.max_bytes, self.max_entries, self.key = max_bytes, max_entries, key
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def fetch(self, tokens: list[int]) -> tuple[Optional[list], list[int], int]:
        """(cache, rest, cached): a private copy of the cache of the longest stored prefix of
        `tokens` (None if nothing shares a prefix), the tokens still to feed (never empty), and
        how many prompt tokens the cache covers."""
        if self.max_entries <= 0 or self.max_bytes <= 0 or len(tokens) < 2:
            return None, list(tokens), 0
        cache, rest = self._lru.fetch_nearest_cache(self.key, list(tokens))
        if cache is not None and not rest:  # exact hit: step back one token to get its logits
            if not can_trim_prompt_cache(cache):
                cache, rest = None, list(tokens)
            else:
                trim_prompt_cache(cache, 1)
                rest = list(tokens[-1:])
        if cache is None or cache[0].offset == 0:
            self.misses += 1
            return None, list(tokens), 0
        self.hits += 1
        return cache, list(rest), len(tokens) - len(rest)

    def store(self, tokens: list[int], cache: list) -> None:
        """Keep `cache`, which holds exactly `tokens` (the caller gives up the cache object)."""
        if self.max_entries <= 0 or self.max_bytes <= 0 or not cache or not tokens:
            return
        if cache[0].offset != len(tokens):
            raise ValueError(f"the cache holds {cache[0].offset} tokens, not {len(tokens)}")
        if sum(c.nbytes for c in cache) > self.max_bytes:
            return  # would evict everything and still not fit
        self._lru.insert_cache(self.key, list(tokens), cache)

    def stats(self) -> dict:
        return {"entries": len(self), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}
