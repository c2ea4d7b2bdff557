"""Run a .metal kernel body on the CPU, for tests on machines without a GPU.

The body is compiled by the host C++ compiler (g++ or clang++, C++20) inside a
function whose parameters are the inputs, outputs and Metal's thread-position
attributes, as MLX's Metal wrapper declares them. A threadgroup runs as one
std::thread per thread (threadgroup_barrier and simd_sum are real barriers) when
the body synchronizes; otherwise its threads run one after another. Threadgroups
run one at a time, so `threadgroup` variables are function statics. bfloat16
is a 16-bit struct that rounds to nearest even; float16 is _Float16.

common.h (the helpers the bodies share), pruned to what the body uses, is compiled in front of
every body, as on the GPU back ends. This checks a body's indexing, guards and arithmetic; it proves nothing about
the Metal or CUDA compilers (tests/test_kernels.py checks the Metal source, and
the GPU tests run the real thing).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ._core import load_source, minify, used_common

CXX = next((c for c in (os.environ.get("CXX"), "g++", "clang++") if c and shutil.which(c)), None)
_CACHE = Path(tempfile.gettempdir()) / "qwen_mlx_emu"

_PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>
typedef unsigned int uint;
struct uint3 { uint x, y, z; };
struct alignas(16) uint4 { uint x, y, z, w; };
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) bits = uint16_t((u >> 16) | 0x40u);
    else bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
typedef _Float16 float16_t;
namespace metal {
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float exp(float x) { return std::exp(x); }
inline float cos(float x) { return std::cos(x); }
inline float sin(float x) { return std::sin(x); }
namespace precise {
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float exp(float x) { return std::exp(x); }
inline float cos(float x) { return std::cos(x); }
inline float sin(float x) { return std::sin(x); }
}
}
namespace mem_flags { enum : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2 }; }
struct Group { std::barrier<>* all; std::vector<std::barrier<>*> simd; float slots[1024]; };
thread_local Group* g_group = nullptr;
thread_local uint g_tid = 0;
inline void threadgroup_barrier(int) { g_group->all->arrive_and_wait(); }
template <class F> inline float simd_reduce(float v, F f) {  // every lane gets f folded over lanes 0..31
  uint sg = g_tid / 32;
  g_group->slots[g_tid] = v;
  g_group->simd[sg]->arrive_and_wait();
  float s = g_group->slots[sg * 32];
  for (uint i = 1; i < 32; i++) s = f(s, g_group->slots[sg * 32 + i]);
  g_group->simd[sg]->arrive_and_wait();
  return s;
}
inline float simd_sum(float v) { return simd_reduce(v, [](float a, float b) { return a + b; }); }
inline float simd_max(float v) { return simd_reduce(v, [](float a, float b) { return b > a ? b : a; }); }
inline float simd_shuffle_xor(float v, unsigned short mask) {  // lane i gets lane (i ^ mask)'s v
  uint sg = g_tid / 32;
  g_group->slots[g_tid] = v;
  g_group->simd[sg]->arrive_and_wait();
  float r = g_group->slots[sg * 32 + ((g_tid % 32) ^ mask)];
  g_group->simd[sg]->arrive_and_wait();
  return r;
}
template <typename T, typename U> inline T as_type(U x) { static_assert(sizeof(T) == sizeof(U)); T y; std::memcpy(&y, &x, sizeof(T)); return y; }
#define METAL_FUNC inline
#define THREADGROUP_PTR
#define UNROLL
"""

_ADDRESS_SPACES = r"""
#define threadgroup static
#define device
#define constant
"""

_MAIN = r"""
int main(int argc, char** argv) {
  // argv: dir gx tgx; files dir/<name>.bin in, dir/<name>.out out
  std::string dir = argv[1];
  uint gx = std::atoi(argv[2]), tgx = std::atoi(argv[3]);
  auto rd = [&](const char* name, size_t bytes) {
    std::vector<char> b(bytes); FILE* f = std::fopen((dir + "/" + name + ".bin").c_str(), "rb");
    if (std::fread(b.data(), 1, bytes, f) != bytes) { std::puts("short read"); std::exit(2); } std::fclose(f); return b; };
  auto wr = [&](const char* name, const std::vector<char>& b) {
    FILE* f = std::fopen((dir + "/" + name + ".out").c_str(), "wb"); std::fwrite(b.data(), 1, b.size(), f); std::fclose(f); };
  @LOAD@
  uint groups = (gx + tgx - 1) / tgx;
  for (uint gi = 0; gi < groups; gi++) {
    auto one = [&](uint t) {
      uint3 thread_position_in_grid{gi * tgx + t, 0, 0}, threadgroup_position_in_grid{gi, 0, 0};
      uint3 threads_per_threadgroup{tgx, 1, 1};
      uint thread_index_in_threadgroup = t, thread_index_in_simdgroup = t % 32, simdgroup_index_in_threadgroup = t / 32;
      g_tid = t;
      kernel_body(@ARGS@);
    };
    if (@THREADED@) {
      Group grp; std::barrier<> all(tgx); grp.all = &all;
      std::vector<std::barrier<>*> sb; for (uint s = 0; s < tgx / 32; s++) sb.push_back(new std::barrier<>(32));
      grp.simd = sb;
      std::vector<std::thread> ths;
      for (uint t = 0; t < tgx; t++) ths.emplace_back([&, t] { g_group = &grp; one(t); });
      for (auto& th : ths) th.join();
      for (auto* b : sb) delete b;
    } else {
      for (uint t = 0; t < tgx; t++) one(t);
    }
  }
  @STORE@
  return 0;
}
"""

