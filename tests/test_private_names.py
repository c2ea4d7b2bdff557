"""Private names of other libraries that qwen-mlx relies on, each checked BY NAME.

pyproject.toml bounds gguf and mlx-lm to the versions tested; when a new version is allowed, this
file says at once (test name and message) which private name moved, instead of a slow parse or a
wrong RoPE somewhere else. Everything else qwen-mlx uses from them is public API.
"""

import inspect

import gguf
import mlx.core as mx
import numpy as np
from mlx_lm.models.rope_utils import YarnRoPE, initialize_rope

from qwen_mlx.gguf import GGUFFile, open_gguf


def test_gguf_reader_get_is_the_header_primitive(tiny_gguf, monkeypatch):
    """qwen_mlx.gguf.GGUFFile overrides `gguf.GGUFReader._get(offset, dtype, count, override_order)`
    (the fast parse, truncation errors). It must exist with that signature, and parsing must go
    through it (else the override silently stops working)."""
    assert hasattr(gguf.GGUFReader, "_get"), "gguf.GGUFReader._get is gone: update qwen_mlx.gguf.GGUFFile"
    params = list(inspect.signature(gguf.GGUFReader._get).parameters)
    assert params[:5] == ["self", "offset", "dtype", "count", "override_order"], params
    calls = []
    original = GGUFFile._get
    monkeypatch.setattr(GGUFFile, "_get", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    reader = open_gguf(tiny_gguf())
    assert len(calls) > 100 and reader.fields["general.architecture"].contents() == "qwen2"
    # Same parse as the stock reader.
    stock = gguf.GGUFReader(reader.path)
    fields = lambda r: {k: str(f.contents()) for k, f in r.fields.items()}  # noqa: E731
    assert fields(stock) == fields(reader)
    assert [(t.name, t.data_offset) for t in stock.tensors] == [(t.name, t.data_offset) for t in reader.tensors]


def test_mlx_lm_yarn_rope_freqs():
    """qwen_mlx.model reads `YarnRoPE._freqs` (and the public `mscale`) to hand YaRN's frequencies to
    the fused q/k/v kernel. Checked against what the module itself computes: position p rotates
    pair (i, i + 32) of mscale * x by the angle p / _freqs[i]."""
    rope = initialize_rope(64, 1e6, False, {"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 32768}, 131072)
    assert isinstance(rope, YarnRoPE)
    assert hasattr(rope, "_freqs"), "mlx_lm YarnRoPE._freqs is gone: update qwen_mlx.model.Attention"
    freqs = np.array(rope._freqs)
    assert freqs.shape == (32,) and hasattr(rope, "mscale")
    # The rotation of position p, pair (i, i + 32), is by angle p / freqs[i] (NeoX halves), scaled by mscale.
    x = mx.random.normal((1, 1, 3, 64), key=mx.random.key(0))
    got = np.array(rope(x, offset=5))[0, 0]
    xs = np.array(x)[0, 0] * rope.mscale
    pos = np.arange(5, 8)[:, None]
    cos, sin = np.cos(pos / freqs), np.sin(pos / freqs)
    want = np.concatenate([xs[:, :32] * cos - xs[:, 32:] * sin, xs[:, 32:] * cos + xs[:, :32] * sin], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
