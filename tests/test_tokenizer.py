"""qwen_mlx.tokenizer against transformers' own GGUF tokenizer (the reference), plus the streaming
detokenizer against `decode`, on the tiny GGUFs and the real default model, and the tokenizer of a
directory written by `qwen_mlx.convert` against the GGUF's (one construction for both load paths).

Reference quirk: transformers (5.x) builds the GGUF Qwen2 tokenizer without Qwen2's NFC
normalizer (its tokenizer.json has one; ours does), so non-NFC text is compared as
ours(s) == transformers(NFC(s)). NFC here is the `tokenizers` library's, as in Qwen's
tokenizer.json: its Unicode tables are older than Python's `unicodedata` (e.g. it does not
reorder U+1AC9, new in Unicode 14, before a lower-class mark); the two are checked to agree
on the hand-written corpus.

The random part of the corpus is seeded from the clock; set QWEN_MLX_TOKENIZER_SEED to replay one.
"""

import json
import os
import random
import sys
import time
import unicodedata

import gguf
import pytest
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.tokenizer_utils import load as mlx_lm_load_tokenizer
from transformers import AutoTokenizer
from tokenizers.normalizers import NFC as _NFC
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qwen_mlx.tokenizer import QwenStreamingDetokenizer, TokenizerLoadError, load_tokenizer
from tiny_gguf import CHAT_TEMPLATE, SPECIALS, tiny_vocab

SEED = int(os.environ.get("QWEN_MLX_TOKENIZER_SEED", time.time_ns() % 2**32))
print(f"test_tokenizer: random corpus seed {SEED} (QWEN_MLX_TOKENIZER_SEED={SEED} to replay)", file=sys.stderr)

# ---------------------------------------------------------------- corpus

