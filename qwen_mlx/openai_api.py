"""OpenAI's wire format for the server: request validation and response bodies, no HTTP.

`parse_request(body, kind, tokenizer, ...)` checks a decoded JSON body of `/v1/chat/completions`
(kind "chat") or `/v1/completions` (kind "text") field by field and returns a `ParsedRequest`
(prompt token ids + the engine's sampling arguments), or raises `APIError` naming the field.
The `*_body` / `*_chunk` functions build the JSON objects the server sends back.
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .infill import INFILL_STOPS, infill_prompt

ROLES = {"system", "user", "assistant", "tool", "developer"}  # developer: OpenAI's newer name for system
MAX_STOPS, MAX_TOP_LOGPROBS = 16, 20


class APIError(Exception):
    """A request the server refuses; `body()` is OpenAI's error object."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    kind: str                    # "chat" or "text"
    prompt: list[int]
    sampling: dict               # keyword arguments of the engine's insert() (less prompt/cache)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _type_name(v) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _get(body: dict, name: str, kinds: tuple, default=None, *, lo=None, hi=None, lo_open=False):
    """body[name] checked for JSON type (bool never counts as a number) and range."""
    v = body.get(name)
    if v is None:
        return default
    numeric = int in kinds or float in kinds
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds) or numeric and isinstance(v, float) \
            and not math.isfinite(v):
        want = " or ".join(dict.fromkeys({bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                          list: "an array", dict: "an object"}[k] for k in kinds))
        raise APIError(f"'{name}' must be {want}, not {_type_name(v)} {v!r}"[:200], param=name)
    if lo is not None and (v < lo or lo_open and v == lo) or hi is not None and v > hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise APIError(f"'{name}' must be in {rng}, got {v}", param=name)
    return v


def _text_content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def chat_prompt(tokenizer, messages) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}"[:200],
                           param=f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role, "content": _text_content(m.get("content"), i)})
    try:
        return list(tokenizer.apply_chat_template(out, add_generation_prompt=True, tokenize=True))
    except Exception as e:  # a template that rejects the conversation (e.g. role order)
        raise APIError(f"the chat template rejected these messages: {e}"[:300], param="messages")


@functools.lru_cache(maxsize=4)
def _vocab_size(tokenizer) -> int:
    return len(tokenizer.get_vocab())


def text_prompt(tokenizer, body: dict) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < _vocab_size(tokenizer) for t in p):
            raise APIError("'prompt' has a token id outside the vocabulary", param="prompt")
        ids = list(p)
    elif isinstance(p, str):
        suffix = _get(body, "suffix", (str,))
        if suffix is not None:
            try:
                return infill_prompt(tokenizer, p, suffix)
            except ValueError as e:
                raise APIError(str(e), param="suffix", code="infill_unsupported")
        ids = tokenizer.encode(p, add_special_tokens=False)
    else:
        raise APIError("'prompt' must be a string or an array of token ids (one prompt per request)", param="prompt")
    if not ids:
        raise APIError("'prompt' is empty", param="prompt")
    return ids


