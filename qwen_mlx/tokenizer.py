"""The Qwen2 tokenizer, rebuilt from a GGUF file's metadata.

    tok = load_tokenizer("model.gguf")          # or a gguf.GGUFReader
    ids = tok.encode("Hello")                   # transformers' PreTrainedTokenizerFast API
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    detok = tok.detokenizer                      # streaming, UTF-8 safe
    tok.eos_token_ids                            # {<|im_end|>, <|endoftext|>, ...}

The `tokenizers` library does the byte-level BPE, with the same pipeline as Qwen2's
tokenizer.json (NFC, Qwen2's split regex, ByteLevel); transformers supplies encode/decode/
chat templates/save_pretrained, and mlx-lm's TokenizerWrapper the detokenizer and eos ids.
"""

from __future__ import annotations

import os

import gguf
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper, _byte_decoder
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from .gguf import field, path_of

# Values of tokenizer.ggml.pre that name Qwen2's split regex (None: older files without the key).
QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", None}
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)


class TokenizerLoadError(ValueError):
    """The GGUF has no tokenizer, or one this module cannot build."""


class QwenStreamingDetokenizer(BPEStreamingDetokenizer):
    """mlx-lm's byte-level BPE streaming detokenizer, fixed to emit exactly `tokenizer.decode(ids)`.

    The base drops the leading space of the first segment (Qwen's decode keeps it), maps the
    byte-0 token 'Ā' to b'\\xc4\\x80' (its lookup tests the byte value for truth) and raises in
    finalize() on a character outside the byte alphabet. Holding back an incomplete UTF-8
    sequence (the text ends in U+FFFD) until the next token completes it is kept from the base.
    """

    def _maybe_trim_space(self, text):
        return text

    def _decode_bytes(self, seq):
        table = _byte_decoder()
        return b"".join(bytes([table[c]]) if c in table else c.encode() for c in seq).decode("utf-8", "replace")

    def finalize(self):
        self.text += self._decode_bytes(self._unflushed)
        self._unflushed = ""


def load_tokenizer(source: gguf.GGUFReader | str | os.PathLike) -> TokenizerWrapper:
    """The tokenizer of a GGUF file (a path or an open `gguf.GGUFReader`); reads metadata only."""
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
    vocab = hf.get_vocab()
    eos = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
    return TokenizerWrapper(hf, QwenStreamingDetokenizer, eos_token_ids=eos)