CODE = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "import numpy as np\nx = np.arange(10)[::-1]  # reversed\nprint(f\"{x.sum():>8.3f}\")",
    "class Foo(Base):\n\tdef __init__(self, *args, **kwargs):\n\t\tsuper().__init__(*args, **kwargs)\n",
    "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(1, 2)}`);",
    "async function f() { await Promise.all([a(), b()]); }",
    "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
    "<!DOCTYPE html>\n<html><body><div class=\"a\">&amp; &lt;p&gt;</div></body></html>",
    "#!/bin/bash\nfor f in *.txt; do echo \"$f\" | sed 's/a/b/g' >> out.log; done",
    '{"key": [1, 2.5, -3e10, true, null], "nested": {"a": "b\\u00e9"}}',
    "public static void main(String[] args) { System.out.println(\"Hello\"); }",
    "main :: IO ()\nmain = mapM_ print [x | x <- [1..10], even x]",
    "\\begin{equation}\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}\\end{equation}",
    "^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@(?:[a-z0-9-]+\\.)+[a-z]{2,}$",
    "x<<=2; y>>>=1; z **= 3; a ?? b; c?.d; e !== f; g::h",
    "    if (x) {\r\n        return;\r\n    }\r\n",
    "// TODO: fix\n/* multi\n   line */\n# comment\n-- sql comment\n",
    "diff --git a/x.py b/x.py\n@@ -1,3 +1,4 @@\n-old\n+new\n",
]
UNICODE = [
    "café naïve résumé façade jalapeño Ångström",
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301",  # NFD: combining acute/diaeresis
    "Ελληνικά κείμενα", "Русский текст, ёлка", "עברית", "العربية مع أرقام ١٢٣",
    "हिन्दी भाषा", "ภาษาไทย", "ქართული", "Հայերեն", "አማርኛ",
    "中文分词测试，包含标点。", "日本語のテキスト、カタカナとひらがな。", "한국어 텍스트",
    "\u1100\u1161\u11a8",  # NFD Hangul jamo, NFC-composes to 각
    "𠀀𠀁𪚥 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚", "😀😃😄😁 🎉🎊", "👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈 🧑‍🤝‍🧑",
    "👍🏻👍🏼👍🏽👍🏾👍🏿", "🇫🇷🇯🇵🇺🇸", "1️⃣ #️⃣ ©️ ™", "❤️‍🔥 ☺︎ ☺️",
    "Z̷̢̛a̴͎͝l̸̰̚g̶̣̈́o̵̖͑ ť̸̬e̷̩͊x̸̹̿t̴̯̕", "a\u0300\u0301\u0302\u0303\u0304",
    "zero\u200bwidth\u200cjoin\u200dner\ufeffbom", "nbsp\u00a0here\u3000ideographic",
    "full-width ＡＢＣ１２３！", "math ∀x∈ℝ: x²≥0 ⇒ √x² = |x| ≠ ∞", "arrows ←↑→↓ ⟨⟩ «» „“ ‚‘",
    "replacement \ufffd char", "ﬁ ﬂ ligatures Ⅻ ① ㎏", "Ω Å K (compat/canonical singletons \u2126 \u212b \u212a)",
]
WHITESPACE = [
    "", " ", "  ", "   ", " " * 17, "\t", "\t\t\t", "\n", "\n\n", "\n\n\n\n", "\r\n", "\r\n\r\n", "\r",
    " \n ", "\t\n\t", "a  b   c    d", "trailing   ", "   leading", "x\n\n\ny", "tab\tsep\tvalues",
    "\x0b\x0c", " \t \n \r\n ", "end\n", "  \n  \n", "a\r\nb\rc\nd",
]
NUMBERS = [
    "0", "7", "42", "1234567890", "3.14159265358979", "-0.0001", "1e-10", "6.022e23", "0x1F 0b1010 0o777",
    "1,000,000", "12 345 678", "99999999999999999999999999999999", "v1.2.3-rc4", "2024-01-31T23:59:59Z",
    "+1 (555) 123-4567", "１２３４", "٠١٢٣٤٥", "½ ¾ ²³",
]
WORDS = [
    "I'm", "don't", "THEY'RE here", "we'll", "she'd", "it's", "You've", "O'Neil", "rock'n'roll", "don’t",
    "'s 't 're 've 'm 'll 'd", "'S 'T 'RE", "'TWAS 'SUP THEY'REALLY 'Mmm",
    "'SELECT'\n'DEVELOPER'",  # (?i:) contractions: an uppercase ' chunk here tokenizes differently without it
    "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "HELLO WORLD", "hello_world", "camelCaseIdentifier", "snake_case_identifier", "kebab-case-id",
    "e.g. i.e. etc.", "Mr. Smith's car", "a--b...c!!!d???", "@user #tag $var %mod ^caret &amp *star",
]
SPECIAL = [
    "<|im_start|>user\nhello<|im_end|>\n", "a<|endoftext|>b", "<|endoftext|>", "<|im_end|><|im_end|>",
    " <|im_start|> ", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<|im_", "<|IM_END|>", "<|im_end|", "[PAD151665]", "<|repo_name|>x<|file_sep|>y.py\n", "<|endoftext|>é",
    "\x00", "a\x00b", "\x01\x02\x7f", "\x1b[31mred\x1b[0m",
]
_POOL = ("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 \t\n\r.,;:'\"!?-_()[]{}<>/\\|@#$%^&*+=~`"
         "éèêëàâäôöûüçñÅßæø ΑΒΓαβγ АБВабв 中文日本語한국어 ひらがな カタカナ 😀🎉👍🏽👨‍👩‍👧 \u0301\u0308\u200d\ufe0f\u00a0\u3000")


def _random_strings(rng: random.Random, n: int) -> list[str]:
    out = []
    for i in range(n):
        k = rng.randint(0, 40)
        if i % 3 == 0:  # printable code points from anywhere in the BMP and the supplementary planes
            out.append("".join(_printable(rng) for _ in range(k)))
        elif i % 3 == 1:
            out.append("".join(rng.choice(_POOL) for _ in range(k)))
        else:
            out.append("".join(rng.choice(" \t\n\r\r\n0123456789abc'") for _ in range(k)))
    return out


