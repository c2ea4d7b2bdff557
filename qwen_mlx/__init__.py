"""qwen-mlx: Qwen2.5 language models on MLX.

    from qwen_mlx import load, generate, stream_generate
    model, tokenizer = load("model.gguf")
    print(generate(model, tokenizer, "Write a haiku about caches.", max_tokens=64))
"""

from . import _blas  # noqa: F401  (must come before the first `import mlx.core`)

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "GenerationResponse"]


def __getattr__(name):  # lazy, so that `import qwen_mlx.fetch` stays light
    if name == "load":
        from .loader import load

        return load
    if name in ("generate", "stream_generate", "GenerationResponse"):
        from . import generate as g

        return getattr(g, name)
    raise AttributeError(f"module 'qwen_mlx' has no attribute {name!r}")
