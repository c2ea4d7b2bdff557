#!/usr/bin/env python
"""Convert a Qwen2 GGUF file (or Hugging Face checkpoint) into an MLX model directory.

Thin wrapper around `python -m qwen_mlx.convert`; see its --help.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_mlx.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
