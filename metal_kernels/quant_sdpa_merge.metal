// quant_sdpa_merge: the second pass of quant_sdpa: combine the per-chunk partial sums into the
// attention output, out = sum_c o_c e^(m_c - M) / sum_c l_c e^(m_c - M), M = max_c m_c.
// One thread per output element (grid B * HQ * D, threadgroups of D threads); each reads its
// head's NC maxima and sums and its element of the NC partial sums. float32 throughout; empty
// chunks (m = -3e38, l = 0) weigh nothing.
// Inputs:  o [B, HQ, NC, D], m, l [B, HQ, NC] (float32, from quant_sdpa).
// Outputs: out [B, HQ, 1, D] (T).
// Template: T, D.
// ---- body ----
const int NC = m_shape[2];
const int gid = int(thread_position_in_grid.x);
const int h = gid / D;
const int d = gid % D;
const size_t base = size_t(h) * size_t(NC);
float M = -3.0e38f;
for (int c = 0; c < NC; c++) {
  M = m[base + c] > M ? m[base + c] : M;
}
float acc = 0.0f;
float den = 0.0f;
for (int c = 0; c < NC; c++) {
  const float f = metal::exp(m[base + c] - M);
  acc += o[(base + c) * D + d] * f;
  den += l[base + c] * f;
}
out[gid] = static_cast<T>(acc / den);
