// Pieces shared by the CUDA backend's kernel files: launch shapes, fixed-order warp and
// block reductions (deterministic: the same tree every run), and a grow-only scratch buffer.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "backends/cuda/cuda_check.cuh"

namespace speedrun::cuda {

constexpr int kThreads = 256;          // elementwise block size
constexpr unsigned kFullMask = 0xffffffffu;

// Blocks for a grid-stride loop over n elements (capped: the loop covers the rest).
inline unsigned grid_for(size_t n) {
  const size_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<size_t>(blocks, 1, 65535u * 16u));
}

#define SPEEDRUN_GRID_STRIDE(i, n)                                                                  \
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);             \
       i += static_cast<size_t>(gridDim.x) * blockDim.x)

struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <class T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Butterfly reduction: every lane ends with the same value (a + b == b + a exactly).
template <class T, class Op>
__device__ inline T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Whole-block reduction in a fixed tree (warps, then warp 0 over the warp results); every
// thread gets the result. blockDim.x must be a multiple of 32 (at most 1024); shared holds
// kBlockReduceSlots values: one per warp and the result in its own slot.
constexpr int kBlockReduceSlots = 33;
template <class T, class Op>
__device__ inline T block_reduce(T v, Op op, T identity, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_reduce(v, op);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? shared[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) shared[32] = w;
  }
  __syncthreads();
  return shared[32];
}

// A device buffer that only grows; growing waits for the stream, since queued kernels
// may still use the old buffer. Lent memory, while large enough, is served instead.
class Scratch {
 public:
  explicit Scratch(cudaStream_t stream) : stream_(stream) {}
  ~Scratch() {
    if (data_) cudaFree(data_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get(size_t bytes) {
    if (lent_ && bytes <= lent_size_) return lent_;
    if (bytes <= size_ && data_) return data_;
    SPEEDRUN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (data_) SPEEDRUN_CUDA_CHECK(cudaFree(data_));
    data_ = nullptr;
    size_ = 0;
    check_cuda(cudaMalloc(&data_, std::max<size_t>(bytes, 256)), "cudaMalloc (scratch)");
    size_ = std::max<size_t>(bytes, 256);
    return data_;
  }

  // Memory someone else owns (Backend::lend_scratch), served instead of growing while it
  // is large enough.
  void lend(void* memory, size_t bytes) {
    lent_ = memory;
    lent_size_ = bytes;
  }
  void withdraw() { lend(nullptr, 0); }

 private:
  cudaStream_t stream_;
  void* data_ = nullptr;
  size_t size_ = 0;
  void* lent_ = nullptr;
  size_t lent_size_ = 0;
};

// Cuts one scratch allocation into 256-byte-aligned pieces; run once with base = nullptr
// to measure, then again over the real buffer.
class Carver {
 public:
  explicit Carver(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(base_ ? base_ + offset_ : nullptr);
    offset_ += (count * sizeof(T) + 255) / 256 * 256;
    return p;
  }
  void* take_bytes(size_t bytes) { return take<char>(bytes); }
  size_t size() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

}  // namespace speedrun::cuda