def _printable(rng: random.Random) -> str:
    while True:
        c = chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF), rng.randint(0x3000, 0xD7FF),
                            rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x2FFFF)]))
        if c.isprintable():
            return c


def corpus(seed: int = SEED) -> list[str]:
    base = CODE + UNICODE + WHITESPACE + NUMBERS + WORDS + SPECIAL
    framed = [f"{p}{s}{q}" for s in CODE[:6] + UNICODE[:12] + WORDS[:12] + NUMBERS[:6]
              for p, q in [(" ", ""), ("\n", "  ")]]
    return base + framed + _random_strings(random.Random(seed), 130)


nfc = _NFC().normalize_str
CORPUS = corpus()
assert len(CORPUS) >= 300, len(CORPUS)
NFC = [nfc(s) for s in CORPUS]


def stream(tok, ids, detok=None):
    """The segments the streaming detokenizer emits, fed one id at a time, then finalized."""
    detok = detok or tok.detokenizer
    detok.reset()
    segments = []
    for i in ids:
        detok.add_token(i)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    return segments


def check_stream(tok, ids, context):
    full = tok.decode(ids)
    segments = stream(tok, ids)
    assert "".join(segments) == full, (SEED, context, ids, segments)
    if "\ufffd" not in full:
        assert not any("\ufffd" in s for s in segments), (SEED, context, ids, segments)


def random_id_sequences(tok, rng, n=150):
    """Id sequences a model could emit: single bytes (incl. stray UTF-8 lead/continuation bytes),
    random vocab tokens and special tokens, mixed."""
    vocab = tok.get_vocab()
    byte_ids = [vocab[c] for c in bytes_to_unicode().values()]
    specials = sorted(tok.added_tokens_decoder)
    out = []
    for _ in range(n):
        seq = []
        for _ in range(rng.randint(1, 24)):
            r = rng.random()
            seq.append(rng.choice(byte_ids) if r < 0.6 else rng.choice(specials) if r < 0.7 else rng.randrange(len(tok)))
        out.append(seq)
    return out


def test_reference_nfc_is_nfc():
    """The tokenizers NFC used as reference agrees with Python's on the hand-written corpus
    (old characters only, whose normalization data Unicode keeps stable), and changes some of it."""
    hand = CORPUS[:len(CORPUS) - 130]
    assert [nfc(s) for s in hand] == [unicodedata.normalize("NFC", s) for s in hand]
    assert sum(nfc(s) != s for s in hand) >= 3


# ---------------------------------------------------------------- tiny GGUF (fast)

TINY_TEXT = ["the def f() = 1", " the cat\n\tis here  ", "héllo wörld", "中文 😀 👨‍👩‍👧", "e\u0301", "",
             "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b", "\x00\x7f\r\n"]


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    path = tiny_gguf()
    return path, load_tokenizer(path)


def test_tiny_builds_with_ids_from_the_file(tiny):
    path, tok = tiny
    tokens, _, _ = tiny_vocab()
    assert isinstance(tok, TokenizerWrapper) and len(tok) == len(tokens)
    assert tok.get_vocab() == {t: i for i, t in enumerate(tokens)}
    for s in SPECIALS:
        assert tok.encode(s) == [tokens.index(s)]
        assert tok.encode(f"x{s}y") == tok.encode("x") + [tokens.index(s)] + tok.encode("y")
    assert tok.eos_token_ids == {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")}
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.chat_template == CHAT_TEMPLATE
    # Same tokenizer from an already-open reader.
    other = load_tokenizer(gguf.GGUFReader(path))
    assert [other.encode(s) for s in TINY_TEXT] == [tok.encode(s) for s in TINY_TEXT]


def test_tiny_roundtrip_and_merges(tiny):
    _, tok = tiny
    for s in TINY_TEXT + CORPUS[:80]:
        assert tok.decode(tok.encode(s)) == nfc(s), (SEED, s)
    # The merges are applied: " the" is one token, and no BOS is added.
    tokens = tiny_vocab()[0]
    assert tok.encode(" the") == [tokens.index("Ġthe")]
    assert tok.encode("e\u0301") == tok.encode("é") == list("é".encode())  # NFC, then one id per byte here


def test_tiny_matches_transformers(tiny):
    path, tok = tiny
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for s, n in zip(TINY_TEXT + CORPUS, [nfc(s) for s in TINY_TEXT + CORPUS]):
        assert tok.encode(s) == hf.encode(n), (SEED, s)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "héllo the"}]
    for gen in (False, True):
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
            hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == \
            hf.apply_chat_template(msgs, add_generation_prompt=gen, return_dict=False)


