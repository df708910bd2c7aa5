// The bf16/FP8 rounding emulation of backends/low_precision.h: every FP8 code, ties to
// even, subnormals, saturation, and (when the CUDA headers are present) agreement with the
// CUDA toolkit's host conversion functions on millions of floats, an independent oracle.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backends/low_precision.h"

#if __has_include(<cuda_fp8.h>) && __has_include(<cuda_bf16.h>)
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#define SPEEDRUN_HAVE_CUDA_FP8_HEADERS 1
#endif

namespace speedrun::lowp {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct FormatCase {
  Fp8Format format;
  const char* name;
  int exponent_bits, mantissa_bits, bias;
};
constexpr FormatCase kFormats[] = {{Fp8Format::kE4M3, "e4m3", 4, 3, 7}, {Fp8Format::kE5M2, "e5m2", 5, 2, 15}};

// The value of an FP8 code straight from the textbook definition of its fields, in double.
double value_from_fields(uint8_t code, const FormatCase& f) {
  const int sign = code >> 7;
  const int exponent = (code >> f.mantissa_bits) & ((1 << f.exponent_bits) - 1);
  const int mantissa = code & ((1 << f.mantissa_bits) - 1);
  const int exponent_all_ones = (1 << f.exponent_bits) - 1;
  const double s = sign ? -1.0 : 1.0;
  if (f.format == Fp8Format::kE4M3 && exponent == exponent_all_ones && mantissa == (1 << f.mantissa_bits) - 1) {
    return std::nan("");
  }
  if (f.format == Fp8Format::kE5M2 && exponent == exponent_all_ones) {
    return mantissa == 0 ? s * HUGE_VAL : std::nan("");
  }
  const double m = static_cast<double>(mantissa) / std::pow(2.0, f.mantissa_bits);
  if (exponent == 0) return s * m * std::pow(2.0, 1 - f.bias);
  return s * (1.0 + m) * std::pow(2.0, exponent - f.bias);
}

TEST(LowPrecision, EveryFp8CodeDecodesToItsFieldValueAndFiniteOnesReencodeToThemselves) {
  for (const FormatCase& f : kFormats) {
    SCOPED_TRACE(f.name);
    int nan_codes = 0, infinity_codes = 0;
    for (int c = 0; c < 256; ++c) {
      const uint8_t code = static_cast<uint8_t>(c);
      const double want = value_from_fields(code, f);
      const float got = decode_fp8(code, f.format);
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got)) << "code " << c;
        ++nan_codes;
        continue;
      }
      EXPECT_EQ(static_cast<double>(got), want) << "code " << c;
      EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << "code " << c;
      if (std::isinf(want)) {  // e5m2's infinities saturate like every other overflow
        EXPECT_EQ(encode_fp8(got, f.format), (c & 0x80) | 0x7B) << "code " << c;
        ++infinity_codes;
        continue;
      }
      EXPECT_EQ(encode_fp8(got, f.format), code) << "code " << c;
      EXPECT_EQ(std::bit_cast<uint32_t>(round_to_fp8(got, f.format)), std::bit_cast<uint32_t>(got)) << "code " << c;
    }
    EXPECT_EQ(nan_codes, f.format == Fp8Format::kE4M3 ? 2 : 6);
    EXPECT_EQ(infinity_codes, f.format == Fp8Format::kE4M3 ? 0 : 2);
  }
}

TEST(LowPrecision, Fp8LandmarkValues) {
  EXPECT_EQ(decode_fp8(0x7E, Fp8Format::kE4M3), 448.f);
  EXPECT_EQ(decode_fp8(0x01, Fp8Format::kE4M3), 0x1p-9f);
  EXPECT_EQ(decode_fp8(0x08, Fp8Format::kE4M3), 0x1p-6f);
  EXPECT_EQ(decode_fp8(0x38, Fp8Format::kE4M3), 1.f);
  EXPECT_EQ(decode_fp8(0xB8, Fp8Format::kE4M3), -1.f);
  EXPECT_EQ(decode_fp8(0x7B, Fp8Format::kE5M2), 57344.f);
  EXPECT_EQ(decode_fp8(0x7C, Fp8Format::kE5M2), kInf);
  EXPECT_EQ(decode_fp8(0x01, Fp8Format::kE5M2), 0x1p-16f);
  EXPECT_EQ(decode_fp8(0x3C, Fp8Format::kE5M2), 1.f);
  EXPECT_EQ(encode_fp8(1.f, Fp8Format::kE4M3), 0x38);
  EXPECT_EQ(encode_fp8(-0.f, Fp8Format::kE4M3), 0x80);
}

