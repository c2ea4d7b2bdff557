"""The benchmark scripts: their Q4_K_M-like layout is the real file's; bench.py, bench_formats.py, bench_kv.py,
bench_batch.py and the probes (probe_build.py, probe_batch_ops.py, probe_batch_step.py, probe_attention.py) run;
profile_decode.py's timeline summary is right, and it and probe_small_arrays.py refuse to run without a
CUDA GPU.

(Speed itself lives in the scripts, never in tests: this only checks that they measure the
right thing and run.)
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def import_script(name: str):
    """scripts/<name>.py as a module (the scripts import benchlib from their own directory)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def benchlib():
    return import_script("benchlib")


@pytest.mark.real_model
def test_q4km_layout_is_the_default_models(benchlib, default_model):
    """q4km_type predicts the GGUF type of every matrix of the real Q4_K_M file (metadata only)."""
    import gguf

    kinds = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
             "ffn_up": "up", "ffn_down": "down"}
    reader = gguf.GGUFReader(default_model)
    n_layers, hidden, ffn = 24, 896, 4864
    got = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in kinds and parts[3] == "weight":
            kind = kinds[parts[2]]
            got[t.name] = (t.tensor_type.name,
                           benchlib.q4km_type(kind, int(parts[1]), n_layers, ffn if kind == "down" else hidden))
    assert len(got) == 7 * n_layers
    wrong = {k: v for k, v in got.items() if v[0] != v[1]}
    assert not wrong, wrong
    out = next(t for t in reader.tensors if t.name == "output.weight")
    assert out.tensor_type.name == benchlib.q4km_type("output", 0, n_layers, hidden)


def test_q4km_formats_mix(benchlib):
    """At 7B (K-quant blocks fit): q/k/o/gate/up 4-bit group 32, v and down 8-bit group 64 in the
    Q6_K layers (14 of 28: 3 first, 4 last, every third between) and 4-bit group 32 elsewhere, output 8-bit group 64."""
    f = benchlib.q4km_formats(benchlib.config("7B"))
    more = benchlib.more_bits_layers(28)
    assert len(more) == 14
    for i in range(28):
        p = f"model.layers.{i}."
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert f[p + n] == (4, 32)
        for n in ("self_attn.v_proj", "mlp.down_proj"):
            assert f[p + n] == ((8, 64) if i in more else (4, 32))
    assert f["lm_head"] == (8, 64)


def test_bench_runs_on_a_tiny_gguf(tiny_gguf, tmp_path):
    """bench.py --model on a tiny mixed-format GGUF: our load against mlx-lm on our converter's
    directory, both fusion policies, every round kept in the JSON."""
    path = tiny_gguf(qtype="Q5_0", qtypes={"attn_v": "Q8_0", "ffn_down": "Q4_K"}, seed=3)
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench.py"), "--model", str(path), "--quantized",
                        "--dtype", "float32", "--cases", "chat:4,16:2", "--rounds", "2",
                        "--fuse-qkv", "always,same-format", "--promote-bits", "none,5:8", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["case"] for row in rows] == ["chat:4", "16:2"]
    for row in rows:
        variants = {"qwen_mlx fuse_qkv=always promote=none", "qwen_mlx fuse_qkv=same-format promote=none",
                    "qwen_mlx fuse_qkv=always promote=5:8", "qwen_mlx fuse_qkv=same-format promote=5:8"}
        assert set(row["results"]) == variants | {"mlx_lm"}
        for res in row["results"].values():
            assert len(res["decode"]["rounds"]) == 2
            assert res["decode"]["min"] <= res["decode"]["median"] <= res["decode"]["max"]
        assert set(row["ratios"]) == variants


def test_bench_formats_runs(tmp_path):
    """bench_formats.py at the tiny geometry: a row per matrix and format, times consistent."""
    out = tmp_path / "f.json"
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench_formats.py"), "--geometry", "tiny", "--rows", "1",
                        "--formats", "bf16,5/32,8/32", "--calls", "2", "--rounds", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(x["matrix"], x["format"]) for x in rows} == {
        (m, f) for m in ("qkv", "o", "gate_up", "down", "head") for f in ("bf16", "5/32", "8/32")}
    for x in rows:
        assert 0 < x["min_us"] <= x["us"] <= x["max_us"]
    q = {(x["matrix"], x["format"]): x["weight_bytes"] for x in rows}
    assert q[("head", "5/32")] < q[("head", "8/32")] < q[("head", "bf16")]  # the formats really differ


