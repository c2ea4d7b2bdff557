"""Kernel decisions per phase and per machine: `metal_kernels.USE` rules, `qwen_mlx.tune`, and the
per-machine tables `load()` applies (`qwen_mlx.kernel_table`).

There is no GPU here, so these tests stand in for one: `metal_kernels.backend` is patched to say
"cuda", and each `metal_kernels.kernels.<op>` is replaced by its plain-MLX reference, once plainly
and once with a planted `time.sleep` per call. Tune must then turn the planted-slow kernel off and
a kernel whose reference was made slow on purpose on. The planted delays (20 ms per call, several
calls per step) are tens of times the tiny model's own step time, so the decisions do not depend
on timing noise. Ops with no planted difference may go either way and are not asserted.
"""

import json
import subprocess
import sys
import time

import mlx.core as mx
import pytest

import metal_kernels as K
from metal_kernels import kernels as KK
from metal_kernels import reference as R
from qwen_mlx import kernel_table, tune
from qwen_mlx.loader import load

DELAY = 20e-3


@pytest.fixture
def fake_gpu(monkeypatch):
    """Dispatch believes a GPU back end is there; every "kernel" is its reference (no delay yet)."""
    monkeypatch.setattr(K, "backend", lambda: "cuda")
    monkeypatch.setattr(K, "IN_COMPILED_DECODE", {})  # the table alone decides (as on a real GPU outside compiled steps)
    for op in K.USE:
        monkeypatch.setattr(KK, op, getattr(R, op))
    saved = dict(K.USE)
    yield monkeypatch
    K.USE.update(saved)


def slowed(fn):
    def call(*args, **kw):
        time.sleep(DELAY)
        return fn(*args, **kw)
    return call


def test_rules_decide_per_number_of_rows(fake_gpu):
    calls = []
    fake_gpu.setattr(KK, "add_rms_norm", lambda *a, **k: calls.append(a[0].shape) or R.add_rms_norm(*a))
    w = mx.ones((8,))
    K.set_table({**tune.OFF, "add_rms_norm": (512, None)}, "test")
    K.add_rms_norm(mx.ones((1, 1, 8)), mx.ones((1, 1, 8)), w, 1e-6)      # decode: 1 row
    K.add_rms_norm(mx.ones((1, 511, 8)), mx.ones((1, 511, 8)), w, 1e-6)  # 511 rows
    assert calls == []
    K.add_rms_norm(mx.ones((2, 256, 8)), mx.ones((2, 256, 8)), w, 1e-6)  # 512 rows (batch x length)
    assert calls == [(2, 256, 8)]
    K.set_table({**tune.OFF, "add_rms_norm": (1, 2)}, "test")              # single-row decode only
    K.add_rms_norm(mx.ones((2, 1, 8)), mx.ones((2, 1, 8)), w, 1e-6)
    K.add_rms_norm(mx.ones((1, 1, 8)), mx.ones((1, 1, 8)), w, 1e-6)
    assert calls == [(2, 256, 8), (1, 1, 8)]
    # the old on/off form still reads
    assert K.rule(True) == (1, None) and K.rule(False) is None
    with pytest.raises(ValueError, match="lacks"):
        K.set_table({"rms_norm": None}, "a partial table")
    assert "add_rms_norm on at 1 row" in K.describe()[0]


def test_shipped_defaults_and_description():
    assert set(K.SHIPPED["metal"]) == set(K.SHIPPED["cuda"]) == set(K.USE)
    assert all(r is None for r in K.SHIPPED["cuda"].values())  # measured on H100/H200: none pays
    # Metal: the fused kernels at prefill sizes only (MLX issue #4259's evidence), the rest off
    assert K.SHIPPED["metal"]["add_rms_norm"] == (512, None) and K.SHIPPED["metal"]["rms_norm"] is None
    K.reset_table()
    if K.backend() == "reference":
        assert K.describe()[0].startswith("kernels: all off (no GPU back end)")
    else:
        assert K.describe()[0].startswith(f"kernels ({K.backend()}, shipped defaults for {K.backend()})")


