"""qwen_mlx.convert: GGUF / Hugging Face -> MLX model directory, read back by mlx_lm.load and qwen_mlx.load."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny_gguf
from mlx_lm.models import qwen2

from qwen_mlx.convert import ConvertError, convert, main
from qwen_mlx.gguf import gguf_config, gguf_quantized_weights, gguf_weights, open_gguf

ROOT = Path(__file__).resolve().parent.parent
MIXED = {"qtype": "Q5_0", "qtypes": {"ffn_down": "Q6_K", "attn_v": "Q8_0", "output": "Q8_0", "ffn_gate": "Q4_K"}}


def reference_model(gguf_path):
    """mlx-lm's own qwen2 with the GGUF's float32 dequantized weights."""
    reader = open_gguf(gguf_path)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(gguf_config(reader)))
    model.load_weights(list(gguf_weights(reader).items()), strict=True)
    return model


def greedy(model, prompt, n=24):
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(mx.argmax(model(mx.array([toks]))[0, -1]).item()))
    return toks[len(prompt):]


PROMPTS = [[280, 10, 72, 101, 108, 108, 111], [281, 117, 115, 101, 114, 10, 100, 101, 102, 32, 102, 40, 41, 58],
           list(range(30, 90, 3))]


def check_dir(out: Path, gguf_path, quantized: bool, atol=2e-3):
    """mlx_lm.load opens `out`; greedy tokens equal the float32 reference; logits close."""
    import mlx_lm

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json"} <= names, names
    assert not any(n.startswith(".") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert ("quantization" in config) == quantized
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == tiny_gguf.CHAT_TEMPLATE
    model, tokenizer = mlx_lm.load(str(out))
    ref = reference_model(gguf_path)
    for p in PROMPTS:
        assert greedy(model, p) == greedy(ref, p)
        a, b = model(mx.array([p])).astype(mx.float32), ref(mx.array([p]))
        assert float(mx.abs(a - b).max() / mx.abs(b).max()) < atol
    text = "def f():\n    return 'hi'  # ok"
    from qwen_mlx.tokenizer import load_tokenizer

    assert tokenizer.encode(text) == load_tokenizer(open_gguf(gguf_path)).encode(text)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                     add_generation_prompt=True, tokenize=False)
    return model, config


@pytest.mark.parametrize("kw", [{"qtype": "Q8_0"}, {"qtype": "Q4_K", "tied": True}, MIXED, {"qtype": "IQ4_XS"}],
                         ids=["Q8_0", "Q4_K-tied", "mixed", "IQ4_XS"])
def test_gguf_to_mlx(tiny_gguf, tmp_path, kw):
    src = tiny_gguf(**kw)
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    _, config = check_dir(out, src, quantized=True)
    q = config["quantization"]
    # The safetensors hold exactly what gguf_quantized_weights gives.
    weights, quantization = gguf_quantized_weights(open_gguf(src), mx.float32)
    assert quantization == q
    saved = mx.load(str(out / "model.safetensors"))
    assert set(saved) == set(weights)
    for k, v in weights.items():
        assert saved[k].dtype == v.dtype and mx.array_equal(saved[k], v).item(), k
    if kw is MIXED:
        assert q["bits"] == 5 and q["lm_head"] == {"group_size": 32, "bits": 8}
        assert q["model.layers.0.self_attn.v_proj"] == {"group_size": 32, "bits": 8}
        assert q["model.layers.1.mlp.gate_proj"] == {"group_size": 32, "bits": 4}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [282, 280] and config["eos_token_id"] == [282, 280]


def test_qwen_mlx_load_matches_mlx_lm(tiny_gguf, tmp_path):
    import mlx_lm

    import qwen_mlx

    src = tiny_gguf(qtype="Q4_K", qtypes={"ffn_down": "Q6_K"})
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    a, _ = mlx_lm.load(str(out))
    b, _ = qwen_mlx.load(out, dtype="float32")
    for p in PROMPTS:
        assert greedy(b, p) == greedy(a, p)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtypes(tiny_gguf, tmp_path, dtype):
    src = tiny_gguf(qtype="Q4_0")
    out = convert(src, tmp_path / "out", dtype=dtype, progress=False)
    saved = mx.load(str(out / "model.safetensors"))
    assert saved["model.layers.0.self_attn.q_proj.scales"].dtype == getattr(mx, dtype)
    assert saved["model.norm.weight"].dtype == getattr(mx, dtype)
    assert saved["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32


def test_dequantize(tiny_gguf, tmp_path):
    src = tiny_gguf(**MIXED)
    out = convert(src, tmp_path / "out", dtype="float32", dequantize=True, progress=False)
    check_dir(out, src, quantized=False, atol=1e-5)
    saved = mx.load(str(out / "model.safetensors"))
    for k, v in gguf_weights(open_gguf(src)).items():
        assert mx.array_equal(saved[k], v).item(), k


def test_gguf_q_bits(tiny_gguf, tmp_path):
    """--q-bits re-quantizes float matrices and non-exact types; exact types keep their own format."""
    src = tiny_gguf(qtype="F16", qtypes={"ffn_down": "Q4_K", "ffn_up": "Q6_K"})
    out = convert(src, tmp_path / "out", dtype="float32", q_bits=8, q_group_size=32, progress=False)
    model, config = check_dir(out, src, quantized=True, atol=0.05)
    q = config["quantization"]
    assert (q["bits"], q["group_size"]) == (8, 32)
    assert q["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 4}
    out2 = convert(src, tmp_path / "out2", dtype="float32", q_bits=4, q_group_size=64, dequantize=True,
                   progress=False)
    q2 = json.loads((out2 / "config.json").read_text())["quantization"]
    assert q2 == {"group_size": 64, "bits": 4, "mode": "affine"}


def test_sharded(tiny_gguf, tmp_path):
    import mlx_lm

    src = tiny_gguf(qtype="Q8_0")
    out = convert(src, tmp_path / "out", dtype="float32", progress=False, shard_bytes=200_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    model, _ = mlx_lm.load(str(out))
    ref = reference_model(src)
    assert greedy(model, PROMPTS[0]) == greedy(ref, PROMPTS[0])


def hf_checkpoint(tiny_gguf, tmp_path, tied=False):
    """A Hugging Face-layout Qwen2 directory: written by transformers from the tiny GGUF's weights."""
    import torch
    import transformers

    src = tiny_gguf(qtype="F32", tied=tied)
    reader = open_gguf(src)
    config = gguf_config(reader)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{k: v for k, v in config.items()
                                                                   if k not in ("rope_scaling", "architectures")}))
    state = {k: torch.from_numpy(np.array(v)) for k, v in gguf_weights(reader).items()}
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    d = tmp_path / "hf"
    hf.to(torch.bfloat16).save_pretrained(d)
    from qwen_mlx.tokenizer import load_tokenizer

    load_tokenizer(reader)._tokenizer.save_pretrained(d)
    return src, d, hf.float()


