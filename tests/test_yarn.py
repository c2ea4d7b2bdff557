"""YaRN (rope_scaling type yarn) against transformers' Qwen2: same config, same weights.

- CPU (CI): a tiny GGUF carrying `qwen2.rope.scaling.*` (factor 4, original context 128), read by
  our loader, against transformers' Qwen2ForCausalLM built from an explicit YaRN config with the
  GGUF's weights; logits at every position up to 500 (4x the original context).
- CPU: the frequencies and attention factor for several rope_scaling variants against
  transformers' `ROPE_INIT_FUNCTIONS["yarn"]`.
- GPU (`gpu` marker): two layers of the 0.5B geometry, random weights, factor 4 over 32768,
  compared past 32k on a 40k-token sequence.
Each comparison also checks that plain RoPE (no YaRN) would fail it by a wide margin.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

import qwen_mlx
from qwen_mlx.generation import _context_length
from qwen_mlx.gguf import gguf_config, gguf_weights, open_gguf
from qwen_mlx.loader import build_model
from qwen_mlx.model import Attention, ModelArgs

torch = pytest.importorskip("torch", reason="the YaRN tests compare with transformers on torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def hf_qwen2(cfg: dict, weights: dict, dtype=torch.float32):
    """transformers' Qwen2 with `cfg` (our HF-style config) and `weights` (HF names, mx arrays)."""
    config = transformers.Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    model = transformers.Qwen2ForCausalLM(config).to(dtype).eval()
    state = {k: torch.from_numpy(np.array(v.astype(mx.float32))).to(dtype) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or (m == "lm_head.weight" and cfg["tie_word_embeddings"])
                                  for m in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("betas", [None, (16.0, 2.0)])
def test_yarn_from_gguf_matches_transformers_at_4x_the_original_context(tiny_gguf, betas):
    """The GGUF's qwen2.rope.scaling.{type,factor,original_context_length,yarn_beta_fast,
    yarn_beta_slow} read by our loader; transformers' config written out here. float32 on both sides, 2 layers, logits of magnitude ~1: the differences are summation
    order and RoPE angles (positions < 512: float32 angle error < 512 * 2^-24 rad), ~1e-6; 1e-4
    absolute leaves two orders of margin. Plain RoPE differs by ~1e-1 past position 128."""
    path = tiny_gguf(qtype="F32", yarn_factor=4.0, yarn_betas=betas, seed=7, context=512)
    model, _ = qwen_mlx.load(path, dtype="float32")
    cfg = gguf_config(open_gguf(path))
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 128 and _context_length(model) == 512
    weights = gguf_weights(open_gguf(path), mx.float32)
    toks = np.random.default_rng(7).integers(0, 283, 500)
    ours = np.array(model(mx.array(toks[None]))[0])
    # transformers' config written out here, not taken from our GGUF reader
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    if betas:
        assert (cfg["rope_scaling"]["beta_fast"], cfg["rope_scaling"]["beta_slow"]) == betas
        scaling.update(beta_fast=betas[0], beta_slow=betas[1])
    hf_cfg = dict(cfg, rope_scaling=scaling)
    with torch.no_grad():
        ref = hf_qwen2(hf_cfg, weights)(torch.tensor(toks[None])).logits[0].numpy()
        plain = hf_qwen2(dict(cfg, rope_scaling=None), weights)(torch.tensor(toks[None])).logits[0].numpy()
    err = np.abs(ours - ref).max()
    assert err < 1e-4, err
    assert np.abs(plain[128:] - ref[128:]).max() > 100 * max(err, 1e-5)


@pytest.mark.parametrize("extra", [{}, {"beta_fast": 16, "beta_slow": 2}, {"mscale": 0.707},
                                   {"mscale": 1.0, "mscale_all_dim": 0.5}, {"attention_factor": 1.3}])
@pytest.mark.parametrize("theta,orig,factor", [(1e6, 32768, 4.0), (1e4, 64, 4.0), (1e6, 4096, 8.0)])
def test_yarn_frequencies_and_attention_factor_match_transformers(theta, orig, factor, extra):
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig, **extra}
    cfg = dict(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=int(orig * factor), rope_theta=theta)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.Qwen2Config(**cfg, rope_scaling=dict(scaling)), "cpu")
    attn = Attention(ModelArgs(**cfg, rope_scaling=dict(scaling)))
    np.testing.assert_allclose(1.0 / np.array(attn._rope["freqs"]), inv_freq.numpy(), rtol=1e-6)
    assert math.isclose(attn._rope["mscale"], attention_factor, rel_tol=1e-9)


