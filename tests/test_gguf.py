"""qwen_mlx.gguf: validation, config and dequantized weights, against gguf.quants.dequantize."""

import shutil

import gguf
import mlx.core as mx
import numpy as np
import pytest
import tiny_gguf
from gguf import GGMLQuantizationType as Q

from qwen_mlx.gguf import GGUFError, check_tensors, expected_shapes, gguf_config, gguf_weights, mlx_name, open_gguf

ALL_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def reference(reader) -> dict[str, np.ndarray]:
    """gguf.quants.dequantize of every tensor, under mlx-lm names, as [out, in]."""
    n = reader.fields["qwen2.block_count"].contents()
    return {mlx_name(t.name, n): gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_every_type_exact(tiny_gguf, qtype):
    reader = open_gguf(tiny_gguf(qtype=qtype))
    types = {t.tensor_type.name for t in reader.tensors}
    assert qtype in types
    weights = gguf_weights(reader, mx.float32)
    ref = reference(reader)
    assert set(weights) == set(ref)
    for name, w in weights.items():
        assert w.dtype == mx.float32
        np.testing.assert_array_equal(np.array(w), ref[name], err_msg=name)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_cast(tiny_gguf, dtype):
    reader = open_gguf(tiny_gguf(qtype="Q4_K"))
    weights = gguf_weights(reader, dtype)
    for name, ref in reference(reader).items():
        assert weights[name].dtype == dtype
        assert mx.array_equal(weights[name], mx.array(ref).astype(dtype)).item(), name


@pytest.mark.parametrize("tied", [False, True])
def test_names_shapes_config(tiny_gguf, tied):
    path = tiny_gguf(qtype="Q8_0", tied=tied)
    reader = open_gguf(path)
    config = gguf_config(reader)
    assert config == {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 256, "num_hidden_layers": 2,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "max_position_embeddings": 512, "vocab_size": 283, "tie_word_embeddings": tied,
        "rope_scaling": None,
    }
    weights = gguf_weights(reader, mx.float32)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_shapes(config)
    assert ("lm_head.weight" in weights) == (not tied)
    assert weights["model.layers.1.self_attn.q_proj.weight"].shape == (256, 256)
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (128, 256)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (256, 512)


def test_yarn_config(tiny_gguf):
    config = gguf_config(open_gguf(tiny_gguf(yarn_factor=4.0)))
    assert config["rope_scaling"] == {"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 128}


def test_mixed_types(tiny_gguf):
    reader = open_gguf(tiny_gguf(qtype="Q4_K", qtypes={"ffn_down": "Q6_K", "attn_v": "Q8_0", "token_embd": "Q5_0"}))
    weights, ref = gguf_weights(reader), reference(reader)
    for name, w in weights.items():
        np.testing.assert_array_equal(np.array(w), ref[name], err_msg=name)


# ---- errors: GGUFError, one line, naming the file ----------------------------------------------

def expect_error(path, *words):
    with pytest.raises(GGUFError) as e:
        reader = open_gguf(path)
        gguf_weights(reader, mx.float32)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path):
    expect_error(tmp_path, "not a file")


def test_empty(tmp_path):
    (p := tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(p, "empty")


def test_random_bytes(tmp_path):
    (p := tmp_path / "random.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    expect_error(p, "not a GGUF file")


def test_garbage_after_magic(tmp_path):
    (p := tmp_path / "garbage.gguf").write_bytes(b"GGUF" + np.random.default_rng(1).bytes(4096))
    expect_error(p)


@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.999])
def test_truncated(tiny_gguf, tmp_path, fraction):
    src = tiny_gguf(qtype="Q4_0")
    data = src.read_bytes()
    (p := tmp_path / "truncated.gguf").write_bytes(data[: int(len(data) * fraction)])
    expect_error(p, "truncated")


def test_other_architecture(tiny_gguf):
    expect_error(tiny_gguf(arch="llama"), "'llama'", "qwen2")


def test_not_a_gguf_extension_irrelevant(tiny_gguf, tmp_path):
    shutil.copy(tiny_gguf(), p := tmp_path / "model.bin")
    assert gguf_config(open_gguf(p))["hidden_size"] == 256


@pytest.fixture
def writer_patch(monkeypatch):
    """Patch one GGUFWriter.add_* method with a function of (original, self, value)."""
    def patch(method, fn):
        orig = getattr(gguf.GGUFWriter, method)
        monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, v: fn(orig, self, v))
    return patch


