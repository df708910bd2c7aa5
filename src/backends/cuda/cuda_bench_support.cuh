// What the kernel benchmarks (the flash kernel's, the matmul sweep) share: device memory
// freed with its scope, and their clock.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "backends/cuda/cuda_check.cuh"

namespace speedrun::cuda {

// `count` T of device memory (at least one), freed with the object.
template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t count) {
    check_cuda(cudaMalloc(&ptr, std::max<size_t>(count, 1) * sizeof(T)), "cudaMalloc (benchmark buffer)");
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// Median milliseconds of `repeats` runs of body() on stream s, timed by events, after two
// untimed runs (module load, shared-memory attributes, cuBLASLt's first-call setup): the
// kernel benchmarks' clock.
template <class Body>
double median_ms(cudaStream_t s, int repeats, Body body) {
  cudaEvent_t start, stop;
  SPEEDRUN_CUDA_CHECK(cudaEventCreate(&start));
  SPEEDRUN_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 2; ++i) body();
  std::vector<float> times;
  for (int i = 0; i < repeats; ++i) {
    SPEEDRUN_CUDA_CHECK(cudaEventRecord(start, s));
    body();
    SPEEDRUN_CUDA_CHECK(cudaEventRecord(stop, s));
    SPEEDRUN_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    SPEEDRUN_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace speedrun::cuda
