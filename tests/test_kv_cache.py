"""Quantized and rotating KV caches, prompt caches on disk (qwen_mlx.kv_cache, qwen_mlx.cache_prompt).

References: the full-precision cache (the plain path), a full-precision forward with K/V replaced
by their quantize-dequantize round trip (what a quantized cache must compute), a full forward with
an explicit window mask (what a rotating cache must compute), and generation from the prompt
itself (what a loaded prompt cache must reproduce).
"""

import importlib
import json
import sys

import mlx.core as mx
import numpy as np
import pytest

import qwen_mlx
from qwen_mlx import cache_prompt
from qwen_mlx.generation import generate as generate_text, generate_step, stream_generate
from mlx_lm.models.cache import QuantizedKVCache

from qwen_mlx.kv_cache import (BlockQuantizedKVCache, PromptCacheError, cache_nbytes, cache_options, continuation, load_prompt_cache_file,
                               maybe_quantize, new_cache, read_metadata, save_prompt_cache_file)
from qwen_mlx.research import patch

cli = importlib.import_module("qwen_mlx.generate")  # the CLI module (qwen_mlx.generate is also a function)


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    path = tiny_gguf(qtype="F32", seed=5, context=4096)
    model, tok = qwen_mlx.load(path, dtype="float32")
    return path, model, tok


def random_tokens(n, seed):
    return np.random.default_rng(seed).integers(0, 280, n).tolist()


# ---- quantized cache ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_computes_attention_over_round_tripped_kv(tiny, bits):
    """A cache quantized from the first token must equal a full-precision forward whose K and V
    are replaced by mx.dequantize(mx.quantize(.)): same values, only the matmul differs (float32
    summation order, ~1e-6 relative). The plain forward (no quantization) sits much further from
    that reference (8 bits: ~6e-4 of the logit scale on this model, 4 bits ~1e-2), so agreeing
    20x closer than it shows the cache really attends over the quantized values."""
    _, model, _ = tiny
    toks = mx.array([random_tokens(300, bits)])

    def round_trip(x):
        return mx.dequantize(*mx.quantize(x, group_size=64, bits=bits), group_size=64, bits=bits)

    cache = model.make_cache(kv_bits=bits, kv_group_size=64)
    ours = np.array(mx.concatenate([model(toks[:, :257], cache=cache)] +
                                   [model(toks[:, i:i + 1], cache=cache) for i in range(257, 300)], axis=1))
    with patch({"layers.*.k": round_trip, "layers.*.v": round_trip}, model):
        ref = np.array(model(toks))
    plain = np.array(model(toks))
    err, quant_effect = np.abs(ours - ref).max(), np.abs(plain - ref).max()
    assert err < 1e-5 * np.abs(ref).max() and err * 20 < quant_effect, (err, quant_effect)


def test_generation_quantizes_at_quantized_kv_start(tiny):
    _, model, _ = tiny
    kv = cache_options(kv_bits=8, quantized_kv_start=40)
    cache = new_cache(model, kv)
    kinds = []
    for _ in generate_step(mx.array(random_tokens(30, 1)), model, max_tokens=20, cache=cache, kv=kv):
        kinds.append((cache[0].offset, type(cache[0]).__name__))
    assert all(k == "KVCache" for off, k in kinds if off < 40) and kinds[-1][1] == "QuantizedKVCache"
    assert all(type(c).__name__ == "QuantizedKVCache" and c.bits == 8 for c in cache)


def feed(caches, k, v):
    for c in caches:
        c.update_and_fetch(k, v)