def parse_request(body: Any, kind: str, tokenizer, context: int, defaults: dict) -> ParsedRequest:
    """Validate `body` (decoded JSON) for `kind` ("chat" or "text"); `defaults` are the server's
    sampling defaults (max_tokens, temperature, top_p, top_k, min_p, repetition_penalty)."""
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, not {_type_name(body)}")
    _get(body, "model", (str,))
    if _get(body, "n", (int,), 1) != 1:
        raise APIError("only n=1 is supported", param="n")
    if body.get("suffix") is not None and kind == "chat":
        raise APIError("'suffix' (code infill) is a /v1/completions field", param="suffix")
    prompt = chat_prompt(tokenizer, body.get("messages")) if kind == "chat" else text_prompt(tokenizer, body)
    if len(prompt) >= context:
        raise APIError(f"the prompt has {len(prompt)} tokens; this model's context is {context} tokens",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, (int,), defaults["max_tokens"], lo=1, hi=context)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS
                             or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(f"'stop' must be a non-empty string or an array of at most {MAX_STOPS} of them", param="stop")
    stop = list(stop or [])
    if kind == "text" and body.get("suffix") is not None:
        stop += [s for s in INFILL_STOPS if s not in stop]
    if kind == "chat":
        logprobs = _get(body, "logprobs", (bool,), False)
        top = _get(body, "top_logprobs", (int,), 0, lo=0, hi=MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:  # the legacy completions API: logprobs is the number of alternatives
        top = _get(body, "logprobs", (int,), None, lo=0, hi=MAX_TOP_LOGPROBS)
        logprobs, top = top is not None, top or 0
    options = _get(body, "stream_options", (dict,), {})
    sampling = dict(
        max_tokens=min(max_tokens, context - len(prompt)),
        temperature=float(_get(body, "temperature", (int, float), defaults["temperature"], lo=0, hi=2)),
        top_p=float(_get(body, "top_p", (int, float), defaults["top_p"], lo=0, hi=1, lo_open=True)),
        top_k=_get(body, "top_k", (int,), defaults["top_k"], lo=0),
        min_p=float(_get(body, "min_p", (int, float), defaults["min_p"], lo=0, hi=1)),
        repetition_penalty=_get(body, "repetition_penalty", (int, float), defaults["repetition_penalty"], lo=0,
                                hi=10, lo_open=True),
        seed=_get(body, "seed", (int,)),
        stop=stop,
        top_logprobs=top,
    )
    return ParsedRequest(kind, prompt, sampling, stream=_get(body, "stream", (bool,), False),
                         include_usage=_get(options, "include_usage", (bool,), False), logprobs=logprobs)


# ---- responses ----

class LogprobFormatter:
    """Per-token log-probability entries, in the chat or the legacy completions layout."""

    def __init__(self, tokenizer, kind: str):
        # the exact bytes of a token (a byte-level BPE piece may be part of a UTF-8 character), as
        # the project's streaming detokenizer (qwen_mlx.tokenizer) turns it into text
        self.token_bytes, self.kind = tokenizer.detokenizer._bytes, kind

    def _tok(self, t: int) -> tuple[str, list[int]]:
        b = self.token_bytes(t)
        return b.decode("utf-8", errors="replace"), list(b)

    def entries(self, responses, text_offset: int = 0) -> dict:
        if self.kind == "chat":
            content = []
            for r in responses:
                s, b = self._tok(r.token)
                tops = [dict(zip(("token", "bytes"), self._tok(t)), logprob=lp) for t, lp in (r.top_logprobs or [])]
                content.append({"token": s, "logprob": r.logprob, "bytes": b, "top_logprobs": tops})
            return {"content": content, "refusal": None}
        tokens, offsets, off = [], [], text_offset
        for r in responses:
            tokens.append(self._tok(r.token)[0])
            offsets.append(off)
            off += len(tokens[-1])
        tops = [{self._tok(t)[0]: lp for t, lp in (r.top_logprobs or [])} for r in responses]
        return {"tokens": tokens, "token_logprobs": [r.logprob for r in responses],
                "top_logprobs": tops if any(r.top_logprobs for r in responses) else None, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _head(req: ParsedRequest, model: str, chunk: bool) -> dict:
    if req.kind == "chat":
        return {"id": f"chatcmpl-{req.id}", "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": req.created, "model": model}
    return {"id": f"cmpl-{req.id}", "object": "text_completion", "created": req.created, "model": model}


def response_body(req: ParsedRequest, model: str, text: str, finish: str, logprobs: Optional[dict],
                  use: dict) -> dict:
    choice = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
    if req.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {**_head(req, model, False), "choices": [choice], "usage": use}


def chunk_body(req: ParsedRequest, model: str, text: Optional[str], finish: Optional[str] = None,
               logprobs: Optional[dict] = None, first: bool = False) -> dict:
    choice = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
    if req.kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    out = {**_head(req, model, True), "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: ParsedRequest, model: str, use: dict) -> dict:
    return {**_head(req, model, True), "choices": [], "usage": use}