// Every midpoint between neighbouring finite FP8 values of one sign goes to the neighbour
// whose code is even, and the floats on either side of it go to the nearer neighbour.
TEST(LowPrecision, Fp8HalfwayCasesRoundToEven) {
  for (const FormatCase& f : kFormats) {
    SCOPED_TRACE(f.name);
    const Fp8Spec spec = fp8_spec(f.format);
    for (int c = 0; c < 0x7F; ++c) {
      const float lo = decode_fp8(static_cast<uint8_t>(c), f.format);
      const float hi = decode_fp8(static_cast<uint8_t>(c + 1), f.format);
      if (!(hi <= spec.max_finite)) break;  // past the largest finite value
      const float mid = (lo + hi) / 2;      // exact: both have few significant bits
      ASSERT_LT(lo, mid);
      ASSERT_LT(mid, hi);
      const float even = (c % 2 == 0) ? lo : hi;
      for (float sign : {1.f, -1.f}) {
        SCOPED_TRACE("between codes " + std::to_string(c) + " and " + std::to_string(c + 1) + " sign " +
                     std::to_string(sign));
        EXPECT_EQ(round_to_fp8(sign * mid, f.format), sign * even);
        EXPECT_EQ(round_to_fp8(sign * std::nextafter(mid, 0.f), f.format), sign * lo);
        EXPECT_EQ(round_to_fp8(sign * std::nextafter(mid, kInf), f.format), sign * hi);
      }
    }
  }
}

TEST(LowPrecision, Fp8Subnormals) {
  // e4m3's quantum below 2^-6 is 2^-9; e5m2's below 2^-14 is 2^-16.
  EXPECT_EQ(round_to_fp8(0x1p-10f, Fp8Format::kE4M3), 0.f);  // tie with 0: even
  EXPECT_EQ(round_to_fp8(std::nextafter(0x1p-10f, 1.f), Fp8Format::kE4M3), 0x1p-9f);
  EXPECT_EQ(round_to_fp8(3 * 0x1p-10f, Fp8Format::kE4M3), 0x1p-8f);  // tie between 1 and 2 quanta
  EXPECT_EQ(round_to_fp8(5 * 0x1p-10f, Fp8Format::kE4M3), 0x1p-8f);  // tie between 2 and 3 quanta
  EXPECT_EQ(round_to_fp8(7 * 0x1p-9f + 0x1p-11f, Fp8Format::kE4M3), 7 * 0x1p-9f);
  EXPECT_EQ(round_to_fp8(15 * 0x1p-10f, Fp8Format::kE4M3), 0x1p-6f);  // up into the normals
  EXPECT_EQ(encode_fp8(3 * 0x1p-9f, Fp8Format::kE4M3), 0x03);
  EXPECT_EQ(round_to_fp8(0x1p-17f, Fp8Format::kE5M2), 0.f);
  EXPECT_EQ(round_to_fp8(-3 * 0x1p-17f, Fp8Format::kE5M2), -0x1p-15f);
  EXPECT_EQ(encode_fp8(3 * 0x1p-16f, Fp8Format::kE5M2), 0x03);
  EXPECT_EQ(round_to_fp8(1e-30f, Fp8Format::kE4M3), 0.f);
  EXPECT_TRUE(std::signbit(round_to_fp8(-1e-30f, Fp8Format::kE4M3)));
  EXPECT_EQ(round_to_fp8(std::numeric_limits<float>::denorm_min(), Fp8Format::kE5M2), 0.f);
}

