"""The command line: `python -m qwen_mlx.generate --prompt "Write quicksort in Python"`.

Applies the model's chat template (unless --ignore-chat-template), streams the
answer to stdout and the speed/memory stats to stderr; `--chat` is a multi-turn
session that keeps its KV cache between turns; `--suffix` fills the gap between
--prompt and it (code infill, `infill.py`); `--prompts-file in.jsonl --output
out.jsonl` generates many prompts in one batch (`qwen_mlx.batch`). `--kv-bits` /
`--max-kv-size` pick a quantized or rotating KV cache and `--prompt-cache-file` continues
from a cache written by `python -m qwen_mlx.cache_prompt` (see there for how the chat
template applies). Errors are one line: exit code 2 for bad flags, 1 for runtime errors
(qwen_mlx.cli).

Importing this module (as the `qwen-mlx-generate` console script does) makes Python bind it
as the attribute `qwen_mlx.generate`, in place of the function of that name; so the module
is callable and forwards to `qwen_mlx.generation.generate`: `qwen_mlx.generate(model,
tokenizer, prompt)` works in every import order.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from typing import Optional

from . import _blas
import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

import metal_kernels as K

from .cli import ArgumentParser, runtime_error
from .batch import PromptError, batch_generate
from .batch_io import read_requests, write_results
from .generation import GenerationResponse, generate as _generate, stream_generate
from .infill import INFILL_STOPS, infill_prompt
from .cache_prompt import add_kv_arguments, kv_flags_given, kv_options, prompt_ids
from .kv_cache import new_cache


class _CallableModule(types.ModuleType):
    """This module, callable as `qwen_mlx.generation.generate` (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        return _generate(*args, **kwargs)


if __name__ != "__main__":
    sys.modules[__name__].__class__ = _CallableModule
    __wrapped__ = _generate  # inspect.signature(qwen_mlx.generate) is the function's


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qwen_mlx.generate", description="Generate text with a Qwen2.5 model on MLX.")
    p.add_argument("--model", help="GGUF file or converted model directory (default: Qwen2.5-Coder-0.5B-Instruct "
                   "Q4_K_M, downloaded on first use)")
    p.add_argument("--prompt", "-p", default=None, help="prompt text ('-' reads stdin)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--suffix", default=None, help="code infill: the prompt is the code before the gap, this the "
                   "code after it; prints the middle (Qwen2.5-Coder's fill-in-the-middle tokens)")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--quantized", action=argparse.BooleanOptionalAction, default=None,
                   help="keep quantized weights quantized (default on a GPU) or dequantize them to --dtype "
                        "(default on a CPU, where MLX's quantized matmul is slow)")
    p.add_argument("--ignore-chat-template", action="store_true", help="use the prompt as is")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (keeps the KV cache)")
    p.add_argument("--prompts-file", default=None, help="JSONL file, one {\"prompt\": ...} or {\"messages\": [...]} "
                   "per line with optional per-line settings (max_tokens, temperature, top_p, top_k, min_p, "
                   "repetition_penalty, seed, stop, top_logprobs, id): all generated in one batch")
    p.add_argument("--output", "-o", default=None, help="JSONL results of --prompts-file (written when all are done)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded at once with --prompts-file")
    add_kv_arguments(p)
    p.add_argument("--prompt-cache-file", default=None, help="continue from a prompt cache written by "
                   "qwen_mlx.cache_prompt; --prompt is then the continuation of the cached prompt")
    p.add_argument("--draft-model", default=None, help="speculative decoding: a smaller model with the same "
                   "vocabulary (GGUF file or converted directory) proposes tokens")
    p.add_argument("--num-draft-tokens", type=int, default=None,
                   help="tokens proposed per target forward (default: 3 from a draft model, 10 from prompt lookup)")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="speculative decoding: propose the tokens that followed the last N tokens' earlier "
                        "occurrence in the prompt or output")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the formatted prompt, load details and speculative acceptance statistics")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.max_tokens < 1:
        p.error("--max-tokens must be at least 1")
    if a.temp < 0:
        p.error("--temp must be >= 0")
    if not 0.0 < a.top_p <= 1.0:
        p.error("--top-p must be in (0, 1]")
    if a.top_k < 0:
        p.error("--top-k must be >= 0")
    if not 0.0 <= a.min_p < 1.0:
        p.error("--min-p must be in [0, 1)")
    if a.repetition_penalty is not None and a.repetition_penalty <= 0:
        p.error("--repetition-penalty must be > 0")
    if a.chat and a.prompt is not None:
        p.error("--chat and --prompt are exclusive")
    if a.suffix is not None and (a.chat or a.prompt is None):
        p.error("--suffix needs --prompt (the code before the gap) and no --chat")
    if a.prompts_file is not None and (a.chat or a.prompt is not None):
        p.error("--prompts-file excludes --prompt and --chat")
    if (a.prompts_file is None) != (a.output is None):
        p.error("--prompts-file and --output go together")
    if a.max_batch < 1:
        p.error("--max-batch must be at least 1")
    if a.prompts_file is not None and (kv_flags_given(a) or a.prompt_cache_file):
        p.error("--prompts-file does not take KV-cache flags or --prompt-cache-file (batched caches are full precision)")
    a.kv = kv_options(p, a)
    if a.prompt_cache_file and (a.chat or a.system is not None or a.ignore_chat_template):
        p.error("--prompt-cache-file takes its system message and chat-template use from the file "
                "(not with --chat, --system or --ignore-chat-template)")
    if a.prompt_lookup < 0:
        p.error("--prompt-lookup must be >= 1 (the n-gram size), or 0 for off")
    if a.num_draft_tokens is not None:
        if a.num_draft_tokens < 1:
            p.error("--num-draft-tokens must be at least 1")
        if not (a.draft_model or a.prompt_lookup):
            p.error("--num-draft-tokens needs --draft-model or --prompt-lookup")
    if a.prompts_file is not None and (a.draft_model or a.prompt_lookup):
        p.error("--prompts-file does not take --draft-model or --prompt-lookup (batched decoding is not speculative)")


