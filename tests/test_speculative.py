"""Speculative decoding (qwen_mlx/speculative.py): exactness against plain decoding.

Greedy: the tokens must equal plain greedy decoding's, token for token (a draft that is almost
always rejected, the model drafting itself, prompt lookup, both combined, quantized weights).
Sampling: the empirical distribution of the first tokens over many fixed seeds must match the
target's exact distribution, enumerated with the target model in float64 (chi-square); the same
test with the residual resampling broken on purpose must fail it. Stop strings, EOS and
max_tokens must cut exactly where plain decoding cuts.
"""

import numpy as np
import pytest
from scipy.stats import chisquare

import qwen_mlx
import mlx.core as mx
from qwen_mlx import speculative
from qwen_mlx.generate import main as cli
from qwen_mlx.generation import stream_generate
from qwen_mlx.speculative import PromptLookup, check_draft, load_draft

PROMPTS = ["def the fore in the the at", "the cat sat on the mat", "1 = 1 = 1 = 1 = 1", "hello"]


@pytest.fixture(scope="module")
def pair(tiny_gguf):
    """A tiny target and an unrelated tiny random draft with the same vocabulary."""
    target, tok = qwen_mlx.load(tiny_gguf(seed=0), dtype="float32")
    draft, _ = qwen_mlx.load(tiny_gguf(seed=1), dtype="float32")
    return target, tok, draft


def tokens(model, tok, prompt, **kw):
    return [r.token for r in stream_generate(model, tok, prompt, **kw)]


def test_prompt_lookup_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3):
        lookup = PromptLookup(n)
        seq = []
        for _ in range(300):  # grow the sequence like a generation does and compare at every length
            seq += rng.integers(0, 6, rng.integers(1, 4)).tolist()
            want = []
            for i in range(len(seq) - n - 1, -1, -1):  # most recent earlier occurrence of the last n-gram
                if len(seq) > n and seq[i:i + n] == seq[-n:]:
                    want = seq[i + n:i + n + 4]
                    break
            assert lookup.propose(seq, 4) == want


@pytest.mark.parametrize("kw", [dict(draft=True, num_draft_tokens=1), dict(draft=True, num_draft_tokens=4),
                                dict(prompt_lookup=1, num_draft_tokens=5), dict(prompt_lookup=2, num_draft_tokens=3),
                                dict(draft=True, prompt_lookup=2, num_draft_tokens=3)])
def test_greedy_equals_plain_with_a_mostly_rejected_draft(pair, kw):
    target, tok, draft = pair
    kw = dict(kw)
    if kw.pop("draft", False):
        kw["draft_model"] = draft
    for prompt in PROMPTS:
        plain = list(stream_generate(target, tok, prompt, max_tokens=40))
        spec = list(stream_generate(target, tok, prompt, max_tokens=40, **kw))
        assert [r.token for r in spec] == [r.token for r in plain], prompt
        # same log-probabilities (one k-token forward vs k one-token forwards: float32 rounding only)
        np.testing.assert_allclose([r.logprob for r in spec], [r.logprob for r in plain], atol=1e-4)
        last = spec[-1]
        assert last.spec_forwards <= last.generation_tokens and last.spec_accepted <= last.spec_proposed
        assert last.generation_tokens == last.spec_accepted + last.spec_forwards or last.finish_reason == "stop"
    if "draft_model" in kw and "prompt_lookup" not in kw:
        assert last.spec_accepted < last.spec_proposed / 2  # the random draft is mostly rejected


def test_greedy_self_draft_accepts_everything(pair):
    target, tok, _ = pair
    for prompt in PROMPTS[:2]:
        spec = list(stream_generate(target, tok, prompt, max_tokens=30, draft_model=target, num_draft_tokens=4))
        assert [r.token for r in spec] == tokens(target, tok, prompt, max_tokens=30)
        last = spec[-1]
        if last.finish_reason == "length":
            assert last.spec_accepted == last.spec_proposed  # a model agrees with itself
            assert last.generation_tokens / last.spec_forwards > 4


