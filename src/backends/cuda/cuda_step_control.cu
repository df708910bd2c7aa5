// Small kernels that let a training step run without the host waiting on the device:
// the device-side fault flag, int32 fills, and the per-token document ids of a sequence.
#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kScanThreads = 1024;  // document_ids: one block scans the whole sequence

// dst[i] = value. Traffic: 4 n bytes.
__global__ void fill_i32_kernel(int32_t* dst, int32_t value, size_t n) {
  SPEEDRUN_GRID_STRIDE(i, n) dst[i] = value;
}

// flag[0] = 1 if any x[i] is NaN or +-inf. Traffic: 4 n bytes read; at most one store per
// warp that saw a bad value (all store the same 1, so the race is benign).
__global__ void flag_nonfinite_kernel(int32_t* flag, const float* x, size_t n) {
  bool bad = false;
  SPEEDRUN_GRID_STRIDE(i, n) bad |= !isfinite(x[i]);
  if (__any_sync(kFullMask, bad) && threadIdx.x % 32 == 0) *flag = 1;
}

// doc[t] = number of separators in tokens[0..t]: each thread counts its contiguous chunk,
// a block-wide exclusive scan of the counts gives each chunk's start, then each thread
// writes its chunk. One block (sequences are at most a few hundred thousand tokens).
// Traffic: 8 T bytes (tokens read twice from L2 in practice, doc written once).
__global__ void __launch_bounds__(kScanThreads) document_ids_kernel(int32_t* doc, const int32_t* tokens, int T, int32_t separator) {
  __shared__ int32_t warp_totals[32];
  const int chunk = (T + blockDim.x - 1) / blockDim.x;
  const int begin = min(T, static_cast<int>(threadIdx.x) * chunk);
  const int end = min(T, begin + chunk);
  int32_t count = 0;
  for (int t = begin; t < end; ++t) count += tokens[t] == separator;
  // Inclusive scan within the warp, then over the warp totals.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int32_t inclusive = count;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int32_t other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    int32_t total = lane < warps ? warp_totals[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int32_t other = __shfl_up_sync(kFullMask, total, offset);
      if (lane >= offset) total += other;
    }
    if (lane < warps) warp_totals[lane] = total;  // inclusive prefix over warps
  }
  __syncthreads();
  int32_t running = inclusive - count + (warp > 0 ? warp_totals[warp - 1] : 0);
  for (int t = begin; t < end; ++t) {
    running += tokens[t] == separator;
    doc[t] = running;
  }
}

}  // namespace

void fill_i32(cudaStream_t s, int32_t* dst, int32_t value, size_t count) {
  if (count == 0) return;
  fill_i32_kernel<<<grid_for(count), kThreads, 0, s>>>(dst, value, count);
  check_launch("fill_i32_kernel");
}

void flag_nonfinite(cudaStream_t s, int32_t* flag, const float* x, size_t n) {
  if (n == 0) return;
  flag_nonfinite_kernel<<<std::min(grid_for(n), 4096u), kThreads, 0, s>>>(flag, x, n);
  check_launch("flag_nonfinite_kernel");
}

void document_ids(cudaStream_t s, int32_t* doc, const int32_t* tokens, int T, int32_t separator) {
  if (T <= 0) return;
  document_ids_kernel<<<1, kScanThreads, 0, s>>>(doc, tokens, T, separator);
  check_launch("document_ids_kernel");
}

}  // namespace speedrun::cuda
