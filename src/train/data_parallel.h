// Data parallelism over logical ranks (SPEC §4): world_size sequences per step are
// shared by the P processes of the run (world_size / P each), in one of two gradient
// reductions. `exact`: every rank's gradient is summed in logical-rank order (gathered
// first when P > 1) — the same float additions for any P — so 1, 2, 4 or 8 processes train bit-identical
// models. `overlap`: each process adds its ranks' gradients straight into the model's
// (no buffer), and the all-reduce of each bucket of final gradients starts during the
// last rank's backward pass (rounding then depends on P and differs from exact's).
// Losses are averaged in a fixed order in both.
#pragma once

#include <functional>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/gpt.h"

namespace speedrun {

enum class GradReduce {
  kAuto,     // overlap when the backend works on device memory (CUDA), else exact
  kExact,
  kOverlap,
};
GradReduce parse_grad_reduce(const std::string& name);  // "auto", "exact", "overlap"; UsageError otherwise
// kAuto becomes overlap where the backend works on device memory (CUDA: a GPU's memory is
// scarce, and its multi-process runs reduce over NCCL), else exact.
GradReduce resolve_grad_reduce(GradReduce requested, bool device_backend);
std::string grad_reduce_name(GradReduce mode);

struct GradReduceOptions {
  GradReduce mode = GradReduce::kAuto;
  // Smallest all-reduce of the overlap mode. 25 MB (as PyTorch DDP): one NCCL call costs
  // tens of microseconds, so smaller buckets waste latency, while larger ones start late
  // and leave more of the reduction exposed after the backward. For GPT-2 small each block
  // (28 MB) is one bucket (block 7, without attention, 18.9 MB, joins block 6's) and the
  // lm_head (154 MB) goes first.
  size_t bucket_bytes = size_t{25} << 20;
};

struct FloatRange {
  size_t offset = 0;
  size_t count = 0;
  bool operator==(const FloatRange&) const = default;
};

// Groups the gradient ranges a backward pass reports final (GPT::GradientReadyHook) into
// buckets of at least min_floats adjacent floats, handing each to `launch` as soon as it
// is complete. A range that does not extend the open bucket closes it first. finish()
// launches the last bucket and checks that exactly `total` floats were reported.
class GradientBuckets {
 public:
  GradientBuckets(size_t min_floats, size_t total, std::function<void(FloatRange)> launch);
  void ready(size_t offset, size_t count);
  void finish();  // throws Error when the reported ranges did not cover `total` floats

 private:
  void close();
  size_t min_floats_;
  size_t total_;
  size_t reported_ = 0;
  FloatRange open_;
  std::function<void(FloatRange)> launch_;
};

class DataParallel {
 public:
  // Throws UsageError when the process count does not divide world_size, or when
  // the communicator's buffers are not the backend's (NCCL with the CPU backend).
  DataParallel(Communicator& comm, GPT& model, GradReduceOptions options = {});
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;
  // The backend memory the constructor allocates for gradient sums and gathers, with the
  // mode resolved (exact or overlap).
  static size_t memory_bytes(size_t parameters, int world_size, int processes, GradReduce mode);
  // Throws UsageError unless `processes` divides world_size (checked by the constructor;
  // callers check it earlier where they can agree on the failure before any collective).
  static void check_process_count(int world_size, int processes);

  int first_rank() const { return first_rank_; }
  int local_ranks() const { return local_ranks_; }
  GradReduce mode() const { return mode_; }  // exact or overlap (auto resolved)
  Communicator& comm() { return comm_; }
  GPT& model() { return model_; }

  // Forward and backward of this process's sequences (laid out one after another),
  // then every process gets the mean gradient over all world_size sequences in
  // model.grads(). Returns the step's train loss (mean over all sequences).
  // enqueue_gradients, then finish_losses.
  double compute_gradients(std::span<const int32_t> inputs, std::span<const int32_t> targets, int long_window);
  // The same split so that nothing waits on the device before the optimiser's update is
  // queued: this queues the forward and backward passes and the gradient reduction
  // (inputs and targets must stay unchanged until finish_losses); finish_losses waits
  // for the backend (Backend::synchronize) and returns the step's train loss.
  void enqueue_gradients(std::span<const int32_t> inputs, std::span<const int32_t> targets, int long_window);
  double finish_losses();
  // Mean over every process's per-sequence losses. `local_losses` holds `windows` groups
  // of local_ranks() losses; they are summed window by window in logical-rank order,
  // the order of one process.
  double mean_over_ranks(const std::vector<double>& local_losses, int windows = 1);
  // Host time spent in gradient communication calls: the gather (exact), or issuing
  // the bucket all-reduces and waiting for them (overlap; on NCCL the wait is queued on
  // the GPU, so this is launch time only).
  double communication_seconds() const { return communication_seconds_; }

 private:
  struct GradientBufferSizes {
    size_t sum = 0, local = 0, all = 0;  // floats
  };
  static GradientBufferSizes gradient_buffer_sizes(size_t parameters, int world_size, int processes, GradReduce mode);
  void reduce_exact();
  void backward_overlapped(std::span<const int32_t> inputs, std::span<const int32_t> targets, int long_window,
                           float grad_scale);

  Communicator& comm_;
  GPT& model_;
  GradReduce mode_ = GradReduce::kExact;
  size_t bucket_floats_ = 0;
  int first_rank_ = 0;
  int local_ranks_ = 1;
  size_t count_ = 0;
  float* sum_ = nullptr;         // backend memory: running sum of this process's ranks but the last (exact, P = 1)
  float* local_grads_ = nullptr;  // backend memory: this process's per-rank gradients (exact, P > 1)
  float* all_grads_ = nullptr;    // backend memory: every rank's gradients (exact, P > 1)
  double* loss_sums_ = nullptr;  // Backend::alloc_host: each local rank's summed token losses
  double communication_seconds_ = 0;
};

}  // namespace speedrun