@pytest.mark.parametrize("qtype", ["Q8_K", "F64", "I32"])
def test_unhandled_type(tmp_path, monkeypatch, qtype):
    encode = tiny_gguf.encode_tensor

    def encode_with_bad_down(w, t, rng):  # ffn_down is [256, 512]: store it as `qtype`
        if w.shape != (256, 512):
            return encode(w, t, rng)
        if qtype == "F64":
            return w.astype(np.float64)
        if qtype == "I32":
            return w.astype(np.int32)
        block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
        return np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)

    monkeypatch.setattr(tiny_gguf, "encode_tensor", encode_with_bad_down)
    p = tiny_gguf.write_tiny_gguf(tmp_path / "bad.gguf", qtypes={"ffn_down": qtype})
    expect_error(p, "blk.0.ffn_down.weight", qtype)


def test_shape_contradicts_metadata(tmp_path, writer_patch):
    writer_patch("add_feed_forward_length", lambda orig, self, n: orig(self, n * 2))
    p = tiny_gguf.write_tiny_gguf(tmp_path / "ffn.gguf")
    expect_error(p, "ffn_gate.weight", "[512, 256]", "[1024, 256]")


def test_kv_heads_contradict_metadata(tmp_path, writer_patch):
    writer_patch("add_head_count_kv", lambda orig, self, n: orig(self, 1))
    p = tiny_gguf.write_tiny_gguf(tmp_path / "kv.gguf")
    expect_error(p, "attn_k", "shape")


def test_too_few_layers_in_metadata(tmp_path, writer_patch):
    writer_patch("add_block_count", lambda orig, self, n: orig(self, 1))
    p = tiny_gguf.write_tiny_gguf(tmp_path / "layers.gguf")
    expect_error(p, "unexpected tensor blk.1.")


def test_missing_tensors(tmp_path, writer_patch):
    writer_patch("add_block_count", lambda orig, self, n: orig(self, 3))
    p = tiny_gguf.write_tiny_gguf(tmp_path / "layers.gguf")
    expect_error(p, "missing", "blk.2.", "model.layers.2.")


def test_missing_key(tmp_path, writer_patch):
    writer_patch("add_layer_norm_rms_eps", lambda orig, self, v: None)
    p = tiny_gguf.write_tiny_gguf(tmp_path / "eps.gguf")
    expect_error(p, "qwen2.attention.layer_norm_rms_epsilon")


def test_check_tensors_maps_every_tensor(tiny_gguf):
    reader = open_gguf(tiny_gguf())
    found = check_tensors(reader, gguf_config(reader))
    assert {t.name for t in found.values()} == {t.name for t in reader.tensors}


# ---- the real model, against transformers' GGUF loader --------------------------------------

@pytest.mark.real_model
def test_real_model_matches_transformers(default_model, hf_model):
    import transformers

    reader = open_gguf(default_model)
    config = gguf_config(reader)
    kw = dict(gguf_file=default_model.name)
    hf = transformers.AutoConfig.from_pretrained(default_model.parent, **kw)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert config[key] == getattr(hf, key), key
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (24, 896, False)

    weights = gguf_weights(reader, mx.float32)
    state = hf_model.state_dict()
    assert set(weights) == set(state)
    # q/k (NeoX rope order: no un-permutation), a Q6_K and a Q4_K ffn_down, embeddings, head.
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.bias",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.23.mlp.down_proj.weight",
                 "model.layers.5.self_attn.v_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(np.array(weights[name]), state[name].numpy(), err_msg=name)


# ---- MLX affine quantization: gguf_quantized_weights -----------------------------------------

from qwen_mlx.gguf import gguf_quantized_weights  # noqa: E402
from qwen_mlx.quant import EXACT, REQUANT, pack  # noqa: E402

