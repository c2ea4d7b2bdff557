// quant_sdpa: one decode step of attention over a quantized KV cache (mlx-lm's QuantizedKVCache),
// first pass: a partial softmax-weighted sum of V per chunk of CH = 128 cache positions, plus one
// chunk for a tail of full-precision positions (qwen_mlx.kv_cache.BlockQuantizedKVCache keeps its
// newest tokens unquantized until a block of 128 fills; an empty tail for mlx-lm's cache).
//
// Why: MLX 0.32.4 on NVIDIA GPUs has no quantized matmul for the shapes of quantized attention
// at decode (mlx-lm's quantized_scaled_dot_product_attention), and dequantizing the whole cache
// every step writes and reads it again in full precision. This body reads the packed cache once.
// Layout: one threadgroup of 128 threads per (batch row, KV head, chunk); grid =
// (B * HKV * NC * 128, 1, 1), NC = ceil(CAP / 128) + 1, the last chunk the tail. Three phases, no per-position reductions
// across threads (a first version spread each key over a SIMD-group's lanes and paid NREP
// simd_sums per position: slower than bfloat16 attention on an H200):
//   1. scores: thread t takes position c*128 + t, dequantizes its key (scale * q + bias, MLX's
//      affine format, low bits first) and dots it with the NREP query heads sharing the KV head
//      (mlx-lm's grouping: heads h*NREP .. h*NREP+NREP-1), held in threadgroup memory;
//   2. per head, the chunk's max m (simd_max, then over the 4 SIMD-groups), p = exp(s - m) and
//      their sum l (simd_sum);
//   3. values: D/4 threads cover a V row, four neighbouring elements each (part of one packed
//      word, one scale and bias), so a SIMD-group reads whole rows, coalesced; the 128/(D/4)
//      position groups each take every (128/(D/4))-th position of the chunk (a loop of constant
//      trip count: D/4 independent loads per thread), and their sums meet in threadgroup memory.
//      (The version before had each thread own one output element and read all 128 positions
//      one after another: 0.71x instead of 0.75x bfloat16 attention's decode speed at 32k.)
// Phases 1 and 3 read the chunk's packed keys, then its values, from threadgroup memory: the 128
// threads first copy them there, consecutive threads on consecutive words (coalesced; each thread
// reading its own row, D*BITS/32 words from its neighbour's, spread every load over many cache
// lines), rows padded by one word against bank conflicts, scales and biases as float32 bits. Keys,
// values and phase 3's partial sums share one array (barriers between), so at 4 bits the
// threadgroup memory is what the partial sums alone took before (~21.7 KB at 7B: one wave of
// threadgroups on an H200). GPU time of the positions beyond 128 at 32k on an H200: 44 instead of
// 48 us per call at 4 bits, 41 instead of 56 at 8 bits (`scripts/probe_attention.py`).
// Scores, softmax and sums are float32; positions >= n are never read.
// Inputs:  q [B, HKV*NREP, 1, D] (T); kw, vw [B, HKV, CAP, D*BITS/32] (uint32); ks, kb, vs, vb
//          [B, HKV, CAP, D/GS] (T); n [1] (int32, valid packed positions); tk, tv [B, HKV, TCAP, D]
//          (T, TCAP <= 128); nt [1] (int32, valid tail positions).
// Outputs: o [B, HKV*NREP, NC, D] (float32, the unnormalized sum over the chunk), m, l
//          [B, HKV*NREP, NC] (float32); an empty chunk has m = -3e38, l = 0, o = 0.
//          quant_sdpa_merge combines the chunks.
// Template: T, D (32, 64 or 128), NREP (<= 8), BITS (2, 4 or 8), GS (group size, a multiple
//          of 32 / BITS), SCALE (the
//          attention scale's float32 bits). CAP and HKV come from kw's shape, so a growing cache does not recompile.
// ---- body ----
constexpr int CH = 128;       // cache positions per threadgroup = threads per threadgroup
constexpr int PER = 32 / BITS;
constexpr int WPR = D / PER;
constexpr int GPR = D / GS;
constexpr int WPG = GS / PER;
constexpr int E = 4;          // V elements per thread in phase 3 (PER >= 4 for BITS <= 8)
constexpr int TPR = D / E;    // threads per V row
constexpr int NPG = CH / TPR; // position groups
constexpr uint MASK = (1u << BITS) - 1u;
const int CAP = kw_shape[2];
const int TCAP = tk_shape[2];
const int NCQ = (CAP + CH - 1) / CH;
const int NC = NCQ + 1;
const int gi = int(threadgroup_position_in_grid.x);
const int c = gi % NC;
const int bh = gi / NC;
const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int tid = int(thread_index_in_threadgroup);
const bool tail = c == NCQ;
const int start = tail ? 0 : c * CH;
const int left = (tail ? nt[0] : n[0]) - start;
const int cnt = left < 0 ? 0 : (left < CH ? left : CH);
const float sc = as_type<float>(uint(SCALE));

