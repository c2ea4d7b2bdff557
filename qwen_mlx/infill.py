"""Code infill (fill-in-the-middle) prompts for Qwen2.5-Coder.

    ids = infill_prompt(tokenizer, prefix="def add(a, b):\\n    ", suffix="\\n\\nprint(add(1, 2))")
    middle = generate(model, tokenizer, ids, max_tokens=64, stop=INFILL_STOPS)

Qwen2.5-Coder was trained on `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>` and
continues with the middle, ending it with `<|endoftext|>` (one of the EOS tokens). The special
tokens are looked up in the tokenizer's vocabulary and placed by id, so text in the prefix or
suffix can never be read as one; a tokenizer without them raises `InfillUnsupported`.
"""

from __future__ import annotations

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
# Markers the model sometimes writes instead of <|endoftext|> after the middle: the middle ends there.
INFILL_STOPS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|file_sep|>",
                "<|repo_name|>", "<|endoftext|>")


class InfillUnsupported(ValueError):
    """The tokenizer has no fill-in-the-middle tokens."""


def fim_token_ids(tokenizer) -> tuple[int, int, int]:
    vocab = tokenizer.get_vocab()
    missing = [t for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if t not in vocab]
    if missing:
        raise InfillUnsupported(f"this model's tokenizer has no fill-in-the-middle tokens ({', '.join(missing)} "
                                "missing): code infill needs a Qwen2.5-Coder model")
    return vocab[FIM_PREFIX], vocab[FIM_SUFFIX], vocab[FIM_MIDDLE]


def infill_prompt(tokenizer, prefix: str, suffix: str) -> list[int]:
    """Token ids of the fill-in-the-middle prompt for the code between `prefix` and `suffix`."""
    pre, suf, mid = fim_token_ids(tokenizer)

    def enc(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False) if s else []

    return [pre, *enc(prefix), suf, *enc(suffix), mid]