_ATTRS = ("thread_position_in_grid, threadgroup_position_in_grid, threads_per_threadgroup, "
          "thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup")


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether CXX builds C++20 with <barrier> (what the emulator needs)."""
    if CXX is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
        r = subprocess.run([CXX, "-std=c++20", "-pthread", "-o", str(Path(d) / "probe"), str(src)],
                           capture_output=True)
        return r.returncode == 0


def run(name: str, inputs: list, outputs: list, template: list, grid: int, threadgroup: int) -> list:
    """inputs: [(name, array)]; arrays are np.float32/float16/int32/uint32, or ("bf16", uint16 array) for bfloat16.
    outputs: [(name, shape, 'float32'|'float16'|'bfloat16')]; returns the output arrays (bf16 as uint16),
    each poisoned with NaN before the run. template: [(name, 'float32'|... or int)]."""
    if not available():
        raise RuntimeError("metal_kernels.cpu_emulator needs a C++20 compiler with <barrier> (g++ >= 11, clang++)")
    body = minify(load_source(name)[1])  # as the GPU back ends get it
    ct = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "int32": "int32_t", "uint32": "uint32_t"}
    np_of = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int32": np.int32,
             "uint32": np.uint32}
    ins = []
    for n, a in inputs:
        kind = a[0] if isinstance(a, tuple) else {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                                                   np.dtype(np.int32): "int32", np.dtype(np.uint32): "uint32"}[a.dtype]
        arr = np.ascontiguousarray(a[1] if isinstance(a, tuple) else a)
        ins.append((n, kind, arr))
    params = []
    for n, kind, arr in ins:
        params.append(f"const {ct[kind]}* {n}")
        if n + "_shape" in body:
            params.append(f"const int* {n}_shape")
        if n + "_ndim" in body:
            params.append(f"const int {n}_ndim")
    params += [f"{ct[k]}* {n}" for n, _, k in outputs]
    params += ["uint3 thread_position_in_grid", "uint3 threadgroup_position_in_grid", "uint3 threads_per_threadgroup",
               "uint thread_index_in_threadgroup", "uint thread_index_in_simdgroup",
               "uint simdgroup_index_in_threadgroup"]
    consts = "".join(f"using {n} = {ct[v]};\n" if isinstance(v, str) else f"constexpr int {n} = {v};\n"
                     for n, v in template)
    load, args = [], []
    for n, kind, arr in ins:
        load.append(f'auto buf_{n} = rd("{n}", {arr.nbytes});')
        args.append(f"(const {ct[kind]}*)buf_{n}.data()")
        if n + "_shape" in body:
            load.append(f"int shp_{n}[] = {{{', '.join(str(s) for s in arr.shape)}}};")
            args.append(f"shp_{n}")
        if n + "_ndim" in body:
            args.append(str(arr.ndim))
    store = []
    for n, shape, k in outputs:
        nbytes = int(np.prod(shape)) * np.dtype(np_of[k]).itemsize
        load.append(f"std::vector<char> buf_{n}({nbytes}, (char)0xff);")  # 0xffff.. is a NaN in every float type
        args.append(f"({ct[k]}*)buf_{n}.data()")
        store.append(f'wr("{n}", buf_{n});')
    args.append(_ATTRS)
    # threads of a group must run together when the body synchronizes (directly or through common.h's
    # threadgroup_sum, whose callers all declare threadgroup memory)
    threaded = "true" if re.search(r"barrier|simd_|\bthreadgroup\b", body) else "false"
    src = (_PRELUDE + used_common(body) + _ADDRESS_SPACES + f"void kernel_body({', '.join(params)}) {{\n{consts}\n{body}\n}}\n"
           + _MAIN.replace("@LOAD@", "\n  ".join(load)).replace("@ARGS@", ", ".join(args))
           .replace("@STORE@", "\n  ".join(store)).replace("@THREADED@", threaded))
    _CACHE.mkdir(exist_ok=True)
    exe = _CACHE / f"{name}_{hashlib.sha1(src.encode()).hexdigest()[:16]}"
    if not exe.exists():
        cpp = exe.with_suffix(".cpp")
        cpp.write_text(src)
        tmp = exe.with_suffix(f".tmp{os.getpid()}")
        r = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", "-o", str(tmp), str(cpp)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{name}.metal does not compile as C++ ({cpp}):\n{r.stderr[-4000:]}")
        tmp.rename(exe)
    with tempfile.TemporaryDirectory() as d:
        for n, _, arr in ins:
            arr.tofile(f"{d}/{n}.bin")
        subprocess.run([str(exe), d, str(grid), str(threadgroup)], check=True, capture_output=True, text=True)
        return [np.fromfile(f"{d}/{n}.out", dtype=np_of[k]).reshape(shape) for n, shape, k in outputs]
