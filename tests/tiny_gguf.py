"""Write tiny random-weight Qwen2 GGUF files for the tests, with gguf.GGUFWriter.

`write_tiny_gguf(path, qtype="F32", tied=False, ...)` writes a 2-layer Qwen2
with a small byte-level BPE vocabulary (256 byte tokens, a few merges and
Qwen's three special tokens) and a Qwen-style chat template. Every 2-D weight
matrix is stored as `qtype`: quantized with `gguf.quants.quantize` where the
gguf package can, otherwise filled with random blocks whose float16 scale
fields are set to sane values (so every type can be tested; the true weights
are then whatever `gguf.quants.dequantize` says). Norm weights and biases
stay F32, as in llama.cpp's files. Hidden and FFN sizes are multiples of 256
so that the K-quants fit.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t", "e n", "Ġ w",
          "o r", "i s", "Ġ c", "Ġ 1", "d e", "Ġ f", "f o", "Ġ =", "Ġ d", "e f", "Ġd ef", "( )"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Byte offsets of the float16 scale fields (d, and dmin where there is one) in
# each block, for the types whose blocks we fill by hand.
_F16_FIELDS = {
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
}


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_vocab(merges: list[str] = MERGES) -> tuple[list[str], list[int], list[str]]:
    tokens = byte_tokens()
    for m in merges:
        tokens.append(m.replace(" ", ""))
    types = [1] * len(tokens) + [3] * len(SPECIALS)
    return tokens + SPECIALS, types, list(merges)


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator, std: float = 0.02) -> np.ndarray:
    """Random bytes for a [rows, cols] tensor of `qtype`, with float16 scales set
    so that the dequantized values have about the standard deviation `std`."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    assert cols % block == 0, (qtype.name, cols)
    nb = cols // block
    raw = rng.integers(0, 256, size=(rows, nb, nbytes), dtype=np.uint8)
    fields = [(off, rng.uniform(0.5, 1.5, size=(rows, nb))) for off in _F16_FIELDS[qtype]]

    def set_scales(k: float) -> np.ndarray:
        for off, d in fields:
            raw[:, :, off:off + 2] = (d * k).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
        return raw.reshape(rows, nb * nbytes)

    k = std / float(gguf.quants.dequantize(set_scales(1.0), qtype).std())
    return set_scales(k)


def encode_tensor(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Encode float32 `w` [rows, cols] as `qtype` (raw bytes for quantized types)."""
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    try:
        return gguf.quants.quantize(w.astype(np.float32), qtype)
    except NotImplementedError:
        return random_blocks(qtype, w.shape[0], w.shape[1], rng, float(w.std()))


def write_tiny_gguf(
    path: str | Path,
    qtype: Q | str = "F32",
    tied: bool = False,
    seed: int = 0,
    hidden: int = 256,
    intermediate: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    context: int = 512,
    rope_base: float = 1_000_000.0,
    eps: float = 1e-6,
    yarn_factor: float | None = None,
    yarn_betas: tuple[float, float] | None = None,
    arch: str = "qwen2",
    qtypes: dict[str, Q | str] | None = None,
    merges: list[str] | None = None,
) -> Path:
    """Write the tiny model; `qtypes` overrides the type per GGUF name suffix (e.g. {"ffn_down": "Q6_K"});
    `merges` replaces the BPE merges (a different vocabulary)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    qtype = Q[qtype] if isinstance(qtype, str) else qtype
    qtypes = {k: (Q[v] if isinstance(v, str) else v) for k, v in (qtypes or {}).items()}
    tokens, types, merges = tiny_vocab(MERGES if merges is None else merges)
    vocab = len(tokens)
    head_dim = hidden // heads

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-qwen2")
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(eps)
    if yarn_factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn_factor)
        w.add_rope_scaling_orig_ctx_len(context // int(yarn_factor))
        if yarn_betas:
            w.add_rope_scaling_yarn_beta_fast(yarn_betas[0])
            w.add_rope_scaling_yarn_beta_slow(yarn_betas[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def mat(name: str, rows: int, cols: int, std: float = 0.02) -> None:
        t = qtypes.get(name.split(".")[-2], qtype)
        w.add_tensor(name, encode_tensor(rng.normal(0, std, (rows, cols)).astype(np.float32), t, rng), raw_dtype=t)

    def vec(name: str, n: int, mean: float = 0.0, std: float = 0.02) -> None:
        w.add_tensor(name, (mean + rng.normal(0, std, n)).astype(np.float32))

    mat("token_embd.weight", vocab, hidden, std=1.0)
    for i in range(layers):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", hidden, 1.0, 0.1)
        mat(p + "attn_q.weight", heads * head_dim, hidden)
        mat(p + "attn_k.weight", kv_heads * head_dim, hidden)
        mat(p + "attn_v.weight", kv_heads * head_dim, hidden)
        vec(p + "attn_q.bias", heads * head_dim, std=0.5)
        vec(p + "attn_k.bias", kv_heads * head_dim, std=0.5)
        vec(p + "attn_v.bias", kv_heads * head_dim, std=0.1)
        mat(p + "attn_output.weight", hidden, heads * head_dim)
        vec(p + "ffn_norm.weight", hidden, 1.0, 0.1)
        mat(p + "ffn_gate.weight", intermediate, hidden)
        mat(p + "ffn_up.weight", intermediate, hidden)
        mat(p + "ffn_down.weight", hidden, intermediate)
    vec("output_norm.weight", hidden, 1.0, 0.1)
    if not tied:
        mat("output.weight", vocab, hidden)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
