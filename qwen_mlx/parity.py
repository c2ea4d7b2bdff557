"""Stage-by-stage parity: where do two implementations of the same forward pass part ways?

    python -m qwen_mlx.parity --model PATH --prompt TEXT [--against reference|transformers]
                              [--dtype D] [--tolerance T] [--stages GLOB]

runs the prompt's tokens through two "runners" and prints, in forward order, the relative
error ||a - b|| / ||b|| and the max abs error of every stage (the names of
`qwen_mlx.research`), marking the FIRST stage whose relative error exceeds the tolerance;
the exit code is 1 when one does (and for runtime errors), 2 for bad flags. The runners:
- `mlx_runner(model)`: our model with the current `metal_kernels` backend (the kernels where
  they are used), against `mlx_runner(model, "reference")` (plain MLX for every op);
- `transformers_runner(hf_model)`: Hugging Face's Qwen2 on the same GGUF (float32), stages
  taken with hooks: input_layernorm -> attn_norm, q_proj/k_proj/v_proj outputs -> q/k/v
  (heads split; HF's own cos/sin and `apply_rotary_pos_emb` applied to q and k, so they
  compare with ours after RoPE), o_proj's input -> attn_out, o_proj -> o_proj,
  post_attention_layernorm -> mlp_norm, mlp -> mlp_out, decoder layer -> residual,
  model.norm -> final_norm, and the logits.
A runner is any callable tokens -> {stage name: numpy array}, so tests can plant a bug in one.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import _blas  # noqa: F401  (before mlx.core)
from .cli import USAGE_ERROR, ArgumentParser, runtime_error
import mlx.core as mx
import numpy as np

import metal_kernels as K

from .research import capture

Runner = Callable[[list], dict]

# Default tolerance on the relative error per stage, by the dtype of our model. Two correct
# implementations differ by rounding (unit roundoff u per op: 6e-8 float32, 4.9e-4 float16,
# 3.9e-3 bfloat16), summed over ~1e3-term dot products and carried through the layers.
# Measured on the real 0.5B model against transformers in float32: at most 8e-6 at any stage,
# so 1e-4 leaves >10x margin, while a real bug (a wrong bias, norm, rope or mask) gives 1e-2
# to 1. Half precision is another matter: in layer 0 of Qwen2.5-0.5B, q and k reach 80 and
# 145 (large biases) and attention scores 1200; rounding q and k alone to bfloat16 moves the
# scores by up to 3, so layer 0's attention output differs from float32 by 15-20%
# (transformers' own bfloat16 run: 0.14 against its float32 run; later stages 1e-2 to 5e-2).
# Hence 0.3 for bfloat16 and, u being 8x smaller, 0.1 for float16: there the tool catches
# only gross errors; localize bugs in float32.
TOLERANCE = {"float32": 1e-4, "float16": 0.1, "bfloat16": 0.3}


def default_tolerance(dtype) -> float:
    return TOLERANCE[str(dtype).removeprefix("mlx.core.")]


def _numpy(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))[0]


def mlx_runner(model, backend: Optional[str] = None) -> Runner:
    """Our model's stages; `backend` ("reference", "auto", "kernels") is set for the call only."""

    def run(tokens) -> dict:
        prev = K.mode()
        if backend is not None:
            K.set_backend(backend)
        try:
            with capture(model) as acts:
                mx.eval(model(mx.array([list(tokens)])))
        finally:
            K.set_backend(prev)
        return {k: _numpy(v) for k, v in acts.items()}

    return run


def transformers_runner(hf_model) -> Runner:
    """Hugging Face Qwen2's stages under our names, from forward hooks (see the module doc)."""
    import torch
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    def run(tokens) -> dict:
        out, raw, hooks = {}, {}, []

        def save(store, name, take_input=False):
            def hook(module, args, output):
                t = args[0] if take_input else (output[0] if isinstance(output, tuple) else output)
                store[name] = t.detach().float()
            return hook

        base = hf_model.model
        hooks.append(base.embed_tokens.register_forward_hook(save(out, "embed")))
        hooks.append(base.norm.register_forward_hook(save(out, "final_norm")))
        for i, layer in enumerate(base.layers):
            p, attn = f"layers.{i}.", layer.self_attn
            hooks += [layer.input_layernorm.register_forward_hook(save(out, p + "attn_norm")),
                      attn.o_proj.register_forward_hook(save(out, p + "attn_out", take_input=True)),
                      attn.o_proj.register_forward_hook(save(out, p + "o_proj")),
                      layer.post_attention_layernorm.register_forward_hook(save(out, p + "mlp_norm")),
                      layer.mlp.register_forward_hook(save(out, p + "mlp_out")),
                      layer.register_forward_hook(save(out, p + "residual"))]
            hooks += [getattr(attn, f"{n}_proj").register_forward_hook(save(raw, p + n)) for n in "qkv"]
            hooks.append(attn.register_forward_pre_hook(
                lambda m, a, kw, p=p: raw.__setitem__(p + "rope", kw["position_embeddings"]), with_kwargs=True))
        try:
            with torch.no_grad():
                out["logits"] = hf_model(torch.tensor([list(tokens)])).logits.float()
        finally:
            for h in hooks:
                h.remove()
        d = hf_model.config.hidden_size // hf_model.config.num_attention_heads
        for i in range(len(base.layers)):
            p = f"layers.{i}."
            q, k, v = (raw[p + n].view(1, len(tokens), -1, d).transpose(1, 2) for n in "qkv")
            out[p + "q"], out[p + "k"] = apply_rotary_pos_emb(q, k, *raw[p + "rope"])
            out[p + "v"] = v
        return {k: v[0].numpy() for k, v in out.items()}

    return run


