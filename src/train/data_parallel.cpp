#include "train/data_parallel.h"

#include <chrono>

#include "util/error.h"

namespace speedrun {

DataParallel::DataParallel(Communicator& comm, GPT& model) : comm_(comm), model_(model) {
  const int world = model.config().world_size;
  const int processes = comm.size();
  if (world % processes != 0) {
    throw UsageError("world_size " + std::to_string(world) + " is not divisible by the " + std::to_string(processes) +
                     " processes of this run: each process must hold the same number of logical ranks");
  }
  local_ranks_ = world / processes;
  first_rank_ = comm.rank() * local_ranks_;
  count_ = model.layout().total();
  sum_ = model.backend().alloc(count_);
  if (processes > 1) {
    local_grads_.resize(count_ * local_ranks_);
    all_grads_.resize(count_ * world);
  }
}

DataParallel::~DataParallel() { model_.backend().release(sum_); }

double DataParallel::compute_gradients(std::span<const int32_t> inputs, std::span<const int32_t> targets,
                                       int long_window) {
  Backend& be = model_.backend();
  const Config& config = model_.config();
  const size_t seq = static_cast<size_t>(config.seq_len);
  const float grad_scale = 1.f / static_cast<float>(config.world_size);
  const bool distributed = comm_.size() > 1;
  std::vector<double> losses(local_ranks_);
  for (int r = 0; r < local_ranks_; ++r) {
    model_.zero_grad();
    losses[r] = model_.forward_backward(inputs.subspan(r * seq, seq), targets.subspan(r * seq, seq), long_window,
                                        grad_scale);
    if (distributed) {
      be.download(local_grads_.data() + r * count_, model_.grads(), count_);
    } else if (r == 0) {
      be.copy(sum_, model_.grads(), count_);
    } else {
      be.add(sum_, model_.grads(), count_);
    }
  }
  if (distributed) {
    const auto start = std::chrono::steady_clock::now();
    comm_.all_gather(local_grads_.data(), all_grads_.data(), count_ * local_ranks_);
    communication_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // The same additions as one process: sum = g_0, then sum += g_r in rank order.
    be.upload(sum_, all_grads_.data(), count_);
    for (int r = 1; r < config.world_size; ++r) {
      be.upload(model_.grads(), all_grads_.data() + r * count_, count_);
      be.add(sum_, model_.grads(), count_);
    }
  }
  be.copy(model_.grads(), sum_, count_);
  return mean_over_ranks(losses);
}

double DataParallel::mean_over_ranks(const std::vector<double>& local_losses, int windows) {
  const int processes = comm_.size();
  std::vector<double> all(local_losses.size() * processes);
  comm_.all_gather(local_losses.data(), all.data(), local_losses.size());
  // all is [process][window][local rank]; sum as [window][process][local rank].
  double total = 0;
  for (int w = 0; w < windows; ++w) {
    for (int p = 0; p < processes; ++p) {
      for (int r = 0; r < local_ranks_; ++r) total += all[(static_cast<size_t>(p) * windows + w) * local_ranks_ + r];
    }
  }
  return total / static_cast<double>(all.size());
}

}  // namespace speedrun
