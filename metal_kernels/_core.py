"""Loading the .metal kernel files and building MLX kernel objects (once each).

A kernel file is a comment header (what it does, its grid and inputs; it
becomes the kernel's `header` text) and, after the line `// ---- body ----`,
the body of the kernel function. The device helpers the bodies share
(block sum, RoPE rotation, rounding) are in `common.h`, pasted in front of
every kernel's header. On Metal the body goes to `mx.fast.metal_kernel` as
is; on CUDA the same body goes to `mx.fast.cuda_kernel` with `msl_compat.h`
in front (common.h inside it, before its address-space macros).

Kernel names carry a hash of their source: MLX's CUDA backend caches compiled
kernels by name only (in memory and as PTX files under /tmp/mlx/<version>/ptx),
so a stale build must never be picked up after an edit.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import mlx.core as mx

DIR = Path(__file__).resolve().parent
BODY_MARK = "// ---- body ----"
KERNEL_NAMES = ("rms_norm", "add_rms_norm", "rope", "qkv_post", "swiglu")
TG = 256  # threads per threadgroup of the one-thread-per-element kernels


def metal_file(name: str) -> Path:
    return DIR / f"{name}.metal"


@lru_cache(maxsize=None)
def load_source(name: str) -> tuple[str, str]:
    """(header, body) of metal_kernels/<name>.metal."""
    text = metal_file(name).read_text()
    if BODY_MARK not in text:
        raise ValueError(f"{metal_file(name)}: no '{BODY_MARK}' line")
    header, body = text.split(BODY_MARK, 1)
    return header, body.lstrip("\n")


@lru_cache(maxsize=None)
def common_header() -> str:
    """metal_kernels/common.h: the device helpers every body may call (block sum, RoPE pair, rounding)."""
    return (DIR / "common.h").read_text()


@lru_cache(maxsize=None)
def compat_header() -> str:
    return (DIR / "msl_compat.h").read_text()


ADDRESS_SPACE_MARK = "// ---- address spaces ----"


def full_header(name: str, backend: str) -> str:
    """The `header` text of kernel <name> on `backend`: common.h, then the file's own comment header;
    on CUDA msl_compat.h comes first, with common.h pasted before its address-space macros."""
    header = load_source(name)[0]
    if backend == "metal":
        return common_header() + "\n" + header
    if backend == "cuda":
        compat = compat_header()
        if ADDRESS_SPACE_MARK not in compat:
            raise ValueError(f"msl_compat.h: no '{ADDRESS_SPACE_MARK}' line")
        before, after = compat.split(ADDRESS_SPACE_MARK, 1)
        return before + common_header() + "\n" + ADDRESS_SPACE_MARK + after + "\n" + header
    raise ValueError(f"no kernel back end {backend!r} (want 'metal' or 'cuda')")


def gpu_backend() -> str | None:
    """'metal' or 'cuda' when MLX has that GPU back end, else None."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


@lru_cache(maxsize=None)
def get_kernel(name: str, input_names: tuple, output_names: tuple, backend: str):
    """The MLX kernel object for <name>.metal on `backend` ('metal' or 'cuda'), built once."""
    body = load_source(name)[1]
    header = full_header(name, backend)
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    tag = hashlib.sha1((header + body).encode()).hexdigest()[:10]
    return make(name=f"qwen_{name}_{tag}", input_names=list(input_names), output_names=list(output_names),
                source=body, header=header, ensure_row_contiguous=True)


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def row_threads(d: int) -> int:
    """Threads per row for the row-reduction kernels: ~4 elements each, a multiple of 32, <= 1024."""
    return min(1024, round_up(max(1, -(-d // 4)), 32))


# Small constant inputs (eps, mscale, rope frequencies) are made once and reused.
@lru_cache(maxsize=256)
def f32_scalar(value: float) -> mx.array:
    return mx.array([value], dtype=mx.float32)


@lru_cache(maxsize=64)
def base_freqs(base: float, dims: int) -> mx.array:
    """mx.fast.rope's frequencies for `base`: base ** (2i / dims), i < dims/2 (the angle is pos / freqs[i])."""
    import numpy as np

    return mx.array(float(base) ** (np.arange(0, dims, 2, dtype=np.float64) / dims), dtype=mx.float32)


_last_pos: list = [None, None]  # one-entry cache: every layer of a step asks for the same offset


def pos_array(offset) -> mx.array:
    """The rope offset as an int32 array of shape (1,) (an int or an array of 1 element)."""
    if isinstance(offset, mx.array):
        if offset.dtype != mx.int32:
            offset = offset.astype(mx.int32)
        return offset.reshape(1)
    offset = int(offset)
    if _last_pos[0] != offset:
        _last_pos[0], _last_pos[1] = offset, mx.array([offset], dtype=mx.int32)
    return _last_pos[1]
