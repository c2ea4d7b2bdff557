"""`load(path)`: a GGUF file or a converted MLX model directory -> (model, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .model import Model, ModelArgs, is_quantized, smooth_keys  # noqa: F401  (is_quantized: loader's API)
from .quant import affine_format, dequantize_weights, promote

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> mx.Dtype:
    """float32 on a CPU (MLX's fast CPU dtype), bfloat16 on a GPU (Qwen2.5's training dtype)."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def resolve_dtype(dtype: Union[None, str, mx.Dtype]) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        return DTYPES[dtype]
    return dtype


def load(path: Union[str, Path, None] = None, dtype: Union[None, str, mx.Dtype] = None,
         quantized: Optional[bool] = None, shard=None, kernel_table: bool = True):
    """Load a Qwen2 model and its tokenizer.

    path: a `.gguf` file, or a directory written by `python -m qwen_mlx.convert`
    (mlx-lm's layout). None means the default model (fetched on first use).
    dtype: "float32" | "float16" | "bfloat16"; None picks `default_dtype()`.
    quantized: keep quantized weights quantized (MLX affine quantization; GGUF types
    are repacked exactly where the formats allow, see docs/quantization.md) or
    dequantize them to `dtype`. None: quantized on a GPU, dequantized on a CPU (MLX's
    CPU quantized matmul is ~10x slower than its float32 path).
    shard: tensor parallelism (docs/distributed.md). None: split the model over the ranks of
    `mlx.launch`'s group when there is more than one, each rank reading only its own slices;
    False: load the whole model; True or an `mx.distributed.Group`: split over that group.
    kernel_table: set the kernels (`metal_kernels.USE`, process-wide) for this model on this machine:
    the table `python -m qwen_mlx.tune` wrote, else the back end's shipped defaults
    (`qwen_mlx.kernel_table`). False leaves them as they are (a draft model loaded beside its
    target keeps the target's table: `speculative.load_draft`).
    Returns (model, tokenizer); the tokenizer is mlx-lm's TokenizerWrapper
    around a transformers tokenizer (encode / decode / apply_chat_template), built
    the same way for both sources (`qwen_mlx.tokenizer.load_tokenizer`).
    """
    from . import distributed as dist

    group = dist.resolve_group(shard)
    rank, n = (group.rank(), group.size()) if group else (0, 1)
    part = (lambda name, shape: dist.weight_part(name, shape, rank, n)) if group else None
    if path is None:
        from .fetch import default_model_path

        path = default_model_path()
    path = Path(path)
    dtype = resolve_dtype(dtype)
    quantized = mx.default_device() != mx.cpu if quantized is None else quantized
    if path.is_dir():
        config, weights, tokenizer = _read_directory(path)
        if group:
            dist.check_shardable(config, n)
            weights = dist.slice_checkpoint(weights, config.get("quantization") or {}, rank, n)
        if not quantized:
            weights = dequantize_weights(weights, config.get("quantization") or {})
    else:
        from .gguf import gguf_config, gguf_quantized_weights, gguf_weights, open_gguf
        from .tokenizer import load_tokenizer

        reader = open_gguf(path)
        config = gguf_config(reader)
        tokenizer = load_tokenizer(reader)
        if group:
            dist.check_shardable(config, n)
        if quantized:
            weights, _ = gguf_quantized_weights(reader, dtype, shard=part)
        else:
            weights = gguf_weights(reader, dtype, shard=part)
    model = build_model(config, weights, dtype, group)
    if group:
        dist.sync_seed(group)
    if kernel_table:
        from .kernel_table import apply as apply_kernel_table

        apply_kernel_table(model)  # this machine's tuned kernel table for the model, or the shipped defaults
    return model, tokenizer


def build_model(config: dict, weights: dict, dtype: mx.Dtype, group=None) -> Model:
    """Instantiate `Model` from an HF-style config and checkpoint-named weights (quantized ones
    as mlx-lm stores them: `X.weight` uint32, `X.scales`, `X.biases`). With a `group`, the
    weights are one rank's slices (`distributed.weight_part`) and the model is sharded to match."""
    from .distributed import COLUMN_SHARDED

    model = Model(ModelArgs.from_dict(config))
    weights = model.sanitize(dict(weights))
    n = group.size() if group else 1

    formats = {}  # quantized module path -> (bits, group size), which follow from the shapes
    promotions = model.args.promotions()
    for path, module in model.named_modules():
        if (scales := weights.get(f"{path}.scales")) is not None:
            d = module.weight.shape[-1] // (n if path.endswith(COLUMN_SHARDED) else 1)  # this rank's inputs
            bits, gs = affine_format(weights[f"{path}.weight"], scales, d)
            if (to := promotions.get(bits, bits)) != bits:
                keys = [f"{path}.{k}" for k in ("weight", "scales", "biases")]
                for k, v in zip(keys, promote(*(weights[k] for k in keys), bits, gs, to, gs)):
                    weights[k] = v
            formats[path] = (to, gs)
    nn.quantize(model, class_predicate=lambda path, _: path in formats and
                {"bits": formats[path][0], "group_size": formats[path][1]})
    if group:  # before any parameter is evaluated: the full-size initial weights are never built
        model.shard(group)
    weights = {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    if model.args.smooth_keys and not group and dtype in (mx.float32, mx.bfloat16):  # exact there (float16:
        smooth_keys(model, weights)  # scaled-down scales could turn subnormal; sharded: slices differ per rank)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


class CheckpointError(ValueError):
    """A model directory that cannot be read; the message is one line naming the path."""


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """config.json and the *.safetensors weights of a Qwen2 directory (Hugging Face or mlx-lm)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a GGUF file or a model directory (no config.json)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: cannot read ({e})") from None
    if config.get("model_type") != "qwen2":
        raise CheckpointError(f"{path}: model_type is {config.get('model_type')!r}, only 'qwen2' is supported")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return config, weights


def _read_directory(path: Path):
    from .tokenizer import load_tokenizer

    config, weights = read_checkpoint(path)
    return config, weights, load_tokenizer(path)
