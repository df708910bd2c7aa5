// Deterministic embedding backward on the GPU: a stable radix sort groups the positions
// of each token id in ascending order, the runs of equal ids are listed, then each (run,
// column) sums its rows in exactly the CPU backend's order (dtable value first, then tokens
// by position), so the result is bit-identical to the CPU's and to every other run. No
// float atomics. A fixed grid strides over the runs, whose count stays on the device: no
// block is launched per token only to find it starts no run.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>

#include <algorithm>

#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kColumnThreads = 128;
// Blocks striding over the runs (times the column tiles): several per SM on an H100,
// fewer than a batch's distinct tokens.
constexpr int kRunBlocks = 1024;

// positions[t] = t. Traffic: 4 T bytes.
__global__ void iota_kernel(int32_t* positions, int T) {
  SPEEDRUN_GRID_STRIDE(t, static_cast<size_t>(T)) positions[t] = static_cast<int32_t>(t);
}

// starts[i] = 1 where sorted index i starts a run of equal ids, else 0. Traffic: 9 T bytes.
__global__ void mark_run_starts_kernel(uint8_t* starts, const int32_t* sorted_ids, int T) {
  SPEEDRUN_GRID_STRIDE(i, static_cast<size_t>(T)) {
    starts[i] = (i == 0 || sorted_ids[i] != sorted_ids[i - 1]) ? 1 : 0;
  }
}

// Block (b, column tile) takes runs b, b + gridDim.x, ... of the *run_count listed:
// dtable[id, c] += dout[pos, c] for the run's positions in ascending order, the loads of
// kInFlight positions in flight at a time (the sum's order unchanged: a frequent token's
// run is thousands long). Traffic: 4 T dim read + 8 unique-ids dim bytes.
__global__ void embedding_accumulate_kernel(float* dtable, const float* __restrict__ dout,
                                            const int32_t* __restrict__ sorted_ids,
                                            const int32_t* __restrict__ sorted_positions,
                                            const int32_t* __restrict__ run_starts, const int32_t* run_count, int T,
                                            int dim) {
  const int c = blockIdx.y * kColumnThreads + threadIdx.x;
  if (c >= dim) return;
  const int runs = *run_count;
  for (int r = blockIdx.x; r < runs; r += gridDim.x) {
    const int begin = run_starts[r], end = r + 1 < runs ? run_starts[r + 1] : T;
    float* dst = dtable + static_cast<size_t>(sorted_ids[begin]) * dim + c;
    float acc = *dst;
    constexpr int kInFlight = 16;
    int j = begin;
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
}

// The scratch the backward takes: sorted ids and positions, the run list, and cub's
// temporaries (the sort's and the selection's, which run in turn, share theirs).
struct BackwardScratch {
  int32_t *sorted_ids, *positions, *sorted_positions, *run_starts, *run_count;
  uint8_t* starts;
  void* temp;
  size_t temp_bytes;

  BackwardScratch(Carver& c, int T, size_t temp_bytes)
      : sorted_ids(c.take<int32_t>(T)),
        positions(c.take<int32_t>(T)),
        sorted_positions(c.take<int32_t>(T)),
        run_starts(c.take<int32_t>(T)),
        run_count(c.take<int32_t>(1)),
        starts(c.take<uint8_t>(T)),
        temp(c.take_bytes(temp_bytes)),
        temp_bytes(temp_bytes) {}
};

}  // namespace

void embedding_backward(cudaStream_t s, Scratch& scratch, float* dtable, const float* dout, const int32_t* tokens,
                        int T, int dim) {
  if (T <= 0 || dim <= 0) return;
  size_t sort_bytes = 0, select_bytes = 0;
  SPEEDRUN_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, tokens, static_cast<int32_t*>(nullptr),
                                                      static_cast<const int32_t*>(nullptr),
                                                      static_cast<int32_t*>(nullptr), T, 0, 32, s));
  SPEEDRUN_CUDA_CHECK(cub::DeviceSelect::Flagged(nullptr, select_bytes, static_cast<const int32_t*>(nullptr),
                                                 static_cast<const uint8_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                                 static_cast<int32_t*>(nullptr), T, s));
  const size_t temp_bytes = std::max(sort_bytes, select_bytes);
  Carver measure;
  [[maybe_unused]] const BackwardScratch counted(measure, T, temp_bytes);
  Carver cut(scratch.get(measure.size()));
  const BackwardScratch b(cut, T, temp_bytes);

  iota_kernel<<<grid_for(T), kThreads, 0, s>>>(b.positions, T);
  check_launch("iota_kernel");
  size_t bytes = b.temp_bytes;
  SPEEDRUN_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(b.temp, bytes, tokens, b.sorted_ids, b.positions,
                                                      b.sorted_positions, T, 0, 32, s));
  mark_run_starts_kernel<<<grid_for(T), kThreads, 0, s>>>(b.starts, b.sorted_ids, T);
  check_launch("mark_run_starts_kernel");
  // The sort leaves its input values alone: `positions` is still 0 .. T-1, so the selection
  // lists the sorted indices that start runs.
  bytes = b.temp_bytes;
  SPEEDRUN_CUDA_CHECK(
      cub::DeviceSelect::Flagged(b.temp, bytes, b.positions, b.starts, b.run_starts, b.run_count, T, s));
  const dim3 grid(static_cast<unsigned>(std::min(T, kRunBlocks)),
                  static_cast<unsigned>((dim + kColumnThreads - 1) / kColumnThreads));
  embedding_accumulate_kernel<<<grid, kColumnThreads, 0, s>>>(dtable, dout, b.sorted_ids, b.sorted_positions,
                                                               b.run_starts, b.run_count, T, dim);
  check_launch("embedding_accumulate_kernel");
}

}  // namespace speedrun::cuda
