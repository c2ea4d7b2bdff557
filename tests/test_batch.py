"""Batched generation (qwen_mlx.batch) against the single-sequence path, `stream_generate`.

The reference for every sequence is the same prompt run alone through `stream_generate` (one
row, no padding, no mask, its own cache): in float32 each sequence's greedy tokens must be the
same, its logprobs equal within float32 rounding, and seeded sampling must give the same tokens
whatever else is in the batch. The batches are built to exercise what could go wrong: prompts of
very different lengths (left padding, per-row RoPE offsets), prefill chunks spread over steps,
sequences joining a running batch, stopping early (EOS, stop strings, max_tokens) and leaving it
(cache compaction), cancelled mid-run, prefix caches in and caches out.

Logprob tolerance: batched and single runs differ only in float32 summation order (a [B, D]
matmul instead of [1, D], attention over a padded, masked key range), ~1e-7 relative per op.
On the 2-layer tiny model the logprobs (magnitude ~5) agree to ~1e-6; 1e-4 leaves two orders of
margin. On the 24-layer real model the same ~1e-7 relative rounding compounds through the
layers on logits of magnitude ~10-30 (a few 1e-5 absolute per layer at most); 2e-3 on a logprob
allows for that and still catches any real error (a wrong position, a leaked padding key or a
wrong row changes logprobs by O(0.1-1)).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qwen_mlx
import mlx.core as mx
from qwen_mlx.batch import BatchGenerator, PromptError, batch_generate, stream_batch_generate
from qwen_mlx.generation import stream_generate


def single(model, tok, prompt, **kw):
    """(tokens, logprobs, text, finish_reason, top_logprobs) of `prompt` run alone."""
    rs = list(stream_generate(model, tok, prompt, **kw))
    return ([r.token for r in rs], [r.logprob for r in rs], "".join(r.text for r in rs), rs[-1].finish_reason,
            [r.top_logprobs for r in rs])


def run_all(gen: BatchGenerator, joins: dict = None) -> dict:
    """Step `gen` to the end; `joins` maps a step number to [(prompt, kwargs)] inserted before it.
    -> {uid: (tokens, logprobs, text, finish_reason, responses)}."""
    joins, out, n = dict(joins or {}), {}, 0
    while gen.has_work() or joins:
        for prompt, kw in joins.pop(n, []):
            gen.insert(prompt, **kw)
        for r in gen.step():
            t, lp, text, _, rs = out.setdefault(r.uid, ([], [], [""], [None], []))
            t.append(r.token)
            lp.append(r.logprob)
            text[0] += r.text
            out[r.uid][3][0] = r.finish_reason
            rs.append(r)
            assert r.finish_reason is None or r is rs[-1]
        n += 1
    return {u: (t, lp, text[0], f[0], rs) for u, (t, lp, text, f, rs) in out.items()}


def assert_same(got, ref, atol):
    tokens, logprobs, text, finish, _ = got
    assert tokens == ref[0]
    assert text == ref[2] and finish == ref[3]
    np.testing.assert_allclose(logprobs, ref[1], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    path = tiny_gguf(qtype="Q8_0", tied=False, seed=1)
    model, tok = qwen_mlx.load(path, dtype="float32")
    return path, model, tok


def fresh_prompts(n_list, seed=None):
    """Random prompts of the given lengths, seeded (by default from the lengths, so each call site
    gets its own fixed inputs and a failure reproduces)."""
    rng = np.random.default_rng(seed if seed is not None else [len(n_list), *n_list])
    return [rng.integers(0, 283, n).tolist() for n in n_list]


def test_rope_per_row_offsets_equal_single_rows():
    import metal_kernels as K

    x = mx.random.normal((3, 4, 5, 64))
    offsets = mx.array([0, 7, 300])
    out = K.rope(x, offsets, 1e6)
    for b, o in enumerate(offsets.tolist()):
        assert mx.array_equal(out[b:b + 1], K.rope(x[b:b + 1], o, 1e6))
    qkv = mx.random.normal((3, 5, (4 + 2 * 2) * 64))
    bias = mx.random.normal(((4 + 2 * 2) * 64,))
    outs = K.qkv_post(qkv, bias, 4, 2, offsets, 1e6)
    for b, o in enumerate(offsets.tolist()):
        for u, v in zip(outs, K.qkv_post(qkv[b:b + 1], bias, 4, 2, o, 1e6)):
            assert mx.array_equal(u[b:b + 1], v)


def test_greedy_batch_equals_single_with_joins_and_early_stops(tiny):
    """Prompts of 1..400 tokens, chunked prefill (16 columns), at most 3 rows decoding, groups of 2,
    sequences joining at steps 3 and 9, stop strings and small max_tokens ending some early."""
    _, model, tok = tiny
    prompts = fresh_prompts([1, 37, 400, 5, 120, 2, 64, 250])
    settings = [dict(max_tokens=24) for _ in prompts]
    settings[1]["max_tokens"] = 3
    # a stop string taken from the sequence's own single-run text, so it does end early
    for j in (0, 4, 6):
        text = single(model, tok, prompts[j], max_tokens=24)[2]
        if len(text) > 8:
            settings[j]["stop"] = [text[5:7], "never-there"]
    refs = [single(model, tok, p, **kw) for p, kw in zip(prompts, settings)]
    assert any(r[3] == "stop" for r in refs) and any(len(r[0]) < 24 for r in refs)
    gen = BatchGenerator(model, tok, max_batch=3, prefill_step_size=16, prefill_batch=2)
    for p, kw in zip(prompts[:4], settings[:4]):
        gen.insert(p, **kw)
    got = run_all(gen, {3: list(zip(prompts[4:6], settings[4:6])), 9: list(zip(prompts[6:], settings[6:]))})
    assert sorted(got) == list(range(len(prompts)))
    for uid, ref in enumerate(refs):
        assert_same(got[uid], ref, atol=1e-4)
    assert not gen.rows and gen.cache is None  # everything left the batch


def test_batch_generate_api(tiny):
    _, model, tok = tiny
    prompts = fresh_prompts([3, 90, 17]) + ["the cat sat on the mat"]
    res = batch_generate(model, tok, prompts, max_tokens=10, max_batch=2)
    for i, p in enumerate(prompts):
        t, lp, text, finish, _ = single(model, tok, p, max_tokens=10)
        assert res.tokens[i] == t and res.texts[i] == text and res.finish_reasons[i] == finish
        np.testing.assert_allclose(res.logprobs[i], lp, atol=1e-4, rtol=0)
    assert res.stats.generation_tokens == sum(map(len, res.tokens)) and res.stats.generation_tps > 0
    assert res.stats.prompt_tokens == sum(res.prompt_tokens) and res.stats.peak_memory > 0
    with pytest.raises(PromptError, match="prompt 1: the prompt is empty"):
        stream_batch_generate(model, tok, [[1], []])
    with pytest.raises(PromptError, match="prompt 0: .*context of 512"):
        stream_batch_generate(model, tok, [list(range(100)) * 6])


SAMPLING = [dict(temperature=0.9), dict(temperature=0.7, top_p=0.8), dict(temperature=1.2, top_k=20, min_p=0.05),
            dict(temperature=0.8, repetition_penalty=1.3), dict(temperature=0.0)]


def test_seeded_sampling_independent_of_batch(tiny):
    """Each seeded sequence gives the same tokens alone, in a batch of 5 with different settings,
    and joining late into another batch; and equals stream_generate with that seed (its PRNG key
    is split once per token exactly as mx.random.seed(seed) + global sampling does)."""
    _, model, tok = tiny
    prompts = fresh_prompts([4, 50, 11, 200, 30])
    seeds = np.random.default_rng().integers(0, 2**31 - 1, len(prompts)).tolist()
    kws = [dict(s, seed=int(seed), max_tokens=16) for s, seed in zip(SAMPLING, seeds)]
    alone = []
    for p, kw in zip(prompts, kws):
        gen = BatchGenerator(model, tok)
        gen.insert(p, **kw)
        alone.append(run_all(gen)[0])
    gen = BatchGenerator(model, tok, prefill_batch=5)
    for p, kw in zip(prompts, kws):
        gen.insert(p, **kw)
    together = run_all(gen)
    gen = BatchGenerator(model, tok, max_batch=3, prefill_batch=1)
    order = [4, 2, 0, 3, 1]
    for i in order[:3]:
        gen.insert(prompts[i], **kws[i])
    late = run_all(gen, {5: [(prompts[i], kws[i]) for i in order[3:]]})
    for i in range(len(prompts)):
        assert together[i][0] == alone[i][0]
        assert late[order.index(i)][0] == alone[i][0]
        assert alone[i][0] == single(model, tok, prompts[i], **kws[i])[0]
    # different seeds give different samples (16 tokens from a ~280-token vocabulary at T=0.9)
    gen = BatchGenerator(model, tok)
    gen.insert(prompts[0], **dict(kws[0], seed=seeds[0] + 1))
    assert run_all(gen)[0][0] != alone[0][0]


def test_top_logprobs_remove_and_caches(tiny):
    """top_logprobs as stream_generate's; a sequence cancelled mid-run leaves the others as they
    would be alone; a finished sequence's cache continues exactly; a prefix cache goes in."""
    _, model, tok = tiny
    p0, p2 = fresh_prompts([30, 60])
    # the sequence to cancel must still be running at step 4: a prompt whose greedy run alone goes
    # past 8 tokens without EOS
    p1 = next(p for i in range(50) for p in fresh_prompts([8], seed=i)
              if len(single(model, tok, p, max_tokens=8)[0]) == 8)
    gen = BatchGenerator(model, tok, max_batch=4)
    u0 = gen.insert(p0, max_tokens=12, top_logprobs=3)
    u1 = gen.insert(p1, max_tokens=40)
    u2 = gen.insert(p2, max_tokens=5, return_cache=True)
    seen = {u0: [], u1: [], u2: []}
    step = 0
    while gen.has_work():
        if step == 4:
            gen.remove(u1)
        for r in gen.step():
            seen[r.uid].append(r)
        step += 1
    assert 0 < len(seen[u1]) < 40 and seen[u1][-1].finish_reason is None  # cancelled: no more responses
    ref = single(model, tok, p0, max_tokens=12, top_logprobs=3)
    assert [r.token for r in seen[u0]] == ref[0]
    for r, top in zip(seen[u0], ref[4]):
        assert [t for t, _ in r.top_logprobs] == [t for t, _ in top]
        np.testing.assert_allclose([v for _, v in r.top_logprobs], [v for _, v in top], atol=1e-4)
    # the returned cache holds prompt + generated tokens but the last: continuing from it with the
    # last token gives the single run's continuation
    last = seen[u2][-1]
    assert last.finish_reason == "length" and last.cache[0].offset == len(p2) + 5 - 1
    ten = single(model, tok, p2, max_tokens=10)[0]
    assert ten[:5] == [r.token for r in seen[u2]]
    assert single(model, tok, [ten[4]], max_tokens=5, cache=last.cache)[0] == ten[5:]
    # a prefix cache in: prompt p2 split at 25, the prefix prefilled alone
    prefix = model.make_cache()
    model(mx.array([p2[:25]]), cache=prefix)
    gen = BatchGenerator(model, tok, prefill_batch=3)
    gen.insert(p0, max_tokens=10)
    gen.insert(p2[25:], max_tokens=10, cache=prefix)
    gen.insert(p1, max_tokens=10)
    out = run_all(gen)
    assert out[1][0] == ten and prefix[0].offset == 25  # the caller's cache is not changed
    assert out[0][0] == single(model, tok, p0, max_tokens=10)[0]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen_mlx.generate", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_prompts_file(tiny, tmp_path):
    path, model, tok = tiny
    lines = [{"prompt": "the cat", "max_tokens": 6},
             {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
              "temperature": 0.8, "seed": 5, "id": "b"},
             {"prompt": "a dog ran", "max_tokens": 9, "stop": ["zz"]}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    r = run_cli("--model", str(path), "--prompts-file", str(src), "--output", str(dst), "--max-tokens", "7")
    assert r.returncode == 0, r.stderr
    assert "3 sequences" in r.stderr and "tok/s" in r.stderr
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 4] and out[1]["id"] == "b"
    for o, x, kw in zip(out, lines, [dict(max_tokens=6), dict(max_tokens=7, temperature=0.8, seed=5),
                                     dict(max_tokens=9, stop=["zz"])]):
        msgs = x.get("messages") or [{"role": "user", "content": x["prompt"]}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        t, lp, text, finish, _ = single(model, tok, ids, **kw)
        assert o["tokens"] == t and o["text"] == text and o["finish_reason"] == finish
        assert o["prompt_tokens"] == len(ids) and o["generation_tokens"] == len(t)


@pytest.mark.parametrize("content,needle", [
    ('{"prompt": "x"}\nnot json\n', "in.jsonl:2: not JSON"),
    ('{"prompt": "x", "max_tokens": "5"}\n', "in.jsonl:1: bad type for 'max_tokens'"),
    ('{"prompt": "x", "colour": 1}\n', "in.jsonl:1: unknown key(s) colour"),
    ('\n{"messages": []}\n', "in.jsonl:2: \"prompt\" must be a string"),
    ('{"prompt": "x", "messages": []}\n', "in.jsonl:1: want exactly one of"),
    ('\n\n', "in.jsonl: no prompts"),
])
def test_read_requests_names_the_bad_line(tmp_path, content, needle):
    from qwen_mlx.batch_io import read_requests

    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(ValueError) as e:
        read_requests(str(src))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content,needle,code", [
    ('{"prompt": "x"}\n{"prompt": "y", "temperature": -1}\n', "in.jsonl:2: temperature must be >= 0", 1),
    ('{"prompt": "x"}\nnot json\n', "in.jsonl:2: not JSON", 1),
    (None, "--prompts-file and --output go together", 2),
])
def test_cli_prompts_file_errors(tiny, tmp_path, content, needle, code):
    """One-line errors naming the line; exit 1 for a bad file, 2 for bad flags; nothing written."""
    path = tiny[0]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(content or '{"prompt": "x"}\n')
    args = ["--model", str(path), "--prompts-file", str(src)] + (["--output", str(dst)] if content else [])
    r = run_cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and needle in lines[0], r.stderr
    assert not dst.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "kernels"])
