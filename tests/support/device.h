// What the GPU tests share: whether a CUDA device is visible (query_cuda_devices is empty
// in builds without CUDA), and float buffers in a backend's memory.
#pragma once

#include <cstddef>
#include <vector>

#include "backends/backend.h"
#include "backends/cuda_devices.h"

namespace speedrun::testing {

inline bool gpu_available() {
  static const bool available = !query_cuda_devices().devices.empty();
  return available;
}

// A backend buffer holding `host`, released with the object; get() reads it back.
struct DeviceFloats {
  Backend& be;
  float* ptr;
  size_t n;
  DeviceFloats(Backend& b, const std::vector<float>& host) : be(b), ptr(b.alloc(host.size())), n(host.size()) {
    be.upload(ptr, host.data(), n);
  }
  DeviceFloats(Backend& b, size_t count, float fill) : DeviceFloats(b, std::vector<float>(count, fill)) {}
  ~DeviceFloats() { be.release(ptr); }
  DeviceFloats(const DeviceFloats&) = delete;
  std::vector<float> get() const {
    std::vector<float> host(n);
    be.download(host.data(), ptr, n);
    return host;
  }
};

}  // namespace speedrun::testing
