"""The HTTP server under load: prompt-cache reuse and aggregate throughput, against mlx-lm's server.

    python scripts/bench_server.py                          # CPU: the default model
    python scripts/bench_server.py --against-mlx-lm         # and mlx_lm.server on the same weights

Starts `python -m qwen_mlx.server` (and, with --against-mlx-lm, `python -m mlx_lm.server` on a
directory written by `qwen_mlx.convert` from the same GGUF: float32 weights on a CPU, the GGUF's
own quantization on a GPU) on loopback ports and measures over HTTP, streaming, greedy:

- cache: time to first token (first SSE data line) of a request whose first --prefix-tokens tokens
  are new, then of a second request sharing that prefix with a different ending. Each round uses a
  fresh prefix, so the first request always misses. Ratio = second / first.
- throughput: C clients at once (C in --concurrency), each asking one chat completion of --tokens
  new tokens; aggregate tok/s = all completion tokens / wall time until the last answer.

The servers alternate round by round; medians over --rounds rounds with [min, max] are printed,
and a JSON line per measurement goes to stdout with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], timeout: float = 900):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w", prefix=f"bench-{name}-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd + ["--host", "127.0.0.1", "--port", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"error: {name} server exited; log: {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        sys.exit(f"error: {name} server did not start in {timeout} s; log: {self.log.name}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def ttft(self, prompt: str, max_tokens: int = 2) -> float:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        tic = time.perf_counter()
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=900) as r:
            r.raise_for_status()
            t = None
            for line in r.iter_lines():  # read to the end: the next request must not overlap this one
                if t is None and line.startswith("data: "):
                    t = time.perf_counter() - tic
        return t

    def chat(self, content: str, max_tokens: int) -> int:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0.0}
        r = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=1800)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]


def source_text() -> str:
    """Real code to build prompts from: this repository's Python sources."""
    return "\n\n".join(p.read_text() for p in sorted((ROOT / "qwen_mlx").glob("*.py")))


def prefix_of(tokenizer, text: str, n: int, round_: int) -> str:
    """A text of about n tokens that starts differently in every round (so the first request misses)."""
    ids = tokenizer.encode(f"# round {round_}: {time.time_ns()}\n" + text, add_special_tokens=False)[:n]
    return tokenizer.decode(ids)


def stat(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g} [{min(xs):.3g}, {max(xs):.3g}]"


def mlx_lm_dir(model: str, gpu: bool) -> Path:
    out = Path(os.environ.get("QWEN_MLX_CACHE", Path.home() / ".cache" / "qwen_mlx")) / (
        f"mlx-lm-{Path(model).stem}-{'native' if gpu else 'float32'}")
    if not out.exists():
        extra = [] if gpu else ["--dequantize", "--dtype", "float32"]
        subprocess.run([sys.executable, "-m", "qwen_mlx.convert", model, str(out), "--quiet", *extra], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--against-mlx-lm", action="store_true", help="also run mlx_lm.server on the same weights")
    ap.add_argument("--parts", default="cache,throughput")
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per client (throughput)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its servers

    from qwen_mlx.fetch import default_model_path  # qwen_mlx before mlx.core (it picks the BLAS)
    from qwen_mlx.tokenizer import load_tokenizer
    import mlx.core as mx

    model = a.model or str(default_model_path())
    gpu = mx.metal.is_available() or mx.cuda.is_available()
    tok = load_tokenizer(model)
    servers = [Server("qwen_mlx", [sys.executable, "-m", "qwen_mlx.server", "--model", model, "--log-level",
                                   "warning", "--max-batch", str(a.max_batch)])]
    if a.against_mlx_lm:
        # mlx-lm's server in a process that loaded qwen_mlx first: on Linux that preloads OpenBLAS,
        # so both servers run on the same BLAS (alone, mlx-lm's CPU matmuls use MLX's slow reference one)
        launcher = "import sys, qwen_mlx; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"
        servers.append(Server("mlx_lm", [sys.executable, "-c", launcher, "--model",
                                         str(mlx_lm_dir(model, gpu)), "--log-level", "WARNING",
                                         "--decode-concurrency", str(a.max_batch)]))
    device = "GPU" if gpu else "CPU"
    print(f"# {time.strftime('%Y-%m-%d')} {device}, model {Path(model).name}, rounds {a.rounds}", flush=True)
    res: dict = {}
    try:
        text = source_text()
        for s in servers:  # warm-up: first request pays one-off costs (compilation, allocation)
            s.ttft("def warm_up():", 4)
            s.chat("Say hi.", 4)
        for r in range(a.rounds):
            for s in servers:
                if "cache" in a.parts:
                    prefix = prefix_of(tok, text, a.prefix_tokens, r)
                    first = s.ttft(prefix + "\n# Question one: what does this code do?\n")
                    second = s.ttft(prefix + "\n# Question two: list the functions.\n")
                    for k, v in (("ttft_first", first), ("ttft_second", second), ("ratio", second / first)):
                        res.setdefault((s.name, "cache", k), []).append(v)
                    print(f"round {r + 1} {s.name}: ttft {first:.2f} s -> {second:.2f} s", file=sys.stderr, flush=True)
                if "throughput" in a.parts:
                    for c in map(int, a.concurrency.split(",")):
                        prompts = [f"Write a Python class number {r * 100 + i} for a bank account with deposits, "
                                   "withdrawals and interest, with docstrings." for i in range(c)]
                        tic = time.perf_counter()
                        with ThreadPoolExecutor(c) as ex:
                            n = sum(ex.map(lambda p: s.chat(p, a.tokens), prompts))
                        res.setdefault((s.name, f"tok/s@{c}", "aggregate"), []).append(n / (time.perf_counter() - tic))
                        print(f"round {r + 1} {s.name}: {c} clients {res[(s.name, f'tok/s@{c}', 'aggregate')][-1]:.1f} "
                              "tok/s", file=sys.stderr, flush=True)
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.close()
    print("| server | measure | median [min, max] |\n|---|---|---|")
    for (name, part, k), xs in res.items():
        print(f"| {name} | {part} {k} | {stat(xs)} |")
        if a.json:
            print(json.dumps({"server": name, "part": part, "measure": k, "values": xs}))
    if a.against_mlx_lm:
        print("\n| measure | qwen_mlx / mlx_lm (ratio of medians) |\n|---|---|")
        for (name, part, k), xs in res.items():
            if name == "qwen_mlx" and ("mlx_lm", part, k) in res:
                print(f"| {part} {k} | {statistics.median(xs) / statistics.median(res[('mlx_lm', part, k)]):.2f} |")


if __name__ == "__main__":
    main()