def test_tiny_streaming(tiny):
    _, tok = tiny
    for s in TINY_TEXT + CORPUS:
        ids = tok.encode(s)
        check_stream(tok, ids, s)
    # This vocab has no multi-byte tokens, so every non-ASCII character is split across tokens.
    assert "\ufffd" in tok.decode(tok.encode("中")[:1])
    for ids in random_id_sequences(tok, random.Random(SEED)):
        check_stream(tok, ids, "random ids")


def test_detokenizer_is_reusable_and_independent(tiny):
    _, tok = tiny
    a, b = tok.detokenizer, tok.detokenizer
    assert a is not b
    ids1, ids2 = tok.encode(" 中文 x"), tok.encode("😀 y")
    for i in ids1:
        a.add_token(i)
    assert "".join(stream(tok, ids2, b)) == tok.decode(ids2)  # b unaffected by a
    a.finalize()
    assert a.text == tok.decode(ids1) and a.tokens == ids1
    assert "".join(stream(tok, ids2, a)) == tok.decode(ids2)  # reset() clears a


def test_save_pretrained_roundtrip(tiny, tmp_path):
    _, tok = tiny
    tok.save_pretrained(tmp_path / "a")
    tok.save_pretrained(tmp_path / "b", save_jinja_files=False)
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}]
    for d in ("a", "b"):
        back = AutoTokenizer.from_pretrained(tmp_path / d)
        assert [back.encode(s) for s in CORPUS] == [tok.encode(s) for s in CORPUS]
        assert back.decode(tok.encode("中文 the")) == "中文 the"
        assert back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert (back.eos_token, back.bos_token, back.pad_token) == (tok.eos_token, tok.bos_token, tok.pad_token)
        # mlx-lm recognises the byte-level decoder in the saved tokenizer.json.
        assert isinstance(mlx_lm_load_tokenizer(tmp_path / d)._detokenizer, BPEStreamingDetokenizer)


# ---------------------------------------------------------------- converted directory (tiny)

def assert_same_tokenizer(gguf_tok, dir_tok, texts, id_sequences):
    """Both load paths give the same wrapper: our detokenizer, the same eos ids and encodings, and
    streaming the same ids yields `decode(ids)` (the same for both) segment by segment."""
    for tok in (gguf_tok, dir_tok):
        assert isinstance(tok._detokenizer, QwenStreamingDetokenizer), type(tok._detokenizer)
    assert dir_tok.eos_token_ids == gguf_tok.eos_token_ids and len(gguf_tok.eos_token_ids) == 2
    assert dir_tok.get_vocab() == gguf_tok.get_vocab()
    for s in texts:
        ids = gguf_tok.encode(s)
        assert dir_tok.encode(s) == ids, (SEED, s)
        full = gguf_tok.decode(ids)
        assert dir_tok.decode(ids) == full
        a, b = stream(gguf_tok, ids), stream(dir_tok, ids)
        assert a == b and "".join(a) == full, (SEED, s, ids, a, b)
    for ids in id_sequences:
        a, b = stream(gguf_tok, ids), stream(dir_tok, ids)
        assert a == b and "".join(b) == dir_tok.decode(ids) == gguf_tok.decode(ids), (SEED, ids, a, b)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    from qwen_mlx.convert import convert

    return convert(tiny[0], tmp_path_factory.mktemp("converted") / "out", dtype="float32", progress=False)


