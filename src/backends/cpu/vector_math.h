// Vectorisable float exp for the CPU backend's hot loops (softmax, softcap).
// Cody-Waite range reduction x = n ln2 + r and Cephes' degree-6 polynomial for e^r:
// within 2 ulp of std::exp over [-87, 88]; other inputs are clamped to that range, NaN
// passes through.
#pragma once

#include <cstdint>
#include <bit>

// A hot loop's function compiled twice by GCC's function multiversioning: for AVX-512
// (x86-64-v4) and for the build's baseline (x86-64-v3); the loader runs the one the CPU
// supports. Vector sums then differ in their last bits between CPUs of the two kinds, as
// OpenBLAS's kernels (chosen per CPU) already make every product differ. Not under the
// sanitizers: the loader runs the clones' resolver before ThreadSanitizer's runtime is up,
// and an instrumented resolver crashes the program at start-up.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__) && \
    !defined(__SANITIZE_ADDRESS__)
#define SPEEDRUN_AVX512_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define SPEEDRUN_AVX512_CLONES
#endif

namespace speedrun::cpu {

inline float exp_approx(float x) {
  const float input = x;
  x = x > -87.0f ? x : -87.0f;  // ternaries, not fmaxf/fminf: those are library calls here
  x = x < 88.0f ? x : 88.0f;    // (NaN becomes -87 here; the end gives it back)
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  // NaN in, NaN out, as std::exp: a NaN logit must reach the loss and the fault check.
  return input == input ? e * std::bit_cast<float>(bits) : input;
}

}  // namespace speedrun::cpu
