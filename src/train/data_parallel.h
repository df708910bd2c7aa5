// Data parallelism over logical ranks (SPEC §4): world_size sequences per step are
// shared by the P processes of the run (world_size / P each). Per-rank gradients are
// summed in logical-rank order — the same float additions for any P — so 1, 2, 4 or 8
// processes train bit-identical models. Losses are averaged in the same fixed order.
#pragma once

#include <span>
#include <vector>

#include "comm/communicator.h"
#include "model/gpt.h"

namespace speedrun {

class DataParallel {
 public:
  // Throws UsageError when the process count does not divide world_size.
  DataParallel(Communicator& comm, GPT& model);
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  int first_rank() const { return first_rank_; }
  int local_ranks() const { return local_ranks_; }
  Communicator& comm() { return comm_; }
  GPT& model() { return model_; }

  // Forward and backward of this process's sequences (laid out one after another),
  // then every process gets the mean gradient over all world_size sequences in
  // model.grads(). Returns the step's train loss (mean over all sequences).
  double compute_gradients(std::span<const int32_t> inputs, std::span<const int32_t> targets, int long_window);
  // Mean over every process's per-sequence losses. `local_losses` holds `windows` groups
  // of local_ranks() losses; they are summed window by window in logical-rank order,
  // the order of one process.
  double mean_over_ranks(const std::vector<double>& local_losses, int windows = 1);
  double communication_seconds() const { return communication_seconds_; }

 private:
  Communicator& comm_;
  GPT& model_;
  int first_rank_ = 0;
  int local_ranks_ = 1;
  size_t count_ = 0;
  float* sum_ = nullptr;                 // backend memory: running sum in rank order
  std::vector<float> local_grads_;       // host: this process's per-rank gradients (P > 1)
  std::vector<float> all_grads_;         // host: every rank's gradients (P > 1)
  double communication_seconds_ = 0;
};

}  // namespace speedrun