@pytest.mark.parametrize("tied", [False, True])
def test_hf_checkpoint(tiny_gguf, tmp_path, tied):
    import mlx_lm
    import torch

    src, d, hf = hf_checkpoint(tiny_gguf, tmp_path, tied)
    out = convert(d, tmp_path / "out", dtype="float32", progress=False)
    model, _ = mlx_lm.load(str(out))
    tokens = PROMPTS[1]
    with torch.no_grad():
        want = hf(torch.tensor([tokens])).logits[0].numpy()
    got = np.array(model(mx.array([tokens]))[0])
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    outq = convert(d, tmp_path / "outq", dtype="float16", q_bits=8, q_group_size=64, progress=False)
    config = json.loads((outq / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    saved = mx.load(str(outq / "model.safetensors"))
    w = mx.load(str(d / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"].astype(mx.float32)
    q = mx.quantize(w, group_size=64, bits=8)  # what mlx_lm.convert -q does
    assert mx.array_equal(saved["model.layers.1.mlp.up_proj.weight"], q[0]).item()
    assert mx.array_equal(saved["model.layers.1.mlp.up_proj.scales"], q[1].astype(mx.float16)).item()
    qmodel, _ = mlx_lm.load(str(outq))
    got = np.array(qmodel(mx.array([tokens]))[0].astype(mx.float32))
    assert np.abs(got - want).max() / np.abs(want).max() < 0.03
    # An MLX directory is also accepted as input (dequantized first).
    back = convert(outq, tmp_path / "back", dtype="float32", progress=False)
    assert "quantization" not in json.loads((back / "config.json").read_text())


def test_existing_output_refused_and_force(tiny_gguf, tmp_path, capsys):
    src = tiny_gguf(qtype="Q8_0")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main([str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err and "--force" in err
    assert (out / "keep.txt").exists()
    assert main([str(src), str(out), "--quiet", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_nothing_left_behind_on_error(tiny_gguf, tmp_path, monkeypatch):
    import qwen_mlx.convert as C

    src = tiny_gguf(qtype="Q8_0")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C, "_write_tokenizer", boom)
    with pytest.raises(OSError):
        convert(src, tmp_path / "a" / "b" / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(OSError):
        convert(src, tmp_path / "out", force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "old.txt").exists()


# ---- bad input: exit code 1, one line naming the file, no traceback --------------------------

def bad_inputs(tiny_gguf, tmp_path):
    rng = np.random.default_rng(0)
    cases = {"missing": (tmp_path / "missing.gguf", "no such file")}
    (p := tmp_path / "empty.gguf").write_bytes(b"")
    cases["empty"] = (p, "empty")
    (p := tmp_path / "random.gguf").write_bytes(rng.bytes(5000))
    cases["random"] = (p, "not a GGUF file")
    data = tiny_gguf(qtype="Q4_0").read_bytes()
    (p := tmp_path / "truncated.gguf").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (p, "truncated")
    cases["llama"] = (tiny_gguf(arch="llama"), "'llama'")
    return cases


@pytest.mark.parametrize("case", ["missing", "empty", "random", "truncated", "llama"])
def test_bad_input(tiny_gguf, tmp_path, capsys, case):
    path, words = bad_inputs(tiny_gguf, tmp_path)[case]
    assert main([str(path), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and words in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_bad_tensor_type_and_shape(tmp_path, monkeypatch, capsys):
    import gguf

    encode = tiny_gguf.encode_tensor
    monkeypatch.setattr(tiny_gguf, "encode_tensor",
                        lambda w, t, rng: w.astype(np.float64) if w.shape == (256, 512) else encode(w, t, rng))
    bad_type = tiny_gguf.write_tiny_gguf(tmp_path / "f64.gguf", qtypes={"ffn_down": "F64"})
    monkeypatch.setattr(tiny_gguf, "encode_tensor", encode)
    orig = gguf.GGUFWriter.add_head_count
    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count", lambda self, n: orig(self, 8))
    bad_shape = tiny_gguf.write_tiny_gguf(tmp_path / "heads.gguf")
    for path, words in ((bad_type, "F64"), (bad_shape, "but the metadata implies")):
        assert main([str(path), str(tmp_path / "out"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and words in err, err


def test_bad_hf_directory(tmp_path, capsys):
    d = tmp_path / "hf"
    d.mkdir()
    assert main([str(d), str(tmp_path / "out"), "--quiet"]) == 1
    assert "no config.json" in capsys.readouterr().err
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main([str(d), str(tmp_path / "out"), "--quiet"]) == 1
    assert "'llama'" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="no \\*.safetensors"):
        (d / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        convert(d, tmp_path / "out")


def test_script_wrapper(tiny_gguf, tmp_path):
    """scripts/convert_gguf.py runs as a program; a bad file gives one line and exit code 1."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_gguf.py"), str(tmp_path / "nope.gguf"),
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "nope.gguf: no such file" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_gguf.py"), str(tiny_gguf(qtype="Q8_0")),
                        str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


# ---- the real model ---------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_convert(default_model, converted_default_model):
    """Converting the default model takes < 30 s (about 10 s here); mlx_lm.load runs it, and its greedy
    tokens on a chat prompt equal those of the float32 dequantized weights in mlx-lm's qwen2."""
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    out, seconds = converted_default_model
    print(f"converted the default model in {seconds:.1f} s")
    assert seconds < 60  # 30 s target on an idle machine; slack for a busy one
    model, tokenizer = mlx_lm.load(str(out))
    ref = reference_model(default_model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that checks "
                                             "whether a number is prime."}], add_generation_prompt=True)

    def run(m, n=16):
        cache, x, toks = make_prompt_cache(m), mx.array([prompt]), []
        for _ in range(n):
            toks.append(int(mx.argmax(m(x, cache=cache)[0, -1]).item()))
            x = mx.array([[toks[-1]]])
        return toks

    assert run(model) == run(ref)