def _sampling(a) -> dict:
    spec = {}
    if a.draft_model or a.prompt_lookup:
        k = a.num_draft_tokens or (3 if a.draft_model else 10)
        spec = dict(draft_model=a.draft, num_draft_tokens=k, prompt_lookup=a.prompt_lookup)
    return dict(temperature=a.temp, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed, **spec)


def _kv(a) -> dict:
    return dict(kv_bits=a.kv.kv_bits, kv_group_size=a.kv.kv_group_size, quantized_kv_start=a.kv.quantized_kv_start,
                max_kv_size=a.kv.max_kv_size)


def _format(tokenizer, messages: list, ignore_template: bool) -> list[int]:
    if ignore_template or not tokenizer.has_chat_template:
        return tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _stats(r: GenerationResponse, model_desc: str) -> str:
    return (f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | generation: {r.generation_tokens} "
            f"tokens, {r.generation_tps:.1f} tok/s | peak memory: {r.peak_memory:.2f} GB | {model_desc}")


def _run_turn(model, tokenizer, ids, a, cache, desc) -> tuple[str, list[int]]:
    text, out, last = "", [], None
    for r in stream_generate(model, tokenizer, ids, max_tokens=a.max_tokens, cache=cache, **_sampling(a), **_kv(a)):
        print(r.text, end="", flush=True)
        text, last = text + r.text, r
        out.append(r.token)
    print(flush=True)
    if last is not None:
        print(_stats(last, desc), file=sys.stderr)
        if a.verbose and last.spec_forwards:
            print(f"speculative: {last.spec_accepted}/{last.spec_proposed} proposed tokens accepted, "
                  f"{last.generation_tokens / last.spec_forwards:.2f} tokens per target forward "
                  f"({last.spec_forwards} forwards)", file=sys.stderr)
    return text, out