def test_block_cache_stores_exactly_what_mlx_lm_stores():
    """BlockQuantizedKVCache against mlx-lm's QuantizedKVCache fed the same keys and values: a
    prompt, one-token steps across several tail flushes and buffer growths, a prefill chunk in the
    middle, a trim: after each phase the packed buffers (read through `state`, which flushes) are
    bit-identical up to the offset (capacities may differ) and the offsets equal; while tokens wait in the tail, `tail()` holds them exactly."""
    g = np.random.default_rng(int.from_bytes(__import__("os").urandom(4), "little"))
    arr = lambda n: mx.array(g.standard_normal((1, 2, n, 64)) * 3, mx.float32)
    ours, theirs = BlockQuantizedKVCache(group_size=32, bits=4), QuantizedKVCache(group_size=32, bits=4)
    ours.block = 16
    feed((ours, theirs), arr(37), arr(37))

    def same():
        assert ours.offset == theirs.offset
        for a, b in zip(ours.state[0] + ours.state[1], theirs.state[0] + theirs.state[1]):
            assert np.array_equal(np.array(a[..., :ours.offset, :]), np.array(b[..., :ours.offset, :]))

    for phase in (40, 3, 300):  # one-token steps, then a 5-token chunk after each phase
        for i in range(phase):
            k, v = arr(1), arr(1)
            feed((ours, theirs), k, v)
            tk, tv, nt = ours.tail()
            assert nt == (i % 16) + 1 and np.array_equal(np.array(tk[..., nt - 1:nt, :]), np.array(k))
            assert np.array_equal(np.array(tv[..., nt - 1:nt, :]), np.array(v))
        same()
        feed((ours, theirs), arr(5), arr(5))
        assert ours.tail() is None
        same()
    feed((ours, theirs), arr(1), arr(1))
    assert ours.trim(4) == theirs.trim(4) == 4 and ours.tail() is None
    same()


def test_block_cache_attends_over_quantized_blocks_and_the_exact_tail(tiny):
    """The model decoding one token at a time on a BlockQuantizedKVCache (blocks of 16, the prompt of
    257 tokens quantized as one chunk) equals a full-precision forward whose K and V are replaced by
    their quantize-dequantize round trip at exactly the positions the cache has quantized (the
    tail's stay exact): float32 summation order only (~1e-6 relative). The same forward with every
    position round-tripped is much further off (so the tail is really read unrounded)."""
    _, model, _ = tiny
    toks = mx.array([random_tokens(300, 7)])
    cache = [BlockQuantizedKVCache(group_size=64, bits=4) for _ in model.layers]
    for c in cache:
        c.block = 16
    ours = [model(toks[:, :257], cache=cache)[0, -1]] + [model(toks[:, i:i + 1], cache=cache)[0, -1]
                                                           for i in range(257, 299)]

    def forward(quantized):  # logits of the whole sequence, K/V round-tripped below `quantized`
        def rt(x):
            r = mx.dequantize(*mx.quantize(x, group_size=64, bits=4), group_size=64, bits=4)
            return mx.concatenate([r[:, :, :quantized], x[:, :, quantized:]], axis=2)
        with patch({"layers.*.k": rt, "layers.*.v": rt}, model):
            return np.array(model(toks[:, :299])[0])

    refs = {b: forward(b) for b in (257, 273, 289, 299)}
    err = quant_effect = 0.0
    for p, logits in enumerate(ours, start=256):  # logits of position p, which sees positions 0..p
        quantized = 257 if p < 257 else 257 + 16 * ((p - 257) // 16)
        err = max(err, np.abs(np.array(logits) - refs[quantized][p]).max())
        if p >= 257:
            quant_effect = max(quant_effect, np.abs(refs[299][p] - refs[quantized][p]).max())
    print("err", err, "quantization effect", quant_effect)
    assert err < 1e-5 * np.abs(refs[299]).max() and err * 20 < quant_effect, (err, quant_effect)


def test_block_cache_where_quant_sdpa_runs_and_in_files(tiny, tmp_path, monkeypatch):
    """Where quantized attention runs through metal_kernels.quant_sdpa (NVIDIA GPUs; forced here),
    generation's quantized layers are BlockQuantizedKVCaches; a prompt-cache file written from them
    holds mlx-lm's QuantizedKVCache, loads, and its arrays equal the flushed cache's."""
    import types
    from qwen_mlx import kv_cache
    _, model, tok = tiny
    monkeypatch.setattr(kv_cache, "K", types.SimpleNamespace(runs_quant_sdpa=lambda: True))
    kv = cache_options(kv_bits=8, quantized_kv_start=0)
    cache = new_cache(model, kv)
    ids = random_tokens(30, 3)
    out = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=12, cache=cache, kv=kv)]
    assert all(type(c) is BlockQuantizedKVCache and c.tail() is not None for c in cache)
    f = tmp_path / "block.safetensors"
    save_prompt_cache_file(f, cache, ids + out[:-1], model, tok)
    assert read_metadata(f)["classes"] == ["QuantizedKVCache"] * len(model.layers)
    loaded, tokens, _, _ = load_prompt_cache_file(f, model, tok)
    assert tokens == ids + out[:-1] and all(c.tail() is None for c in cache)
    for a, b in zip(loaded, cache):
        for x, y in zip(a.state[0] + a.state[1], b.state[0] + b.state[1]):
            assert np.array_equal(np.array(x), np.array(y))


