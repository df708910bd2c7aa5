#include "train/run_memory.h"

#include "model/params.h"
#include "optim/optimizer.h"

namespace speedrun {

RunMemoryPlan plan_run_memory(const Config& config, ActivationOptions activations, int head_chunk_rows, int processes,
                              GradReduce mode) {
  const ParamLayout layout(config);
  RunMemoryPlan plan;
  plan.model = GPT::plan_memory(config, config.seq_len, config.val_seq_len, activations, head_chunk_rows);
  plan.optimizer_bytes = Optimizer::memory_bytes(layout);
  plan.gradient_reduction_bytes = DataParallel::memory_bytes(layout.total(), config.world_size, processes, mode);
  return plan;
}

}  // namespace speedrun
