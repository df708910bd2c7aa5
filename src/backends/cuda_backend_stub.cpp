// make_cuda_backend of a build without the CUDA backend: always an error.
#ifndef SPEEDRUN_HAVE_CUDA
#include "backends/backend.h"
#include "util/error.h"

namespace speedrun {

std::unique_ptr<Backend> make_cuda_backend(int device, const BackendOptions&) {
  throw Error("this build has no CUDA backend (device " + std::to_string(device) +
              " requested): configure with nvcc available, or -DSPEEDRUN_CUDA=ON");
}

}  // namespace speedrun
#endif
