"""Tensor parallelism (qwen_mlx.distributed) in real processes: two ranks on 127.0.0.1 over MLX's
ring backend, started by `mlx.launch`, against the same jobs run in one plain process.

Tolerance: the sharded model computes the same float32 products; what changes is the order of
the sums in o_proj and down_proj (each rank sums its half of the input features, then all_sum
adds the two halves). float32 rounding of a reordered sum of k terms differs by ~k * 2^-24 of the
terms' magnitude; through 24 layers and the head, the real model's last-position logits (up to
~22) moved by 7.9e-6 in float32 and 3.5e-5 kept quantized (docs/distributed.md), so 1e-4 holds
with a 3-10x margin, while a wrong slice (the fused q/k/v cut into contiguous halves
instead of per segment: tried) moves even the tiny model's logits by 4.5e-2. Both ranks must agree
exactly: all_sum leaves the same bits on every rank, and the head and sampling are replicated.

Every run ends under a timeout, and its whole process group is killed, so a hang fails the test
instead of blocking CI. `mlx.launch` exits 0 even when a rank fails, so the checks read the
ranks' output files and messages, never the launcher's exit code alone.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).parent / "dist_worker.py")
TOL = 1e-4
REQUESTS = [{"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.7, "seed": 5}, "plain text ✓", [], 0]


def _launcher() -> str:
    exe = Path(sys.executable).parent / "mlx.launch"
    return str(exe) if exe.exists() else "mlx.launch"


def _free_ports(n: int) -> int:
    """A port p with p..p+n-1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n > 65535:
            continue
        try:
            socks = []
            for i in range(n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def run(args: list, n: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python ARGS` in one process (n=0) or as n ranks under mlx.launch; killed (whole process
    group) past `timeout` seconds, which fails the test."""
    cmd = [sys.executable, *args]
    if n:
        cmd = [_launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n),
               "--starting-port", str(_free_ports(n)), "--", *cmd]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out}\n{err}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # anything the ranks left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_jobs(jobs: list, out: Path, n: int = 0, timeout: float = 240) -> dict:
    """Run the worker's jobs; {name: [rank0 npz, rank1 npz, ...]}."""
    out.mkdir(parents=True, exist_ok=True)
    r = run([WORKER, json.dumps(jobs), str(out)], n, timeout)
    results = {}
    for job in jobs:
        files = [out / f"{job['name']}-rank{i}.npz" for i in range(max(n, 1))]
        missing = [f.name for f in files if not f.exists()]
        assert not missing, f"no output {missing}:\n{r.stdout}\n{r.stderr}"
        results[job["name"]] = [dict(np.load(f)) for f in files]
    return results


def check_against_single(single: dict, ranks: list, n: int, heads: int, exact_tokens: bool = True) -> float:
    """Both ranks sharded and identical, tokens as the single process, logits within TOL."""
    for r in ranks:
        assert int(r["size"]) == n and bool(r["sharded"]) and int(r["n_heads"]) == heads // n
        np.testing.assert_array_equal(r["tokens"], ranks[0]["tokens"])
        np.testing.assert_array_equal(r["logits"], ranks[0]["logits"])
    assert int(single["size"]) == 1 and not bool(single["sharded"])
    if exact_tokens:
        np.testing.assert_array_equal(ranks[0]["tokens"], single["tokens"])
    err = float(np.abs(ranks[0]["logits"] - single["logits"]).max())
    print(f"max |logit difference| {err:.2e} (largest |logit| {np.abs(single['logits']).max():.1f})")
    assert err < TOL, err
    return err


@pytest.fixture(scope="module")
def tiny_runs(tiny_gguf, tmp_path_factory):
    f32 = str(tiny_gguf())
    mixed = str(tiny_gguf(qtype="Q4_K", qtypes={"attn_q": "Q5_0", "attn_v": "Q8_0", "ffn_down": "Q6_K"}, seed=3))
    from qwen_mlx.convert import convert

    tmp = tmp_path_factory.mktemp("dist")
    converted = str(convert(mixed, tmp / "converted", dtype="float32", progress=False))
    prompt = [10, 200, 33, 7, 91, 150, 3, 64, 12]
    jobs = [
        {"name": "f32", "model": f32, "prompt": prompt, "tokens": 10},
        {"name": "f32_after", "model": f32, "prompt": prompt, "tokens": 10, "shard_after": True},
        {"name": "mixed_q", "model": mixed, "quantized": True, "prompt": prompt, "tokens": 10},
        {"name": "mixed_q_after", "model": mixed, "quantized": True, "prompt": prompt, "tokens": 10,
         "shard_after": True},
        {"name": "dir_q", "model": converted, "quantized": True, "prompt": prompt, "tokens": 10},
        {"name": "dir_f32", "model": converted, "prompt": prompt, "tokens": 10},
        {"name": "sampled", "model": f32, "prompt": prompt, "tokens": 16, "temp": 1.0, "seed": 11},
        {"name": "unseeded", "model": f32, "prompt": prompt, "tokens": 16, "temp": 1.0},
        {"name": "requests", "requests": REQUESTS},
    ]
    return run_jobs(jobs, tmp / "single"), run_jobs(jobs, tmp / "ranks", n=2)


@pytest.mark.parametrize("name", ["f32", "f32_after"])
def test_float_matches_single_process(tiny_runs, name):
    """Per-rank loading (each rank reads its slices) and sharding a loaded model both give the
    single process's greedy tokens and logits."""
    single, ranks = tiny_runs
    check_against_single(single[name][0], ranks[name], 2, heads=4)


@pytest.mark.parametrize("name", ["mixed_q", "mixed_q_after"])
def test_native_quantized_matches_single_process(tiny_runs, name):
    """GGUF-native quantized weights in mixed formats (q Q5_0, k Q4_K, v Q8_0: the fused qkv is
    promoted; down_proj Q6_K re-quantized to 8 bits, split by columns) against the single-process
    quantized model: the same codes, scales and biases, so again only the sum order differs."""
    single, ranks = tiny_runs
    check_against_single(single[name][0], ranks[name], 2, heads=4)


@pytest.mark.parametrize("name", ["dir_q", "dir_f32"])
def test_converted_directory_matches_single_process(tiny_runs, name):
    """A converted MLX directory (lazily loaded safetensors, each rank slicing packed codes, scales
    and biases), kept quantized or dequantized, against the same directory in one process."""
    single, ranks = tiny_runs
    check_against_single(single[name][0], ranks[name], 2, heads=4)


def test_sampling_is_identical_on_every_rank(tiny_runs):
    """With a seed: the ranks sample the same tokens, and the single process's (the sampled
    distributions agree to ~1e-7, so a different draw would need a uniform to land within that of
    a boundary: ~1e-6 per token). Without one: `load` seeds every rank alike."""
    single, ranks = tiny_runs
    check_against_single(single["sampled"][0], ranks["sampled"], 2, heads=4)
    a, b = ranks["unseeded"]
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert len(set(ranks["sampled"][0]["tokens"].tolist())) > 3  # really sampled, not a repeat


def test_four_ranks(tiny_gguf, tmp_path):
    """Any N: 8 query and 4 KV heads over 4 ranks, native quantized in mixed formats."""
    path = str(tiny_gguf(heads=8, kv_heads=4, qtype="Q4_K", qtypes={"attn_v": "Q8_0", "ffn_down": "Q6_K"}))
    jobs = [{"name": "q4", "model": path, "quantized": True, "tokens": 6}]
    single, ranks = run_jobs(jobs, tmp_path / "single"), run_jobs(jobs, tmp_path / "ranks", n=4)
    check_against_single(single["q4"][0], ranks["q4"], 4, heads=8)


def test_broadcast_and_follow(tiny_runs):
    """The server hook: rank 0 broadcasts each request (JSON, any size) then None; rank 1, in
    `follow`, receives every request in order and returns."""
    _, ranks = tiny_runs
    for r in ranks["requests"]:
        assert json.loads(str(r["got"])) == REQUESTS


def test_head_count_not_divisible(tiny_gguf, tmp_path):
    """3 query heads over 2 ranks: every rank says why, nothing hangs, nothing is written."""
    path = str(tiny_gguf(hidden=192, heads=3, kv_heads=1))
    r = run([WORKER, json.dumps([{"name": "bad", "model": path}]), str(tmp_path)], n=2, timeout=120)
    for rank in (0, 1):
        assert (f"error: rank {rank}/2: cannot split the model over 2 ranks: its 3 query heads, 1 KV heads "
                f"and intermediate size 512 must all divide by 2") in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.npz"))


def test_cli_under_mlx_launch(tiny_gguf):
    """`mlx.launch ... -- python -m qwen_mlx.generate`: rank 0 prints the same text as one process,
    once; the other rank stays silent."""
    args = ["-m", "qwen_mlx.generate", "--model", str(tiny_gguf()), "--prompt", "def f(x):",
            "--ignore-chat-template", "--max-tokens", "12"]
    single, ranks = run(args), run(args, n=2)
    assert single.returncode == 0, single.stderr
    assert single.stdout.strip() and ranks.stdout == single.stdout, (ranks.stdout, ranks.stderr)
    assert ranks.stderr.count("tensor parallel over 2 ranks") == 1, ranks.stderr
    assert ranks.stderr.count("generation:") == 1


@pytest.fixture(scope="module")
def real_runs(default_model, tmp_path_factory):
    """The real default model, float32 (dequantized) and native quantized, one process and two ranks."""
    prompt = [151644, 872, 198, 7985, 264, 13027, 729, 429, 12341, 3425, 264, 1372, 374, 10250, 13,
              151645, 198, 151644, 77091, 198]  # chat-formatted "Write a Python function that checks..."
    jobs = [{"name": "real_f32", "model": str(default_model), "prompt": prompt, "tokens": 8},
            {"name": "real_q", "model": str(default_model), "prompt": prompt, "tokens": 8, "quantized": True}]
    tmp = tmp_path_factory.mktemp("dist_real")
    return run_jobs(jobs, tmp / "single", timeout=400), run_jobs(jobs, tmp / "ranks", n=2, timeout=400)


def test_real_model_float32(real_runs):
    """Qwen2.5-Coder-0.5B (14 query heads, 2 KV heads) in float32 over 2 ranks: greedy tokens equal
    to one process, logits within 1e-4; each rank's load peaks well under the whole model's
    (layers halved, embedding kept: ~0.64 of the float32 weights)."""
    single, ranks = real_runs
    check_against_single(single["real_f32"][0], ranks["real_f32"], 2, heads=14)
    for r in ranks["real_f32"]:
        assert r["load_peak"] < 0.8 * single["real_f32"][0]["load_peak"], (r["load_peak"], single["real_f32"][0]["load_peak"])


def test_real_model_native_quantized(real_runs):
    """The Q4_K_M file kept quantized (Q4_K/Q6_K/Q8_0 repacked) over 2 ranks against one process."""
    single, ranks = real_runs
    check_against_single(single["real_q"][0], ranks["real_q"], 2, heads=14)
