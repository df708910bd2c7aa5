// The backend memory one process of a training run holds: the model's plan, the
// optimiser's state and the gradient reduction's buffers, each from the function its
// owner allocates by. `speedrun memory` prints it; `speedrun bench` compares it with
// what the backend really allocated.
#pragma once

#include <cstddef>

#include "model/config.h"
#include "model/gpt.h"
#include "train/data_parallel.h"

namespace speedrun {

struct RunMemoryPlan {
  GPT::MemoryPlan model;
  size_t optimizer_bytes = 0;
  size_t gradient_reduction_bytes = 0;
  size_t total_bytes() const { return model.total_bytes() + optimizer_bytes + gradient_reduction_bytes; }
};

// With `processes` sharing the config's world_size and the reduction mode resolved.
RunMemoryPlan plan_run_memory(const Config& config, ActivationOptions activations, int head_chunk_rows, int processes,
                              GradReduce mode);

}  // namespace speedrun
