"""The files of `python -m qwen_mlx.generate --prompts-file in.jsonl --output out.jsonl`.

Input: one JSON object per line, {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}]},
with an optional "id" and per-line settings (max_tokens, temperature, top_p, top_k, min_p,
repetition_penalty, seed, stop, top_logprobs); blank lines are skipped. Output: one object per
prompt, in input order: line, id, text, finish_reason, prompt_tokens, generation_tokens, tokens,
logprobs; written to a temporary file renamed into place, so it is whole or absent.
"""

from __future__ import annotations

import json
import os
import tempfile

from .batch import BatchResult


# Per-line settings of a prompts file and their types.
_LINE_SETTINGS = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
                  "min_p": (int, float), "repetition_penalty": (int, float), "seed": int, "stop": (str, list),
                  "top_logprobs": int}


def read_requests(path: str) -> list[dict]:
    """Parse a JSONL prompts file: one object per line with "prompt" (a string) or "messages" (chat
    messages), optional "id" and settings (max_tokens, temperature, seed, stop, ...). Blank lines are
    skipped. Returns [{"line", "id", "messages", "settings"}]; a bad line raises ValueError naming it."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: want a JSON object")
            if ("prompt" in obj) == ("messages" in obj):
                raise ValueError(f"{where}: want exactly one of \"prompt\" and \"messages\"")
            messages = [{"role": "user", "content": obj["prompt"]}] if "prompt" in obj else obj["messages"]
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                raise ValueError(f"{where}: \"prompt\" must be a string and \"messages\" a non-empty list of "
                                 "{\"role\": ..., \"content\": ...}")
            unknown = set(obj) - set(_LINE_SETTINGS) - {"prompt", "messages", "id"}
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
            settings = {k: obj[k] for k in _LINE_SETTINGS if k in obj}
            for k, v in settings.items():
                if not isinstance(v, _LINE_SETTINGS[k]) or isinstance(v, bool):
                    raise ValueError(f"{where}: bad type for {k!r}: {type(v).__name__}")
            if isinstance(settings.get("stop"), list) and not all(isinstance(s, str) for s in settings["stop"]):
                raise ValueError(f"{where}: \"stop\" must be a string or a list of strings")
            requests.append({"line": n, "id": obj.get("id"), "messages": messages, "settings": settings})
    if not requests:
        raise ValueError(f"{path}: no prompts")
    return requests


def write_results(path: str, requests: list[dict], result: BatchResult) -> None:
    """Write one JSON object per request (in input order) to `path`, atomically (temp file, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, req in enumerate(requests):
                row = {"line": req["line"], **({"id": req["id"]} if req["id"] is not None else {}),
                       "text": result.texts[i], "finish_reason": result.finish_reasons[i],
                       "prompt_tokens": result.prompt_tokens[i], "generation_tokens": len(result.tokens[i]),
                       "tokens": result.tokens[i], "logprobs": result.logprobs[i]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