def test_yarn_without_truncation_is_refused():
    with pytest.raises(ValueError, match="truncation"):
        Attention(ModelArgs(
            hidden_size=64, num_hidden_layers=1, intermediate_size=64, num_attention_heads=1, num_key_value_heads=1,
            vocab_size=8, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "truncate": False}))


QWEN_05B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
                rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True)


@pytest.mark.gpu
def test_yarn_past_32k_matches_transformers_at_the_05b_geometry():
    """40960 tokens (positions up to 1.25x the native 32768) through two layers of the 0.5B
    geometry with random weights, YaRN factor 4 over 32768, float32 on both sides (transformers on
    CUDA with SDPA, ours on the GPU, each prefilled in chunks of 2048 through its own KV cache).
    Compared past 32k, per position: the final hidden state's relative error, and the logits'
    argmax at 32 positions. q/k weights are 4x the default init so that attention is sharp and
    positions matter (scores of std ~6). float32 RoPE angles at ~4e4 carry ~2e-3 rad of rounding on
    each side in the fastest dimensions, moving such scores by ~1e-2 and the attention weights and
    hidden states by ~1%; where two keys nearly tie the error is larger, so the bound is on the 99th
    percentile: 2e-2, while plain RoPE (no YaRN) is off by its whole scale at most positions (H200,
    2026-12-03: median 7e-3, 99th percentile 1.2e-2, max 1.7e-2; plain RoPE median 1.4; at 8x the
    init, scores 4x larger, median 2.1e-2). Two layers, as the CPU test above: deeper random layers
    amplify those differences."""
    N, ORIG, CHUNK = 40960, 32768, 2048
    cfg = dict(QWEN_05B, num_hidden_layers=2,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG})
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **{k: v for k, v in cfg.items() if k != "model_type"}, attn_implementation="sdpa")).eval()
    with torch.no_grad():  # sharpen attention so positions matter: q/k weights 4x the default init
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    weights = {k: mx.array(v.float().numpy()) for k, v in hf.state_dict().items() if "rotary" not in k}
    ours = build_model(cfg, weights, mx.float32)
    plain = build_model(dict(cfg, rope_scaling=None), weights, mx.float32)
    toks = np.random.default_rng(0).integers(0, 151936, N)
    pick = np.linspace(ORIG, N - 1, 32).astype(int)

    def run(model):
        cache, hs = model.make_cache(), []
        for i in range(0, N, CHUNK):
            h = model.model(mx.array(toks[None, i:i + CHUNK]), cache=cache)
            mx.eval(h)
            if i + CHUNK > ORIG:
                hs.append(np.array(h[0, max(ORIG - i, 0):]))
        return np.concatenate(hs)

    h_ours, h_plain = run(ours), run(plain)
    mx.clear_cache()  # MLX's cached buffers back to the device before torch allocates
    hf = hf.cuda()
    with torch.no_grad():  # in chunks through transformers' own cache: one 40960-token pass would
        cache, hs = transformers.DynamicCache(), []  # need an 88 GB float32 attention matrix
        for i in range(0, N, CHUNK):
            h = hf.model(torch.tensor(toks[None, i:i + CHUNK]).cuda(), past_key_values=cache, use_cache=True)
            if i + CHUNK > ORIG:
                hs.append(h.last_hidden_state[0, max(ORIG - i, 0):])
        h_ref = torch.cat(hs)
        logits_ref = hf.lm_head(h_ref[pick - ORIG]).cpu().numpy()
        h_ref = h_ref.cpu().numpy()
    logits_ours = np.array(ours.model.embed_tokens.as_linear(mx.array(h_ours[pick - ORIG])))
    norm = np.linalg.norm(h_ref, axis=-1)
    err, err_plain = (np.linalg.norm(h - h_ref, axis=-1) / norm for h in (h_ours, h_plain))
    p99, plain_median = np.percentile(err, 99), np.median(err_plain)
    print(f"past 32k, relative error per position: median {np.median(err):.2e}, 99th pct {p99:.2e}, "
          f"max {err.max():.2e} (plain RoPE: median {plain_median:.2e}); logits argmax agree at "
          f"{(logits_ours.argmax(-1) == logits_ref.argmax(-1)).sum()} of {len(pick)}; transformers' attention "
          f"factor {hf.model.rotary_emb.attention_scaling:.4f}")
    assert math.isclose(hf.model.rotary_emb.attention_scaling, ours.layers[0].self_attn._rope["mscale"])  # YaRN on
    assert p99 < 2e-2 and plain_median > 10 * p99
    assert (logits_ours.argmax(-1) == logits_ref.argmax(-1)).mean() >= 0.9
