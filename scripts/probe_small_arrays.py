"""GPU time of a tiny custom kernel by where its one scalar input lives (NVIDIA; CUPTI through
torch.profiler, which records MLX's kernels too).

    python scripts/probe_small_arrays.py [--calls 100] [--rounds 3]

The kernel is y = x * s + 1 over 3,584 float32 (a norm's row at 7B), called `--calls` times in a
dependent chain; per variant the median kernel duration. MLX's CUDA allocator keeps arrays of up to
8 bytes in one pool of managed host memory, so a kernel reading such an array reads it across the
bus (docs/kernels.md, "Small arrays"): the reason metal_kernels passes constants as template
arguments and the compiled decode step keeps its position in a 16-byte device array. Rerun it on a
new MLX release to see whether that still holds.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import struct
import sys
import tempfile

import mlx.core as mx

from profile_decode import trace_kernels  # scripts/ is first on sys.path

N = 3584
READ = "unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;\nif (i < N) y[i] = x[i] * s[0] + 1.0f;\n"
TEMPLATE = "unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;\nif (i < N) y[i] = x[i] * __int_as_float(SB) + 1.0f;\n"


def variants() -> dict:
    """name -> f(x): one call of the kernel (or of a built-in op) on x."""
    kernels = {}

    def call(name, x, s=None):
        if name not in kernels:
            kernels[name] = mx.fast.cuda_kernel(name, ["x"] if s is None else ["x", "s"], ["y"],
                                                TEMPLATE if s is None else READ)
        tmpl = [("N", N)] + ([("SB", struct.unpack("<i", struct.pack("<f", 0.5))[0])] if s is None else [])
        return kernels[name](inputs=[x] if s is None else [x, s], output_shapes=[(N,)], output_dtypes=[mx.float32],
                             grid=(N, 1, 1), threadgroup=(256, 1, 1), template=tmpl)[0]

    host4, host16 = mx.array([0.5]), mx.array([0.5, 0.0, 0.0, 0.0])
    dev4, dev16 = mx.full((1,), 0.5) + 0, mx.full((4,), 0.5) + 0  # made by GPU ops
    mx.eval(host4, host16, dev4, dev16)
    return {
        "template argument": lambda x: call("k_template", x),
        "16-byte array, GPU-made": lambda x: call("k_dev16", x, dev16),
        "16-byte array, host-made once": lambda x: call("k_host16", x, host16),
        "4-byte array, GPU-made": lambda x: call("k_dev4", x, dev4),
        "4-byte array, host-made once": lambda x: call("k_host4", x, host4),
        "4-byte array, new each call": lambda x: call("k_fresh4", x, mx.array([0.5])),
        "built-in x * 0.5": lambda x: x * 0.5,
        "built-in x * view of 16-byte array": lambda x: x * dev16[:1],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=100, help="calls per chain")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if a.calls < 1 or a.rounds < 1:
        p.error("--calls and --rounds must be at least 1")
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not (torch.cuda.is_available() and mx.default_device() == mx.gpu and mx.cuda.is_available()):
        print("probe_small_arrays: needs an NVIDIA GPU seen by both MLX and torch", file=sys.stderr)
        return 2
    torch.cuda.init()
    x0 = mx.random.normal((N,))
    mx.eval(x0)
    times = collections.defaultdict(list)
    for _ in range(a.rounds):
        for name, f in variants().items():
            chain(f, x0, a.calls)  # compiles and warms up
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                chain(f, x0, a.calls)
            fd, path = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            prof.export_chrome_trace(path)
            durations = [d for _, _, d in trace_kernels(path)]
            os.remove(path)
            times[name].append(statistics.median(durations))
    for name, t in times.items():
        print(f"{name:36s} {statistics.median(t):6.2f} us a call (rounds: {', '.join(f'{v:.2f}' for v in t)})")
    return 0


def chain(f, x, calls: int) -> None:
    """calls dependent calls of f from x, evaluated and waited for."""
    for _ in range(calls):
        x = f(x)
    mx.eval(x)
    mx.synchronize()


if __name__ == "__main__":
    sys.exit(main())
