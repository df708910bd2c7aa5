// Gradient bucketing of the overlapped reduction (issue #5): which ranges the backward
// reports final and when, how they group into buckets, and that the overlap mode of one
// process gives the exact mode's gradients bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "backends/backend.h"
#include "comm/nccl_communicator.h"
#include "model/gpt.h"
#include "train/data_parallel.h"
#include "util/error.h"

namespace speedrun {
namespace {

std::vector<FloatRange> bucket(size_t min_floats, size_t total, const std::vector<FloatRange>& ranges) {
  std::vector<FloatRange> out;
  GradientBuckets buckets(min_floats, total, [&](FloatRange b) { out.push_back(b); });
  for (const FloatRange& r : ranges) buckets.ready(r.offset, r.count);
  buckets.finish();
  return out;
}

TEST(GradientBuckets, MergesDescendingNeighboursUntilTheMinimumSize) {
  const auto out = bucket(25, 100, {{90, 10}, {70, 20}, {40, 30}, {30, 10}, {0, 30}});
  const std::vector<FloatRange> expected{{70, 30}, {40, 30}, {0, 40}};
  EXPECT_EQ(out, expected);
}

TEST(GradientBuckets, LaunchesEveryRangeAloneWithAMinimumOfOne) {
  const std::vector<FloatRange> ranges{{6, 4}, {2, 4}, {0, 2}};
  EXPECT_EQ(bucket(1, 10, ranges), ranges);
}

TEST(GradientBuckets, FinishLaunchesTheRemainderAsOneBucket) {
  const std::vector<FloatRange> expected{{0, 10}};
  EXPECT_EQ(bucket(1000, 10, {{6, 4}, {2, 4}, {0, 2}}), expected);
}

TEST(GradientBuckets, ARangeThatDoesNotExtendTheBucketClosesItFirst) {
  // Ascending neighbours merge too; a gap starts a new bucket.
  EXPECT_EQ(bucket(100, 10, {{0, 3}, {3, 3}, {8, 2}, {6, 2}}).size(), 2u);
  std::vector<FloatRange> out;
  GradientBuckets buckets(100, 10, [&](FloatRange b) { out.push_back(b); });
  buckets.ready(0, 3);
  buckets.ready(3, 3);
  EXPECT_TRUE(out.empty());
  buckets.ready(8, 2);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0], (FloatRange{0, 6}));
  buckets.ready(6, 2);  // adjacent to [8, 10): joins it
  buckets.finish();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[1], (FloatRange{6, 4}));
}

TEST(GradientBuckets, MissingOrRepeatedOrOutsideRangesAreErrors) {
  GradientBuckets missing(4, 10, [](FloatRange) {});
  missing.ready(5, 5);
  EXPECT_THROW(missing.finish(), Error);
  GradientBuckets repeated(4, 10, [](FloatRange) {});
  repeated.ready(0, 10);
  repeated.ready(0, 2);
  EXPECT_THROW(repeated.finish(), Error);
  GradientBuckets outside(4, 10, [](FloatRange) {});
  EXPECT_THROW(outside.ready(8, 3), Error);
}

// A micro model with random parameters (every gradient non-zero) and a random sequence.
struct MicroModel {
  std::unique_ptr<Backend> be = make_cpu_backend();
  Config config = Config::preset("micro");
  std::unique_ptr<GPT> model;
  std::vector<int32_t> inputs, targets;
  explicit MicroModel(int world_size = 2) {
    config.world_size = world_size;
    model = std::make_unique<GPT>(config, *be, config.seq_len, config.seq_len);
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.f, 0.2f);
    std::vector<float> params(model->layout().total());
    for (float& p : params) p = normal(rng);
    model->load_parameters(params);
    std::uniform_int_distribution<int32_t> token(0, config.vocab_size - 1);
    for (int i = 0; i < config.seq_len * world_size; ++i) {
      inputs.push_back(token(rng));
      targets.push_back(token(rng));
    }
  }
  std::span<const int32_t> in(int r) const { return std::span(inputs).subspan(r * config.seq_len, config.seq_len); }
  std::span<const int32_t> out(int r) const { return std::span(targets).subspan(r * config.seq_len, config.seq_len); }
};

struct Reported {
  FloatRange range;
  std::vector<float> gradient;  // the gradient at the time of the report
};

