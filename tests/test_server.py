"""The HTTP server as users run it: a real `python -m qwen_mlx.server` subprocess on a free loopback
port, driven by the official `openai` client, raw HTTP (httpx) and a headless Chromium.

References are independent of the server: the plain single-sequence path (`stream_generate` in
this process on the same file), the tokenizer, and the CLI (`python -m qwen_mlx.generate`).
Every subprocess is killed at teardown and every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
TINY_CONTEXT, TINY_MAX_TOKENS = 4096, 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m qwen_mlx.server` in a subprocess; output goes to a log file (shown on failure)."""

    def __init__(self, model: str, *args: str, log_dir: Path, timeout: float = 300, launch: tuple = ()):
        """`launch`: a launcher command in front (mlx.launch ... --), its processes in one group."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if launch:
            env["OPENBLAS_NUM_THREADS"] = "1"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*launch, sys.executable, "-m", "qwen_mlx.server", "--model", str(model), "--port",
                                      str(self.port), "--log-level", "warning", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=bool(launch))
        self.launched = bool(launch)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.close()
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.close()
        pytest.fail(f"server did not answer /health within {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=kw.pop("timeout", 120))

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.launched:  # every rank, whatever the launcher did with the signal
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


@pytest.fixture(scope="module")
def tiny_path(tiny_gguf):
    return tiny_gguf(context=TINY_CONTEXT)


@pytest.fixture(scope="module")
def tiny_server(tiny_path, tmp_path_factory):
    s = Server(tiny_path, "--max-tokens", str(TINY_MAX_TOKENS), "--max-body-bytes", "65536",
               log_dir=tmp_path_factory.mktemp("logs"), timeout=120)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny_ref(tiny_path):
    """The plain single-sequence path in this process: (tokenizer, generate(ids, **kw) -> list of responses)."""
    from qwen_mlx import load, stream_generate

    model, tok = load(tiny_path, dtype="float32")
    return tok, lambda ids, **kw: list(stream_generate(model, tok, ids, **kw))


def chat_ids(tok, messages):
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


MSGS = [[{"role": "user", "content": c}] for c in ("Hello there", "def fib(n):", "What is 2 + 2?", "the cat sat")]


def test_command_line_errors(tmp_path):
    """Bad flags: exit 2 and one line; a file that is not a model: exit 1 and one line; no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"hello")
    for args, code, words in [(["--temp", "-1"], 2, "temperature"),
                              (["--model", str(bad), "--port", str(free_port())], 1, "not-a-model.gguf")]:
        p = subprocess.run([sys.executable, "-m", "qwen_mlx.server", *args], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == code and len(lines) == 1 and words in lines[0], p.stderr
    from qwen_mlx.server import is_loopback
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")


# ---- the openai client: chat, completions, streaming, logprobs ----

def test_chat_matches_single_sequence_path(tiny_server, tiny_ref):
    tok, ref = tiny_ref
    c = tiny_server.client()
    for m in MSGS[:2]:
        r = c.chat.completions.create(model="any", messages=m, max_tokens=12)
        want = ref(chat_ids(tok, m), max_tokens=12)
        assert r.choices[0].message.content == "".join(x.text for x in want)
        assert r.choices[0].finish_reason == want[-1].finish_reason
        assert r.usage.prompt_tokens == len(chat_ids(tok, m))
        assert r.usage.completion_tokens == len(want)
        assert r.model == Path(tiny_server.proc.args[4]).stem


def test_stream_equals_non_stream_with_usage(tiny_server):
    c = tiny_server.client()
    full = c.chat.completions.create(model="m", messages=MSGS[2], max_tokens=10)
    chunks = list(c.chat.completions.create(model="m", messages=MSGS[2], max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # the raw wire: data: lines, then data: [DONE]
    with httpx.stream("POST", tiny_server.url + "/v1/completions", timeout=60,
                      json={"prompt": "def f", "max_tokens": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completion_and_logprobs_match_reference(tiny_server, tiny_ref):
    tok, ref = tiny_ref
    c = tiny_server.client()
    prompt = "def quicksort(xs):"
    want = ref(tok.encode(prompt), max_tokens=8, top_logprobs=3)
    r = c.completions.create(model="m", prompt=prompt, max_tokens=8, logprobs=3)
    assert r.choices[0].text == "".join(x.text for x in want)
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 8
    # float32 log-softmax of the same logits: equal up to accumulation order (prefill chunking)
    assert r.choices[0].logprobs.token_logprobs == pytest.approx([x.logprob for x in want], abs=1e-4)
    chat = c.chat.completions.create(model="m", messages=MSGS[1], max_tokens=6, logprobs=True, top_logprobs=3)
    want = ref(chat_ids(tok, MSGS[1]), max_tokens=6, top_logprobs=3)
    got = chat.choices[0].logprobs.content
    assert [g.logprob for g in got] == pytest.approx([x.logprob for x in want], abs=1e-4)
    for g, w in zip(got, want):
        assert g.bytes == list(tok.decode([w.token]).encode()) or "\ufffd" in tok.decode([w.token])
        assert [t.logprob for t in g.top_logprobs] == pytest.approx([lp for _, lp in w.top_logprobs], abs=1e-4)
        assert g.top_logprobs[0].logprob == pytest.approx(g.logprob, abs=1e-6)  # greedy takes the top token


def test_stop_strings_seed_and_infill_refused(tiny_server, tiny_ref):
    tok, ref = tiny_ref
    c = tiny_server.client()
    text = "".join(x.text for x in ref(tok.encode("the cat"), max_tokens=16))
    i = next(i for i in range(len(text) // 2, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[i:i + 2]
    r = c.completions.create(model="m", prompt="the cat", max_tokens=16, stop=[stop, "unused-stop"])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model="m", prompt="the cat", max_tokens=16, temperature=1.0)
    a, b, other = (c.completions.create(**kw, seed=s).choices[0].text for s in (7, 7, 8))
    assert a == b and a != other
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt="def f(", suffix="\n", max_tokens=4)
    assert e.value.status_code == 400 and "fill-in-the-middle" in e.value.body["message"]
    assert e.value.body["param"] == "suffix"


def test_models_health_and_page(tiny_server):
    ids = [m.id for m in tiny_server.client().models.list()]
    assert ids == [Path(tiny_server.proc.args[4]).stem]
    h = tiny_server.health()
    assert h["status"] == "ok" and h["active"] == 0
    page = httpx.get(tiny_server.url + "/", timeout=10)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets


# ---- prompt-cache reuse ----

def test_prompt_cache_reuse_gives_the_same_answer(tiny_server, tiny_ref):
    tok, ref = tiny_ref
    c = tiny_server.client()
    system = {"role": "system", "content": "You are a careful assistant. " * 40}
    m1, m2 = ([system, {"role": "user", "content": u}] for u in ("one", "two"))
    first = c.chat.completions.create(model="m", messages=m1, max_tokens=4)
    second = c.chat.completions.create(model="m", messages=m2, max_tokens=8)
    shared = next(i for i, (x, y) in enumerate(zip(chat_ids(tok, m1), chat_ids(tok, m2))) if x != y)
    assert first.usage.prompt_tokens > 300 and second.usage.prompt_tokens_details.cached_tokens == shared
    assert second.choices[0].message.content == "".join(x.text for x in ref(chat_ids(tok, m2), max_tokens=8))
    # a conversation growing turn by turn reuses the whole previous turn
    m3 = m1 + [{"role": "assistant", "content": first.choices[0].message.content},
                           {"role": "user", "content": "and?"}]
    third = c.chat.completions.create(model="m", messages=m3, max_tokens=4)
    assert third.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert third.choices[0].message.content == "".join(x.text for x in ref(chat_ids(tok, m3), max_tokens=4))


def test_prompt_cache_lru_budget(tiny_ref, tiny_path):
    """The store itself: copies on fetch, the shared prefix of a longer entry, eviction by bytes."""
    from qwen_mlx import load
    from qwen_mlx.prompt_cache import PromptCache
    import mlx.core as mx

    model, _ = load(tiny_path, dtype="float32")

    def filled(tokens):
        cache = model.make_cache()
        model(mx.array([tokens]), cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    a, b, d = list(range(10, 40)), list(range(50, 90)), list(range(100, 130))
    one = sum(c.nbytes for c in filled(a))  # KVCache buffers grow in steps of 256 positions: same size for all
    pc = PromptCache(max_bytes=2 * one, max_entries=8)
    pc.store(a, filled(a))
    pc.store(b, filled(b))
    cache, rest, n = pc.fetch(a[:20] + [7, 8])
    assert (n, rest, cache[0].offset) == (20, [7, 8], 20)  # trimmed copy of the longer entry
    cache, rest, n = pc.fetch(b)  # exact hit: the last token is fed again for its logits
    assert (n, rest, cache[0].offset) == (len(b) - 1, b[-1:], len(b) - 1)
    assert pc.fetch(b)[2] == len(b) - 1  # the stored entry was not changed by the first fetch
    pc.store(d, filled(d))  # over the budget: the least recently used (a) goes
    assert len(pc) == 2 and pc.fetch(a)[0] is None and pc.fetch(d)[2] == len(d) - 1
    with pytest.raises(ValueError, match="holds"):
        pc.store(a[:5], filled(a))


# ---- bad input: a clear 400/404/405/413, never a traceback, and the server keeps answering ----

BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"\xff\xfe\x00garbage", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b"[" * 100000 + b"]" * 100000, 413, None),
    ("/v1/chat/completions", b"[" * 20000 + b"]" * 20000, 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2.5}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "seed": True}, 400, "seed"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 6000}]}, 400, "messages"),
    ("/v1/completions", {"prompt": "x " * 6000}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "suffix": 3}, 400, "suffix"),
    ("/v1/completions", b'{"prompt": "' + b"a" * 70000 + b'"}', 413, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[3] or b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_refused_cleanly(tiny_server, path, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(tiny_server.url + path, content=data, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert err["message"] and "\n" not in err["message"] and "Traceback" not in r.text
    assert httpx.get(tiny_server.url + "/health", timeout=10).status_code == 200


def test_unknown_paths_and_methods(tiny_server):
    for method, path, status in [("GET", "/v1/nothing", 404), ("POST", "/health", 405),
                                 ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)]:
        r = httpx.request(method, tiny_server.url + path, timeout=10)
        assert r.status_code == status and r.json()["error"]["code"] in ("not_found", "method_not_allowed")
    ok = tiny_server.client().completions.create(model="m", prompt="still here", max_tokens=2)
    assert ok.usage.completion_tokens == 2


# ---- concurrency ----

def test_concurrent_greedy_answers_equal_single_client(tiny_server):
    c = tiny_server.client()
    single = [c.chat.completions.create(model="m", messages=m, max_tokens=16).choices[0].message.content
              for m in MSGS]

    def ask(i):
        m = MSGS[i % len(MSGS)]
        if i % 2:  # half of them stream
            s = c.chat.completions.create(model="m", messages=m, max_tokens=16, stream=True)
            return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
        return c.chat.completions.create(model="m", messages=m, max_tokens=16).choices[0].message.content

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(ask, range(8), timeout=120))
    assert got == [single[i % len(MSGS)] for i in range(8)]
    assert tiny_server.health()["peak_batch"] > 1  # they really were decoded together


def _wait(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_disconnect_stops_generation(tiny_server):
    before = tiny_server.health()
    body = {"prompt": "the", "max_tokens": TINY_CONTEXT - 10, "stream": True}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # three data lines and their blank separators
        assert sum(ln.startswith("data: ") for ln in got) == 3
        assert tiny_server.health()["active"] == 1  # still generating when the client goes
    assert _wait(lambda: tiny_server.health()["active"] == 0), tiny_server.health()
    after = tiny_server.health()
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    # a non-streaming client that gives up (read timeout) is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/v1/completions", json={**body, "stream": False}, timeout=1.5)
    assert _wait(lambda: tiny_server.health()["cancelled"] == before["cancelled"] + 2), tiny_server.health()
    assert _wait(lambda: tiny_server.health()["active"] == 0)
    # and the next request is served at once
    ok = tiny_server.client().completions.create(model="m", prompt="next", max_tokens=3)
    assert ok.usage.completion_tokens == 3


# ---- the chat page in a real browser ----

def _chromium():
    for b, d in [("/usr/bin/chromium", "/usr/bin/chromedriver"), (shutil.which("chromium"), shutil.which("chromedriver"))]:
        if b and d and os.path.exists(b) and os.path.exists(d):
            return b, d
    return None


def test_chat_page_streams_in_headless_chromium(tiny_server):
    found = _chromium()
    if found is None:
        pytest.skip("no Chromium + chromedriver on this machine (.ci/run installs Debian's chromium and "
                    "chromium-driver where apt-get can)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(tiny_server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text != "…")
        # count the chunks the page sees arrive (a streamed answer arrives in several)
        driver.execute_script("""
            window.__updates = 0;
            new MutationObserver(() => window.__updates++).observe(document.getElementById('log'),
                {subtree: true, childList: true, characterData: true});""")
        driver.find_element(By.ID, "input").send_keys("Hello there")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        shown = driver.execute_script(
            "return document.querySelector('.msg.assistant:last-child').textContent")
        updates = driver.execute_script("return window.__updates")
    finally:
        driver.quit()
    want = tiny_server.client().chat.completions.create(model="m", messages=MSGS[0]).choices[0].message.content
    assert shown == want and len(want) > 0
    assert updates >= 4  # user bubble, assistant bubble, then text that grew chunk by chunk


# ---- the real default model ----

REAL_PROMPT = "Write a Python function that reverses a string."
REAL_TOKENS = 24


@pytest.fixture(scope="module")
def real_server(default_model, tmp_path_factory):
    s = Server(default_model, "--max-tokens", str(REAL_TOKENS), log_dir=tmp_path_factory.mktemp("logs"), timeout=600)
    yield s
    s.close()


def run_cli(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "qwen_mlx.generate", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.endswith("\n")
    return p.stdout[:-1]


@pytest.mark.real_model
def test_real_chat_equals_cli(real_server, default_model):
    """The first request (nothing cached) over HTTP gives the CLI's greedy answer, token for token."""
    r = real_server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": REAL_PROMPT}], max_tokens=REAL_TOKENS)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.choices[0].message.content == run_cli("--model", str(default_model), "--prompt", REAL_PROMPT,
                                                   "--max-tokens", str(REAL_TOKENS))
    assert r.usage.completion_tokens == REAL_TOKENS and r.choices[0].finish_reason == "length"


@pytest.mark.real_model
def test_real_infill(real_server, default_model):
    from qwen_mlx.infill import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, infill_prompt
    from qwen_mlx.tokenizer import load_tokenizer

    prefix, suffix = "def add(a, b):\n    return ", "\n\n\nprint(add(2, 3))\n"
    tok = load_tokenizer(default_model)
    ids = infill_prompt(tok, prefix, suffix)
    # placed by id == the tokenizer's own parse of the textual special tokens
    assert ids == tok.encode(FIM_PREFIX + prefix + FIM_SUFFIX + suffix + FIM_MIDDLE, add_special_tokens=False)
    r = real_server.client().completions.create(model="m", prompt=prefix, suffix=suffix, max_tokens=16)
    middle = r.choices[0].text
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].finish_reason == "stop"
    assert middle.split("\n")[0].replace(" ", "") == "a+b", middle  # the obvious middle (the model may go on
    # to repeat a line of the suffix before it ends the middle)
    assert middle == run_cli("--model", str(default_model), "--prompt", prefix, "--suffix", suffix,
                             "--max-tokens", "16")


@pytest.mark.real_model
def test_real_shared_system_prompt_is_reused(real_server):
    from qwen_mlx.tokenizer import load_tokenizer

    c = real_server.client()
    system = {"role": "system", "content": "You are a Python expert. Answer with code only, no prose. " * 8}
    m1, m2 = ([system, {"role": "user", "content": u}] for u in ("Sum a list.", "Reverse a list."))
    c.chat.completions.create(model="m", messages=m1, max_tokens=4)
    r = c.chat.completions.create(model="m", messages=m2, max_tokens=4)
    tok = load_tokenizer(Path(real_server.proc.args[4]))
    shared = next(i for i, (x, y) in enumerate(zip(chat_ids(tok, m1), chat_ids(tok, m2))) if x != y)
    assert shared > 100 and r.usage.prompt_tokens_details.cached_tokens == shared


# ---- under mlx.launch: rank 0 serves, the ranks run every step together ----

def test_server_under_mlx_launch(tiny_path, tiny_server, tmp_path):
    """`mlx.launch --backend ring --hosts 127.0.0.1 -n 2 -- python -m qwen_mlx.server`: the model is
    split over two real processes, rank 0 answers HTTP. Concurrent greedy and seeded requests give
    the single-process server's text; a stream the client abandons is cancelled on every rank (the
    next requests still match); stopping the launcher ends both ranks."""
    from test_distributed import _free_ports, _launcher

    launch = (_launcher(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
              "--starting-port", str(_free_ports(2)), "--")
    s = Server(tiny_path, "--max-tokens", str(TINY_MAX_TOKENS), log_dir=tmp_path, timeout=180, launch=launch)
    try:
        reqs = [dict(messages=MSGS[0], max_tokens=12), dict(messages=MSGS[1], max_tokens=12, temperature=0.9, seed=7),
                dict(messages=MSGS[2], max_tokens=10, temperature=0.7, seed=3)]

        def ask(server, kw):
            return server.client().chat.completions.create(model="any", **kw).choices[0].message.content

        want = [ask(tiny_server, kw) for kw in reqs]
        with ThreadPoolExecutor(3) as pool:  # concurrent: they share the launched server's batched steps
            got = list(pool.map(lambda kw: ask(s, kw), reqs))
        assert got == want
        # long enough that it is still generating when the client goes (24 tokens of the tiny model
        # can all be sent before the close, and then there is nothing left to cancel)
        stream = s.client().chat.completions.create(model="any", messages=MSGS[3], max_tokens=TINY_CONTEXT // 2,
                                                    stream=True)
        chunks = iter(stream)
        for _ in range(3):  # the role chunk, then two tokens: the sequence is in the batch
            next(chunks)
        assert s.health()["active"] == 1
        stream.close()  # the client goes away: rank 0 cancels, and tells the other rank
        deadline = time.monotonic() + 30
        while s.health()["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.health()["cancelled"] == 1 and s.health()["completed"] == len(reqs)
        assert [ask(s, kw) for kw in reqs[:2]] == want[:2]
    finally:
        s.proc.terminate()
        try:
            s.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        ended = s.proc.poll() is not None
        s.close()
    log = s.log_path.read_text()
    assert ended, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
