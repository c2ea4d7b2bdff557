"""The Qwen2 tokenizer, from a GGUF file's metadata or a model directory's tokenizer files.

    tok = load_tokenizer("model.gguf")          # or a gguf.GGUFReader, or a model directory
    ids = tok.encode("Hello")                   # transformers' PreTrainedTokenizerFast API
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    detok = tok.detokenizer                      # streaming, UTF-8 safe
    tok.eos_token_ids                            # {<|im_end|>, <|endoftext|>, ...}

From a GGUF, the `tokenizers` library does the byte-level BPE, with the same pipeline as
Qwen2's tokenizer.json (NFC, Qwen2's split regex, ByteLevel); from a directory (converted by
`qwen_mlx.convert`, or Hugging Face's), transformers reads tokenizer.json. transformers supplies
encode/decode/chat templates/save_pretrained. Both sources end in the same `wrap`: mlx-lm's
TokenizerWrapper with this module's `QwenStreamingDetokenizer` and the same eos ids, so a GGUF
and its converted directory stream the same text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import gguf
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from .gguf import field, path_of

# Values of tokenizer.ggml.pre that name Qwen2's split regex (None: older files without the key).
QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", None}
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)


class TokenizerLoadError(ValueError):
    """The GGUF or directory has no tokenizer, or one this module cannot build (one line, names the path)."""


_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE alphabet -> byte


class QwenStreamingDetokenizer(StreamingDetokenizer):
    """Byte-level BPE streaming detokenizer (mlx-lm's interface) whose text is exactly
    `tokenizer.decode(ids)`: added tokens (<|im_end|>, <tool_call>, ...) as their content, other
    tokens as the bytes their byte-level characters stand for, decoded as UTF-8 with U+FFFD for
    invalid bytes. An incomplete UTF-8 sequence at the end (the text so far ends in U+FFFD) is held
    back until a later token completes it, or `finalize()`. Unlike mlx-lm's BPEStreamingDetokenizer
    it keeps the leading space of the first segment, as Qwen's decode does."""

    def __init__(self, tokenizer):
        self.tokenmap = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.added = {i: t.content.encode() for i, t in tokenizer.added_tokens_decoder.items()}
        self.reset()

    def reset(self):
        self.offset, self.text, self.tokens, self.pending = 0, "", [], b""

    def _bytes(self, token: int) -> bytes:
        if token in self.added:
            return self.added[token]
        if token >= len(self.tokenmap):  # a padded vocabulary's unused rows: decode gives nothing either
            return b""
        return b"".join(bytes([_BYTE_OF[c]]) if c in _BYTE_OF else c.encode() for c in self.tokenmap[token])

    def add_token(self, token):
        self.tokens.append(token)
        self.pending += self._bytes(token)
        text = self.pending.decode("utf-8", "replace")
        if not text.endswith("\ufffd"):
            self.text += text
            self.pending = b""

    def finalize(self):
        self.text += self.pending.decode("utf-8", "replace")
        self.pending = b""


def wrap(hf: PreTrainedTokenizerFast, eos_token_ids: Iterable[int] = ()) -> TokenizerWrapper:
    """The one TokenizerWrapper construction for every source: `QwenStreamingDetokenizer`, and
    generation stops at <|im_end|> and <|endoftext|> (where the vocabulary has them) plus
    `eos_token_ids` (a directory's config.json)."""
    vocab = hf.get_vocab()
    eos = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab} | {int(i) for i in eos_token_ids}
    return TokenizerWrapper(hf, QwenStreamingDetokenizer, eos_token_ids=eos)


def load_tokenizer(source: gguf.GGUFReader | str | os.PathLike) -> TokenizerWrapper:
    """The tokenizer of a GGUF file (a path or an open `gguf.GGUFReader`; reads metadata only)
    or of a model directory (tokenizer.json, tokenizer_config.json, config.json's eos ids)."""
    if not isinstance(source, gguf.GGUFReader) and Path(source).is_dir():
        return _from_directory(Path(source))
    reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
    name = path_of(reader)

    def _field(key, default=None):
        return field(reader, key, default)

    kind, pre = _field("tokenizer.ggml.model"), _field("tokenizer.ggml.pre")
    tokens, merges = _field("tokenizer.ggml.tokens"), _field("tokenizer.ggml.merges")
    if kind is None or tokens is None:
        raise TokenizerLoadError(f"{name}: no tokenizer in this GGUF (tokenizer.ggml.model/tokens missing)")
    if kind != "gpt2":
        raise TokenizerLoadError(f"{name}: unsupported tokenizer.ggml.model {kind!r}; "
                                 "only 'gpt2' (byte-level BPE) is supported")
    if merges is None:
        raise TokenizerLoadError(f"{name}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    if pre not in QWEN2_PRE:
        raise TokenizerLoadError(f"{name}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; expected 'qwen2'")
    types = _field("tokenizer.ggml.token_type") or [1] * len(tokens)

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    # CONTROL tokens (<|im_end|> ...) are special; USER_DEFINED ones (<tool_call>) are matched whole but not special.
    tk.add_tokens([AddedToken(t, special=ty == _CONTROL, normalized=False)
                   for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)])

    def token(key):
        i = _field(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk, chat_template=_field("tokenizer.chat_template"),
        bos_token=token("bos"), eos_token=token("eos"), pad_token=token("padding"), unk_token=token("unknown"),
        add_bos_token=bool(_field("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(_field("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        # no model_max_length: the generation loop checks the context (transformers would only warn)
    )
    return wrap(hf)


def _from_directory(path: Path) -> TokenizerWrapper:
    """A directory's tokenizer through transformers' AutoTokenizer, wrapped as a GGUF's is.

    fix_mistral_regex=False: transformers (5.7 and others) warns that a local tokenizer with a
    large vocabulary whose config.json lacks a recent `transformers_version` may carry Mistral's
    broken split regex. Qwen2's tokenizer.json has Qwen2's own regex (the one this module
    builds from a GGUF), so the warning is spurious here; passing the flag explicitly is
    transformers' documented way to say no patch is wanted, and silences it."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(path, fix_mistral_regex=False)
    except Exception as e:
        raise TokenizerLoadError(" ".join(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})".split())) \
            from None
    eos = []
    for name in ("config.json", "generation_config.json"):
        try:
            value = json.loads((path / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        eos += value if isinstance(value, list) else [] if value is None else [value]
    return wrap(hf, eos)