def test_tiny_directory_streams_like_gguf(tiny, tiny_dir):
    """`load(converted_dir)` used to wrap its tokenizer with mlx-lm's BPEStreamingDetokenizer, which
    drops the first segment's leading space: " hello world" streamed as "hello world"."""
    import qwen_mlx

    _, gguf_tok = tiny
    dir_tok = load_tokenizer(tiny_dir)
    texts = [" hello world", "  two spaces", " 中文"] + TINY_TEXT + CORPUS
    assert len(texts) >= 300
    assert_same_tokenizer(gguf_tok, dir_tok, texts, random_id_sequences(gguf_tok, random.Random(SEED)))
    assert "".join(stream(dir_tok, gguf_tok.encode(" hello world"))) == " hello world"
    msgs = [{"role": "user", "content": "hi"}]
    assert dir_tok.apply_chat_template(msgs, add_generation_prompt=True) == \
        gguf_tok.apply_chat_template(msgs, add_generation_prompt=True)
    # the loader's directory path is this same construction
    _, loaded = qwen_mlx.load(tiny_dir, dtype="float32")
    assert isinstance(loaded._detokenizer, QwenStreamingDetokenizer) and loaded.eos_token_ids == gguf_tok.eos_token_ids


def test_directory_tokenizer_json_is_qwen2s(tiny_dir):
    """What the converter writes is Qwen2's own pipeline (transformers' Qwen2 split regex, NFC,
    byte-level without its own regex), not Mistral's regex transformers warns about; config.json
    names the transformers that wrote it, which is what makes transformers skip that check."""
    from packaging.version import Version
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tj = json.loads((tiny_dir / "tokenizer.json").read_text())
    split, byte_level = tj["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"] == {"Regex": PRETOKENIZE_REGEX}
    assert split["behavior"] == "Isolated" and not split["invert"]
    assert byte_level["type"] == "ByteLevel" and not byte_level["use_regex"] and not byte_level["add_prefix_space"]
    assert tj["normalizer"]["type"] == "NFC" and tj["decoder"]["type"] == "ByteLevel"
    version = json.loads((tiny_dir / "config.json").read_text())["transformers_version"]
    assert Version(version) >= Version("5.0")


# ---------------------------------------------------------------- errors