TEST(LowPrecision, Fp8SaturatesAtTheLargestFiniteValueAndKeepsNaN) {
  for (float x : {448.f, 449.f, 463.f, 464.f, 465.f, 1e6f, 3e38f, kInf}) {
    EXPECT_EQ(round_to_fp8(x, Fp8Format::kE4M3), 448.f) << x;
    EXPECT_EQ(round_to_fp8(-x, Fp8Format::kE4M3), -448.f) << x;
    EXPECT_EQ(encode_fp8(x, Fp8Format::kE4M3), 0x7E) << x;
  }
  for (float x : {57344.f, 61439.f, 61440.f, 65536.f, 1e9f, kInf}) {
    EXPECT_EQ(round_to_fp8(x, Fp8Format::kE5M2), 57344.f) << x;
    EXPECT_EQ(round_to_fp8(-x, Fp8Format::kE5M2), -57344.f) << x;
    EXPECT_EQ(encode_fp8(-x, Fp8Format::kE5M2), 0xFB) << x;
  }
  // Just below the top the rounding is ordinary.
  EXPECT_EQ(round_to_fp8(420.f, Fp8Format::kE4M3), 416.f);
  EXPECT_EQ(round_to_fp8(432.f, Fp8Format::kE4M3), 448.f);  // tie 416/448: 448 is even (0x7E)
  for (Fp8Format f : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
    EXPECT_TRUE(std::isnan(round_to_fp8(kNaN, f)));
    EXPECT_TRUE(std::isnan(decode_fp8(encode_fp8(kNaN, f), f)));
    EXPECT_TRUE(std::isnan(decode_fp8(encode_fp8(-kNaN, f), f)));
  }
}

TEST(LowPrecision, Bf16RoundsToNearestEven) {
  EXPECT_EQ(round_to_bf16(1.f + 0x1p-8f), 1.f);                       // tie: 1 is even
  EXPECT_EQ(round_to_bf16(1.f + 3 * 0x1p-8f), 1.f + 0x1p-6f);         // tie: up to the even one
  EXPECT_EQ(round_to_bf16(std::nextafter(1.f + 0x1p-8f, 2.f)), 1.f + 0x1p-7f);
  EXPECT_EQ(round_to_bf16(-(1.f + 0x1p-8f + 0x1p-20f)), -(1.f + 0x1p-7f));
  EXPECT_EQ(encode_bf16(1.f), 0x3F80);
  EXPECT_EQ(decode_bf16(0xC000), -2.f);
  // Subnormal floats round on the same grid (bf16 keeps float's exponent range).
  EXPECT_EQ(round_to_bf16(std::bit_cast<float>(0x00008000u)), 0.f);  // tie with 0
  EXPECT_EQ(round_to_bf16(std::bit_cast<float>(0x00018000u)), std::bit_cast<float>(0x00020000u));
  // Overflow is IEEE's: past half an ulp above the largest bf16 value comes infinity.
  EXPECT_EQ(round_to_bf16(std::numeric_limits<float>::max()), kInf);
  EXPECT_EQ(round_to_bf16(std::bit_cast<float>(0x7F7F7FFFu)), std::bit_cast<float>(0x7F7F0000u));
  EXPECT_EQ(round_to_bf16(-kInf), -kInf);
  EXPECT_TRUE(std::isnan(round_to_bf16(kNaN)));
  // A NaN whose payload sits only in the dropped bits must not turn into infinity.
  EXPECT_TRUE(std::isnan(round_to_bf16(std::bit_cast<float>(0x7F800001u))));
  EXPECT_TRUE(std::isnan(round_to_bf16(std::bit_cast<float>(0xFF800001u))));
}

TEST(LowPrecision, ScaledRoundingAppliesTheScaleBeforeTheOneRounding) {
  const std::vector<float> in = {1.f, 100.f, 300.f, -0.0123f, 1e-4f};
  std::vector<float> out(in.size());
  scaled_round_to_fp8(out.data(), in.data(), in.size(), 2.f, Fp8Format::kE4M3);
  for (size_t i = 0; i < in.size(); ++i) EXPECT_EQ(out[i], round_to_fp8(in[i] * 2.f, Fp8Format::kE4M3)) << i;
  EXPECT_EQ(out[2], 448.f);  // 600 saturates
  std::vector<float> b = {1.f + 0x1p-8f, 3.14159f};
  round_to_bf16_inplace(b.data(), b.size());
  EXPECT_EQ(b[0], 1.f);
  EXPECT_EQ(b[1], round_to_bf16(3.14159f));
}