def test_cache_options_refuse_bad_settings():
    for kw in (dict(kv_bits=7), dict(kv_group_size=48), dict(quantized_kv_start=-1), dict(max_kv_size=4),
               dict(kv_bits=4, max_kv_size=1024)):
        with pytest.raises(ValueError) as e:
            cache_options(**kw)
        assert "\n" not in str(e.value)


# ---- rotating cache -------------------------------------------------------------------------

W, KEEP = 64, 4


def test_rotating_cache_equals_full_cache_within_the_window(tiny):
    _, model, _ = tiny
    toks = mx.array([random_tokens(W, 2)])
    full = np.array(model(toks))
    cache = model.make_cache(max_kv_size=W, keep=KEEP)
    parts = [model(toks[:, :20], cache=cache)] + [model(toks[:, i:i + 1], cache=cache) for i in range(20, W)]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, 1)), full, atol=1e-5, rtol=1e-5)


def test_rotating_cache_beyond_the_window_keeps_first_and_recent_tokens_in_flat_memory(tiny):
    """Token by token past the window, each position must see exactly the first KEEP tokens and the
    W - KEEP most recent ones (itself included): a full forward with that boolean mask. Cache
    bytes stop growing once the window is full."""
    _, model, _ = tiny
    n = 3 * W
    toks = mx.array([random_tokens(n, 3)])
    i, j = np.arange(n)[:, None], np.arange(n)[None]
    mask = mx.array((j <= i) & ((j < KEEP) | (j > i - (W - KEEP))))
    ref = np.array(model(toks, mask=mask))
    cache = model.make_cache(max_kv_size=W, keep=KEEP)
    outs, sizes = [model(toks[:, :W // 2], cache=cache)], []
    for p in range(W // 2, n):
        outs.append(model(toks[:, p:p + 1], cache=cache))
        mx.eval(outs[-1])
        sizes.append(cache_nbytes(cache))
    np.testing.assert_allclose(np.array(mx.concatenate(outs, 1)), ref, atol=1e-4, rtol=1e-4)
    assert len(set(sizes[W:])) == 1 and sizes[-1] <= sizes[W // 2] * 1.0001


def test_rotating_generation_runs_past_the_window(tiny):
    _, model, tok = tiny
    rs = list(stream_generate(model, tok, random_tokens(40, 4), max_tokens=3 * W, max_kv_size=W))
    assert len(rs) == 3 * W or rs[-1].finish_reason == "stop"


# ---- prompt caches on disk ------------------------------------------------------------------

def run_cli(main, argv, capsys):
    """(exit code, stdout, stderr) of a CLI's main(argv), run in this process."""
    msg = ""
    try:
        main(argv)
        code = 0
    except SystemExit as e:  # sys.exit("error: ...") prints its message only when the process exits
        code, msg = (e.code, "") if isinstance(e.code, int) else (1, f"{e.code}\n")
    out, err = capsys.readouterr()
    return code, out, err + msg


@pytest.mark.parametrize("kv_flags", [[], ["--kv-bits", "8", "--quantized-kv-start", "0"]])
def test_cli_prompt_cache_continues_like_the_whole_prompt(tiny, tmp_path, capsys, kv_flags):
    path, _, _ = tiny
    doc, question = "the cat sat on the mat and then the dog came in", " what sat on the mat?"
    (tmp_path / "doc.txt").write_text(doc)
    out = str(tmp_path / "c.safetensors")
    code, _, err = run_cli(cache_prompt.main, ["--model", str(path), "--prompt-file", str(tmp_path / "doc.txt"),
                                               "--out", out, "--system", "be brief"] + kv_flags, capsys)
    assert code == 0, err
    common = ["--model", str(path), "-m", "24"] + kv_flags
    code, from_cache, err = run_cli(cli.main, common + ["--prompt-cache-file", out, "--prompt", question], capsys)
    assert code == 0, err
    if not kv_flags:  # the plain path: the whole prompt at once
        code, whole, err = run_cli(cli.main, common + ["--system", "be brief", "--prompt", doc + question], capsys)
        assert code == 0, err
        assert from_cache == whole and len(whole.strip()) > 0
    # the API with the same chunks (a quantized cache depends on them: the cached part is quantized
    # before the continuation attends to it)
    _, model, tok = tiny
    kv = cache_options(kv_bits=8, quantized_kv_start=0) if kv_flags else cache_options()
    head = cache_prompt.prompt_ids(tok, doc, "be brief", True, open_turn=True)
    ids = cache_prompt.prompt_ids(tok, doc + question, "be brief", True, open_turn=False)
    cache = new_cache(model, kv)
    cache_prompt.prefill(model, head, cache, kv)
    text = generate_text(model, tok, continuation(head, ids), max_tokens=24, cache=cache, kv_bits=kv.kv_bits,
                             quantized_kv_start=kv.quantized_kv_start)
    assert from_cache == text + "\n"
    # the flags must agree with the file's KV settings
    other = ["--kv-bits", "4"] if not kv_flags else ["--max-kv-size", "100"]
    code, _, err = run_cli(cli.main, ["--model", str(path), "--prompt-cache-file", out] + other, capsys)
    assert code == 1 and "KV settings" in err


def make_cache_file(tiny, tmp_path, name="c.safetensors", n=50):
    path, model, tok = tiny
    ids = random_tokens(n, 6)
    cache = model.make_cache()
    model(mx.array([ids]), cache=cache)
    f = tmp_path / name
    save_prompt_cache_file(f, cache, ids, model, tok, extra={"prompt": "", "system": "", "template": "raw"})
    return f, ids


def test_loaded_cache_is_the_saved_cache_and_metadata_has_no_pickle(tiny, tmp_path):
    _, model, tok = tiny
    f, ids = make_cache_file(tiny, tmp_path)
    cache, tokens, opts, meta = load_prompt_cache_file(f, model, tok)
    assert tokens == ids and opts == cache_options() and meta["template"] == "raw"
    assert all(isinstance(v, str) and json.loads(meta["tokens"]) for v in [meta["tokens"]])
    assert f.read_bytes()[:1] != b"\x80"  # not a pickle: an 8-byte header length, then JSON
    header = f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")]
    assert json.loads(header)["__metadata__"]["0.format"] == "qwen-mlx prompt cache 1"


def expect_refusal(f, model, tok, *words):
    with pytest.raises(PromptCacheError) as e:
        load_prompt_cache_file(f, model, tok)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg, msg
    for w in words:
        assert w in msg, msg


def test_refuses_other_model_dtype_format_and_damaged_files(tiny, tiny_gguf, tmp_path):
    path, model, tok = tiny
    f, _ = make_cache_file(tiny, tmp_path)
    other, other_tok = qwen_mlx.load(tiny_gguf(qtype="F32", seed=6, context=4096), dtype="float32")
    expect_refusal(f, other, other_tok, "another model")
    bf16, _ = qwen_mlx.load(path, dtype="bfloat16")
    expect_refusal(f, bf16, tok, "dtype float32", "bfloat16")
    q_path = tiny_gguf(qtype="Q8_0", seed=5, context=4096)
    q_model, q_tok = qwen_mlx.load(q_path, dtype="float32", quantized=True)
    fq = tmp_path / "q.safetensors"
    save_prompt_cache_file(fq, q_model.make_cache(), [], q_model, q_tok)
    deq_model, _ = qwen_mlx.load(q_path, dtype="float32", quantized=False)
    expect_refusal(fq, deq_model, q_tok, "weight format quantized", "dequantized")

    data = f.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:-100])
    expect_refusal(tmp_path / "truncated.safetensors", model, tok, "not a readable safetensors file")
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # inside the last array's data: the header still parses
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    expect_refusal(tmp_path / "flipped.safetensors", model, tok, "content hash")
    (tmp_path / "text.safetensors").write_text("not a cache at all, just some text " * 20)
    expect_refusal(tmp_path / "text.safetensors", model, tok, "not a readable safetensors file")
    mx.save_safetensors(str(tmp_path / "weights.safetensors"), {"w": mx.ones(3)})
    expect_refusal(tmp_path / "weights.safetensors", model, tok, "not a qwen-mlx prompt cache")
    expect_refusal(tmp_path / "missing.safetensors", model, tok, "no such file")
    # nothing half-written when saving fails: the temporary file is gone, the target untouched
    cache = model.make_cache()
    with pytest.raises(ValueError):
        save_prompt_cache_file(tmp_path / "bad.safetensors", cache, [1, 2, 3], model, tok)
    assert not list(tmp_path.glob("bad*"))


def test_cli_refusals_are_one_line_with_exit_1(tiny, tmp_path, capsys):
    path, _, _ = tiny
    f, _ = make_cache_file(tiny, tmp_path)
    code, _, err = run_cli(cli.main, ["--model", str(path), "--dtype", "bfloat16", "--prompt-cache-file", str(f)], capsys)
    assert code == 1 and err.count("\n") == 1 and "dtype" in err
    (tmp_path / "x.txt").write_text("hello")
    code, _, err = run_cli(cli.main, ["--model", str(path), "--prompt-cache-file", str(tmp_path / "x.txt")], capsys)
    assert code == 1 and err.count("\n") == 1 and "safetensors" in err
    code, _, err = run_cli(cli.main, ["--model", str(path), "--prompt-cache-file", str(f), "--chat"], capsys)
    assert code == 2
    code, _, err = run_cli(cli.main, ["--model", str(path), "--kv-bits", "4", "--max-kv-size", "64"], capsys)
    assert code == 2 and err.count("\n") == 1


def test_continuation_checks_the_prefix():
    assert continuation([1, 2, 3], [1, 2, 3, 4, 5]) == [4, 5]
    for ids in ([1, 2, 4, 5], [1, 2, 3], [1, 2]):
        with pytest.raises(ValueError, match="not a prefix"):
            continuation([1, 2, 3], ids)


# ---- the real model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(real_model):
    return real_model


@pytest.fixture(scope="module")
def real_sequences(real_greedy):
    """The reference prompts of test_real_model with 48 greedy tokens from the full-precision cache."""
    return real_greedy


@pytest.mark.real_model
def test_real_model_quantized_kv_teacher_forced_agreement(real, real_sequences):
    """As generation with `kv_bits=8, quantized_kv_start=0` runs (the prompt prefilled, the cache
    quantized, then every new token's K/V quantized before it is attended to), teacher-forced on
    the full-precision cache's greedy continuations: the argmax agrees with the full-precision
    argmax at >= 99% of the continuation positions with 8 bits in groups of 32 and of 64 (measured
    282/282 for both with key smoothing, `qwen_mlx.model.smooth_keys`; without it 280/282 and
    278/282); 4 bits in groups of 64 is reported, not asserted (248/282 = 87.9%; without smoothing
    216/282). Quantizing
    from the very first token (prompt included) is harsher on this model, whose layer-0 keys reach
    ~145 in a few dimensions (docs/architecture.md), so one group's quantization step is large for
    all its other dimensions; that case is not timed here (quantized attention over whole prompts
    is slow on a CPU)."""
    model, _ = real
    stats = {}
    total = 0
    for ids, new in real_sequences:
        seq, n = ids + new, len(ids)
        full = np.array(mx.argmax(model(mx.array([seq]))[0, n:-1], -1))
        total += len(full)
        for bits, group in ((8, 32), (8, 64), (4, 64)):
            kv = cache_options(kv_bits=bits, kv_group_size=group, quantized_kv_start=0)
            cache = new_cache(model, kv)
            model(mx.array([ids]), cache=cache)
            maybe_quantize(cache, kv)
            got = np.array(mx.argmax(model(mx.array([new[:-1]]), cache=cache)[0], -1))
            stats[bits, group] = stats.get((bits, group), 0) + int((got == full).sum())
    print(f"teacher-forced argmax agreement with the full-precision cache over {total} positions: "
          + ", ".join(f"{b}-bit group {g} {stats[b, g] / total:.2%}" for b, g in ((8, 32), (8, 64), (4, 64))))
    assert stats[8, 32] / total >= 0.99 and stats[8, 64] / total >= 0.99, stats


@pytest.mark.real_model
def test_real_model_prompt_cache_round_trip_generates_the_same(real, real_sequences, tmp_path):
    """Greedy generation from a saved and loaded prompt cache equals generation from the prompt
    itself (the long prompt, cached up to 16 tokens before its end)."""
    model, tok = real
    ids, new = max(real_sequences, key=lambda s: len(s[0]))
    head = ids[:-16]
    cache = model.make_cache()
    cache_prompt.prefill(model, head, cache, cache_options())
    f = tmp_path / "real.safetensors"
    save_prompt_cache_file(f, cache, head, model, tok, extra={"prompt": "", "system": "", "template": "raw"})
    loaded, tokens, _, _ = load_prompt_cache_file(f, model, tok)
    got = [r.token for r in stream_generate(model, tok, continuation(tokens, ids), max_tokens=24, cache=loaded)]
    assert got == new[:len(got)] and len(got) >= 16
    assert read_metadata(f)["weights"] == "dequantized"