def _write(path, **kv):
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    if "model" in kv:
        w.add_tokenizer_model(kv["model"])
        w.add_token_list(["a", "b", "ab"])
    if "pre" in kv:
        w.add_tokenizer_pre(kv["pre"])
        w.add_token_merges(["a b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kv, message", [
    ({}, "no tokenizer"),
    ({"model": "llama"}, "unsupported tokenizer.ggml.model 'llama'"),
    ({"model": "gpt2"}, "without tokenizer.ggml.merges"),
    ({"model": "gpt2", "pre": "llama-bpe"}, "unsupported pre-tokenizer"),
])
def test_clear_errors(tmp_path, kv, message):
    path = _write(tmp_path / "bad.gguf", **kv)
    for source in (path, str(path), gguf.GGUFReader(path)):
        with pytest.raises(TokenizerLoadError) as e:
            load_tokenizer(source)
        assert isinstance(e.value, ValueError)
        text = str(e.value)
        assert message in text and "bad.gguf" in text and "\n" not in text


# ---------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def real(default_model):
    t = time.perf_counter()
    ours = load_tokenizer(default_model)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    hf = AutoTokenizer.from_pretrained(str(default_model.parent), gguf_file=default_model.name)
    print(f"load_tokenizer {t_ours:.1f} s, transformers GGUF tokenizer {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return ours, hf


@pytest.mark.real_model
def test_real_vocab_and_specials(real):
    ours, hf = real
    assert len(ours) == len(hf) == 151936
    assert ours.get_vocab() == hf.get_vocab()
    mine = {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()}
    theirs = {i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()}
    assert mine == theirs and len(mine) == 22  # 20 CONTROL (special) + <tool_call>, </tool_call> (not special)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert ours.eos_token_ids == {hf.eos_token_id, *hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])}
    assert len(ours.eos_token_ids) == 2


@pytest.mark.real_model
def test_real_encode_matches_transformers(real):
    ours, hf = real
    bad = [(s, ours.encode(s), hf.encode(n)) for s, n in zip(CORPUS, NFC) if ours.encode(s) != hf.encode(n)]
    assert not bad, (f"seed {SEED}", bad[:5])
    assert sum(s != n for s, n in zip(CORPUS, NFC)) >= 3  # the corpus does exercise NFC
    # Batch encoding (the wrapped transformers tokenizer; the wrapper is not callable) agrees too.
    assert ours._tokenizer(CORPUS[:40])["input_ids"] == [ours.encode(s) for s in CORPUS[:40]]


@pytest.mark.real_model
def test_real_roundtrip(real):
    ours, hf = real
    for s, n in zip(CORPUS, NFC):
        ids = ours.encode(s)
        assert ours.decode(ids) == n == hf.decode(ids), (SEED, s)
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.real_model
def test_real_streaming(real):
    ours, _ = real
    split = 0
    for s in CORPUS:
        ids = ours.encode(s)
        check_stream(ours, ids, s)
        split += any("\ufffd" in ours.decode([i]) for i in ids)
    assert split >= 5  # multi-byte characters split across tokens do occur in the corpus
    for ids in random_id_sequences(ours, random.Random(SEED)):
        check_stream(ours, ids, "random ids")


@pytest.mark.real_model
def test_real_chat_template(real):
    ours, hf = real
    conversations = [
        [{"role": "user", "content": "Write a function that reverses a string."}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "héllo 中文 😀\n\tcode"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c <|im_end|> d"}],
    ]
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Now.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for msgs in conversations:
        for gen in (False, True):
            for kw in ({}, {"tools": tools}):
                text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
                assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
                ids = ours.apply_chat_template(msgs, add_generation_prompt=gen, **kw)
                assert ids == hf.apply_chat_template(msgs, add_generation_prompt=gen, return_dict=False, **kw)
                assert ids == hf.encode(text) and ours.decode(ids) == text
    assert text.endswith("<|im_start|>assistant\n") and "# Tools" in text


@pytest.fixture(scope="module")
def real_dir(converted_default_model):
    """The converted default model's tokenizer, through our loader and mlx-lm's, with transformers'
    log records (the spurious "incorrect regex pattern ... fix_mistral_regex=True" warning) kept."""
    import logging

    from mlx_lm.tokenizer_utils import load as mlx_lm_load

    out, _ = converted_default_model
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        ours, theirs = load_tokenizer(out), mlx_lm_load(out)
    finally:
        logger.removeHandler(handler)
    return ours, theirs, [r.getMessage() for r in records]


@pytest.mark.real_model
def test_real_directory_streams_like_gguf(real, real_dir):
    ours, _ = real
    dir_tok, mlx_lm_tok, warnings = real_dir
    assert not [w for w in warnings if "regex" in w], warnings
    assert_same_tokenizer(ours, dir_tok, CORPUS, random_id_sequences(ours, random.Random(SEED), n=60))
    assert mlx_lm_tok.encode(CORPUS[0]) == ours.encode(CORPUS[0])


@pytest.mark.real_model
def test_real_save_pretrained(real, tmp_path):
    ours, hf = real
    ours.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert [back.encode(s) for s in CORPUS] == [hf.encode(n) for n in NFC]
    msgs = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