@dataclass
class StageDiff:
    name: str
    rel_err: float  # ||a - b|| / ||b|| over the whole stage output
    max_abs: float
    diverged: bool  # rel_err > tolerance (or not finite)


def compare(run_a: Runner, run_b: Runner, tokens, tolerance: float, stages: str = "*") -> list[StageDiff]:
    """Run both on `tokens`; one StageDiff per stage both produce, in run_a's (forward) order."""
    a, b = run_a(tokens), run_b(tokens)
    diffs = []
    for name in (n for n in a if n in b and fnmatch.fnmatchcase(n, stages)):
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        if x.shape != y.shape:
            raise ValueError(f"{name}: shapes differ, {x.shape} vs {y.shape}")
        rel = float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
        diffs.append(StageDiff(name, rel, float(np.abs(x - y).max()), not rel <= tolerance))
    return diffs


def first_divergence(diffs: list[StageDiff]) -> Optional[StageDiff]:
    return next((d for d in diffs if d.diverged), None)


def format_report(diffs: list[StageDiff], tolerance: float) -> str:
    first = first_divergence(diffs)
    lines = [f"{'stage':<24} {'rel err':>10} {'max abs':>10}"]
    for d in diffs:
        mark = "  <-- FIRST DIVERGENCE" if d is first else ("  !" if d.diverged else "")
        lines.append(f"{d.name:<24} {d.rel_err:>10.3e} {d.max_abs:>10.3e}{mark}")
    if first:
        lines.append(f"first divergence: {first.name} (relative error {first.rel_err:.3e} > tolerance {tolerance:.1e})")
    else:
        worst = max(diffs, key=lambda d: d.rel_err)
        lines.append(f"no divergence: every stage within tolerance {tolerance:.1e} "
                     f"(largest relative error {worst.rel_err:.3e} at {worst.name})")
    return "\n".join(lines)


def load_transformers(path) -> object:
    import torch
    import transformers

    path = Path(path)
    if path.suffix != ".gguf":
        raise ValueError(f"--against transformers needs a .gguf file, not {path}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return hf.eval()


def main(argv=None) -> int:
    from .generation import encode_prompt
    from .loader import load, resolve_dtype

    ap = ArgumentParser(prog="python -m qwen_mlx.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a .gguf file or converted model directory (default: the default model)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--against", choices=["reference", "transformers"], default="reference",
                    help="reference: kernel path vs plain-MLX path; transformers: vs HF Qwen2 (float32)")
    ap.add_argument("--dtype", choices=list(TOLERANCE), help="dtype of our model (default: the device's)")
    ap.add_argument("--tolerance", type=float, help="max relative error per stage (default: by dtype)")
    ap.add_argument("--stages", default="*", help="only the stages matching this glob")
    args = ap.parse_args(argv)
    if args.tolerance is not None and not args.tolerance > 0:
        ap.error(f"--tolerance must be > 0, not {args.tolerance}")
    try:
        dtype = resolve_dtype(args.dtype)
        tol = args.tolerance if args.tolerance is not None else default_tolerance(dtype)
        model, tokenizer = load(args.model, dtype)
        tokens = encode_prompt(tokenizer, args.prompt)
        if args.against == "reference":
            if K.backend() == "reference":
                print("note: the kernel backend here is 'reference': both paths run the same ops", file=sys.stderr)
            a, b = mlx_runner(model), mlx_runner(model, "reference")
        else:
            a, b = mlx_runner(model), transformers_runner(load_transformers(args.model or _default_path()))
        diffs = compare(a, b, tokens, tol, args.stages)
    except (OSError, ValueError) as e:
        return runtime_error(e)
    if not diffs:  # a bad flag, found once the model's stages are known
        print(f"{ap.prog}: error: --stages {args.stages!r} matches no stage (see --help)", file=sys.stderr)
        return USAGE_ERROR
    print(f"{len(tokens)} tokens, {str(dtype).removeprefix('mlx.core.')}, against {args.against}")
    print(format_report(diffs, tol))
    return 1 if first_divergence(diffs) else 0


def _default_path():
    from .fetch import default_model_path

    return default_model_path()


if __name__ == "__main__":
    sys.exit(main())