std::vector<Reported> record_backward(MicroModel& m) {
  std::vector<Reported> reports;
  m.model->set_gradient_ready_hook([&](size_t offset, size_t count) {
    Reported r{{offset, count}, std::vector<float>(count)};
    m.be->download(r.gradient.data(), m.model->grads() + offset, count);
    reports.push_back(std::move(r));
  });
  m.model->zero_grad();
  m.model->forward_backward(m.in(0), m.out(0), 2, 1.f);
  m.model->set_gradient_ready_hook({});
  return reports;
}

TEST(GradientReadyHook, ReportsEveryParameterOnceHeadFirstThenBlocksDownwards) {
  MicroModel m;
  const ParamLayout& layout = m.model->layout();
  const std::vector<Reported> reports = record_backward(m);
  ASSERT_EQ(reports.size(), static_cast<size_t>(m.config.num_layers) + 2);
  // Adjacent and descending: together exactly [0, total).
  size_t end = layout.total();
  for (const Reported& r : reports) {
    EXPECT_EQ(r.range.offset + r.range.count, end);
    end = r.range.offset;
  }
  EXPECT_EQ(end, 0u);
  EXPECT_EQ(reports.front().range.offset, layout.at("lm_head.weight").offset);
  for (int i = 0; i < m.config.num_layers; ++i) {
    const FloatRange block = reports[1 + m.config.num_layers - 1 - i].range;
    const std::string prefix = "blocks." + std::to_string(i) + ".";
    for (const ParamSpec& spec : layout.specs()) {
      const bool inside = spec.offset >= block.offset && spec.offset < block.offset + block.count;
      EXPECT_EQ(inside, spec.name.rfind(prefix, 0) == 0) << spec.name << " vs block " << i;
    }
  }
  EXPECT_EQ(reports.back().range.offset, 0u);
  EXPECT_EQ(reports.back().range.count, layout.at("blocks.0.lambdas").offset);
}

TEST(GradientReadyHook, ReportedGradientsAreAlreadyFinal) {
  MicroModel m;
  const std::vector<Reported> reports = record_backward(m);
  const std::vector<float> final_grads = m.model->gradients_to_host();
  for (const Reported& r : reports) {
    // Non-zero at the end, so a report before the gradient was written cannot pass.
    bool any_nonzero = false;
    for (size_t i = 0; i < r.range.count; ++i) any_nonzero |= final_grads[r.range.offset + i] != 0.f;
    EXPECT_TRUE(any_nonzero) << "range at " << r.range.offset;
    EXPECT_EQ(std::memcmp(r.gradient.data(), final_grads.data() + r.range.offset, r.range.count * sizeof(float)), 0)
        << "the gradient at " << r.range.offset << " changed after it was reported final";
  }
}

TEST(GradientReadyHook, ForwardOnlyPassesReportNothing) {
  MicroModel m;
  int calls = 0;
  m.model->set_gradient_ready_hook([&](size_t, size_t) { ++calls; });
  m.model->forward(m.in(0), m.out(0), 2);
  EXPECT_EQ(calls, 0);
}

