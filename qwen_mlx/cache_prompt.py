"""Prompt caches on disk: `python -m qwen_mlx.cache_prompt --prompt-file F --out cache.safetensors`.

Prefills a prompt (e.g. a long document) once and writes its KV cache, with the token ids, the
KV settings and the model's identity, to a safetensors file (`qwen_mlx.kv_cache`). Later,
`python -m qwen_mlx.generate --prompt-cache-file cache.safetensors --prompt Q` continues from it.

How the prompt and the chat template combine (`prompt_ids`):
- With the chat template (the default, when the model has one), the cache holds the conversation
  up to the END of the user's message text, the turn left open: [system] + user: TEXT, rendered
  with `continue_final_message=True`. `generate` renders [system] + user: TEXT + Q (the strings
  concatenated, so Q usually starts with a space or newline) with the generation prompt, checks
  that the cached tokens are a prefix of that, and feeds only the tokens after them.
- With --ignore-chat-template the cache holds the tokens of TEXT and `generate` feeds the
  tokens of TEXT + Q after them.
The system message and the template choice are stored in the file and reused by `generate`.
Where TEXT + Q tokenizes differently at the seam (e.g. TEXT ends and Q starts with a newline,
which Qwen's tokenizer merges), the cached tokens are not a prefix: generate refuses, naming the
first differing token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from . import _blas  # noqa: F401  (before mlx.core)
import mlx.core as mx

from .kv_cache import (DEFAULT_QUANTIZED_KV_START, KV_BITS, KV_GROUP_SIZES, CacheOptions, cache_nbytes, cache_options,
                       maybe_quantize, new_cache, save_prompt_cache_file)


def prompt_ids(tokenizer, text: str, system: Optional[str], chat: bool, open_turn: bool) -> list[int]:
    """Token ids of `text` as the user's message: the turn left open (`open_turn`, what a cache
    holds) or followed by the generation prompt; raw tokens of `text` when not `chat`."""
    if not chat:
        return list(tokenizer.encode(text, add_special_tokens=False))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    if open_turn:
        return list(tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True))
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def prefill(model, ids: list[int], cache: list, opts: CacheOptions, step: int = 2048) -> None:
    """Run `ids` through the model into `cache`, in chunks of `step`, quantizing as `opts` says."""
    for i in range(0, len(ids), step):
        model(mx.array(ids[i:i + step])[None], cache=cache, last_only=True)
        maybe_quantize(cache, opts)
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def add_kv_arguments(p: argparse.ArgumentParser) -> None:
    """The KV-cache flags shared by this CLI and `qwen_mlx.generate` (None: not given)."""
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                   help="quantize the KV cache to this many bits (default: full precision)")
    p.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=None,
                   help="KV quantization group size (default 64)")
    p.add_argument("--quantized-kv-start", type=int, default=None,
                   help=f"quantize the KV cache once it holds this many tokens (default {DEFAULT_QUANTIZED_KV_START})")
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="rotating KV cache: keep the first 4 and the most recent tokens, at most this many")


def kv_options(p: argparse.ArgumentParser, a: argparse.Namespace) -> CacheOptions:
    given = {k: v for k, v in (("kv_bits", a.kv_bits), ("kv_group_size", a.kv_group_size),
                               ("quantized_kv_start", a.quantized_kv_start), ("max_kv_size", a.max_kv_size))
             if v is not None}
    try:
        return cache_options(**given)
    except ValueError as e:
        p.error(str(e))


def kv_flags_given(a: argparse.Namespace) -> bool:
    return any(v is not None for v in (a.kv_bits, a.kv_group_size, a.quantized_kv_start, a.max_kv_size))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen_mlx.cache_prompt",
                description="Prefill a prompt once and save its KV cache to a safetensors file.")
    p.add_argument("--model", help="GGUF file or converted model directory (default: the default model)")
    p.add_argument("--prompt-file", required=True, help="text file with the prompt ('-' reads stdin)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--ignore-chat-template", action="store_true", help="cache the prompt's raw tokens")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--quantized", action=argparse.BooleanOptionalAction, default=None,
                   help="keep quantized weights quantized (default on a GPU)")
    add_kv_arguments(p)
    return p


def main(argv: Optional[list] = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    opts = kv_options(p, a)
    if not a.out.endswith(".safetensors"):
        p.error("--out must end in .safetensors")
    from .loader import load

    try:
        text = sys.stdin.read() if a.prompt_file == "-" else Path(a.prompt_file).read_text()
        if not text:
            raise ValueError(f"{a.prompt_file}: the prompt is empty")
        model, tokenizer = load(a.model, dtype=a.dtype, quantized=a.quantized)
        chat = not a.ignore_chat_template and tokenizer.has_chat_template
        ids = prompt_ids(tokenizer, text, a.system, chat, open_turn=True)
        cache = new_cache(model, opts)
        prefill(model, ids, cache, opts)
        save_prompt_cache_file(a.out, cache, ids, model, tokenizer, opts,
                               extra={"prompt": text, "system": a.system or "", "template": "chat" if chat else "raw"})
        print(f"cached {len(ids)} tokens ({cache_nbytes(cache) / 1e6:.1f} MB of KV) in {a.out}", file=sys.stderr)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