def test_bench_kv_runs(tmp_path):
    """bench_kv.py at the tiny geometry: a row per (KV setting, library) with its rounds, its cache
    really smaller when quantized, and the host build time per step."""
    out = tmp_path / "kv.json"
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench_kv.py"), "--geometry", "tiny", "--weights", "f32",
                        "--kv-group-size", "32", "--context", "64", "--gen", "2", "--rounds", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {(x["kv"], x["library"]): x for x in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(s, lib) for s in ("full", "8bit", "4bit") for lib in ("qwen_mlx", "mlx_lm")}
    for x in rows.values():
        assert "error" not in x, x  # quantized attention runs on the CPU
        assert len(x["decode_tps"]) == 2 and x["build_ms"] > 0
    assert rows["4bit", "qwen_mlx"]["kv_gb"] < rows["8bit", "qwen_mlx"]["kv_gb"] < rows["full", "qwen_mlx"]["kv_gb"]


def test_bench_batch_runs(tiny_gguf, tmp_path):
    """bench_batch.py at the tiny geometry: a row per batch size, both libraries' rounds kept with
    their warm-up times, medians within each spread."""
    out = tmp_path / "bb.json"
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench_batch.py"), "--random", "tiny", "--batch", "1,3",
                        "--prompt-len", "8", "--gen", "4", "--rounds", "2", "--tokenizer", str(tiny_gguf(seed=5)),
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [x["B"] for x in rows] == [1, 3]
    for x in rows:
        for lib in ("ours", "mlx_lm"):
            assert x["warmup_s"][lib] > 0 and len(x[f"{lib}_rounds"]) == 2
            m, lo, hi = x[f"{lib}_decode_tps"]
            assert 0 < lo <= m <= hi and sorted(y["decode_tps"] for y in x[f"{lib}_rounds"]) == [lo, hi]


