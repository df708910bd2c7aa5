// The device query of a build without the CUDA backend.
#ifndef SPEEDRUN_HAVE_CUDA
#include "backends/cuda_devices.h"

namespace speedrun {

bool cuda_compiled_in() { return false; }

CudaDeviceQuery query_cuda_devices() {
  CudaDeviceQuery q;
  q.error = "this build has no CUDA backend (configure with nvcc available, or -DSPEEDRUN_CUDA=ON)";
  return q;
}

}  // namespace speedrun
#endif
