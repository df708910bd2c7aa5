// Arithmetic that fused and unfused kernels must do identically, bit for bit: each step
// spelled with explicit-rounding intrinsics, so that nvcc's contraction of a * b + c into
// an fma cannot differ between two kernels computing the same value.
#pragma once

#include <cuda_runtime.h>

namespace speedrun::cuda {

// acc + a * b, one rounding (rmsnorm's sum of squares and dot product).
__device__ __forceinline__ float multiply_add(float a, float b, float acc) { return __fmaf_rn(a, b, acc); }

// rmsnorm's backward for one element: rstd (dout - out mean).
__device__ __forceinline__ float rmsnorm_gradient(float rstd, float dout, float out, float mean) {
  return __fmul_rn(rstd, __fmaf_rn(-out, mean, dout));
}

// Rotary's turn of the pair (x1, x2) = (x[i], x[i + D/2]) by theta (c = cos, s = sin, or
// -sin for the inverse): (x1 c + x2 s, -x1 s + x2 c).
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, float& y1, float& y2) {
  y1 = __fmaf_rn(x1, c, __fmul_rn(x2, s));
  y2 = __fmaf_rn(x2, c, -__fmul_rn(x1, s));
}

}  // namespace speedrun::cuda
