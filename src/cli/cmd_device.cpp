// speedrun device: which backends this build has and which GPUs it can see.
#include <cstdio>

#include "backends/cuda_devices.h"
#include "cli/commands.h"

namespace speedrun::cli {

void register_device_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("device", "list the backends of this build and the CUDA devices it can see");
  cmd->callback([] {
    std::printf("cpu: float32, OpenMP + OpenBLAS (reference backend)\n");
    if (!cuda_compiled_in()) {
      std::printf("cuda: not compiled into this build\n");
      return;
    }
    const CudaDeviceQuery q = query_cuda_devices();
    std::printf("cuda: compiled in (runtime %d.%d, driver %d.%d)\n", q.runtime_version / 1000,
                (q.runtime_version % 1000) / 10, q.driver_version / 1000, (q.driver_version % 1000) / 10);
    if (q.devices.empty()) std::printf("  %s\n", q.error.c_str());
    for (const CudaDeviceInfo& d : q.devices) {
      std::printf("  [%d] %s, sm_%d%d, %d SMs, %.1f GiB\n", d.index, d.name.c_str(), d.compute_major, d.compute_minor,
                  d.multiprocessors, d.total_memory_bytes / 1073741824.0);
    }
  });
}

}  // namespace speedrun::cli
