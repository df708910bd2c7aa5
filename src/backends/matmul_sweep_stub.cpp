// The matmul sweep of a build without the CUDA backend: an Error.
#ifndef SPEEDRUN_HAVE_CUDA
#include "backends/matmul_sweep.h"
#include "util/error.h"

namespace speedrun {

std::vector<AlgorithmTiming> sweep_product_algorithms(int, const ProductShape&, int, int) {
  throw Error("sweep_product_algorithms: this build has no CUDA backend (configure with nvcc available, or "
              "-DSPEEDRUN_CUDA=ON)");
}

}  // namespace speedrun
#endif