threadgroup float qs[NREP * D];
threadgroup float ps[NREP * CH];
threadgroup float red_m[NREP * 4];
threadgroup float red_l[NREP * 4];
constexpr int KST = CH * (WPR + 1);  // a chunk's packed words, rows padded by one (no bank conflicts)
constexpr int KSS = CH * (GPR + 1);  // its scales, then its biases (float32 bits)
constexpr int STAGE = KST + 2 * KSS;
constexpr int PART = NPG * NREP * D;  // phase 3's partial sums (float32 bits), after the chunk's values
threadgroup uint shm[STAGE > PART ? STAGE : PART];
for (int i = tid; i < NREP * D; i += CH) {
  qs[i] = static_cast<float>(q[size_t(bh) * size_t(NREP * D) + size_t(i)]) * sc;
}
if (!tail) {  // coalesced loads of the chunk's keys into threadgroup memory
  const size_t base = size_t(bh) * size_t(CAP) + size_t(start);
  for (int i = tid; i < CH * WPR; i += CH) {
    const int rr = i / WPR;
    shm[rr * (WPR + 1) + i % WPR] = rr < cnt ? kw[base * WPR + size_t(i)] : 0u;
  }
  for (int i = tid; i < CH * GPR; i += CH) {
    const int rr = i / GPR;
    shm[KST + rr * (GPR + 1) + i % GPR] = as_type<uint>(rr < cnt ? static_cast<float>(ks[base * GPR + size_t(i)]) : 0.0f);
    shm[KST + KSS + rr * (GPR + 1) + i % GPR] = as_type<uint>(rr < cnt ? static_cast<float>(kb[base * GPR + size_t(i)]) : 0.0f);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 1. scores
float s[NREP];
for (int r = 0; r < NREP; r++) {
  s[r] = -3.0e38f;
}
if (tid < cnt) {
  for (int r = 0; r < NREP; r++) {
    s[r] = 0.0f;
  }
  if (tail) {
    const size_t row = size_t(bh) * size_t(TCAP) + size_t(tid);
    for (int d = 0; d < D; d++) {
      const float kd = static_cast<float>(tk[row * D + d]);
      for (int r = 0; r < NREP; r++) {
        s[r] += qs[r * D + d] * kd;
      }
    }
  } else {
    for (int g = 0; g < GPR; g++) {
      const float ksc = as_type<float>(shm[KST + tid * (GPR + 1) + g]);
      const float kbi = as_type<float>(shm[KST + KSS + tid * (GPR + 1) + g]);
      for (int w = 0; w < WPG; w++) {
        const uint word = shm[tid * (WPR + 1) + g * WPG + w];
        for (int i = 0; i < PER; i++) {
          const float kd = ksc * static_cast<float>((word >> uint(i * BITS)) & MASK) + kbi;
          const int d = g * GS + w * PER + i;
          for (int r = 0; r < NREP; r++) {
            s[r] += qs[r * D + d] * kd;
          }
        }
      }
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
if (!tail) {  // the keys are done with: the chunk's packed values into the same threadgroup memory
  const size_t base = size_t(bh) * size_t(CAP) + size_t(start);
  for (int i = tid; i < CH * WPR; i += CH) {
    const int rr = i / WPR;
    shm[rr * (WPR + 1) + i % WPR] = rr < cnt ? vw[base * WPR + size_t(i)] : 0u;
  }
  for (int i = tid; i < CH * GPR; i += CH) {
    const int rr = i / GPR;
    shm[KST + rr * (GPR + 1) + i % GPR] = as_type<uint>(rr < cnt ? static_cast<float>(vs[base * GPR + size_t(i)]) : 0.0f);
    shm[KST + KSS + rr * (GPR + 1) + i % GPR] = as_type<uint>(rr < cnt ? static_cast<float>(vb[base * GPR + size_t(i)]) : 0.0f);
  }
}
float M[NREP];
for (int r = 0; r < NREP; r++) {
  float a = red_m[r * 4];
  for (int k = 1; k < 4; k++) {
    a = red_m[r * 4 + k] > a ? red_m[r * 4 + k] : a;
  }
  M[r] = a;
  const float p = tid < cnt ? metal::exp(s[r] - a) : 0.0f;
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
for (int k = 0; k < NREP * E; k++) {
  acc[k] = 0.0f;
}
for (int it = 0; it < TPR; it++) {
  const int j = pg + it * NPG;
  if (j < cnt) {
    float v[E];
    if (tail) {
      const size_t at = (size_t(bh) * size_t(TCAP) + size_t(j)) * D + size_t(d0);
      for (int i = 0; i < E; i++) {
        v[i] = static_cast<float>(tv[at + i]);
      }
    } else {
      const uint word = shm[j * (WPR + 1) + d0 / PER] >> uint((d0 % PER) * BITS);
      const float vsc = as_type<float>(shm[KST + j * (GPR + 1) + d0 / GS]);
      const float vbi = as_type<float>(shm[KST + KSS + j * (GPR + 1) + d0 / GS]);
      for (int i = 0; i < E; i++) {
        v[i] = vsc * static_cast<float>((word >> uint(i * BITS)) & MASK) + vbi;
      }
    }
    for (int r = 0; r < NREP; r++) {
      const float p = ps[r * CH + j];
      for (int i = 0; i < E; i++) {
        acc[r * E + i] += p * v[i];
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // every thread is done with the staged values
for (int r = 0; r < NREP; r++) {
  for (int i = 0; i < E; i++) {
    shm[(pg * NREP + r) * D + d0 + i] = as_type<uint>(acc[r * E + i]);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int k = tid; k < NREP * D; k += CH) {  // k = r * D + d
  float a = 0.0f;
  for (int g = 0; g < NPG; g++) {
    a += as_type<float>(shm[g * NREP * D + k]);
  }
  const int r = k / D;
  const size_t hr = size_t(bh * NREP + r) * size_t(NC) + size_t(c);
  o[hr * D + size_t(k % D)] = a;
}
if (tid < NREP) {
  const size_t hr = size_t(bh * NREP + tid) * size_t(NC) + size_t(c);
  m[hr] = M[tid];
  l[hr] = red_l[tid * 4] + red_l[tid * 4 + 1] + red_l[tid * 4 + 2] + red_l[tid * 4 + 3];
}