// Single process whose all-reduce records what it was asked to reduce.
class RecordingCommunicator final : public Communicator {
 public:
  std::vector<FloatRange> reduced;
  std::vector<std::string> events;
  const float* base = nullptr;
  std::string name() const override { return "recording"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  void all_gather(const float* local, float* out, size_t count) override {
    std::memmove(out, local, count * sizeof(float));
  }
  void all_gather(const double* local, double* out, size_t count) override {
    std::memmove(out, local, count * sizeof(double));
  }
  void broadcast(void*, size_t, int) override {}
  void broadcast_async(float*, size_t, int) override {}
  void all_reduce_sum_async(float* data, size_t count) override {
    reduced.push_back({static_cast<size_t>(data - base), count});
    events.push_back("reduce");
  }
  void wait_all() override { events.push_back("wait"); }
  void barrier() override {}
  [[noreturn]] void abort(const std::string& message, int) override { throw Error(message); }
};

TEST(DataParallelOverlap, ReducesBucketsCoveringEveryParameterOnceThenWaits) {
  MicroModel m(4);
  RecordingCommunicator comm;
  comm.base = m.model->grads();
  const ParamLayout& layout = m.model->layout();
  // About one block per bucket.
  const size_t block = layout.at("blocks.1.lambdas").offset - layout.at("blocks.0.lambdas").offset;
  DataParallel dp(comm, *m.model, {GradReduce::kOverlap, block * sizeof(float)});
  EXPECT_EQ(dp.mode(), GradReduce::kOverlap);
  dp.compute_gradients(m.inputs, m.targets, 2);
  ASSERT_GE(comm.reduced.size(), 3u);
  size_t end = layout.total();
  for (size_t i = 0; i < comm.reduced.size(); ++i) {
    EXPECT_EQ(comm.reduced[i].offset + comm.reduced[i].count, end) << "bucket " << i;
    if (i + 1 < comm.reduced.size()) EXPECT_GE(comm.reduced[i].count, block) << "bucket " << i;
    end = comm.reduced[i].offset;
  }
  EXPECT_EQ(end, 0u);
  ASSERT_FALSE(comm.events.empty());
  EXPECT_EQ(comm.events.back(), "wait");
  EXPECT_EQ(std::count(comm.events.begin(), comm.events.end(), "wait"), 1);
}

// On one process the overlapped reduction is the model's own accumulation over its ranks,
// bit for bit (whatever the buckets), and equals exact's separately summed gradients within
// float32 rounding: the same terms added in another order.
TEST(DataParallelOverlap, OneProcessAccumulatesItsRanksInTheModelsGradients) {
  MicroModel accumulated(4), exact_model(4);
  accumulated.model->zero_grad();
  double loss_sum = 0;
  for (int r = 0; r < 4; ++r) loss_sum += accumulated.model->forward_backward(accumulated.in(r), accumulated.out(r), 2, 0.25f);
  const std::vector<float> want = accumulated.model->gradients_to_host();
  auto comm = make_single_process_communicator();
  DataParallel exact(*comm, *exact_model.model, {GradReduce::kExact});
  const double exact_loss = exact.compute_gradients(exact_model.inputs, exact_model.targets, 2);
  const std::vector<float> summed = exact_model.model->gradients_to_host();
  for (size_t bucket_bytes : {size_t{64}, size_t{25} << 20}) {
    MicroModel overlap_model(4);
    DataParallel overlap(*comm, *overlap_model.model, {GradReduce::kOverlap, bucket_bytes});
    const double overlap_loss = overlap.compute_gradients(overlap_model.inputs, overlap_model.targets, 2);
    EXPECT_EQ(overlap_loss, exact_loss);
    EXPECT_NEAR(overlap_loss, loss_sum / 4, 1e-12);
    const std::vector<float> got = overlap_model.model->gradients_to_host();
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << "bucket bytes " << bucket_bytes;
    double scale = 0;
    for (float g : summed) scale = std::max(scale, static_cast<double>(std::abs(g)));
    size_t differ = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_NEAR(got[i], summed[i], 1e-6 * scale + 1e-5 * std::abs(summed[i])) << i;
      differ += got[i] != summed[i];
    }
    EXPECT_GT(differ, 0u) << "the same bits as exact: is the overlap mode's accumulation in use?";
  }
}

TEST(DataParallelOverlap, ClearsTheModelsHookAfterTheStep) {
  MicroModel m(2);
  RecordingCommunicator comm;
  comm.base = m.model->grads();
  DataParallel dp(comm, *m.model, {GradReduce::kOverlap, 1024});
  dp.compute_gradients(m.inputs, m.targets, 2);
  const size_t reductions = comm.reduced.size();
  m.model->zero_grad();
  m.model->forward_backward(m.in(0), m.out(0), 2, 1.f);  // not through dp: must reduce nothing
  EXPECT_EQ(comm.reduced.size(), reductions);
}

TEST(DataParallelModes, AutoIsExactOnHostMemoryAndNamesParse) {
  MicroModel m;
  auto comm = make_single_process_communicator();
  DataParallel dp(*comm, *m.model);
  EXPECT_EQ(dp.mode(), GradReduce::kExact);
  EXPECT_EQ(parse_grad_reduce("overlap"), GradReduce::kOverlap);
  EXPECT_EQ(parse_grad_reduce("exact"), GradReduce::kExact);
  EXPECT_EQ(parse_grad_reduce("auto"), GradReduce::kAuto);
  EXPECT_THROW(parse_grad_reduce("ring"), UsageError);
  EXPECT_EQ(grad_reduce_name(GradReduce::kOverlap), "overlap");
}

