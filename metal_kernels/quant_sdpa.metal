// quant_sdpa: one decode step of attention over a quantized KV cache (mlx-lm's QuantizedKVCache),
// first pass: a partial softmax-weighted sum of V per chunk of CH cache positions.
//
// Why: MLX 0.32.4 on NVIDIA GPUs has no quantized matmul for the shapes of quantized attention
// at decode (mlx-lm's quantized_scaled_dot_product_attention), and dequantizing the whole cache
// every step writes and reads it again in full precision. This body reads the packed cache once.
// Layout: one threadgroup of 128 threads (4 SIMD-groups) per (batch row, KV head, chunk); grid =
// (B * HKV * NC * 128, 1, 1), NC = ceil(CAP / CH). SIMD-group s takes blocks of U = 4 consecutive
// positions (c*CH + 4s, then + 16, ...) below n: the 4 positions' loads and score reductions are
// independent, so their latencies overlap (one position at a time ran at half bf16's speed on an
// H200). Lane j holds elements j*E .. j*E+E-1 (E = D / 32) of each key and value, dequantized
// as scale * q + bias (MLX's affine format, low bits first), and of the NREP query heads that
// share the KV head (mlx-lm's grouping: heads h*NREP .. h*NREP+NREP-1). Scores are simd_sums of
// float32 products; an online softmax (running max m, sum l) keeps one accumulator per head.
// The 4 SIMD-groups' partials are merged in threadgroup memory; positions >= n are never read.
// Inputs:  q [B, HKV*NREP, 1, D] (T); kw, vw [B, HKV, CAP, D*BITS/32] (uint32); ks, kb, vs, vb
//          [B, HKV, CAP, D/GS] (T); n [1] (int32, valid positions); scale [1] (float32).
// Outputs: o [B, HKV*NREP, NC, D] (float32, the unnormalized sum over the chunk, exp(s - m)
//          weights), m, l [B, HKV*NREP, NC] (float32); an empty chunk has m = -3e38, l = 0, o = 0.
//          metal_kernels.kernels.quant_sdpa merges the chunks (max, rescale, sum, divide).
// Template: T, D (head dim, a multiple of 32), NREP (<= 8), BITS (2, 4 or 8), GS (group size),
//          CH (positions per threadgroup, a multiple of 16). CAP and HKV come from kw's shape, so a growing cache
//          does not recompile.
// ---- body ----
constexpr int E = D / 32;
constexpr int PER = 32 / BITS;
constexpr int WPR = D / PER;
constexpr int GPR = D / GS;
constexpr int SG = 4;
constexpr int U = 4;
constexpr uint MASK = (1u << BITS) - 1u;
const int HKV = kw_shape[1];
const int CAP = kw_shape[2];
const int NC = (CAP + CH - 1) / CH;
const int gi = int(threadgroup_position_in_grid.x);
const int c = gi % NC;
const int bh = gi / NC;
const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int tid = int(thread_index_in_threadgroup);
const int valid = n[0];
const float sc = scale[0];
const int e0 = lane * E;

float qr[NREP][E];
float acc[NREP][E];
float mx_[NREP];
float sum_[NREP];
for (int r = 0; r < NREP; r++) {
  for (int j = 0; j < E; j++) {
    qr[r][j] = static_cast<float>(q[size_t(bh * NREP + r) * D + e0 + j]) * sc;
    acc[r][j] = 0.0f;
  }
  mx_[r] = -3.0e38f;
  sum_[r] = 0.0f;
}

const int start = c * CH;
const int stop = start + CH < valid ? start + CH : valid;
for (int t0 = start + sg * U; t0 < stop; t0 += SG * U) {
  float kv[U][E];
  float vv[U][E];
  for (int u = 0; u < U; u++) {
    for (int j = 0; j < E; j++) {
      kv[u][j] = 0.0f;
      vv[u][j] = 0.0f;
    }
    if (t0 + u < stop) {
      const size_t row = size_t(bh) * size_t(CAP) + size_t(t0 + u);
      const size_t g = row * GPR + size_t(e0 / GS);
      const float ksc = static_cast<float>(ks[g]);
      const float kbi = static_cast<float>(kb[g]);
      const float vsc = static_cast<float>(vs[g]);
      const float vbi = static_cast<float>(vb[g]);
      for (int j = 0; j < E; j++) {
        const int e = e0 + j;
        const uint sh = uint((e % PER) * BITS);
        kv[u][j] = ksc * static_cast<float>((kw[row * WPR + e / PER] >> sh) & MASK) + kbi;
        vv[u][j] = vsc * static_cast<float>((vw[row * WPR + e / PER] >> sh) & MASK) + vbi;
      }
    }
  }
  float s[U][NREP];
  for (int u = 0; u < U; u++) {
    for (int r = 0; r < NREP; r++) {
      float d = 0.0f;
      for (int j = 0; j < E; j++) {
        d += qr[r][j] * kv[u][j];
      }
      s[u][r] = d;
    }
  }
  for (int u = 0; u < U; u++) {
    for (int r = 0; r < NREP; r++) {
      s[u][r] = simd_sum(s[u][r]);
    }
  }
  for (int r = 0; r < NREP; r++) {
    float mn = mx_[r];
    for (int u = 0; u < U; u++) {
      if (t0 + u < stop && s[u][r] > mn) {
        mn = s[u][r];
      }
    }
    const float f = metal::exp(mx_[r] - mn);
    sum_[r] *= f;
    for (int j = 0; j < E; j++) {
      acc[r][j] *= f;
    }
    for (int u = 0; u < U; u++) {
      if (t0 + u < stop) {
        const float p = metal::exp(s[u][r] - mn);
        sum_[r] += p;
        for (int j = 0; j < E; j++) {
          acc[r][j] += p * vv[u][j];
        }
      }
    }
    mx_[r] = mn;
  }
}

threadgroup float part_m[SG * NREP];
threadgroup float part_l[SG * NREP];
threadgroup float part_o[SG * NREP * D];
for (int r = 0; r < NREP; r++) {
  if (lane == 0) {
    part_m[sg * NREP + r] = mx_[r];
    part_l[sg * NREP + r] = sum_[r];
  }
  for (int j = 0; j < E; j++) {
    part_o[(sg * NREP + r) * D + e0 + j] = acc[r][j];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int i = tid; i < NREP * D; i += SG * 32) {
  const int r = i / D;
  const int d = i % D;
  float M = -3.0e38f;
  for (int s = 0; s < SG; s++) {
    M = part_m[s * NREP + r] > M ? part_m[s * NREP + r] : M;
  }
  float acc_o = 0.0f;
  float acc_l = 0.0f;
  for (int s = 0; s < SG; s++) {
    const float f = metal::exp(part_m[s * NREP + r] - M);
    acc_o += part_o[(s * NREP + r) * D + d] * f;
    acc_l += part_l[s * NREP + r] * f;
  }
  const size_t hr = size_t(bh * NREP + r) * size_t(NC) + size_t(c);
  o[hr * D + d] = acc_o;
  if (d == 0) {
    m[hr] = M;
    l[hr] = acc_l;
  }
}