def test_tune_turns_a_slow_kernel_off_and_a_fast_one_on(fake_gpu, tiny_gguf):
    model, _ = load(tiny_gguf(), dtype="float32")
    # The planted delays are Python-level; compiled decode steps run an op's Python only when they
    # trace (test_a_new_table_retraces_compiled_decode_steps), so here every step builds the modules.
    model.model.compile_decode = False
    fake_gpu.setattr(KK, "add_rms_norm", slowed(R.add_rms_norm))      # the planted slow kernel
    fake_gpu.setattr(R, "swiglu", slowed(KK.swiglu))  # a reference slower than its kernel (the plain one)
    before = dict(K.USE)
    table, evidence = tune.tune(model, rounds=5, decode_steps=4, context=8, prefill=16, log=lambda s: None)
    assert K.USE == before  # tuning leaves the table in use as it found it
    assert table["add_rms_norm"] is None, evidence["single"]
    assert table["swiglu"] == (1, None), evidence["single"]
    single = evidence["single"]
    for ph in ("decode", "prefill"):
        assert single[ph]["add_rms_norm"]["median_ms"] > single[ph]["reference"]["median_ms"]
        assert single[ph]["swiglu"]["median_ms"] < single[ph]["reference"]["median_ms"]
        # the combined table was checked against all references, and is not slower
        assert evidence["check"][ph]["table"]["median_ms"] <= evidence["check"][ph]["reference"]["median_ms"]
    assert "swiglu on" in tune.report(table, evidence)[-1]


def test_rule_from_phases():
    rows = {"decode": 1, "prefill": 512}
    assert tune._rule(["decode", "prefill"], rows) == (1, None)
    assert tune._rule(["prefill"], rows) == (512, None)
    assert tune._rule(["decode"], rows) == (1, 2)
    assert tune._rule([], rows) is None


def test_load_applies_the_tuned_table(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_MLX_CACHE", str(tmp_path))
    path = tiny_gguf()
    model, _ = load(path, dtype="float32")
    shipped = K.shipped()
    assert K.USE == shipped  # no table yet: this back end's defaults
    key = kernel_table.machine_key(model)
    assert key["mlx"] == mx.__version__ and key["dtype"] == "float32" and key["quantized"] is False
    assert f"h{model.args.hidden_size}-l{model.args.num_hidden_layers}" in key["geometry"]
    table = {**tune.OFF, "qkv_post": (1, 2), "swiglu": (64, None)}
    written = kernel_table.save(key, table, {"note": "test"})
    assert written == kernel_table.table_path(key) and written.parent == tmp_path / "kernels"
    try:
        load(path, dtype="float32")
        assert K.USE["qkv_post"] == (1, 2) and K.USE["swiglu"] == (64, None)
        # another dtype is another key: the table does not apply there
        load(path, dtype="bfloat16")
        assert K.USE == shipped
        # a file for another key (copied by hand) is ignored with a warning
        doc = json.loads(written.read_text())
        doc["key"]["device"] = "another GPU"
        written.write_text(json.dumps(doc))
        with pytest.warns(UserWarning, match="kernel table ignored"):
            load(path, dtype="float32")
        assert K.USE == shipped
    finally:
        K.reset_table()


def test_tune_cli_without_a_gpu(tiny_gguf):
    """On a machine without a GPU back end, tune says so in one line and exits 1 (runtime error)."""
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.tune", "--model", str(tiny_gguf())],
                       capture_output=True, text=True, timeout=120)
    if K.backend() != "reference":
        pytest.skip("a GPU back end is in use")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().startswith("error: no GPU back end") and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.tune", "--rounds", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--rounds must be at least 1" in r.stderr


def test_verbose_says_which_kernels_run(tiny_gguf):
    r = subprocess.run([sys.executable, "-m", "qwen_mlx.generate", "--model", str(tiny_gguf()), "--prompt", "the",
                        "--ignore-chat-template", "--max-tokens", "2", "--verbose"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kernels")]
    assert lines == K.describe() or K.backend() != "reference", r.stderr
    assert len(lines) == 1 and ("all off" in lines[0] or "on" in lines[0])


def test_a_new_table_retraces_compiled_decode_steps(fake_gpu, tiny_gguf):
    """Compiled decode segments fix the dispatch's decisions when they trace: a new table (or mode)
    must make the next step trace again, now through the kernel the table turned on."""
    model, _ = load(tiny_gguf(), dtype="float32")
    calls = []
    fake_gpu.setattr(KK, "add_rms_norm", lambda *a, **k: calls.append(1) or R.add_rms_norm(*a, **k))
    K.set_table(tune.OFF, "test")
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    steps = [model(mx.array([[t]]), cache=cache) for t in (4, 5)]
    first = model.model.decode_segments()
    assert calls == []  # off: the reference ran
    K.set_table({**tune.OFF, "add_rms_norm": (1, None)}, "test")
    steps.append(model(mx.array([[6]]), cache=cache))
    n = len(calls)
    assert n >= len(model.layers) and model.model.decode_segments() is not first  # traced anew, kernel in
    steps.append(model(mx.array([[7]]), cache=cache))
    assert len(calls) == n  # and not again: the next step replays the trace
    K.set_backend("reference")
    try:
        model(mx.array([[8]]), cache=cache)
        assert len(calls) == n and model.model.decode_segments() is not first
    finally:
        K.set_backend("auto")
    mx.eval(steps)
