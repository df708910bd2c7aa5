// Data parallelism over logical ranks: the exact (rank-ordered sum, gathered across processes) and overlapped
// (bucketed all-reduce during the backward) gradient reductions, and the loss average.
#include "train/data_parallel.h"

#include <algorithm>
#include <chrono>

#include "util/error.h"

namespace speedrun {
namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Clears the model's gradient hook when the pass ends, also by an exception: the hook
// refers to this call's stack.
struct GradientHookScope {
  GPT& model;
  GradientHookScope(GPT& m, GPT::GradientReadyHook hook) : model(m) { model.set_gradient_ready_hook(std::move(hook)); }
  ~GradientHookScope() { model.set_gradient_ready_hook({}); }
  GradientHookScope(const GradientHookScope&) = delete;
  GradientHookScope& operator=(const GradientHookScope&) = delete;
};

}  // namespace

GradReduce parse_grad_reduce(const std::string& name) {
  if (name == "auto") return GradReduce::kAuto;
  if (name == "exact") return GradReduce::kExact;
  if (name == "overlap") return GradReduce::kOverlap;
  throw UsageError("unknown gradient reduction '" + name + "' (expected auto, exact or overlap)");
}

std::string grad_reduce_name(GradReduce mode) {
  switch (mode) {
    case GradReduce::kAuto: return "auto";
    case GradReduce::kExact: return "exact";
    case GradReduce::kOverlap: return "overlap";
  }
  return "?";
}

// --- GradientBuckets ---------------------------------------------------------------------

GradientBuckets::GradientBuckets(size_t min_floats, size_t total, std::function<void(FloatRange)> launch)
    : min_floats_(min_floats), total_(total), launch_(std::move(launch)) {}

void GradientBuckets::ready(size_t offset, size_t count) {
  if (count == 0) return;
  if (offset > total_ || count > total_ - offset) {
    throw Error("gradient range [" + std::to_string(offset) + ", " + std::to_string(offset + count) +
                ") lies outside the " + std::to_string(total_) + " parameters");
  }
  reported_ += count;
  if (open_.count > 0 && offset + count == open_.offset) {  // extends the bucket downwards
    open_ = {offset, open_.count + count};
  } else if (open_.count > 0 && open_.offset + open_.count == offset) {  // upwards
    open_.count += count;
  } else {
    close();
    open_ = {offset, count};
  }
  if (open_.count >= min_floats_) close();
}

void GradientBuckets::close() {
  if (open_.count == 0) return;
  const FloatRange bucket = open_;
  open_ = {};
  launch_(bucket);
}

void GradientBuckets::finish() {
  close();
  // A range reported twice (or missed) would be summed over processes twice (or never).
  if (reported_ != total_) {
    throw Error("the backward pass reported " + std::to_string(reported_) + " gradient floats as final, but the model has " +
                std::to_string(total_));
  }
  reported_ = 0;
}

// --- DataParallel ------------------------------------------------------------------------

DataParallel::DataParallel(Communicator& comm, GPT& model, GradReduceOptions options) : comm_(comm), model_(model) {
  const int world = model.config().world_size;
  const int processes = comm.size();
  check_process_count(world, processes);
  Backend& be = model.backend();
  const bool device_memory = be.native_stream() != nullptr;
  if (processes > 1 && comm.device_buffers() != device_memory) {
    throw UsageError("the " + comm.name() + " communicator works on " +
                     (comm.device_buffers() ? "device" : "host") + " memory but the " + be.name() + " backend on " +
                     (device_memory ? "device" : "host") + " memory: multi-process CUDA runs need NCCL");
  }
  mode_ = resolve_grad_reduce(options.mode, device_memory);
  bucket_floats_ = std::max<size_t>(1, options.bucket_bytes / sizeof(float));
  local_ranks_ = world / processes;
  first_rank_ = comm.rank() * local_ranks_;
  count_ = model.layout().total();
  loss_sums_ = static_cast<double*>(be.alloc_host(sizeof(double) * local_ranks_));
  const GradientBufferSizes sizes = gradient_buffer_sizes(count_, world, processes, mode_);
  if (sizes.sum > 0) sum_ = be.alloc(sizes.sum);
  if (sizes.local > 0) local_grads_ = be.alloc(sizes.local);
  if (sizes.all > 0) all_grads_ = be.alloc(sizes.all);
}

GradReduce resolve_grad_reduce(GradReduce requested, bool device_backend) {
  if (requested != GradReduce::kAuto) return requested;
  return device_backend ? GradReduce::kOverlap : GradReduce::kExact;
}

// Exact: one process with several ranks keeps the running sum of all but the last; several
// processes keep their own ranks' gradients and gather every rank's. One rank per process,
// and overlap, work in the model's own gradients alone.
DataParallel::GradientBufferSizes DataParallel::gradient_buffer_sizes(size_t parameters, int world_size,
                                                                      int processes, GradReduce mode) {
  const int local_ranks = world_size / processes;
  GradientBufferSizes sizes;
  // One process sums its ranks in sum_ when it has several; the last rank's gradient is
  // added to that sum in the model's own buffer. Several processes gather instead.
  if (mode == GradReduce::kExact && processes == 1 && local_ranks > 1) sizes.sum = parameters;
  if (mode == GradReduce::kExact && processes > 1) {
    sizes.local = parameters * local_ranks;
    sizes.all = parameters * world_size;
  }
  return sizes;
}

