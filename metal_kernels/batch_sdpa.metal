// batch_sdpa: one decode step of attention for a batch whose rows start at different cache
// positions (mlx-lm's BatchKVCache: row b's keys are positions start[b] .. n-1 of the buffers,
// the positions before start[b] are left padding), first pass: a partial softmax-weighted sum of
// V per chunk of CH = 128 cache positions, in quant_sdpa's layout, so quant_sdpa_merge combines
// the chunks.
//
// Why: with MLX 0.32.4 on NVIDIA GPUs, a decode query with an array mask (the padding mask of a
// batch) has no fused attention kernel; MLX's fallback (matmul, where, softmax, matmul) cost
// 2-9x the unmasked kernel on an H200 (docs/benchmarks.md). Here the padding is a per-row start.
// Layout: one threadgroup of 128 threads per (batch row, KV head, chunk); grid =
// (B * HKV * NC * 128, 1, 1), NC = ceil(CAP / 128). As quant_sdpa's full-precision tail:
//   1. scores: thread t takes position c*128 + t and dots its key with the NREP query heads
//      sharing the KV head (heads h*NREP .. h*NREP+NREP-1), held in threadgroup memory;
//   2. per head, the chunk's max m (simd_max, then over the 4 SIMD-groups), p = exp(s - m) and
//      their sum l (simd_sum);
//   3. values: D/4 threads cover a V row, four neighbouring elements each, so a SIMD-group reads
//      whole rows, coalesced; the 128/(D/4) position groups each take every (128/(D/4))-th
//      position of the chunk, and their sums meet in threadgroup memory.
// Scores, softmax and sums are float32; positions outside [start[b], n) are never read.
// Inputs:  q [B, HKV*NREP, 1, D] (T); k, v [B, HKV, CAP, D] (T); start [B] (int32, row b's first
//          position); n [1] (int32, one past the last position of every row).
// Outputs: o [B, HKV*NREP, NC, D] (float32, the unnormalized sum over the chunk), m, l
//          [B, HKV*NREP, NC] (float32); an empty chunk has m = -3e38, l = 0, o = 0.
// Template: T, D (32, 64 or 128), NREP (<= 8), HKV, SCALE (the attention scale's float32
//          bits). CAP comes from k's shape, so a growing cache does not recompile.
// ---- body ----
constexpr int CH = 128;       // cache positions per threadgroup = threads per threadgroup
constexpr int E = 4;          // V elements per thread in phase 3
constexpr int TPR = D / E;    // threads per V row
constexpr int NPG = CH / TPR; // position groups
const int CAP = k_shape[2];
const int NC = (CAP + CH - 1) / CH;
const int gi = int(threadgroup_position_in_grid.x);
const int c = gi % NC;
const int bh = gi / NC;
const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int tid = int(thread_index_in_threadgroup);
const int first = start[bh / HKV] > c * CH ? start[bh / HKV] - c * CH : 0;  // chunk-relative [first, cnt)
const int left = n[0] - c * CH;
const int cnt = left < 0 ? 0 : (left < CH ? left : CH);
const float sc = as_type<float>(uint(SCALE));

threadgroup float qs[NREP * D];
threadgroup float ps[NREP * CH];
threadgroup float red_m[NREP * 4];
threadgroup float red_l[NREP * 4];
threadgroup float part[NPG * NREP * D];
for (int i = tid; i < NREP * D; i += CH) {
  qs[i] = static_cast<float>(q[size_t(bh) * size_t(NREP * D) + size_t(i)]) * sc;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 1. scores
const bool mine = tid >= first && tid < cnt;
float s[NREP];
for (int r = 0; r < NREP; r++) {
  s[r] = mine ? 0.0f : -3.0e38f;
}
if (mine) {
  const size_t row = size_t(bh) * size_t(CAP) + size_t(c * CH + tid);
  for (int d = 0; d < D; d++) {
    const float kd = static_cast<float>(k[row * D + d]);
    for (int r = 0; r < NREP; r++) {
      s[r] += qs[r * D + d] * kd;
    }
  }
}

// 2. softmax over the chunk, per head
for (int r = 0; r < NREP; r++) {
  const float mm = simd_max(s[r]);
  if (lane == 0) {
    red_m[r * 4 + sg] = mm;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float M[NREP];
for (int r = 0; r < NREP; r++) {
  float a = red_m[r * 4];
  for (int kk = 1; kk < 4; kk++) {
    a = red_m[r * 4 + kk] > a ? red_m[r * 4 + kk] : a;
  }
  M[r] = a;
  const float p = mine ? metal::exp(s[r] - a) : 0.0f;
  ps[r * CH + tid] = p;
  const float ls = simd_sum(p);
  if (lane == 0) {
    red_l[r * 4 + sg] = ls;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. values: elements d0 .. d0+3 of positions pg, pg + NPG, ...
const int d0 = (tid % TPR) * E;
const int pg = tid / TPR;
float acc[NREP * E];
for (int kk = 0; kk < NREP * E; kk++) {
  acc[kk] = 0.0f;
}
for (int it = 0; it < TPR; it++) {
  const int j = pg + it * NPG;
  if (j >= first && j < cnt) {
    const size_t at = (size_t(bh) * size_t(CAP) + size_t(c * CH + j)) * D + size_t(d0);
    float vv[E];
    for (int i = 0; i < E; i++) {
      vv[i] = static_cast<float>(v[at + i]);
    }
    for (int r = 0; r < NREP; r++) {
      const float p = ps[r * CH + j];
      for (int i = 0; i < E; i++) {
        acc[r * E + i] += p * vv[i];
      }
    }
  }
}
for (int r = 0; r < NREP; r++) {
  for (int i = 0; i < E; i++) {
    part[(pg * NREP + r) * D + d0 + i] = acc[r * E + i];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int kk = tid; kk < NREP * D; kk += CH) {  // kk = r * D + d
  float a = 0.0f;
  for (int g = 0; g < NPG; g++) {
    a += part[g * NREP * D + kk];
  }
  const int r = kk / D;
  const size_t hr = size_t(bh * NREP + r) * size_t(NC) + size_t(c);
  o[hr * D + size_t(kk % D)] = a;
}
if (tid < NREP) {
  const size_t hr = size_t(bh * NREP + tid) * size_t(NC) + size_t(c);
  m[hr] = M[tid];
  l[hr] = red_l[tid * 4] + red_l[tid * 4 + 1] + red_l[tid * 4 + 2] + red_l[tid * 4 + 3];
}