// Exact on one process: each rank's gradient computed alone from zero, then summed
// g_0 + g_1 + ... in rank order, bit for bit (the sum that 1, 2, 4 or 8 processes repeat).
TEST(DataParallelExact, OneProcessSumsItsRanksGradientsInRankOrder) {
  for (int world : {1, 2, 4}) {
    MicroModel ranks(world), reduced(world);
    std::vector<std::vector<float>> each(world);
    for (int r = 0; r < world; ++r) {
      ranks.model->zero_grad();
      ranks.model->forward_backward(ranks.in(r), ranks.out(r), 2, 1.f / world);
      each[r] = ranks.model->gradients_to_host();
    }
    std::vector<float> in_order = each[0], reversed = each[world - 1];
    for (int r = 1; r < world; ++r) {
      for (size_t i = 0; i < in_order.size(); ++i) {
        in_order[i] += each[r][i];
        reversed[i] += each[world - 1 - r][i];
      }
    }
    auto comm = make_single_process_communicator();
    DataParallel exact(*comm, *reduced.model, {GradReduce::kExact});
    exact.compute_gradients(reduced.inputs, reduced.targets, 2);
    const std::vector<float> got = reduced.model->gradients_to_host();
    ASSERT_EQ(got.size(), in_order.size());
    EXPECT_EQ(std::memcmp(got.data(), in_order.data(), got.size() * sizeof(float)), 0) << "world " << world;
    // Sensitive to the order: with three terms or more another order gives other bits.
    if (world > 2) EXPECT_NE(std::memcmp(reversed.data(), in_order.data(), got.size() * sizeof(float)), 0);
  }
}

// What `speedrun memory` adds for the gradient reduction is what DataParallel allocates.
TEST(DataParallelModes, MemoryBytesAreWhatTheConstructorAllocates) {
  for (GradReduce mode : {GradReduce::kExact, GradReduce::kOverlap}) {
    for (int world : {1, 4}) {
      MicroModel m(world);
      Backend& be = m.model->backend();
      const size_t before = be.peak_memory_bytes();
      auto comm = make_single_process_communicator();
      DataParallel dp(*comm, *m.model, {mode});
      const size_t expected = DataParallel::memory_bytes(m.model->layout().total(), world, 1, mode);
      EXPECT_EQ(be.peak_memory_bytes() - before, expected) << grad_reduce_name(mode) << " world " << world;
      // Overlap reduces in the model's gradients; exact holds one gradient sum for the
      // ranks before the last, which is added in the model's gradients.
      const bool sums = mode == GradReduce::kExact && world > 1;
      EXPECT_EQ(expected, sums ? m.model->layout().total() * sizeof(float) : 0);
    }
  }
  // The exact gather of P processes holds this process's ranks' gradients and every rank's,
  // summed in the model's gradients.
  EXPECT_EQ(DataParallel::memory_bytes(10, 8, 2, GradReduce::kExact), (40 + 80) * sizeof(float));
  EXPECT_EQ(resolve_grad_reduce(GradReduce::kAuto, true), GradReduce::kOverlap);
  EXPECT_EQ(resolve_grad_reduce(GradReduce::kAuto, false), GradReduce::kExact);
}

TEST(NcclCommunicator, PicksTheGpuFromTheLocalRank) {
  EXPECT_EQ(gpu_for_local_rank(0, 8), 0);
  EXPECT_EQ(gpu_for_local_rank(7, 8), 7);
  EXPECT_EQ(gpu_for_local_rank(3, 1), 0);  // Slurm giving each process its own GPU
  EXPECT_EQ(gpu_for_local_rank(5, 4), 1);
  EXPECT_THROW(gpu_for_local_rank(0, 0), Error);
}

// In every build: without NCCL the stub says so; with it, the CPU backend has no stream.
TEST(NcclCommunicator, RefusesTheCpuBackend) {
  auto host = make_single_process_communicator();
  auto be = make_cpu_backend();
  try {
    make_nccl_communicator(*host, *be);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_TRUE(message.find("NCCL") != std::string::npos) << message;
  }
}

}  // namespace
}  // namespace speedrun
