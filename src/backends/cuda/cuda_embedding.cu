// Deterministic embedding backward on the GPU: a stable radix sort groups the positions
// of each token id in ascending order, then each (id, column) sums its rows in exactly the
// CPU backend's order (dtable value first, then tokens by position), so the result is
// bit-identical to the CPU's and to every other run. No float atomics.
#include <cub/device/device_radix_sort.cuh>

#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kColumnThreads = 128;

// positions[t] = t. Traffic: 4 T bytes.
__global__ void iota_kernel(int32_t* positions, int T) {
  SPEEDRUN_GRID_STRIDE(t, static_cast<size_t>(T)) positions[t] = static_cast<int32_t>(t);
}

// The end of the run of ids equal to sorted_ids[i] that starts at i: the block scans
// blockDim.x ids at a time (a frequent token's run is thousands long). Every thread
// returns the same value.
__device__ int run_end(const int32_t* sorted_ids, int i, int T) {
  __shared__ int end;
  const int32_t id = sorted_ids[i];
  if (threadIdx.x == 0) end = T;
  __syncthreads();
  for (int base = i + 1; base < T; base += blockDim.x) {
    const int j = base + threadIdx.x;
    if (j < T && sorted_ids[j] != id) atomicMin(&end, j);  // sorted: the run ends at the first
    __syncthreads();
    const int found = end;
    __syncthreads();  // every thread has read `end` before another chunk may lower it
    if (found < T) return found;
  }
  return end;
}

// Block (i, column tile): if sorted index i starts a run of equal ids, dtable[id, c] +=
// dout[pos, c] for the run's positions in ascending order, the loads of eight positions in
// flight at a time (the sum's order unchanged). Traffic: 4 T dim read + 8 unique-ids dim
// bytes.
__global__ void embedding_accumulate_kernel(float* dtable, const float* __restrict__ dout,
                                            const int32_t* __restrict__ sorted_ids,
                                            const int32_t* __restrict__ sorted_positions, int T, int dim) {
  const int i = blockIdx.x;
  const int32_t id = sorted_ids[i];
  if (i > 0 && sorted_ids[i - 1] == id) return;  // the whole block: not a run's start
  const int end = run_end(sorted_ids, i, T);
  const int c = blockIdx.y * kColumnThreads + threadIdx.x;
  if (c >= dim) return;
  float* dst = dtable + static_cast<size_t>(id) * dim + c;
  float acc = *dst;
  constexpr int kInFlight = 8;
  int j = i;
  for (; j + kInFlight <= end; j += kInFlight) {
    float rows[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) rows[k] = dout[static_cast<size_t>(sorted_positions[j + k]) * dim + c];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) acc += rows[k];
  }
  for (; j < end; ++j) acc += dout[static_cast<size_t>(sorted_positions[j]) * dim + c];
  *dst = acc;
}

}  // namespace

void embedding_backward(cudaStream_t s, Scratch& scratch, float* dtable, const float* dout, const int32_t* tokens,
                        int T, int dim) {
  if (T <= 0 || dim <= 0) return;
  size_t sort_bytes = 0;
  SPEEDRUN_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, tokens, static_cast<int32_t*>(nullptr),
                                                      static_cast<const int32_t*>(nullptr),
                                                      static_cast<int32_t*>(nullptr), T, 0, 32, s));
  auto carve = [&](Carver& c, int32_t** ids, int32_t** pos_in, int32_t** pos_out, void** temp) {
    *ids = c.take<int32_t>(T);
    *pos_in = c.take<int32_t>(T);
    *pos_out = c.take<int32_t>(T);
    *temp = c.take_bytes(sort_bytes);
  };
  int32_t *sorted_ids, *positions, *sorted_positions;
  void* temp;
  Carver measure;
  carve(measure, &sorted_ids, &positions, &sorted_positions, &temp);
  Carver cut(scratch.get(measure.size()));
  carve(cut, &sorted_ids, &positions, &sorted_positions, &temp);

  iota_kernel<<<grid_for(T), kThreads, 0, s>>>(positions, T);
  check_launch("iota_kernel");
  SPEEDRUN_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, sort_bytes, tokens, sorted_ids, positions,
                                                      sorted_positions, T, 0, 32, s));
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((dim + kColumnThreads - 1) / kColumnThreads));
  embedding_accumulate_kernel<<<grid, kColumnThreads, 0, s>>>(dtable, dout, sorted_ids, sorted_positions, T, dim);
  check_launch("embedding_accumulate_kernel");
}

}  // namespace speedrun::cuda
