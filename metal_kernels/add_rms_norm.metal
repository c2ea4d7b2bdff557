// add_rms_norm: h = x + r (rounded to T), y = rms_norm(h) * w, in one pass.
//
// Layout: as rms_norm.metal. One threadgroup per row, grid = (rows * TG, 1, 1),
// threadgroup = (TG, 1, 1), TG a multiple of 32 (<= 1024); thread t loads
// elements t, t + TG, ... of x, r and w (N = ceil(D / TG) of each) before any
// store (h may alias x or r as far as the compiler knows, so a store between
// loads would wait for them: a load's latency per element, 3.8 -> 2.9 us a
// call at D = 3,584 on an H200), writes h, reduces the sum of squares in
// float32 (simd_sum, then one partial per SIMD-group in threadgroup memory)
// and writes y.
// Inputs:  x [..., D] (T; rows = the product of the leading dims), r [rows, D] (T), w [D] (T).
// Outputs: h, y shaped like x (T).
// Template: T (dtype), D (row length), TG (threads per row), EPS (eps's float32 bits).
// Rounding as `h = x + r; mx.fast.rms_norm(h, w, eps)`: h = T(x + r), the
// norm is computed from the rounded h, y = T(T(h * n) * w).
// ---- body ----
constexpr int N = (D + TG - 1) / TG;
const uint row = threadgroup_position_in_grid.x;
const uint tid = thread_index_in_threadgroup;
uint rows = 1;  // x may have any leading dimensions: rows is their product
for (int i = 0; i + 1 < int(x_ndim); i++) {
  rows *= uint(x_shape[i]);
}
if (row >= rows) {
  return;  // whole threadgroup past the last row (no thread reaches the barrier)
}
const size_t base = size_t(row) * D;

float xv[N];
float rv[N];
float wv[N];  // every load issued before the first store (h may alias x or r for the compiler)
UNROLL for (int j = 0; j < N; j++) {
  const uint c = tid + uint(j * TG);
  xv[j] = c < uint(D) ? static_cast<float>(x[base + c]) : 0.0f;
  rv[j] = c < uint(D) ? static_cast<float>(r[base + c]) : 0.0f;
  wv[j] = c < uint(D) ? static_cast<float>(w[c]) : 0.0f;
}
float v[N];
float ss = 0.0f;
UNROLL for (int j = 0; j < N; j++) {
  const uint c = tid + uint(j * TG);
  v[j] = round_to<T>(xv[j] + rv[j]);
  if (c < uint(D)) {
    h[base + c] = static_cast<T>(v[j]);
  }
  ss += v[j] * v[j];
}

threadgroup float partial[TG / 32];
const float total = threadgroup_sum<TG>(ss, partial, thread_index_in_simdgroup, simdgroup_index_in_threadgroup);
const float n = metal::precise::rsqrt(total / float(D) + as_type<float>(uint(EPS)));

for (int j = 0; j < N; j++) {
  const uint c = tid + uint(j * TG);
  if (c < uint(D)) {
    const T hn = static_cast<T>(v[j] * n);
    y[base + c] = static_cast<T>(static_cast<float>(hn) * wv[j]);
  }
}