void DataParallel::check_process_count(int world_size, int processes) {
  if (world_size % processes != 0) {
    throw UsageError("world_size " + std::to_string(world_size) + " is not divisible by the " +
                     std::to_string(processes) +
                     " processes of this run: each process must hold the same number of logical ranks");
  }
}

size_t DataParallel::memory_bytes(size_t parameters, int world_size, int processes, GradReduce mode) {
  const GradientBufferSizes sizes = gradient_buffer_sizes(parameters, world_size, processes, mode);
  return (sizes.sum + sizes.local + sizes.all) * sizeof(float);
}

DataParallel::~DataParallel() {
  Backend& be = model_.backend();
  be.release_host(loss_sums_);
  be.release(all_grads_);
  be.release(local_grads_);
  be.release(sum_);
}

double DataParallel::compute_gradients(std::span<const int32_t> inputs, std::span<const int32_t> targets,
                                       int long_window) {
  enqueue_gradients(inputs, targets, long_window);
  return finish_losses();
}

double DataParallel::finish_losses() {
  model_.backend().synchronize();
  const double seq = static_cast<double>(model_.config().seq_len);
  std::vector<double> losses(local_ranks_);
  for (int r = 0; r < local_ranks_; ++r) losses[r] = loss_sums_[r] / seq;
  return mean_over_ranks(losses);
}

void DataParallel::enqueue_gradients(std::span<const int32_t> inputs, std::span<const int32_t> targets,
                                     int long_window) {
  const size_t seq = static_cast<size_t>(model_.config().seq_len);
  const float grad_scale = 1.f / static_cast<float>(model_.config().world_size);
  if (mode_ == GradReduce::kOverlap) {
    backward_overlapped(inputs, targets, long_window, grad_scale);
    return;
  }
  Backend& be = model_.backend();
  const bool distributed = comm_.size() > 1;
  float* grads = model_.grads();
  for (int r = 0; r < local_ranks_; ++r) {
    model_.zero_grad();
    model_.forward_backward_async(inputs.subspan(r * seq, seq), targets.subspan(r * seq, seq), long_window,
                                  grad_scale, &loss_sums_[r]);
    const bool last = r + 1 == local_ranks_;
    if (distributed) {
      be.copy(local_grads_ + r * count_, grads, count_);
    } else if (last) {
      // sum + g_last, written where the optimiser reads it: float addition commutes, so
      // these are the bits of sum += g_last, without copying the sum back afterwards.
      if (r > 0) be.add(grads, nullptr, sum_, count_);
    } else if (r == 0) {
      be.copy(sum_, grads, count_);
    } else {
      be.add(sum_, nullptr, grads, count_);
    }
  }
  if (distributed) reduce_exact();
}

// The same additions as one process, in the model's gradients: g_0, then += g_r in
// logical-rank order.
void DataParallel::reduce_exact() {
  Backend& be = model_.backend();
  const auto start = std::chrono::steady_clock::now();
  comm_.all_gather(local_grads_, all_grads_, count_ * local_ranks_);
  communication_seconds_ += seconds_since(start);
  float* grads = model_.grads();
  be.copy(grads, all_grads_, count_);
  for (int r = 1; r < model_.config().world_size; ++r) be.add(grads, nullptr, all_grads_ + r * count_, count_);
}

// This process's ranks accumulate in the model's gradients (GPT::forward_backward adds to
// them): no buffer for a partial sum, and no pass over all gradients per rank. During the
// last rank's backward each range, once final, joins a bucket whose all-reduce starts as
// soon as the bucket is full.
void DataParallel::backward_overlapped(std::span<const int32_t> inputs, std::span<const int32_t> targets,
                                       int long_window, float grad_scale) {
  const size_t seq = static_cast<size_t>(model_.config().seq_len);
  float* grads = model_.grads();
  model_.zero_grad();
  for (int r = 0; r + 1 < local_ranks_; ++r) {
    model_.forward_backward_async(inputs.subspan(r * seq, seq), targets.subspan(r * seq, seq), long_window,
                                  grad_scale, &loss_sums_[r]);
  }
  const int last = local_ranks_ - 1;
  GradientBuckets buckets(bucket_floats_, count_, [&](FloatRange bucket) {
    const auto start = std::chrono::steady_clock::now();
    comm_.all_reduce_sum_async(grads + bucket.offset, bucket.count);
    communication_seconds_ += seconds_since(start);
  });
  {
    GradientHookScope scope(model_, [&](size_t offset, size_t count) { buckets.ready(offset, count); });
    model_.forward_backward_async(inputs.subspan(last * seq, seq), targets.subspan(last * seq, seq), long_window,
                                  grad_scale, &loss_sums_[last]);
  }
  buckets.finish();
  const auto start = std::chrono::steady_clock::now();
  comm_.wait_all();
  communication_seconds_ += seconds_since(start);
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
