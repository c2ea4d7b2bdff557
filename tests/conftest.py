"""Shared fixtures. `import qwen_mlx` comes first so OpenBLAS is loaded before mlx.core."""

import sys
import time
from pathlib import Path

import qwen_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)
import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import write_tiny_gguf  # noqa: E402

HAS_GPU = mx.metal.is_available() or mx.cuda.is_available()
_not_run = []


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a GPU (Metal or CUDA): not run on this machine; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
            _not_run.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _not_run:
        terminalreporter.write_line(
            f"NOTE: {len(_not_run)} GPU tests were NOT run here (no Metal or CUDA device); "
            "they run on the device machine: pytest -m gpu", yellow=True)


@pytest.fixture(scope="session")
def default_model():
    """Path of the real default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), fetched once into the cache."""
    from qwen_mlx.fetch import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Factory: tiny_gguf(**kw) -> path of a tiny random Qwen2 GGUF (cached per keyword set)."""
    made = {}

    def make(**kw):
        key = tuple(sorted((k, str(v)) for k, v in kw.items()))
        if key not in made:
            name = "tiny-" + "-".join(f"{k}{v}" for k, v in key)[:80] + f"-{len(made)}.gguf"
            made[key] = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / name, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def converted_default_model(default_model, tmp_path_factory):
    """The default model converted by `qwen_mlx.convert` (float32 scales), once per session:
    (directory, seconds the conversion took)."""
    from qwen_mlx.convert import convert

    start = time.perf_counter()
    out = convert(default_model, tmp_path_factory.mktemp("converted") / "out", dtype="float32", progress=False)
    return out, time.perf_counter() - start


# The real model, loaded once per session and shared by the test files that only read it (each
# load costs seconds here; transformers' GGUF load, dequantizing in numpy, costs more).
@pytest.fixture(scope="session")
def real_model(default_model):
    """(model, tokenizer): the default model through `qwen_mlx.load` in float32 (dequantized)."""
    return qwen_mlx.load(default_model, dtype="float32")


@pytest.fixture(scope="session")
def hf_model(default_model):
    """transformers' float32 model of the same GGUF (eval mode): the independent reference."""
    from qwen_mlx.parity import load_transformers

    return load_transformers(default_model)


@pytest.fixture(scope="session")
def real_greedy(real_model):
    """Our float32 greedy continuations of the reference prompts (tests/real_prompts.py): per prompt,
    (prompt ids, N_NEW tokens from `generate_step`, which does not stop at EOS)."""
    from qwen_mlx.generation import generate_step
    from real_prompts import N_NEW, PROMPTS, prompt_ids

    model, tok = real_model
    out = []
    for prompt, chat in PROMPTS:
        ids = prompt_ids(tok, prompt, chat)
        out.append((ids, [t for t, _ in generate_step(mx.array(ids), model, max_tokens=N_NEW)]))
    return out