# Types tiny_gguf cannot fill on its own: their float16 scale field offsets, for random blocks.
EXTRA_FIELDS = {"IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,)}
QUANT_TYPES = [t for t in ALL_TYPES if t not in ("F32", "F16", "BF16")] + ["TQ1_0", "TQ2_0"] + list(EXTRA_FIELDS)


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory):
    """qtype -> tiny GGUF with every matrix (embedding and head included) of that type."""
    made = {}

    def make(qtype):
        if qtype not in made:
            with pytest.MonkeyPatch.context() as mp:
                for name, offs in EXTRA_FIELDS.items():
                    mp.setitem(tiny_gguf._F16_FIELDS, Q[name], offs)
                made[qtype] = tiny_gguf.write_tiny_gguf(tmp_path_factory.mktemp("q") / f"{qtype}.gguf", qtype=qtype)
        return made[qtype]

    return make


def module_params(quantization, module):
    p = quantization.get(module, quantization)
    return p["group_size"], p["bits"]


def dequantized(weights, quantization, module):
    g, b = module_params(quantization, module)
    s, z = (weights[f"{module}.{k}"].astype(mx.float32) for k in ("scales", "biases"))
    return np.array(mx.dequantize(weights[f"{module}.weight"], s, z, group_size=g, bits=b))


def test_pack_matches_mlx():
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 6, 8):
        q = rng.integers(0, 1 << bits, (3, 128)).astype(np.uint8)
        ones, zeros = mx.ones((3, 4)), mx.zeros((3, 4))
        back = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=32, bits=bits)
        np.testing.assert_array_equal(np.array(back), q)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_quantized_every_type(typed_gguf, qtype, dtype):
    """Every weight is within the documented bound of gguf.quants.dequantize, element by element:
    exact types, bit-exact with float32 scales and biases, else within their rounding to `dtype`;
    re-quantized types, within half a step (round to nearest)."""
    reader = open_gguf(typed_gguf(qtype))
    weights, quantization = gguf_quantized_weights(reader, dtype)
    ref = reference(reader)
    rounding = {mx.float32: 0.0, mx.float16: 2.0 ** -11, mx.bfloat16: 2.0 ** -8}[dtype]
    qt = Q[qtype]
    assert quantization is not None
    for name, x in ref.items():
        module = name[: -len(".weight")]
        if x.ndim == 1:  # norms and biases: plain floats
            assert weights[name].dtype == dtype
            np.testing.assert_array_equal(np.array(weights[name].astype(mx.float32)),
                                          np.array(mx.array(x).astype(dtype).astype(mx.float32)))
            continue
        assert weights[name].dtype == mx.uint32 and weights[f"{module}.scales"].dtype == dtype
        g, bits = module_params(quantization, module)
        assert (bits, g) == (EXACT[qt][:2] if qt in EXACT else REQUANT[qt])
        y = dequantized(weights, quantization, module)
        s = np.abs(np.array(weights[f"{module}.scales"].astype(mx.float32)))
        z = np.abs(np.array(weights[f"{module}.biases"].astype(mx.float32)))
        # per group: |dw| <= |q| |ds| + |db| <= rounding * (qmax |s| + |b|) (scales and biases relative error)
        bound = rounding * ((1 << bits) * s + z) * 1.01
        if qt not in EXACT:
            bound = bound + s / 2 * 1.0001
        err = np.abs(y - x).reshape(x.shape[0], -1, g)
        if dtype == mx.float16:  # scales below 2^-14 are float16 subnormals: absolute rounding <= 2^-25
            bound = bound + ((1 << bits) + 1) * 2.0 ** -25
        assert (err <= bound[..., None] + 1e-30).all(), (name, float((err - bound[..., None]).max()))
        if qt in EXACT and dtype == mx.float32:
            np.testing.assert_array_equal(y, x, err_msg=name)
        if qt in EXACT and dtype == mx.float16 and qt in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q3_K, Q.IQ4_NL):
            np.testing.assert_array_equal(y, x, err_msg=name)  # float16 d is stored as is
        if qt not in EXACT:
            assert np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)) < 0.012, name


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_quantized_float_types_stay_float(tiny_gguf, qtype):
    reader = open_gguf(tiny_gguf(qtype=qtype))
    weights, quantization = gguf_quantized_weights(reader, mx.float32)
    assert quantization is None and not any(k.endswith(".scales") for k in weights)
    for name, x in reference(reader).items():
        np.testing.assert_array_equal(np.array(weights[name]), x)