def test_greedy_with_quantized_weights_and_repetition_penalty(tiny_gguf):
    """Native-quantized weights (QuantizedLinear) and a repetition penalty, whose token history
    differs at every position of a verified block."""
    target, tok = qwen_mlx.load(tiny_gguf(qtype="Q8_0", seed=0), dtype="float32", quantized=True)
    draft, _ = qwen_mlx.load(tiny_gguf(qtype="Q4_0", seed=0), dtype="float32", quantized=True)
    assert isinstance(target.layers[0].mlp.gate_up_proj, qwen_mlx.loader.nn.QuantizedLinear)
    for prompt in PROMPTS[:3]:
        for kw in (dict(), dict(repetition_penalty=1.3)):
            plain = tokens(target, tok, prompt, max_tokens=30, **kw)
            assert tokens(target, tok, prompt, max_tokens=30, draft_model=draft, num_draft_tokens=3, **kw) == plain
            assert tokens(target, tok, prompt, max_tokens=30, prompt_lookup=1, num_draft_tokens=4, **kw) == plain


def test_cache_reuse_continues_exactly(pair):
    """With a reused cache (target's layers, then the draft's), a second call continues the
    sequence exactly as one plain call over the whole text; both caches end at the same offset."""
    target, tok, draft = pair
    ids = tok.encode(PROMPTS[0], add_special_tokens=False)
    more = tok.encode(" the cat", add_special_tokens=False)
    cache = target.make_cache() + draft.make_cache()
    out = tokens(target, tok, ids, max_tokens=12, draft_model=draft, cache=cache)
    assert len(out) == 12
    assert {c.offset for c in cache} == {len(ids) + 11}  # all but the last token, in both caches
    second = tokens(target, tok, out[-1:] + more, max_tokens=12, draft_model=draft, cache=cache)
    assert second == tokens(target, tok, ids + out + more, max_tokens=12)


@pytest.mark.parametrize("kw", [dict(draft=True), dict(prompt_lookup=1)])
def test_stops_max_tokens_and_eos_cut_exactly_as_plain(pair, kw):
    """Several tokens arrive per target forward; none may be emitted past a stop. A self-draft
    accepts every proposal, so the stops fall inside verified blocks."""
    target, tok, _ = pair
    spec_kw = dict(num_draft_tokens=6, **({"draft_model": target} if kw.get("draft") else kw))
    prompt = PROMPTS[2]

    def both(**k):
        a = [(r.text, r.token, r.finish_reason) for r in stream_generate(target, tok, prompt, **k)]
        b = [(r.text, r.token, r.finish_reason) for r in stream_generate(target, tok, prompt, **k, **spec_kw)]
        assert a == b, k
        return a

    full = both(max_tokens=40)
    for m in (1, 2, 5, 7, 13):
        assert len(both(max_tokens=m)) == m
    text = "".join(t for t, _, _ in full)
    for i in (2, 9, 20):  # a stop string starting mid-output
        stop = text[i:i + 3]
        got = both(max_tokens=40, stop=[stop])
        assert "".join(t for t, _, _ in got) == text[:text.find(stop)]
    eos = tok.eos_token_ids
    try:
        tok.eos_token_ids = set(eos) | {full[9][1]}  # make the 10th token an end-of-sequence token
        got = both(max_tokens=40)
        assert got[-1][2] == "stop" and len(got) == next(i for i, f in enumerate(full) if f[1] == full[9][1]) + 1
    finally:
        tok.eos_token_ids = eos


