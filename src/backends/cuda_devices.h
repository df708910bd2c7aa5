// What CUDA devices this process can see. Declared for every build; without the
// CUDA backend compiled in, cuda_compiled_in() is false and the list is empty.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace speedrun {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  size_t total_memory_bytes = 0;
  int multiprocessors = 0;
};

struct CudaDeviceQuery {
  std::vector<CudaDeviceInfo> devices;
  std::string error;         // why no device is usable (empty when devices were found)
  int runtime_version = 0;   // e.g. 13000
  int driver_version = 0;    // 0 when no driver is installed
};

bool cuda_compiled_in();
CudaDeviceQuery query_cuda_devices();

}  // namespace speedrun
