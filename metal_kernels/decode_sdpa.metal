// decode_sdpa: one decode step of attention over plain (unquantized) KV cache buffers, every row
// reading positions 0 .. n-1 (mlx-lm's KVCache, read in place), first pass: a partial
// softmax-weighted sum of V per chunk of CH positions, in quant_sdpa's layout, so
// quant_sdpa_merge combines the chunks. T is bfloat16 or float32 (16-byte key loads).
// Threadgroups of 256 (8 SIMD-groups), one per (row b, KV head, chunk):
// 1. scores: TPR = 256 / CH threads share a key row, each its pieces sub, sub + TPR, ... (16 bytes
//    each, summed in order), the TPR partial sums meeting pairwise by simd_shuffle_xor; the
//    queries (times scale) in threadgroup memory, loaded with the keys and values before the first
//    store (a store between loads would wait for each: 7.96 -> 7.17 us a layer at 4,096 positions);
// 2. softmax over the chunk: SIMD-group r takes query head r;
// 3. values: lane j of a SIMD-group owns elements j*NE .. j*NE+NE-1 (NE = D / 32) of every row, the
//    SIMD-group takes rows sg, sg + 8, ...; the 8 partial sums meet in threadgroup memory.
// Inputs:  q [B, HKV*NREP, 1, D] (T); k, v [B, HKV, CAP, D] (T, read in place); n [1] (int32,
//          one past the last position).
// Outputs: o [B, HKV*NREP, NC, D], m, l [B, HKV*NREP, NC] (float32, as quant_sdpa's), NC = CAP / CH
//          rounded up.
// Template: T (bfloat16 or float32), D (32, 64 or 128), NREP (<= 8), HKV, CH (positions per
//          threadgroup: 16, 32 or 64, at least 256 / (D * sizeof(T) / 16)), SCALE (the attention
//          scale's float32 bits).
// ---- body ----
constexpr int TGT = 256;
constexpr int E = 16 / int(sizeof(T));  // elements per 16-byte piece
constexpr int P = D / E;                // pieces per row
constexpr int TPR = TGT / CH;           // threads per key row (phase 1)
constexpr int PPT = P / TPR;            // pieces per thread (phase 1)
constexpr int NE = D / 32;              // value elements per lane (phase 3)
constexpr int RPW = CH / 8;             // value rows per SIMD-group (phase 3)
const int CAP = k_shape[2];
const int NC = (CAP + CH - 1) / CH;
const int gi = int(threadgroup_position_in_grid.x);
const int c = gi % NC;
const int bh = gi / NC;
const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int tid = int(thread_index_in_threadgroup);
const int left = n[0] - c * CH;
const int cnt = left < 0 ? 0 : (left < CH ? left : CH);
const size_t mo = size_t(bh) * size_t(NREP) * size_t(NC) + size_t(c);
if (cnt == 0) {
  for (int i = tid; i < NREP * D; i += TGT) {
    o[(mo + size_t(i / D) * size_t(NC)) * D + size_t(i % D)] = 0.0f;
  }
  if (tid < NREP) {
    m[mo + size_t(tid) * size_t(NC)] = -3.0e38f;
    l[mo + size_t(tid) * size_t(NC)] = 0.0f;
  }
  return;
}
const size_t rbase = size_t(bh) * size_t(CAP) + size_t(c * CH);
const device uint4* kc = reinterpret_cast<const device uint4*>(k) + rbase * P;

threadgroup float qs[NREP * D];
threadgroup float pt[CH * 8];
threadgroup float part[8 * NREP * D];

