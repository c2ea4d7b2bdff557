"""qwen-mlx: Qwen2.5 language models on MLX.

    from qwen_mlx import load, generate, stream_generate, batch_generate
    model, tokenizer = load("model.gguf")
    print(generate(model, tokenizer, "Write a haiku about caches.", max_tokens=64))
    texts = batch_generate(model, tokenizer, ["Name a prime.", "Name a colour."], max_tokens=16).texts
"""

from . import _blas  # noqa: F401  (must come before the first `import mlx.core`)

from .batch import BatchGenerator, BatchResponse, BatchResult, batch_generate, stream_batch_generate  # noqa: E402
from .generation import GenerationResponse, generate, stream_generate  # noqa: E402
from .infill import infill_prompt  # noqa: E402
from .loader import load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "batch_generate", "stream_batch_generate",
           "BatchGenerator", "BatchResponse", "BatchResult",
           "infill_prompt"]
