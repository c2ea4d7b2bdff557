"""Every command line fails the same way (qwen_mlx.cli): exit 2 and one line for a usage error
(bad flag), exit 1 and one line for a runtime error (missing file, prompt over the context).

Real processes (`python -m qwen_mlx.<cli>`), tiny GGUFs from tests/tiny_gguf.py; `fetch` (no file
to miss) for its usage error only.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CLIS = ["generate", "convert", "parity", "perplexity"]


def run(cli, *args, input=None):
    return subprocess.run([sys.executable, "-m", f"qwen_mlx.{cli}", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=300)


def one_line(r, needle):
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("note: ")]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return tiny_gguf(qtype="Q8_0", seed=3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("txt") / "t.txt"
    f.write_text("The cat sat on the mat, and the dog sat on the log. " * 20)
    return f


def usage_cases(tiny, text_file, tmp_path):
    return {  # cli -> [(args, what the one line must name)]
        "generate": [(["--bogus"], "unrecognized arguments"), (["--max-tokens", "0"], "--max-tokens")],
        "convert": [(["--bogus", tiny, tmp_path / "o"], "unrecognized arguments"),
                    ([tiny, tmp_path / "o", "--q-bits", "7"], "--q-bits")],
        "parity": [(["--prompt", "x", "--tolerance", "-1"], "--tolerance"),
                   (["--model", tiny, "--prompt", "the cat", "--stages", "nope*"], "--stages")],
        "perplexity": [(["--bogus", "--file", text_file], "unrecognized arguments"),
                       (["--model", tiny, "--file", text_file, "--llama-cpp", "--stride", "8"], "--stride")],
    }


@pytest.mark.parametrize("cli", CLIS)
def test_usage_errors_exit_2(cli, tiny, text_file, tmp_path):
    for args, needle in usage_cases(tiny, text_file, tmp_path)[cli]:
        r = run(cli, *args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        one_line(r, needle)
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.parametrize("cli", CLIS)
def test_missing_file_exits_1(cli, tiny, text_file, tmp_path):
    missing = tmp_path / "missing.gguf"
    args = {"generate": ["--model", missing, "--prompt", "x"],
            "convert": [missing, tmp_path / "o"],
            "parity": ["--model", missing, "--prompt", "x"],
            "perplexity": ["--model", missing, "--file", text_file]}[cli]
    r = run(cli, *args)
    assert r.returncode == 1, r.stderr
    one_line(r, "missing.gguf")
    assert not (tmp_path / "o").exists()
    if cli == "perplexity":  # and a missing text file, with a model that loads
        r = run(cli, "--model", tiny, "--file", tmp_path / "missing.txt")
        assert r.returncode == 1
        one_line(r, "missing.txt")


def test_runtime_errors_exit_1(tiny, text_file, tmp_path):
    r = run("generate", "--model", tiny, "--prompt", "the " * 600, "--ignore-chat-template")
    assert r.returncode == 1
    one_line(r, "context")
    r = run("perplexity", "--model", tiny, "--file", text_file, "--context", "100000", "--llama-cpp")
    assert r.returncode == 1
    one_line(r, "--context")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    r = run("convert", bad, tmp_path / "o")
    assert r.returncode == 1
    one_line(r, "bad.gguf")
    assert not (tmp_path / "o").exists()


def test_fetch_usage_error_exits_2():
    r = run("fetch", "--bogus")
    assert r.returncode == 2
    one_line(r, "unrecognized arguments")