def test_probe_build_runs():
    """probe_build.py at the tiny geometry, fast ops stubbed: a median and spread per library, positive."""
    r = subprocess.run([sys.executable, str(SCRIPTS / "probe_build.py"), "--geometry", "tiny", "--quant", "bf16",
                        "--stub-fast", "--rounds", "2", "--builds", "3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if " us [" in line}
    assert set(lines) == {"qwen_mlx", "mlx_lm"}, r.stdout
    for line in lines.values():
        assert float(line.split()[1]) > 0, line
    assert "(mx.fast stubbed)" in r.stdout and "qwen_mlx / mlx_lm:" in r.stdout


def test_probe_batch_ops_runs():
    """probe_batch_ops.py at the tiny geometry: a line per operation and batch size, times positive."""
    r = subprocess.run([sys.executable, str(SCRIPTS / "probe_batch_ops.py"), "--geometry", "tiny", "--batch", "1,3",
                        "--prompt", "8", "--calls", "2", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("B=")[1:]
    assert [b.split()[0] for b in blocks] == ["1", "3"]
    for b in blocks:
        rows = [line for line in b.splitlines()[1:] if "/" in line]
        assert len(rows) == 14 and "whole model step" in rows[-1], b
        for line in rows:
            build, total = (float(x) for x in line.rsplit(None, 3)[-3::2])
            assert 0 < build <= total, line


def test_probe_batch_step_runs(tiny_gguf):
    """probe_batch_step.py at the tiny geometry: per batch size its seven timings, each positive and
    no shorter than the graph building inside it."""
    r = subprocess.run([sys.executable, str(SCRIPTS / "probe_batch_step.py"), "--geometry", "tiny", "--batch", "1,3",
                        "--prompt", "8", "--steps", "2", "--tokenizer", str(tiny_gguf(seed=5))],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("\nB=")[1:]
    assert [b.split(":")[0] for b in blocks] == ["1", "3"]
    for b in blocks:
        rows = [line for line in b.splitlines()[1:] if "build" in line]
        assert len(rows) == 7, b
        for line in rows:
            total = float(line.split("(")[0].split()[-1])
            build = float(line.split("build")[1].split(",")[0].strip(" )"))
            assert 0 < build <= total, line


def test_probe_attention_runs_and_cleans_up(tmp_path):
    """probe_attention.py through the CPU emulator (timings meaningless there): a line per kernel
    body, the variant's copy among the shipped bodies removed afterwards, a clash refused."""
    from metal_kernels import _core

    shipped = sorted(p.name for p in _core.DIR.iterdir())
    variant = tmp_path / "qsdpa_probe_variant.metal"
    variant.write_text(_core.metal_file("quant_sdpa").read_text())
    cmd = [sys.executable, str(SCRIPTS / "probe_attention.py"), "--backend", "cpu-emulator", "--context", "300",
           "--calls", "1", "--repeats", "1", "--bits", "4", "--heads", "2,1", "--head-dim", "32", "--group-size", "32"]
    r = subprocess.run(cmd + ["--variant", str(variant)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    names = [line.split()[2] for line in r.stdout.splitlines() if line.startswith("4-bit cache")]
    assert names == ["quant_sdpa", "qsdpa_probe_variant", "bf16"], r.stdout
    assert sorted(p.name for p in _core.DIR.iterdir()) == shipped
    clash = tmp_path / "rms_norm.metal"
    clash.write_text("")
    r = subprocess.run(cmd + ["--variant", str(clash)], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "would replace a shipped kernel" in r.stderr
    assert sorted(p.name for p in _core.DIR.iterdir()) == shipped


def test_profile_decode_summary_against_a_timeline():
    """profile_decode.summarize on seeded random kernel intervals (integer us, overlapping and not)
    against a timeline of 1-us cells marked busy with numpy: busy time, gaps, the idle stretches
    over 20 us, kernel sums and counts per name."""
    import numpy as np

    profile_decode = import_script("profile_decode")
    rng = np.random.default_rng(12)
    steps = 4
    starts = np.cumsum(rng.integers(-3, 40, 300)) + 1000  # some overlap the one before, some leave gaps
    starts = np.maximum.accumulate(starts)
    durs = rng.integers(1, 30, 300)
    names = rng.choice(["gemv", "rms_norm", "sdpa"], 300)
    kernels = [(str(n), float(s), float(d)) for n, s, d in zip(names, starts, durs)]
    rng.shuffle(kernels)  # the order of the events must not matter
    s = profile_decode.summarize(kernels, steps)

    t0, t1 = starts.min(), max(starts + durs)
    cells = np.zeros(t1 - t0, bool)
    for st, d in zip(starts, durs):
        cells[st - t0:st - t0 + d] = True
    idle = np.flatnonzero(np.diff(np.concatenate([[1], cells.astype(int), [1]])))  # run edges of idle stretches
    runs = idle[1::2] - idle[::2]
    assert s["span_us"] == (t1 - t0) / steps
    assert s["busy_us"] == cells.sum() / steps
    assert s["gaps_us"] == (~cells).sum() / steps == runs.sum() / steps
    assert s["big_gaps_us"] == runs[runs > 20].sum() / steps and s["big_gaps_per_step"] == (runs > 20).sum() / steps
    assert s["kernel_sum_us"] == durs.sum() / steps and s["kernels_per_step"] == 300 / steps
    for name in ("gemv", "rms_norm", "sdpa"):
        assert s["by_kernel"][name] == ((names == name).sum() / steps, durs[names == name].sum() / steps)
    assert list(s["by_kernel"].values()) == sorted(s["by_kernel"].values(), key=lambda v: -v[1])


def test_profile_decode_needs_a_cuda_gpu_and_good_flags():
    """Without a GPU seen by MLX and torch: exit 2 with one line saying so; a bad --context: argparse's error."""
    r = subprocess.run([sys.executable, str(SCRIPTS / "profile_decode.py"), "--geometry", "tiny"],
                       capture_output=True, text=True, timeout=300)
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        assert r.returncode == 2 and "needs an NVIDIA GPU" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, str(SCRIPTS / "profile_decode.py"), "--context", "12x"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--context '12x'" in r.stderr, r.stderr


def test_probe_small_arrays_needs_a_cuda_gpu_and_good_flags():
    """Without a GPU seen by MLX and torch: exit 2 with one line saying so; --calls 0: argparse's error."""
    import mlx.core as mx

    r = subprocess.run([sys.executable, str(SCRIPTS / "probe_small_arrays.py"), "--calls", "2", "--rounds", "1"],
                       capture_output=True, text=True, timeout=300)
    if mx.default_device() == mx.cpu:
        assert r.returncode == 2 and "needs an NVIDIA GPU" in r.stderr, r.stderr
    else:
        assert r.returncode == 0 and "template argument" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, str(SCRIPTS / "probe_small_arrays.py"), "--calls", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--calls and --rounds must be at least 1" in r.stderr, r.stderr
