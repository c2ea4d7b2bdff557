"""Convert a Qwen2 GGUF file or Hugging Face checkpoint into an MLX model directory.

    python -m qwen_mlx.convert INPUT OUTPUT_DIR [--dtype float16|bfloat16|float32]
                               [--q-bits B --q-group-size G] [--dequantize] [--force]

INPUT is a GGUF file or a Hugging Face Qwen2 directory (config.json + *.safetensors +
tokenizer files). OUTPUT_DIR gets mlx-lm's layout: config.json (with a "quantization" section
when weights are quantized), model.safetensors (model-0000i-of-0000n.safetensors past 5 GB)
with model.safetensors.index.json, tokenizer.json, tokenizer_config.json (with the chat
template) and generation_config.json; `qwen_mlx.load` and `mlx_lm.load` both open it.

A GGUF's quantized matrices stay quantized (see `qwen_mlx.gguf.gguf_quantized_weights` and
docs/quantization.md): Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q3_K/IQ4_NL/IQ4_XS/TQ* are repacked
into MLX's affine format exactly, Q6_K/Q2_K/other IQ types re-quantized, floats kept. --q-bits
re-quantizes the non-exact types and float matrices at B bits, group G. --dequantize writes
plain `--dtype` weights (then --q-bits quantizes every matrix afresh). A Hugging Face input is
cast to --dtype and, with --q-bits, quantized like `mlx_lm.convert -q`.

The directory is written beside OUTPUT_DIR under a temporary name and renamed at the end;
an existing OUTPUT_DIR is only replaced with --force; on any error nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import transformers

from .cli import ArgumentParser, runtime_error
from .gguf import GGUFError, expected_shapes, field, gguf_config, gguf_quantized_weights, gguf_weights, open_gguf
from .loader import DTYPES, CheckpointError, read_checkpoint
from .quant import dequantize_weights
from .tokenizer import TokenizerLoadError, load_tokenizer

SHARD_BYTES = 5 << 30


class ConvertError(ValueError):
    """Bad input or output; the message is one line naming the path and the problem."""


def convert(input: Union[str, Path], output: Union[str, Path], dtype: str = "float16",
            q_bits: Optional[int] = None, q_group_size: int = 64, dequantize: bool = False,
            force: bool = False, progress: bool = True, shard_bytes: int = SHARD_BYTES) -> Path:
    """Convert INPUT (GGUF file or Hugging Face directory) into the MLX model directory OUTPUT."""
    src, out = Path(input), Path(output)
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (use --force to replace it)")
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise ConvertError(f"{out}: is the input")
    requant = (q_bits, q_group_size) if q_bits else None
    if src.is_dir():
        config, weights, quantization, tokenizer, generation = _read_hf(src, DTYPES[dtype], requant, progress)
    else:
        config, weights, quantization, tokenizer, generation = _read_gguf(src, DTYPES[dtype], requant, dequantize,
                                                                          progress)
    config.pop("quantization_config", None)
    # The transformers that writes the tokenizer files: without it, transformers (5.7 at least)
    # warns on load that a large-vocabulary local tokenizer may carry Mistral's broken split regex.
    config["transformers_version"] = transformers.__version__
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization

    missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would stick to OUTPUT_DIR
        _write_weights(tmp, weights, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _write_tokenizer(tmp, tokenizer)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise
    return out


# ---- inputs ---------------------------------------------------------------------------------

def _read_gguf(src: Path, dtype, requant, dequantize: bool, progress: bool):
    reader = open_gguf(src)
    config = gguf_config(reader)
    tokenizer = load_tokenizer(reader)._tokenizer
    if dequantize:
        weights = gguf_weights(reader, mx.float32 if requant else dtype, progress=progress)
        quantization = _quantize(weights, *requant, dtype, progress) if requant else None
    else:
        weights, quantization = gguf_quantized_weights(reader, dtype, requant=requant, progress=progress)
    ids = {k: v for k in ("bos", "eos", "padding")
           if (v := field(reader, f"tokenizer.ggml.{k}_token_id", None)) is not None}
    eos = [ids["eos"]] if "eos" in ids else []
    eos += [i for i in [tokenizer.convert_tokens_to_ids("<|endoftext|>")] if isinstance(i, int) and i not in eos]
    generation = {k: v for k, v in (("bos_token_id", ids.get("bos")), ("pad_token_id", ids.get("padding")),
                                    ("eos_token_id", eos or None)) if v is not None}
    config.update({k: v for k, v in generation.items() if k != "pad_token_id"})
    return config, weights, quantization, tokenizer, generation


def _read_hf(src: Path, dtype, requant, progress: bool):
    try:
        config, weights = read_checkpoint(src)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    if q := config.pop("quantization", None):  # an MLX directory: start from its values
        weights = dequantize_weights(weights, q)
    if rp := config.pop("rope_parameters", None):  # transformers 5's spelling; mlx-lm reads the old one
        config.setdefault("rope_theta", rp.get("rope_theta", 1_000_000.0))
        if rp.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {**{k: v for k, v in rp.items() if k != "rope_theta"}, "type": rp["rope_type"]}
    config.setdefault("tie_word_embeddings", False)
    if config["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    _check_hf(src, config, weights)
    weights = {k: v.astype(mx.float32 if requant else dtype) for k, v in weights.items()}
    quantization = _quantize(weights, *requant, dtype, progress) if requant else None
    try:
        tokenizer = load_tokenizer(src)._tokenizer
    except TokenizerLoadError as e:
        raise ConvertError(str(e)) from None
    gen_file = src / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {
        k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    return config, weights, quantization, tokenizer, generation


def _check_hf(src: Path, config: dict, weights: dict) -> None:
    try:
        config["vocab_size"] = int(weights["model.embed_tokens.weight"].shape[0])
        want = expected_shapes(config)
    except KeyError as e:
        raise ConvertError(f"{src}: missing {e.args[0]} (in config.json or the weights)") from None
    for name, w in weights.items():
        if name not in want:
            raise ConvertError(f"{src}: unexpected tensor {name}")
        if tuple(w.shape) != want[name]:
            raise ConvertError(f"{src}: tensor {name} has shape {list(w.shape)}, config.json implies {list(want[name])}")
    if missing := [n for n in want if n not in weights]:
        raise ConvertError(f"{src}: missing {len(missing)} tensor(s), e.g. {missing[0]}")


def _quantize(weights: dict, bits: int, group: int, dtype, progress: bool) -> Optional[dict]:
    """Quantize every matrix of float32 `weights` in place with mx.quantize (as mlx_lm.convert -q
    does), cast everything else to `dtype`; returns the quantization config."""
    from tqdm import tqdm

    quantized = False
    for name in tqdm(list(weights), desc="quantize", unit="tensor", disable=not progress, leave=False):
        w = weights[name]
        if w.ndim == 2 and w.shape[-1] % group == 0:
            base = name[: -len(".weight")]
            weights[name], s, b = mx.quantize(w, group_size=group, bits=bits)
            weights[f"{base}.scales"], weights[f"{base}.biases"] = s.astype(dtype), b.astype(dtype)
            quantized = True
        else:
            weights[name] = w.astype(dtype)
        mx.eval(weights[name])
    return {"group_size": group, "bits": bits, "mode": "affine"} if quantized else None


# ---- output -----------------------------------------------------------------------------------

def _write_weights(path: Path, weights: dict, shard_bytes: int) -> None:
    shards, size = [{}], 0
    for name in sorted(weights):
        if shards[-1] and size + weights[name].nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += weights[name].nbytes
    n = len(shards)
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        mx.save_safetensors(str(path / fname), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: fname for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(path: Path, tokenizer) -> None:
    """tokenizer.json + tokenizer_config.json, the chat template inside the latter (transformers 5
    writes it to chat_template.jinja, which older readers do not know)."""
    tokenizer.save_pretrained(str(path))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
        (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, swapping out an existing `out` (only reached with --force)."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / "x")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "x", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---- command line --------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    ap = ArgumentParser(prog="python -m qwen_mlx.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="a Qwen2 GGUF file or a Hugging Face Qwen2 directory")
    ap.add_argument("output", help="the MLX model directory to write")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16",
                    help="float weights, scales and biases (default: float16)")
    ap.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8],
                    help="quantize (HF input, --dequantize) or re-quantize (GGUF types not repacked exactly, "
                         "float matrices) at this many bits")
    ap.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64, help="group size (default: 64)")
    ap.add_argument("--dequantize", action="store_true", help="write float weights instead of the GGUF's quantization")
    ap.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert(args.input, args.output, args.dtype, args.q_bits, args.q_group_size, args.dequantize,
                      args.force, progress=not args.quiet)
    except (ConvertError, GGUFError, OSError, ValueError) as e:
        return runtime_error(e)
    if not args.quiet:
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        print(f"wrote {out} ({size:.0f} MiB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
