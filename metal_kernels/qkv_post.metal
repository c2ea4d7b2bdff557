// qkv_post: after the fused q/k/v projection: add the bias, apply NeoX RoPE
// to q and k, split into per-head q [B, HQ, L, D], k, v [B, HKV, L, D].
//
// qkv [B, L, NH*D] with NH = HQ + 2*HKV heads: q heads, then k heads, then v.
// For a q or k head, the pair (i, i + D/2) of h = T(qkv + T(bias)) is scaled
// by mscale (rounded to T, as YaRN's `x * mscale`) and rotated by the angle
// (pos0 + l) / freqs[i]; v heads are only biased. Math in float32, rounded to
// T where the unfused ops round (after the bias add, after the mscale
// multiply, at the end), so it matches `mx.fast.rope(qkv + bias)` closely.
// Layout: one thread per pair of one head of one token:
// grid = (B*L*NH*D/2 rounded up to TG, 1, 1), threadgroup = (TG, 1, 1);
// threads past the end return at once. Consecutive threads take consecutive
// i of a head: coalesced loads (two half-rows) and stores.
// Inputs:  qkv [B, L, NH*D] (T), bias [NH*D] (BT, any float type),
//          freqs [D/2] (float32), pos0 [1] (int32).
// Outputs: q [B, HQ, L, D], k [B, HKV, L, D], v [B, HKV, L, D] (T).
// Template: T (activations), BT (bias), D (head dim), HQ, HKV (head counts), MSCALE (mscale's float32
//          bits).
// ---- body ----
constexpr uint HALF = D / 2;
constexpr uint NH = HQ + 2 * HKV;
const uint g = thread_position_in_grid.x;
const uint L = uint(qkv_shape[1]);
const uint n_pairs = uint(qkv_shape[0]) * L * NH * HALF;
if (g >= n_pairs) {
  return;
}
const uint i = g % HALF;
const uint t = g / HALF;
const uint head = t % NH;
const uint bl = t / NH;  // b * L + l
const uint l = bl % L;
const uint bb = bl / L;

const size_t in_idx = size_t(bl) * (NH * D) + head * D + i;
const uint bias_idx = head * D + i;
const float a = round_to<T>(static_cast<float>(qkv[in_idx]) + round_to<T>(static_cast<float>(bias[bias_idx])));
const float b = round_to<T>(static_cast<float>(qkv[in_idx + HALF]) + round_to<T>(static_cast<float>(bias[bias_idx + HALF])));

if (head >= HQ + HKV) {
  const size_t o = (size_t(bb * HKV + (head - HQ - HKV)) * L + l) * D + i;
  v[o] = static_cast<T>(a);
  v[o + HALF] = static_cast<T>(b);
  return;
}

const float ms = round_to<T>(as_type<float>(uint(MSCALE)));
const RotatedPair r = rope_pair(round_to<T>(a * ms), round_to<T>(b * ms), pos0[0] + int(l), freqs[i]);
const T r1 = static_cast<T>(r.first);
const T r2 = static_cast<T>(r.second);
if (head < HQ) {
  const size_t o = (size_t(bb * HQ + head) * L + l) * D + i;
  q[o] = r1;
  q[o + HALF] = r2;
} else {
  const size_t o = (size_t(bb * HKV + (head - HQ)) * L + l) * D + i;
  k[o] = r1;
  k[o + HALF] = r2;
}
