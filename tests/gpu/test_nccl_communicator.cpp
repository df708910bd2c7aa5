// The NCCL communicator on one GPU (NCCL refuses two ranks on one device, so world 1):
// collectives on device buffers give the expected values, stay ordered with the CUDA
// backend's stream, refuse host memory, and carry the overlapped gradient reduction (the
// model's own accumulation, bit for bit). Skips without a GPU or without NCCL.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <span>
#include <vector>

#include "backends/backend.h"
#include "backends/cuda_devices.h"
#include "comm/nccl_communicator.h"
#include "model/gpt.h"
#include "train/data_parallel.h"
#include "util/error.h"

namespace speedrun {
namespace {

#define SKIP_WITHOUT_NCCL_GPU()                                              \
  do {                                                                       \
    if (query_cuda_devices().devices.empty()) GTEST_SKIP() << "no GPU";      \
    if (!nccl_compiled_in()) GTEST_SKIP() << "no NCCL in this build";        \
  } while (0)

struct OneRank {
  std::unique_ptr<Communicator> host = make_single_process_communicator();
  std::unique_ptr<Backend> be = make_cuda_backend(0);
  std::unique_ptr<Communicator> nccl = make_nccl_communicator(*host, *be);
};

std::vector<float> iota_floats(size_t n, float start) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + static_cast<float>(i % 1000);
  return v;
}

std::vector<float> download(Backend& be, const float* x, size_t n) {
  std::vector<float> host(n);
  be.download(host.data(), x, n);
  return host;
}

TEST(NcclCommunicator, DescribesOneRankOnDeviceMemory) {
  SKIP_WITHOUT_NCCL_GPU();
  OneRank r;
  EXPECT_EQ(r.nccl->name(), "nccl");
  EXPECT_EQ(r.nccl->size(), 1);
  EXPECT_EQ(r.nccl->rank(), 0);
  EXPECT_TRUE(r.nccl->device_buffers());
}

TEST(NcclCommunicator, AllReduceBroadcastAndAllGatherOnDeviceBuffers) {
  SKIP_WITHOUT_NCCL_GPU();
  OneRank r;
  const size_t n = 4099;  // not a multiple of anything NCCL chunks by
  float* x = r.be->alloc(n);
  float* out = r.be->alloc(n);
  const std::vector<float> values = iota_floats(n, -500.f);
  r.be->upload(x, values.data(), n);
  r.nccl->all_reduce_sum_async(x, n);  // one rank: the sum is the buffer itself
  r.nccl->broadcast_async(x, n, 0);
  r.nccl->wait_all();
  EXPECT_EQ(download(*r.be, x, n), values);
  r.nccl->all_gather(x, out, n);
  EXPECT_EQ(download(*r.be, out, n), values);
  r.be->release(x);
  r.be->release(out);
}

// Long queues of backend work before and after the collective: were either side not
// ordered by the events, the gather would read x early or the adds would read `out` early.
TEST(NcclCommunicator, CollectivesAreOrderedWithTheBackendsStream) {
  SKIP_WITHOUT_NCCL_GPU();
  OneRank r;
  const size_t n = size_t{32} << 20;
  const int adds = 20;
  float* x = r.be->alloc(n);
  float* one = r.be->alloc(n);
  float* out = r.be->alloc(n);
  const std::vector<float> ones(n, 1.f);
  r.be->upload(one, ones.data(), n);
  r.be->synchronize();
  for (int i = 0; i < adds; ++i) r.be->add(x, nullptr, one, n);  // x = 20, queued
  r.nccl->all_gather(x, out, n);                           // out = 20
  for (int i = 0; i < adds; ++i) r.be->add(out, nullptr, one, n);  // out = 40, queued after the gather
  const std::vector<float> result = download(*r.be, out, n);
  size_t wrong = 0;
  for (float v : result) wrong += v != 2.f * adds;
  EXPECT_EQ(wrong, 0u) << "first value " << result[0];
  r.be->release(x);
  r.be->release(one);
  r.be->release(out);
}

TEST(NcclCommunicator, RefusesHostMemoryForFloatCollectives) {
  SKIP_WITHOUT_NCCL_GPU();
  OneRank r;
  std::vector<float> host(16, 1.f);
  EXPECT_THROW(r.nccl->all_reduce_sum_async(host.data(), host.size()), Error);
  // Host collectives go through the bootstrap communicator.
  const double mine = 2.5;
  double all = 0;
  r.nccl->all_gather(&mine, &all, 1);
  EXPECT_EQ(all, 2.5);
}

// One rank over NCCL: the overlapped reduction is the model's own accumulation over its four
// sequences, bit for bit, and the exact reduction's separately summed gradients within
// float32 rounding.
TEST(NcclCommunicator, OverlappedReductionAccumulatesInTheModelsGradients) {
  SKIP_WITHOUT_NCCL_GPU();
  OneRank r;
  Config config = Config::preset("micro");
  config.world_size = 4;
  GPT exact_model(config, *r.be, config.seq_len, config.seq_len);
  GPT overlap_model(config, *r.be, config.seq_len, config.seq_len);
  GPT accumulated(config, *r.be, config.seq_len, config.seq_len);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.f, 0.2f);
  std::vector<float> params(exact_model.layout().total());
  for (float& p : params) p = normal(rng);
  exact_model.load_parameters(params);
  overlap_model.load_parameters(params);
  accumulated.load_parameters(params);
  std::vector<int32_t> inputs, targets;
  std::uniform_int_distribution<int32_t> token(0, config.vocab_size - 1);
  for (int i = 0; i < config.seq_len * config.world_size; ++i) {
    inputs.push_back(token(rng));
    targets.push_back(token(rng));
  }
  DataParallel exact(*r.host, exact_model, {GradReduce::kExact});
  DataParallel overlap(*r.nccl, overlap_model, {GradReduce::kAuto, 1024});
  EXPECT_EQ(overlap.mode(), GradReduce::kOverlap);  // auto on NCCL
  EXPECT_EQ(exact.compute_gradients(inputs, targets, 2), overlap.compute_gradients(inputs, targets, 2));
  accumulated.zero_grad();
  const size_t seq = static_cast<size_t>(config.seq_len);
  for (int s = 0; s < config.world_size; ++s) {
    accumulated.forward_backward(std::span(inputs).subspan(s * seq, seq), std::span(targets).subspan(s * seq, seq), 2,
                                 1.f / config.world_size);
  }
  const std::vector<float> a = exact_model.gradients_to_host(), b = overlap_model.gradients_to_host();
  const std::vector<float> c = accumulated.gradients_to_host();
  ASSERT_EQ(a.size(), b.size());
  ASSERT_EQ(c.size(), b.size());
  EXPECT_EQ(std::memcmp(c.data(), b.data(), b.size() * sizeof(float)), 0);
  double scale = 0;
  for (float g : a) scale = std::max(scale, static_cast<double>(std::abs(g)));
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(b[i], a[i], 1e-6 * scale + 1e-5 * std::abs(a[i])) << i;
}

}  // namespace
}  // namespace speedrun
