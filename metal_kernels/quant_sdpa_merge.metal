// quant_sdpa_merge: the second pass of quant_sdpa: combine the per-chunk partial sums into the
// attention output, out = sum_c o_c e^(m_c - M) / sum_c l_c e^(m_c - M), M = max_c m_c.
// One threadgroup of 256 threads per (batch row, query head, block of 32 output elements): the
// threads first share out the chunks for M and the denominator (simd_max / simd_sum, then across
// the 8 SIMD-groups), then SIMD-group k sums chunks k, k + 8, ... for the block's 32 elements
// (one coalesced 128-byte row per chunk), eight chunks' loads at a time, and the 8 partial sums
// meet in threadgroup memory. (A first version, one thread per element looping over all chunks,
// one load after another, took as long as quant_sdpa itself at 32k positions on an H200.)
// float32 throughout; empty chunks (m = -3e38, l = 0) weigh nothing.
// Inputs:  o [B, HQ, NC, D], m, l [B, HQ, NC] (float32, from quant_sdpa).
// Outputs: out [B, HQ, 1, D] (T).
// Template: T, D (32, 64 or 128).
// ---- body ----
constexpr int TG = 256;
constexpr int S = TG / 32;  // SIMD-groups = slices of the chunks
const int NC = m_shape[2];
const int h = int(threadgroup_position_in_grid.x) / (D / 32);
const int d = int(threadgroup_position_in_grid.x) % (D / 32) * 32 + int(thread_index_in_simdgroup);
const int tid = int(thread_index_in_threadgroup);
const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const size_t base = size_t(h) * size_t(NC);
threadgroup float red_m[TG / 32];
threadgroup float red_l[TG / 32];
threadgroup float part[TG];

// 1. M and the denominator
float a = -3.0e38f;
for (int c = tid; c < NC; c += TG) {
  a = m[base + c] > a ? m[base + c] : a;
}
a = simd_max(a);
if (lane == 0) {
  red_m[sg] = a;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float M = red_m[0];
for (int k = 1; k < TG / 32; k++) {
  M = red_m[k] > M ? red_m[k] : M;
}
float den = 0.0f;
for (int c = tid; c < NC; c += TG) {
  den += l[base + c] * metal::exp(m[base + c] - M);
}
den = simd_sum(den);
if (lane == 0) {
  red_l[sg] = den;
}

// 2. element d over chunks sg, sg + S, ...
float acc = 0.0f;
int c = sg;
for (; c + 7 * S < NC; c += 8 * S) {
  float ov[8], mv[8];
  for (int k = 0; k < 8; k++) {
    ov[k] = o[(base + size_t(c + k * S)) * D + d];
    mv[k] = m[base + size_t(c + k * S)];
  }
  for (int k = 0; k < 8; k++) {
    acc += ov[k] * metal::exp(mv[k] - M);
  }
}
for (; c < NC; c += S) {
  acc += o[(base + size_t(c)) * D + d] * metal::exp(m[base + size_t(c)] - M);
}
part[tid] = acc;
threadgroup_barrier(mem_flags::mem_threadgroup);
if (sg == 0) {
  float t = 0.0f;
  float dn = 0.0f;
  for (int k = 0; k < S; k++) {
    t += part[k * 32 + lane];
    dn += red_l[k];
  }
  out[size_t(h) * D + size_t(d)] = static_cast<T>(t / dn);
}
