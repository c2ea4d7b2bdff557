// swiglu: out = silu(gate) * up, gate_up = [gate | up] along the last axis.
//
// gate_up [..., 2*I] is the fused gate/up projection output: gate is the
// first I columns of a row, up the last I. silu(g) = g * sigmoid(g) in
// float32, one rounding to T at the end.
// Layout: one thread per output element: grid = (rows*I rounded up to TG, 1, 1),
// threadgroup = (TG, 1, 1); threads past the end return at once.
// Input:   gate_up [..., 2*I] (T).    Output: out [..., I] (T).
// Template: T (dtype), I (intermediate size).
// ---- body ----
const uint g = thread_position_in_grid.x;
uint rows = 1;  // gate_up may have any leading dimensions: rows is their product
for (int i = 0; i + 1 < int(gate_up_ndim); i++) {
  rows *= uint(gate_up_shape[i]);
}
if (g >= rows * uint(I)) {
  return;
}
const uint row = g / uint(I);
const uint j = g % uint(I);
const size_t in_idx = size_t(row) * (2 * I) + j;
const float gate = static_cast<float>(gate_up[in_idx]);
const float up = static_cast<float>(gate_up[in_idx + I]);
const float sig = 1.0f / (1.0f + metal::exp(-gate));
out[g] = static_cast<T>(gate * sig * up);
