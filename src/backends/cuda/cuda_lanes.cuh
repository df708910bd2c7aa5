// Vectorised elementwise kernels: an op's body is written once over W consecutive elements
// ("lanes"), and runs with W = 4 (16-byte float loads and stores, 8-byte bf16 codes) where
// every pointer it names allows, else with W = 1. Memory-bound kernels reach the device's
// bandwidth only with wide accesses and several independent loads in flight per thread.
//
// Reductions that must not depend on alignment (their summation order follows W) take W
// from the shape alone and kWide = false where the pointers forbid wide accesses: the same
// W-element groups, read and written one element at a time.
//
// An op is a struct with
//   template <int W> __device__ void at(size_t g) const;  // elements [g W, g W + W)
//   bool vectorisable() const;                              // every pointer 16-byte aligned
// launched by launch_lanes(stream, op, n, name).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/cuda_common.cuh"

namespace speedrun::cuda {

template <int W>
struct Lanes {
  float v[W];
  __device__ float& operator[](int k) { return v[k]; }
  __device__ float operator[](int k) const { return v[k]; }
};

// Lanes g of a float array: p[g W .. g W + W).
template <int W, bool kWide = true>
__device__ __forceinline__ Lanes<W> load_lanes(const float* p, size_t g) {
  Lanes<W> out;
  if constexpr (W == 4 && kWide) {
    const float4 q = reinterpret_cast<const float4*>(p)[g];
    out[0] = q.x, out[1] = q.y, out[2] = q.z, out[3] = q.w;
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = p[g * W + k];
  }
  return out;
}

// Lanes g of a bf16 code array, widened to float (exact).
template <int W, bool kWide = true>
__device__ __forceinline__ Lanes<W> load_lanes(const uint16_t* p, size_t g) {
  Lanes<W> out;
  if constexpr (W == 4 && kWide) {
    const ushort4 q = reinterpret_cast<const ushort4*>(p)[g];
    out[0] = __bfloat162float(__ushort_as_bfloat16(q.x));
    out[1] = __bfloat162float(__ushort_as_bfloat16(q.y));
    out[2] = __bfloat162float(__ushort_as_bfloat16(q.z));
    out[3] = __bfloat162float(__ushort_as_bfloat16(q.w));
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = __bfloat162float(__ushort_as_bfloat16(p[g * W + k]));
  }
  return out;
}

template <int W, bool kWide = true>
__device__ __forceinline__ void store_lanes(float* p, size_t g, const Lanes<W>& x) {
  if constexpr (W == 4 && kWide) {
    reinterpret_cast<float4*>(p)[g] = make_float4(x[0], x[1], x[2], x[3]);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) p[g * W + k] = x[k];
  }
}

__device__ __forceinline__ uint16_t bf16_code(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

// codes[lanes g] = bf16(x) (nearest even), unless codes is null.
template <int W, bool kWide = true>
__device__ __forceinline__ void store_code_lanes(uint16_t* codes, size_t g, const Lanes<W>& x) {
  if (!codes) return;
  if constexpr (W == 4 && kWide) {
    reinterpret_cast<ushort4*>(codes)[g] = make_ushort4(bf16_code(x[0]), bf16_code(x[1]), bf16_code(x[2]), bf16_code(x[3]));
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) codes[g * W + k] = bf16_code(x[k]);
  }
}

// bf16 activations: with `stored`, x is rounded to bf16 in place and its codes stored.
template <int W, bool kWide = true>
__device__ __forceinline__ void keep_lanes(uint16_t* stored, size_t g, Lanes<W>& x) {
  if (!stored) return;
#pragma unroll
  for (int k = 0; k < W; ++k) x[k] = __bfloat162float(__float2bfloat16_rn(x[k]));
  store_code_lanes<W, kWide>(stored, g, x);
}

inline bool aligned_16(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Every group of W elements in a grid-stride loop, then (W > 1) the n mod W left over, one
// per thread of the first threads.
template <int W, class Op>
__global__ void lanes_kernel(Op op, size_t n) {
  const size_t groups = n / W;
  SPEEDRUN_GRID_STRIDE(g, groups) op.template at<W>(g);
  if constexpr (W > 1) {
    const size_t i = groups * W + static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) op.template at<1>(i);
  }
}

template <class Op>
void launch_lanes(cudaStream_t s, const Op& op, size_t n, const char* name) {
  if (n == 0) return;
  if (op.vectorisable()) {
    lanes_kernel<4><<<grid_for((n + 3) / 4), kThreads, 0, s>>>(op, n);
  } else {
    lanes_kernel<1><<<grid_for(n), kThreads, 0, s>>>(op, n);
  }
  check_launch(name);
}

}  // namespace speedrun::cuda
