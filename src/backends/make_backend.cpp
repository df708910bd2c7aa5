// Chooses a backend by the name the command line uses.
#include "backends/backend.h"
#include "util/error.h"

namespace speedrun {

std::unique_ptr<Backend> make_backend(const std::string& device, int device_index, const BackendOptions& options) {
  if (device == "cpu") return make_cpu_backend(options);
  if (device == "cuda") return make_cuda_backend(device_index, options);
  throw UsageError("unknown device '" + device + "' (expected cpu or cuda)");
}

}  // namespace speedrun