#ifdef SPEEDRUN_HAVE_CUDA_FP8_HEADERS

// Floats to compare with the toolkit: every bit pattern at a stride (all signs, exponents,
// NaNs and infinities), every float at a finer stride across FP8's range, and random
// values of the magnitudes the lm_head sees.
std::vector<float> oracle_inputs() {
  std::vector<float> xs;
  for (uint64_t bits = 0; bits <= 0xFFFFFFFFull; bits += 1021) xs.push_back(std::bit_cast<float>(static_cast<uint32_t>(bits)));
  const uint32_t lo = std::bit_cast<uint32_t>(0x1p-20f), hi = std::bit_cast<uint32_t>(0x1p17f);
  for (uint32_t bits = lo; bits < hi; bits += 97) {
    xs.push_back(std::bit_cast<float>(bits));
    xs.push_back(-std::bit_cast<float>(bits));
  }
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int i = 0; i < 1000000; ++i) xs.push_back(normal(rng) * std::ldexp(1.f, static_cast<int>(rng() % 40) - 20));
  return xs;
}

TEST(LowPrecision, MatchesTheCudaToolkitHostConversionsOnMillionsOfFloats) {
  const std::vector<float> xs = oracle_inputs();
  ASSERT_GT(xs.size(), 5000000u);
  struct Oracle { Fp8Format format; __nv_fp8_interpretation_t cuda; const char* name; };
  for (const Oracle o : {Oracle{Fp8Format::kE4M3, __NV_E4M3, "e4m3"}, Oracle{Fp8Format::kE5M2, __NV_E5M2, "e5m2"}}) {
    SCOPED_TRACE(o.name);
    size_t mismatches = 0;
    for (float x : xs) {
      const uint8_t want = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, o.cuda);
      const uint8_t got = encode_fp8(x, o.format);
      const bool same = std::isnan(x) ? std::isnan(decode_fp8(got, o.format)) &&
                                            std::isnan(decode_fp8(want, o.format))
                                      : got == want;
      if (!same && ++mismatches <= 10) {
        ADD_FAILURE() << "x = " << x << " (bits 0x" << std::hex << std::bit_cast<uint32_t>(x) << "): got 0x"
                      << int{got} << ", toolkit 0x" << int{want} << std::dec;
      }
      if (!std::isnan(x) && round_to_fp8(x, o.format) != decode_fp8(want, o.format)) ++mismatches;
    }
    EXPECT_EQ(mismatches, 0u);
  }
  size_t mismatches = 0;
  for (float x : xs) {
    const __nv_bfloat16_raw raw = __float2bfloat16_rn(x);
    const uint16_t got = encode_bf16(x);
    const bool same = std::isnan(x) ? std::isnan(decode_bf16(got)) && std::isnan(decode_bf16(raw.x)) : got == raw.x;
    if (!same && ++mismatches <= 10) {
      ADD_FAILURE() << "bf16 of " << x << ": got 0x" << std::hex << got << ", toolkit 0x" << raw.x << std::dec;
    }
  }
  EXPECT_EQ(mismatches, 0u);
}

TEST(LowPrecision, DecodesLikeTheCudaToolkit) {
  for (const auto& [format, cuda] : {std::pair{Fp8Format::kE4M3, __NV_E4M3}, std::pair{Fp8Format::kE5M2, __NV_E5M2}}) {
    for (int c = 0; c < 256; ++c) {
      const __half_raw half = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(c), cuda);
      const float want = __half2float(__half(half));
      const float got = decode_fp8(static_cast<uint8_t>(c), format);
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got)) << c;
      } else {
        EXPECT_EQ(got, want) << c;
      }
    }
  }
}

#else

TEST(LowPrecision, MatchesTheCudaToolkitHostConversionsOnMillionsOfFloats) {
  GTEST_SKIP() << "no CUDA toolkit headers (cuda_fp8.h) on this build's include path";
}

#endif

}  // namespace
}  // namespace speedrun::lowp