def test_bad_arguments_and_foreign_vocabulary(pair, tiny_gguf, tmp_path, capsys):
    target, tok, draft = pair
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 1"):
        list(stream_generate(target, tok, "hi", draft_model=draft, num_draft_tokens=0))
    with pytest.raises(ValueError, match="n-gram size\\) must be >= 1"):
        list(stream_generate(target, tok, "hi", prompt_lookup=-1))
    other = tiny_gguf(seed=2, merges=["Ġ t", "h e"])  # a different (smaller) vocabulary
    with pytest.raises(ValueError, match="vocabulary differs from the target's") as e:
        load_draft(other, target, tok)
    assert "\n" not in str(e.value)
    small, _ = qwen_mlx.load(other, dtype="float32")
    with pytest.raises(ValueError, match="does not fit the target's"):
        check_draft(target, tok, small)
    check_draft(target, tok, draft)  # same vocabulary: fine
    with pytest.raises(SystemExit) as e:
        cli(["--model", str(tiny_gguf(seed=0)), "--prompt", "hi", "--draft-model", str(other), "--max-tokens", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "vocabulary differs" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, needle", [
    (["--num-draft-tokens", "0", "--prompt-lookup", "2"], "--num-draft-tokens must be at least 1"),
    (["--num-draft-tokens", "4"], "needs --draft-model or --prompt-lookup"),
    (["--prompt-lookup", "-1"], "--prompt-lookup must be >= 1"),
])
def test_cli_bad_flags(args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.strip().count("\n") == 0


def test_cli_speculative_output_and_verbose_stats(tiny_gguf, capsys):
    path = str(tiny_gguf(seed=0))
    base = ["--model", path, "--prompt", "1 = 1 = 1 = 1", "--ignore-chat-template", "--max-tokens", "20"]

    def run(*a):
        cli(base + list(a))
        return capsys.readouterr()

    plain = run()
    spec = run("--draft-model", path, "--num-draft-tokens", "4", "--verbose")
    look = run("--prompt-lookup", "2", "--verbose")
    assert spec.out == look.out == plain.out and plain.out.strip()
    assert "speculative: 16/16 proposed tokens accepted" in spec.err  # a model drafting itself, 4 per round
    assert "tokens per target forward" in look.err and "speculative" not in plain.err


# ---- the output distribution at temperature > 0 ---------------------------------------------

N_SAMPLES = 600  # runs (fixed seeds 0..N-1) per distribution check
T = 3  # tokens per run whose joint distribution is checked
ALPHA = 1e-3  # chi-square significance; fixed seeds make each check deterministic


@pytest.fixture(scope="module")
def peaked(tiny_gguf):
    """A tiny target whose output projection is scaled up 20x, so a few tokens carry most of the
    mass at each step (the joint of 3 tokens then fits a chi-square over a few dozen cells), and
    a draft that is the same model with the projection scaled 5x: q is a flatter p (the
    probabilities then overlap a lot but differ, which is what exercises the residual)."""
    path = tiny_gguf(seed=0)
    target, tok = qwen_mlx.load(path, dtype="float32")
    draft, _ = qwen_mlx.load(path, dtype="float32")
    w = target.lm_head.weight
    target.lm_head.weight, draft.lm_head.weight = w * 20, w * 5
    return target, tok, draft


def exact_joint(model, prompt, top_k=0, penalty=None, tau=1e-4):
    """{first T tokens: probability} under plain sampling at temperature 1, enumerating every
    prefix of probability > tau with uncached forwards and float64 numpy softmax (top-k and
    mlx-lm's repetition penalty over the last 20 tokens re-done in numpy)."""
    leaves = {(): 1.0}
    for _ in range(T):
        keys = list(leaves)
        logits = np.array(model(mx.array([prompt + list(k) for k in keys]))[:, -1]).astype(np.float64)
        new = {}
        for k, z in zip(keys, logits):
            if penalty:
                hist = np.array((prompt + list(k))[-20:])
                z[hist] = np.where(z[hist] < 0, z[hist] * penalty, z[hist] / penalty)
            if top_k:
                z[np.argsort(-z)[top_k:]] = -np.inf
            p = np.exp(z - z.max())
            p /= p.sum()
            for t in np.nonzero(p * leaves[k] > tau)[0]:
                new[k + (int(t),)] = leaves[k] * p[t]
        leaves = new
    return leaves


def chi2_pvalue(model, tok, prompt, exact, **kw):
    counts = {}
    for s in range(N_SAMPLES):
        got = tuple(r.token for r in stream_generate(model, tok, prompt, max_tokens=T, temperature=1.0, seed=s, **kw))
        counts[got] = counts.get(got, 0) + 1
    cells = [k for k, p in sorted(exact.items(), key=lambda t: -t[1]) if p * N_SAMPLES >= 5]
    assert len(cells) >= 8  # enough cells for the test to see a distortion
    obs = [counts.get(c, 0) for c in cells]
    exp = [exact[c] * N_SAMPLES for c in cells]
    obs.append(N_SAMPLES - sum(obs))  # everything else, with its exact remaining mass
    exp.append(N_SAMPLES - sum(exp))
    p = chisquare(obs, exp).pvalue
    print(f"chi-square over {len(obs)} cells, {N_SAMPLES} runs: p = {p:.2e}")
    return p


def lookup_prompt(model, tok):
    """A prompt whose last token occurred before, followed by the model's own likely tokens: the
    lookup proposals then have probabilities well inside (0, 1), so both branches of the point-mass
    acceptance (accept with p(x), else resample from p without x) are taken often."""
    base = tok.encode("def the fore", add_special_tokens=False)
    ids = list(base)
    for _ in range(3):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    return ids + tok.encode(" at", add_special_tokens=False) + base[-1:]


CASES = {
    "draft": lambda m, tok, d: (tok.encode("def the fore", add_special_tokens=False), dict(draft_model=d, num_draft_tokens=2), {}),
    "lookup": lambda m, tok, d: (lookup_prompt(m, tok), dict(prompt_lookup=1, num_draft_tokens=2), {}),
    "draft+top_k+penalty": lambda m, tok, d: (tok.encode("the the cat", add_special_tokens=False),
                                              dict(draft_model=d, num_draft_tokens=2, top_k=4, repetition_penalty=1.5),
                                              dict(top_k=4, penalty=1.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_preserves_the_target_distribution(peaked, case):
    target, tok, draft = peaked
    prompt, kw, ref = CASES[case](target, tok, draft)
    exact = exact_joint(target, prompt, **ref)
    p = chi2_pvalue(target, tok, prompt, exact, **kw)
    assert p > ALPHA, f"{case}: chi-square p = {p:.2e}: the speculative samples do not follow the target"


@pytest.mark.parametrize("case", ["draft", "lookup"])
def test_a_broken_residual_fails_the_distribution_check(peaked, case, monkeypatch):
    """The planted bug: resample a rejected position from p instead of max(0, p - q). The check
    above must catch it (it is what makes that check worth anything)."""
    target, tok, draft = peaked
    prompt, kw, ref = CASES[case](target, tok, draft)
    exact = exact_joint(target, prompt, **ref)
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    p = chi2_pvalue(target, tok, prompt, exact, **kw)
    assert p < ALPHA, f"{case}: the broken residual passed the check (p = {p:.2e})"


# ---- the real model (greedy, float32) -------------------------------------------------------

EDIT_CODE = '''def moving_average(values, window):
    """Return the moving averages of `values` over `window` items."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''


@pytest.fixture(scope="module")
def real(real_model):
    return real_model


@pytest.mark.real_model
def test_real_model_greedy_speculative_equals_plain(real, real_greedy):
    """The default model in float32: prompt lookup over the reference prompts and a code-editing
    prompt, and the model drafting itself, give plain greedy decoding's tokens exactly."""
    from real_prompts import prompt_ids, until_eos

    model, tok = real
    edit = [{"role": "user", "content": "Rename `total` to `running_sum` in this function and reply with the whole "
                                        "function in one code block:\n\n```python\n" + EDIT_CODE + "```"}]
    # plain greedy decoding of the reference prompts: the shared generate_step run, as stream_generate stops
    cases = [(ids, until_eos(new[:16], tok.eos_token_ids)) for ids, new in real_greedy]
    cases.append((prompt_ids(tok, edit, True), None))
    for i, (ids, plain) in enumerate(cases):
        n = 16 if plain is not None else 80
        plain = plain if plain is not None else tokens(model, tok, ids, max_tokens=n)
        rs = list(stream_generate(model, tok, ids, max_tokens=n, prompt_lookup=3, num_draft_tokens=10))
        assert [r.token for r in rs] == plain, f"prompt {i}"
        if i == len(cases) - 1:  # the edit repeats the function: most of it comes from lookup
            assert rs[-1].generation_tokens / rs[-1].spec_forwards > 2.5, rs[-1]
        if i in (1, len(cases) - 1):  # a chat answer and the edit
            assert tokens(model, tok, ids, max_tokens=n, draft_model=model, num_draft_tokens=3) == plain, f"prompt {i}"


def test_loading_a_draft_keeps_the_targets_kernel_table(pair, tiny_gguf):
    """The kernel table is process-wide: `load` sets it for the model it loads, `load_draft` leaves
    the target's in place (before, a draft's load replaced it with the draft's or the defaults)."""
    import metal_kernels as K

    target, tok, _ = pair
    table = {op: (3, None) for op in K.USE}  # a table no machine ships
    K.set_table(table, "the target's tuned table")
    try:
        load_draft(tiny_gguf(seed=1), target, tok)
        assert K.table_source() == "the target's tuned table"
        assert all(K.USE[op] == (3, None) for op in K.USE)
        qwen_mlx.load(tiny_gguf(seed=1), dtype="float32")  # a plain load does set this model's table
        assert K.table_source() != "the target's tuned table"
    finally:
        K.reset_table()
