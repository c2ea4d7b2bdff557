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
import re
import struct
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
PROVIDES = "// @provides "
_WORD = re.compile(r"[A-Za-z_]\w*")


def minify(text: str) -> str:
    """`text` without // comments, trailing blanks and empty lines: what MLX copies and hashes on every
    kernel call (CustomKernel::eval_gpu hashes the whole source) carries no prose. The kernel
    sources contain no string literals, so every // starts a comment."""
    lines = [line.split("//", 1)[0].rstrip() for line in text.splitlines()]
    return "".join(line + "\n" for line in lines if line.strip())


def prune(text: str, used: str) -> str:
    """The parts of a helper file (`common.h`, `msl_compat.h`) that `used` needs. Each part starts at a
    `// @provides NAME ...` line and runs to the next one; it is kept when a NAME it provides appears
    as a word in `used` or in another kept part (text before the first marker is always kept)."""
    head, *parts = text.split(PROVIDES)
    items = []
    for part in parts:
        names, _, code = part.partition("\n")
        items.append((set(names.split()), code))
    words, keep = set(_WORD.findall(used)), [False] * len(items)
    changed = True
    while changed:
        changed = False
        for i, (names, code) in enumerate(items):
            if not keep[i] and names & words:
                keep[i], changed = True, True
                words |= set(_WORD.findall(code))
    return head + "".join(code for k, (_, code) in zip(keep, items) if k)


def used_common(body: str) -> str:
    """common.h reduced to the helpers `body` calls (and what they call), comments removed."""
    return minify(prune(common_header(), body))


@lru_cache(maxsize=None)
def kernel_source(name: str, backend: str) -> tuple[str, str]:
    """(header, body) as handed to MLX: comments removed, helpers pruned to what the body uses."""
    return full_header(name, backend), minify(load_source(name)[1])


def full_header(name: str, backend: str) -> str:
    """The `header` text of kernel <name> on `backend`, comments removed: the parts of common.h the body
    uses, then the file's own header section; on CUDA the parts of msl_compat.h that the body and those
    helpers use come first, with the helpers pasted before its address-space macros."""
    header, body = (minify(t) for t in load_source(name))
    common = used_common(body)
    if backend == "metal":
        return common + header
    if backend == "cuda":
        compat = compat_header()
        if ADDRESS_SPACE_MARK not in compat:
            raise ValueError(f"msl_compat.h: no '{ADDRESS_SPACE_MARK}' line")
        before, after = compat.split(ADDRESS_SPACE_MARK, 1)
        used = body + common + header
        return minify(prune(before, used)) + common + minify(after) + header
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
    header, body = kernel_source(name, backend)
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    tag = hashlib.sha1((header + body).encode()).hexdigest()[:10]
    return make(name=f"qwen_{name}_{tag}", input_names=list(input_names), output_names=list(output_names),
                source=body, header=header, ensure_row_contiguous=True)


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def row_threads(d: int) -> int:
    """Threads per row for the row-reduction kernels: ~4 elements each, a multiple of 32, <= 1024."""
    return min(1024, round_up(max(1, -(-d // 4)), 32))


@lru_cache(maxsize=256)
def f32_bits(value: float) -> int:
    """value's float32 bit pattern as an int: how a constant float (eps, mscale, the attention scale)
    reaches a kernel, as a template argument that the body reads back with as_type<float>. Not as an
    array: MLX's CUDA allocator keeps arrays of up to 8 bytes in one pool of managed memory that the
    GPU reads across the bus, ~2.4 us a kernel on an H200 (docs/kernels.md). Negative values (never
    one of these) are refused: the bits would be a negative int, which MLX cannot put in a name."""
    bits = struct.unpack("<i", struct.pack("<f", float(value)))[0]
    if bits < 0:
        raise ValueError(f"a kernel constant must be a non-negative float32, not {value!r}")
    return bits


@lru_cache(maxsize=64)
def base_freqs(base: float, dims: int) -> mx.array:
    """mx.fast.rope's frequencies for `base`: base ** (2i / dims), i < dims/2 (the angle is pos / freqs[i])."""
    import numpy as np

    return mx.array(float(base) ** (np.arange(0, dims, 2, dtype=np.float64) / dims), dtype=mx.float32)


@lru_cache(maxsize=8)
def i32_scalar(value: int) -> mx.array:
    """An int32 array of shape (1,), made once per value: every layer of a step asks for the same
    offset (rope, qkv_post) and cache length (quant_sdpa)."""
    return mx.array([value], dtype=mx.int32)


def pos_array(offset) -> mx.array:
    """The rope offset as an int32 array of shape (1,) (an int or an array of 1 element)."""
    if isinstance(offset, mx.array):
        if offset.dtype != mx.int32:
            offset = offset.astype(mx.int32)
        return offset.reshape(1)
    return i32_scalar(int(offset))
