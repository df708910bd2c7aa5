// Each token's document range [start, end) from per-token document ids, on the device:
// what both attention kernels (the float32 reference and the flash kernel) mask with.
#include <cub/device/device_scan.cuh>

#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {
namespace {

struct IntMax {
  __host__ __device__ int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
};

// start_key[t] = t where a document starts, else 0; rev_end_key[T-1-t] = T-1-t where one
// ends, else 0. Max-scans turn these into each token's document start and (reversed)
// end. Traffic: 12 T bytes.
__global__ void document_keys_kernel(int32_t* start_key, int32_t* rev_end_key, const int32_t* doc, int T) {
  SPEEDRUN_GRID_STRIDE(i, static_cast<size_t>(T)) {
    const int t = static_cast<int>(i);
    start_key[t] = (t == 0 || doc[t] != doc[t - 1]) ? t : 0;
    const int r = T - 1 - t;
    rev_end_key[r] = (t == T - 1 || doc[t] != doc[t + 1]) ? r : 0;
  }
}

// end[t] = T - (scanned reversed key at T-1-t): one past the last token of t's document.
// Traffic: 8 T bytes.
__global__ void document_end_kernel(int32_t* end, const int32_t* rev_scanned, int T) {
  SPEEDRUN_GRID_STRIDE(i, static_cast<size_t>(T)) {
    const int t = static_cast<int>(i);
    end[t] = T - rev_scanned[T - 1 - t];
  }
}

size_t scan_bytes(int T) {
  size_t bytes = 0;
  SPEEDRUN_CUDA_CHECK(cub::DeviceScan::InclusiveScan(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                                     static_cast<int32_t*>(nullptr), IntMax{}, T));
  return bytes;
}

struct BoundsScratch {
  int32_t* start_key;
  int32_t* rev_end_key;
  int32_t* rev_scanned;
  void* scan_temp;
};

BoundsScratch carve(Carver& c, int T, size_t scan) {
  BoundsScratch b;
  b.start_key = c.take<int32_t>(T);
  b.rev_end_key = c.take<int32_t>(T);
  b.rev_scanned = c.take<int32_t>(T);
  b.scan_temp = c.take_bytes(scan);
  return b;
}

}  // namespace

size_t document_bounds_scratch_bytes(int T) {
  Carver c;
  carve(c, T, scan_bytes(T));
  return c.size();
}

void document_bounds(cudaStream_t s, void* scratch, int32_t* start, int32_t* end, const int32_t* doc, int T) {
  if (T <= 0) return;
  const size_t scan = scan_bytes(T);
  Carver c(scratch);
  const BoundsScratch b = carve(c, T, scan);
  document_keys_kernel<<<grid_for(T), kThreads, 0, s>>>(b.start_key, b.rev_end_key, doc, T);
  check_launch("document_keys_kernel");
  size_t bytes = scan;
  SPEEDRUN_CUDA_CHECK(cub::DeviceScan::InclusiveScan(b.scan_temp, bytes, b.start_key, start, IntMax{}, T, s));
  bytes = scan;
  SPEEDRUN_CUDA_CHECK(cub::DeviceScan::InclusiveScan(b.scan_temp, bytes, b.rev_end_key, b.rev_scanned, IntMax{}, T, s));
  document_end_kernel<<<grid_for(T), kThreads, 0, s>>>(end, b.rev_scanned, T);
  check_launch("document_end_kernel");
}

}  // namespace speedrun::cuda
