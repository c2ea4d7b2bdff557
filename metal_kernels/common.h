// common.h: device helpers shared by the kernel bodies (one copy of each).
//
// Pasted in front of every kernel's own header section: on Metal after MLX's
// prelude, on NVIDIA GPUs inside msl_compat.h, in the CPU emulator after its
// prelude. Written in the subset all three accept: Metal names only; no
// address-space keyword in a parameter except through THREADGROUP_PTR (Metal:
// threadgroup; msl_compat.h and the emulator define it empty, as a pointer to
// shared memory is a plain pointer there); helpers marked METAL_FUNC (MLX's
// Metal prelude defines it; msl_compat.h makes them device functions).
// Thread-position attributes are kernel arguments on Metal, so the bodies
// pass them in.

#ifndef METAL_FUNC
#define METAL_FUNC inline
#endif
#ifndef THREADGROUP_PTR
#define THREADGROUP_PTR threadgroup
#endif
// UNROLL before a loop of constant trip count: unroll it fully (msl_compat.h and the CPU
// emulator define their own).
#ifndef UNROLL
#define UNROLL _Pragma("clang loop unroll(full)")
#endif

// @provides threadgroup_sum
// Sum of v over a threadgroup of TG threads (TG a multiple of 32, <= 1024), in
// float32: simd_sum within each SIMD-group, one partial per SIMD-group in
// `partial` (threadgroup memory of TG / 32 floats, declared by the kernel),
// then every SIMD-group adds the TG / 32 partials by one more simd_sum (lane s
// holding partial s), so all threads get the same bits. Every thread of the
// threadgroup must call it.
template <int TG>
METAL_FUNC float threadgroup_sum(float v, THREADGROUP_PTR float* partial, uint lane, uint simd_group) {
  v = simd_sum(v);
  if (lane == 0) {
    partial[simd_group] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return simd_sum(lane < uint(TG / 32) ? partial[lane] : 0.0f);
}

// @provides Vec16 unpack16
// The elements of a 16-byte piece of a row of T (bfloat16: 8, float32: 4) as float32, in order.
// T must be bfloat16 or float32 (a 2-byte T is taken as bfloat16).
struct Vec16 {
  float v[8];
};
template <typename T>
METAL_FUNC Vec16 unpack16(uint4 u) {
  Vec16 f;
  const uint w[4] = {u.x, u.y, u.z, u.w};
  for (int i = 0; i < 4; i++) {
    if (sizeof(T) == 2) {
      f.v[2 * i] = as_type<float>(w[i] << 16);
      f.v[2 * i + 1] = as_type<float>(w[i] & 0xffff0000u);
    } else {
      f.v[i] = as_type<float>(w[i]);
    }
  }
  return f;
}

// @provides round_to
// x rounded to T and back to float (where the unfused MLX ops round).
template <typename T>
METAL_FUNC float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// @provides rope_pair RotatedPair
// NeoX RoPE of the pair (a, b) = (x[i], x[i + D/2]) at position pos with
// frequency freq (the angle is pos / freq, as mx.fast.rope), in float32.
struct RotatedPair {
  float first;
  float second;
};
METAL_FUNC RotatedPair rope_pair(float a, float b, int pos, float freq) {
  const float theta = float(pos) * (1.0f / freq);
  const float c = metal::precise::cos(theta);
  const float s = metal::precise::sin(theta);
  RotatedPair r;
  r.first = a * c - b * s;
  r.second = a * s + b * c;
  return r;
}
