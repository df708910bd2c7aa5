// CPU emulation of the GPU's low-precision number formats: bfloat16 and the two FP8
// formats of the lm_head (SPEC §6), as rounding float -> float and as 8/16-bit codes.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>

namespace speedrun::lowp {

// e4m3 is the "fn" variant (no infinities; S.1111.111 is NaN; largest finite 448);
// e5m2 is IEEE-like (infinities, NaNs; largest finite 57344).
enum class Fp8Format { kE4M3, kE5M2 };

struct Fp8Spec {
  int mantissa_bits;
  int exponent_bias;
  float max_finite;
  float min_normal;         // 2^(1 - bias)
  float subnormal_quantum;  // 2^(1 - bias - mantissa_bits): the spacing below min_normal
};
Fp8Spec fp8_spec(Fp8Format format);

// Rounds to the nearest FP8 value, ties to even, saturating at +-max_finite (infinities
// included: SPEC §6's deliberate choice; the reference's casts overflowed to NaN). NaN
// stays NaN; the sign of zero is kept. The result is a float holding an FP8 value exactly.
float round_to_fp8(float x, Fp8Format format);
uint8_t encode_fp8(float x, Fp8Format format);  // the code of round_to_fp8(x); NaN -> S.1111111
float decode_fp8(uint8_t code, Fp8Format format);

// Rounds to the nearest bfloat16, ties to even, IEEE overflow (to infinity, as
// __float2bfloat16_rn does: float and bfloat16 share their exponent range, so only values
// within half a bf16 ulp of FLT_MAX overflow). NaN stays NaN.
// Inline: the CPU backend's bf16 activation loops call them per element.
inline uint16_t encode_bf16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  if (x != x) return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // NaN: keep it a (quiet) NaN
  const uint32_t lowest_kept = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7FFFu + lowest_kept) >> 16);
}
inline float decode_bf16(uint16_t code) { return std::bit_cast<float>(static_cast<uint32_t>(code) << 16); }
inline float round_to_bf16(float x) { return decode_bf16(encode_bf16(x)); }

// out[i] = round_to_fp8(in[i] * scale) for i < n (scale a power of two keeps the product
// exact, so this is a single rounding).
void scaled_round_to_fp8(float* out, const float* in, size_t n, float scale, Fp8Format format);
// x[i] = round_to_bf16(x[i]).
void round_to_bf16_inplace(float* x, size_t n);
// out[i] = round_to_bf16(in[i]) for i < n.
void copy_rounded_to_bf16(float* out, const float* in, size_t n);

}  // namespace speedrun::lowp
