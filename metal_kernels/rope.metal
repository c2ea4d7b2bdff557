// rope: NeoX-style rotary embedding (rotate halves) of x [B, H, L, D].
//
// Element pair (i, i + D/2) of the row at sequence index l is rotated by the
// angle (pos0 + l) / freqs[i] (freqs as mx.fast.rope takes them: base^(2i/D),
// or YaRN's). x is first multiplied by mscale (rounded to T, as `x * mscale`
// in MLX), so this also reproduces mlx-lm's YarnRoPE.
// Layout: one thread per pair: grid = (B*H*L*D/2 rounded up to TG, 1, 1),
// threadgroup = (TG, 1, 1); threads past the last pair return at once. The
// threads of a row touch two contiguous half-rows (coalesced).
// Inputs:  x [B, H, L, D] (T), freqs [D/2] (float32), pos0 [1] (int32).
// Output:  out [B, H, L, D] (T).
// Template: T (dtype), D (head dim, even), MSCALE (mscale's float32 bits).
// Math in float32; one rounding to T at the end (as mx.fast.rope).
// ---- body ----
constexpr uint HALF = D / 2;
const uint g = thread_position_in_grid.x;
const uint L = uint(x_shape[2]);
const uint n_pairs = uint(x_shape[0]) * uint(x_shape[1]) * L * HALF;
if (g >= n_pairs) {
  return;
}
const uint i = g % HALF;
const uint row = g / HALF;  // (b, h, l) flattened
const uint l = row % L;

const float ms = round_to<T>(as_type<float>(uint(MSCALE)));
const size_t a_idx = size_t(row) * D + i;
const float a = round_to<T>(static_cast<float>(x[a_idx]) * ms);
const float b = round_to<T>(static_cast<float>(x[a_idx + HALF]) * ms);

const RotatedPair r = rope_pair(a, b, pos0[0] + int(l), freqs[i]);
out[a_idx] = static_cast<T>(r.first);
out[a_idx + HALF] = static_cast<T>(r.second);