def test_quantized_requant_option(tiny_gguf):
    """requant=(bits, group) re-quantizes float matrices and non-exact types; exact types stay exact."""
    reader = open_gguf(tiny_gguf(qtype="F16", qtypes={"ffn_down": "Q4_K", "ffn_up": "Q6_K"}))
    weights, quantization = gguf_quantized_weights(reader, mx.float32, requant=(4, 64))
    assert (quantization["bits"], quantization["group_size"]) == (4, 64)
    assert quantization["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 4}
    assert "model.layers.0.mlp.up_proj" not in quantization
    ref = reference(reader)
    np.testing.assert_array_equal(dequantized(weights, quantization, "model.layers.1.mlp.down_proj"),
                                  ref["model.layers.1.mlp.down_proj.weight"])
    y = dequantized(weights, quantization, "model.layers.1.self_attn.q_proj")
    x = ref["model.layers.1.self_attn.q_proj.weight"]
    assert np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)) < 0.1


def test_quantized_mixed_model_runs_in_mlx_lm(tiny_gguf):
    """A real-model-like mix loads into mlx-lm's qwen2 (strict) and its logits match the float model."""
    import mlx.nn as nn
    from mlx_lm.models import qwen2

    reader = open_gguf(tiny_gguf(qtype="Q5_0", qtypes={"ffn_down": "Q6_K", "attn_v": "Q8_0", "output": "Q8_0",
                                                       "attn_q": "Q4_K"}))
    config = gguf_config(reader)
    weights, quantization = gguf_quantized_weights(reader, mx.float32)
    assert quantization["bits"] == 5 and quantization["group_size"] == 32
    assert quantization["lm_head"] == {"group_size": 32, "bits": 8}
    assert quantization["model.layers.0.mlp.down_proj"] == {"group_size": REQUANT[Q.Q6_K][1], "bits": 8}
    assert quantization["model.layers.1.self_attn.q_proj"] == {"group_size": 32, "bits": 4}
    args = qwen2.ModelArgs.from_dict(config)
    model = qwen2.Model(args)
    nn.quantize(model, quantization["group_size"], quantization["bits"],
                class_predicate=lambda p, m: quantization.get(p, f"{p}.scales" in weights))
    model.load_weights(list(weights.items()), strict=True)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    ref = qwen2.Model(args)
    ref.load_weights(list(gguf_weights(reader).items()), strict=True)
    tokens = mx.array([[1, 5, 70, 200, 17, 3, 99]])
    a, b = model(tokens), ref(tokens)
    assert float(mx.abs(a - b).max() / mx.abs(b).max()) < 5e-3


@pytest.mark.parametrize("bits,group,to_bits,to_group", [(4, 32, 8, 32), (5, 32, 8, 32), (4, 64, 4, 32),
                                                         (2, 128, 6, 32), (3, 32, 5, 32), (8, 128, 8, 32)])
def test_promote_is_exact(bits, group, to_bits, to_group):
    from qwen_mlx.quant import promote, unpack

    w = mx.random.normal((16, 256), key=mx.random.key(bits))
    q = mx.quantize(w, group, bits)
    assert np.array_equal(pack(unpack(np.array(q[0]), bits), bits), np.array(q[0]))
    p = promote(*q, bits, group, to_bits, to_group)
    assert p[0].shape == (16, 256 * to_bits // 32)
    a = mx.dequantize(*q, group_size=group, bits=bits)
    b = mx.dequantize(*p, group_size=to_group, bits=to_bits)
    assert mx.array_equal(a, b).item()
    with pytest.raises(ValueError):
        promote(*q, bits, group, bits - 1, group)
