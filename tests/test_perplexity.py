"""llama.cpp's perplexity convention (`--llama-cpp`), pinned against a direct float64 numpy computation.

The reference below takes only the model's logits (one forward per chunk); the chunking, the
choice of scored positions (llama.cpp's perplexity.cpp: `first = n_ctx/2`, `n_ctx - 1 - first`
tokens per chunk, `n_chunk = n_tokens / n_ctx`), the log-softmax and the mean are numpy float64,
written from that source and not from qwen_mlx.perplexity.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import qwen_mlx
import mlx.core as mx
from qwen_mlx.perplexity import added_bos, chunk_nlls, chunks, main as ppl_main

TEXT = "def merge(a, b):\n    return sorted(a + b)\n\nThe cat sat on the mat, and the dog sat on the log. "


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    path = tiny_gguf(qtype="F32", tied=False, seed=11)
    model, tok = qwen_mlx.load(path, dtype="float32")
    return path, model, tok


def llama_cpp_reference(model, tokens, n_ctx, bos=None):
    """float64 NLLs of the tokens llama-perplexity scores, from the model's logits per chunk."""
    tokens = np.asarray(tokens)
    first = n_ctx // 2
    out = []
    for c in range(len(tokens) // n_ctx):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
        if bos is not None:
            chunk[0] = bos
        logits = np.array(model(mx.array(chunk[None]))[0], dtype=np.float64)  # [n_ctx, vocab]
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        pos = np.arange(first, n_ctx - 1)  # the logits at pos predict chunk[pos + 1]
        out.append(-logp[pos, chunk[pos + 1]])
    return np.concatenate(out)


@pytest.mark.parametrize("n_ctx,extra", [(64, 0), (41, 17)])
def test_llama_cpp_chunks_match_float64_numpy(tiny, n_ctx, extra):
    """Same scored tokens, same count (n_chunk * (n_ctx - 1 - n_ctx//2)), and the same NLLs: both
    sides start from the same float32 logits; ours takes a float32 log-softmax (relative error
    ~1e-7 of |logit| ~ 10 -> ~1e-6 absolute per token), so 1e-5 absolute per token and 1e-6 relative
    on the mean are wide margins that a shifted position (an NLL off by O(1)) cannot meet."""
    _, model, tok = tiny
    ids = tok.encode(TEXT * 6, add_special_tokens=False)
    ids = ids[:3 * n_ctx + extra]  # a tail shorter than a chunk: dropped
    assert len(ids) == 3 * n_ctx + extra
    ref = llama_cpp_reference(model, ids, n_ctx)
    got = chunk_nlls(model, ids, n_ctx).astype(np.float64)
    assert got.size == ref.size == 3 * (n_ctx - 1 - n_ctx // 2)
    assert np.abs(got - ref).max() < 1e-5
    assert abs(np.exp(got.mean()) / np.exp(ref.mean()) - 1) < 1e-6
    # the BOS option replaces each chunk's first token
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    got_bos = chunk_nlls(model, ids, n_ctx, bos=bos).astype(np.float64)
    assert np.abs(got_bos - llama_cpp_reference(model, ids, n_ctx, bos=bos)).max() < 1e-5
    assert np.abs(got_bos - got).max() > 1e-4  # and that changes the numbers (the test would see it)


def test_chunks_and_refusals():
    assert chunks(10, 4) == [(0, 4, 3), (4, 8, 7)]
    with pytest.raises(ValueError, match="at least one chunk of 512"):
        chunks(100, 512)


def test_qwen_tokenizer_adds_no_bos(tiny):
    assert added_bos(tiny[2]) is None  # as llama.cpp reads Qwen's GGUF (add_bos_token false)


def test_llama_cpp_cli(tiny, tmp_path, capsys):
    path, model, tok = tiny
    f = tmp_path / "t.txt"
    f.write_text(TEXT * 6)
    assert ppl_main(["--model", str(path), "--file", str(f), "--context", "48", "--llama-cpp",
                     "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"perplexity ([\d.]+) \+/- ([\d.]+) .* over (\d+) tokens", out)
    ref = llama_cpp_reference(model, tok.encode(TEXT * 6, add_special_tokens=False), 48)
    assert int(m.group(3)) == ref.size
    assert abs(float(m.group(1)) / np.exp(ref.mean()) - 1) < 1e-4  # printed to 4 decimals
    err = np.exp(ref.mean()) * np.sqrt(ref.var() / (ref.size - 1))  # llama.cpp's estimate
    assert abs(float(m.group(2)) - err) < 1e-4 + 1e-3 * err