def test_gpu_greedy_batch_equals_single(tiny, backend):
    """On a GPU, float32: batched greedy tokens equal single runs, with the default kernel choice
    and with every kernel forced on (single runs then use the qkv_post kernel, batched rows with
    [B] offsets the reference RoPE: the two agree to float32 rounding)."""
    import metal_kernels as K

    _, model, tok = tiny
    prompts = fresh_prompts([1, 9, 130, 300, 33])
    before = K.mode()
    K.set_backend(backend)
    try:
        refs = [single(model, tok, p, max_tokens=16) for p in prompts]
        gen = BatchGenerator(model, tok, max_batch=3, prefill_step_size=64, prefill_batch=2)
        for p in prompts[:3]:
            gen.insert(p, max_tokens=16)
        got = run_all(gen, {4: [(p, dict(max_tokens=16)) for p in prompts[3:]]})
    finally:
        K.set_backend(before)
    for uid, ref in enumerate(refs):
        assert_same(got[uid], ref, atol=1e-4)


# ---------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def real(real_model):
    return real_model


@pytest.mark.real_model
def test_real_model_greedy_batch_equals_single(real):
    """The default model, float32: prompts of 1 to 1,500 tokens (source code and chat prompts),
    one ending at EOS, one at a stop string, others at max_tokens; the 1,500-token prompt joins
    the running batch late and is prefilled in chunks of 256 while the others decode."""
    model, tok = real
    from pathlib import Path

    code = "".join((Path(qwen_mlx.__file__).parent / f).read_text() for f in ("generation.py", "model.py"))
    ids = tok.encode(code, add_special_tokens=False)
    assert len(ids) >= 1500

    def chat(text):
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)

    cases = [(ids[:1], dict(max_tokens=8)),
             (chat("Answer with one word: is water wet?"), dict(max_tokens=12)),
             (chat("Write a Python function that adds two numbers."), dict(max_tokens=16)),
             (ids[:200], dict(max_tokens=8)),
             (ids[:1500], dict(max_tokens=6))]
    text = single(model, tok, cases[2][0], **cases[2][1])[2]
    cases[2][1]["stop"] = [text.split()[2]]  # a word of its own answer: it does stop there
    refs = [single(model, tok, p, **kw) for p, kw in cases]
    reasons = [(r[3], len(r[0])) for r in refs]
    assert refs[1][3] == "stop" and refs[1][0][-1] in tok.eos_token_ids, reasons  # EOS
    assert refs[2][3] == "stop" and refs[2][0][-1] not in tok.eos_token_ids, reasons  # stop string
    gen = BatchGenerator(model, tok, max_batch=4, prefill_step_size=256, prefill_batch=3)
    for p, kw in cases[:4]:
        gen.insert(p, **kw)
    got = run_all(gen, {2: [cases[4]]})
    for uid, ref in enumerate(refs):
        assert_same(got[uid], ref, atol=2e-3)