def _chat(model, tokenizer, a, desc) -> None:
    """Multi-turn chat. The KV cache holds the conversation so far; each turn the
    whole conversation is re-rendered and only the tokens past the longest
    common prefix with what the cache holds are fed (the cache is trimmed back
    where the re-rendered text tokenizes differently)."""
    cache, cached = new_cache(model, a.kv) + (a.draft.make_cache() if a.draft else []), []  # target's, then draft's
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("qwen-mlx chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input(">>> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = _format(tokenizer, messages, a.ignore_chat_template)
        common = next((i for i, (x, y) in enumerate(zip(cached, ids)) if x != y), min(len(cached), len(ids)))
        common = min(common, len(ids) - 1)  # feed at least one token
        held = cache[0].offset
        if held > common and not can_trim_prompt_cache(cache):  # e.g. a full rotating window: start over
            cache[:], held, common = new_cache(model, a.kv), 0, 0
        trim_prompt_cache(cache, held - common)
        cached = cached[:common]
        try:
            reply, out = _run_turn(model, tokenizer, ids[common:], a, cache, desc)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        cached = ids + out[:-1]  # the last sampled token was never fed to the model
        messages.append({"role": "assistant", "content": reply})


def _batch(model, tokenizer, requests, a, desc) -> None:
    system = [{"role": "system", "content": a.system}] if a.system else []
    prompts = [_format(tokenizer, (system if r["messages"][0]["role"] != "system" else []) + r["messages"],
                       a.ignore_chat_template) for r in requests]
    try:
        result = batch_generate(model, tokenizer, prompts, overrides=[r["settings"] for r in requests],
                                max_batch=a.max_batch, progress=True, max_tokens=a.max_tokens, **_sampling(a))
    except PromptError as e:
        raise ValueError(f"{a.prompts_file}:{requests[e.index]['line']}: {e.reason}") from None
    write_results(a.output, requests, result)
    s = result.stats
    print(f"{len(prompts)} sequences | prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tok/s | generation: "
          f"{s.generation_tokens} tokens, {s.generation_tps:.1f} tok/s | peak memory: {s.peak_memory:.2f} GB | "
          f"{desc}", file=sys.stderr)


def _from_prompt_cache(model, tokenizer, a) -> tuple[list[int], argparse.Namespace, list]:
    """The prompt's tokens after the cache from --prompt-cache-file, the args (KV settings from the
    file), the cache (see qwen_mlx.cache_prompt)."""
    from .kv_cache import continuation, load_prompt_cache_file

    cache, cached, kv, meta = load_prompt_cache_file(a.prompt_cache_file, model, tokenizer)
    if kv_flags_given(a) and a.kv != kv:
        raise ValueError(f"{a.prompt_cache_file}: made with KV settings {kv}, the flags ask for {a.kv}")
    a.kv = kv
    ids = prompt_ids(tokenizer, meta["prompt"] + (a.prompt or ""), meta["system"] or None,
                     meta["template"] == "chat", open_turn=False)
    return continuation(cached, ids, a.prompt_cache_file), a, cache


def main(argv: Optional[list] = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    _check_args(p, a)
    from .distributed import rank_prefix, silence_other_ranks
    from .loader import is_quantized, load
    from .speculative import load_draft

    rank0 = silence_other_ranks()  # under mlx.launch, rank 0 prints for all
    try:
        requests = read_requests(a.prompts_file) if a.prompts_file else None  # bad lines fail before the load
        if a.prompt == "-":
            a.prompt = sys.stdin.read()
        tic = time.perf_counter()
        model, tokenizer = load(a.model, dtype=a.dtype, quantized=a.quantized)
        dtype = str(model.model.norm.weight.dtype).split(".")[-1]
        device = mx.default_device()
        weights = "quantized weights" if is_quantized(model) else "dequantized weights"
        desc = f"{dtype}, {weights}, {device}" + (f", BLAS: {_blas.blas_name()}" if device == mx.cpu else "")
        if (n := mx.distributed.init().size()) > 1:
            desc += f", tensor parallel over {n} ranks (memory: rank 0's)"
        a.draft = load_draft(a.draft_model, model, tokenizer, dtype=a.dtype, quantized=a.quantized) if a.draft_model else None
        if a.verbose:
            print(f"loaded {a.model or 'the default model'}{' and the draft' if a.draft else ''} in "
                  f"{time.perf_counter() - tic:.1f} s ({desc})", file=sys.stderr)
            for line in K.describe():
                print(line, file=sys.stderr)
        if a.chat:
            return _chat(model, tokenizer, a, desc)
        if a.prompts_file:
            return _batch(model, tokenizer, requests, a, desc)
        if a.prompt_cache_file:
            _run_turn(model, tokenizer, *_from_prompt_cache(model, tokenizer, a), desc)
            return
        if a.prompt is None:
            a.prompt = "Write a Python function that checks whether a number is prime."
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}]
        if a.suffix is not None:
            ids, a.stop = infill_prompt(tokenizer, a.prompt, a.suffix), a.stop + list(INFILL_STOPS)
        else:
            ids = _format(tokenizer, messages, a.ignore_chat_template)
        if a.verbose:
            print(tokenizer.decode(ids), file=sys.stderr)
        _run_turn(model, tokenizer, ids, a, None, desc)
    except (ValueError, OSError, RuntimeError) as e:
        if not rank0:
            sys.stderr = sys.__stderr__  # every rank reports its error
        sys.exit(runtime_error(f"{rank_prefix()}{e}" if rank_prefix() else e))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
