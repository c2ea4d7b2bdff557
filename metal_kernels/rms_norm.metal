// rms_norm: y = x * rsqrt(mean(x^2) + eps) * w over the last axis of x.
//
// Layout: one threadgroup per row. grid = (rows * TG, 1, 1), threadgroup =
// (TG, 1, 1), TG a multiple of 32 (<= 1024). Thread t of a row holds the
// N = ceil(D / TG) elements t, t + TG, t + 2 TG, ... in registers (coalesced
// loads), so x is read once. Sum of squares in float32: simd_sum within each
// SIMD-group, one partial per SIMD-group in threadgroup memory, every thread
// then adds the TG / 32 partials in the same order.
// Inputs:  x [..., D] (T; rows = the product of the leading dims), w [D] (T).
// Output:  y shaped like x (T).
// Template: T (dtype), D (row length), TG (threads per row), EPS (eps's float32 bits).
// Rounding as mx.fast.rms_norm: y = T(T(x * n) * w), n = rsqrt(mean + eps) in float32.
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

float v[N];
float wv[N];  // the weights too, loaded before the reduction waits
float ss = 0.0f;
for (int j = 0; j < N; j++) {
  const uint c = tid + uint(j * TG);
  v[j] = c < uint(D) ? static_cast<float>(x[base + c]) : 0.0f;
  wv[j] = c < uint(D) ? static_cast<float>(w[c]) : 0.0f;
  ss += v[j] * v[j];
}

threadgroup float partial[TG / 32];
const float total = threadgroup_sum<TG>(ss, partial, thread_index_in_simdgroup, simdgroup_index_in_threadgroup);
const float n = metal::precise::rsqrt(total / float(D) + as_type<float>(uint(EPS)));

for (int j = 0; j < N; j++) {
  const uint c = tid + uint(j * TG);
  if (c < uint(D)) {
    const T xn = static_cast<T>(v[j] * n);
    y[base + c] = static_cast<T>(static_cast<float>(xn) * wv[j]);
  }
}
