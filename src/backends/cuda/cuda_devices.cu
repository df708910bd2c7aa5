// The device query of the CUDA backend: what the runtime and driver report.
#include <cuda_runtime.h>

#include "backends/cuda_devices.h"

namespace speedrun {

bool cuda_compiled_in() { return true; }

CudaDeviceQuery query_cuda_devices() {
  CudaDeviceQuery q;
  cudaRuntimeGetVersion(&q.runtime_version);
  cudaDriverGetVersion(&q.driver_version);
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    q.error = std::string("no usable CUDA device: ") + cudaGetErrorString(status);
    cudaGetLastError();  // clear the sticky error for later calls
    return q;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    q.devices.push_back({i, prop.name, prop.major, prop.minor, prop.totalGlobalMem, prop.multiProcessorCount});
  }
  if (q.devices.empty()) q.error = "no CUDA device found";
  return q;
}

}  // namespace speedrun