// 1. scores: the key pieces first, then the queries into threadgroup memory
const int row = tid / TPR;
const int sub = tid % TPR;
const int ri = row < cnt ? row : cnt - 1;
constexpr int QPT = (NREP * D + TGT - 1) / TGT;
float qv[QPT];  // this thread's query elements, loaded with the keys (before any store)
UNROLL for (int u = 0; u < QPT; u++) {
  const int i = tid + u * TGT;
  qv[u] = i < NREP * D ? static_cast<float>(q[size_t(bh) * NREP * D + size_t(i)]) : 0.0f;
}
uint4 kq[PPT];
UNROLL for (int u = 0; u < PPT; u++) {
  kq[u] = kc[size_t(ri) * P + size_t(sub + u * TPR)];
}
// the value elements of this lane's rows (phase 3), loaded ahead too
const device T* vc = v + rbase * D;
float vv[RPW * NE];
UNROLL for (int j = 0; j < RPW; j++) {
  const int i = sg + 8 * j;
  const int rv = i < cnt ? i : cnt - 1;
  UNROLL for (int e = 0; e < NE; e++) {
    vv[j * NE + e] = static_cast<float>(vc[size_t(rv) * D + size_t(lane * NE + e)]);
  }
}
const float sc = as_type<float>(uint(SCALE));
UNROLL for (int u = 0; u < QPT; u++) {
  const int i = tid + u * TGT;
  if (i < NREP * D) {
    qs[i] = qv[u] * sc;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float s[NREP];
UNROLL for (int r = 0; r < NREP; r++) {
  s[r] = 0.0f;
}
UNROLL for (int u = 0; u < PPT; u++) {
  const Vec16 f = unpack16<T>(kq[u]);
  const int d0 = (sub + u * TPR) * E;
  UNROLL for (int r = 0; r < NREP; r++) {
    UNROLL for (int e = 0; e < E; e++) {
      s[r] += qs[r * D + d0 + e] * f.v[e];
    }
  }
}
UNROLL for (int r = 0; r < NREP; r++) {
  float t = s[r];
  UNROLL for (int w = 1; w < TPR; w <<= 1) {
    t += simd_shuffle_xor(t, w);
  }
  if (sub == r % TPR) {
    pt[row * 8 + r] = row < cnt ? t : -3.0e38f;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. softmax over the chunk: SIMD-group r takes head r
if (sg < NREP) {
  float mm = -3.0e38f;
  UNROLL for (int t = 0; t < (CH + 31) / 32; t++) {
    const int i = lane + 32 * t;
    if (i < CH) {
      mm = pt[i * 8 + sg] > mm ? pt[i * 8 + sg] : mm;
    }
  }
  mm = simd_max(mm);
  float sum = 0.0f;
  UNROLL for (int t = 0; t < (CH + 31) / 32; t++) {
    const int i = lane + 32 * t;
    if (i < CH) {
      const float p = i < cnt ? metal::exp(pt[i * 8 + sg] - mm) : 0.0f;
      pt[i * 8 + sg] = p;
      sum += p;
    }
  }
  sum = simd_sum(sum);
  if (lane == 0) {
    m[mo + size_t(sg) * size_t(NC)] = mm;
    l[mo + size_t(sg) * size_t(NC)] = sum;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. values: this SIMD-group's rows, this lane's elements
float acc[NREP * NE];
UNROLL for (int j = 0; j < NREP * NE; j++) {
  acc[j] = 0.0f;
}
UNROLL for (int j = 0; j < RPW; j++) {
  const int i = sg + 8 * j;
  UNROLL for (int r = 0; r < NREP; r++) {
    const float p = pt[i * 8 + r];
    UNROLL for (int e = 0; e < NE; e++) {
      acc[r * NE + e] += p * vv[j * NE + e];
    }
  }
}
UNROLL for (int r = 0; r < NREP; r++) {
  UNROLL for (int e = 0; e < NE; e++) {
    part[(sg * NREP + r) * D + lane * NE + e] = acc[r * NE + e];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int i = tid; i < NREP * D; i += TGT) {
  float a = 0.0f;
  UNROLL for (int g = 0; g < 8; g++) {
    a += part[g * NREP * D + i];
  }
  o[(mo + size_t(i / D) * size_t(NC)) * D + size_t(i % D)] = a;
}
