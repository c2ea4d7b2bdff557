#!/usr/bin/env python
"""Convert a Qwen2 GGUF file (or Hugging Face checkpoint) into an MLX model directory.

Thin wrapper around `python -m qwen_mlx.convert` (the installed package); see its --help.
"""

import sys

from qwen_mlx.convert import main

if __name__ == "__main__":
    sys.exit(main())
