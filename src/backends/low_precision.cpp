// Bit-exact CPU emulation of bfloat16 and FP8 (e4m3fn, e5m2) rounding: round to nearest
// even, FP8 saturating. The CUDA toolkit's host conversions serve as the test oracle.
#include "backends/low_precision.h"

#include <bit>
#include <cmath>
#include <limits>

namespace speedrun::lowp {
namespace {

constexpr int kFloatMantissaBits = 23;

// Rounds the float mantissa of a positive finite normal float to `keep` bits, ties to
// even, by adding just under half of the dropped part plus the kept part's lowest bit.
// A carry out of the mantissa moves into the exponent, which is the right result.
float round_mantissa(float a, int keep) {
  const int drop = kFloatMantissaBits - keep;
  uint32_t bits = std::bit_cast<uint32_t>(a);
  const uint32_t lowest_kept = (bits >> drop) & 1u;
  bits += ((1u << (drop - 1)) - 1u) + lowest_kept;
  bits &= ~((1u << drop) - 1u);
  return std::bit_cast<float>(bits);
}

// Rounds a in [0, min_normal) to a multiple of the subnormal quantum q, ties to even:
// around 2^23 q the float spacing is exactly q, so the addition does the rounding (in the
// default rounding mode) and the subtraction is exact.
float round_subnormal(float a, float quantum) {
  const float magic = quantum * 8388608.f;  // 2^23 q
  const float shifted = a + magic;
  return shifted - magic;
}

}  // namespace

Fp8Spec fp8_spec(Fp8Format format) {
  if (format == Fp8Format::kE4M3) return Fp8Spec{3, 7, 448.f, 0x1p-6f, 0x1p-9f};
  return Fp8Spec{2, 15, 57344.f, 0x1p-14f, 0x1p-16f};
}

float round_to_fp8(float x, Fp8Format format) {
  if (std::isnan(x)) return x;
  const Fp8Spec s = fp8_spec(format);
  // Saturate first: max_finite rounds to itself, and nothing below it rounds above it.
  const float a = std::fmin(std::fabs(x), s.max_finite);
  const float r = a < s.min_normal ? round_subnormal(a, s.subnormal_quantum) : round_mantissa(a, s.mantissa_bits);
  return std::copysign(r, x);
}

uint8_t encode_fp8(float x, Fp8Format format) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  if (std::isnan(x)) return sign | 0x7F;  // a NaN in both formats
  const Fp8Spec s = fp8_spec(format);
  const float r = std::fabs(round_to_fp8(x, format));
  if (r < s.min_normal) {  // exponent field 0: the mantissa counts quanta
    return sign | static_cast<uint8_t>(r / s.subnormal_quantum);
  }
  int e = 0;
  const float fraction = std::frexp(r, &e);  // r = fraction * 2^e, fraction in [0.5, 1)
  const int exponent_field = e - 1 + s.exponent_bias;
  const int mantissa = static_cast<int>((fraction * 2.f - 1.f) * static_cast<float>(1 << s.mantissa_bits));
  return sign | static_cast<uint8_t>((exponent_field << s.mantissa_bits) | mantissa);
}

float decode_fp8(uint8_t code, Fp8Format format) {
  const Fp8Spec s = fp8_spec(format);
  const bool negative = code & 0x80;
  const int mantissa_mask = (1 << s.mantissa_bits) - 1;
  const int mantissa = code & mantissa_mask;
  const int exponent_field = (code & 0x7F) >> s.mantissa_bits;
  const int exponent_max = 0x7F >> s.mantissa_bits;
  float value;
  if (format == Fp8Format::kE4M3 && exponent_field == exponent_max && mantissa == mantissa_mask) {
    value = std::numeric_limits<float>::quiet_NaN();
  } else if (format == Fp8Format::kE5M2 && exponent_field == exponent_max) {
    value = mantissa == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  } else if (exponent_field == 0) {
    value = static_cast<float>(mantissa) * s.subnormal_quantum;
  } else {
    const float significand = 1.f + static_cast<float>(mantissa) / static_cast<float>(1 << s.mantissa_bits);
    value = std::ldexp(significand, exponent_field - s.exponent_bias);
  }
  return negative ? -value : value;
}

void scaled_round_to_fp8(float* out, const float* in, size_t n, float scale, Fp8Format format) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) out[i] = round_to_fp8(in[i] * scale, format);
}

void round_to_bf16_inplace(float* x, size_t n) { copy_rounded_to_bf16(x, x, n); }

void copy_rounded_to_bf16(float* out, const float* in, size_t n) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) out[i] = round_to_bf16(in[i]);
}

}  // namespace speedrun::lowp
