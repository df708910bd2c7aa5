// The profiling decorator `speedrun bench` reports through: every op still computes what
// the wrapped backend computes, and each memory-bound op adds its floor of memory traffic
// (each input read once, each output written once) under its own name.
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "backends/profiling_backend.h"

namespace speedrun {
namespace {

class ProfilingBackendTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> cpu_ = make_cpu_backend();
  std::map<std::string, OpStats> stats_;
  std::unique_ptr<Backend> profiled_ = make_profiling_backend(*cpu_, stats_);

  ~ProfilingBackendTest() override {
    for (void* p : owned_) profiled_->release(p);
  }

  float* allocated(size_t n) {
    float* x = profiled_->alloc(n);
    owned_.push_back(x);
    return x;
  }
  float* filled(size_t n, float value) {
    float* x = allocated(n);
    const std::vector<float> host(n, value);
    profiled_->upload(x, host.data(), n);
    return x;
  }
  std::vector<void*> owned_;  // released with the test
};

TEST_F(ProfilingBackendTest, MixCountsItsOperandsAndCodes) {
  const size_t n = 1000;
  float *a = filled(n, 1.f), *b = filled(n, 2.f), *coef = filled(2, 0.5f), *out = allocated(n);
  std::vector<uint16_t> codes(n);
  profiled_->mix_forward(out, nullptr, a, b, coef, n);  // a, b read; out written
  profiled_->mix_forward(out, codes.data(), a, nullptr, coef, n);  // a read; out and its codes written
  const OpStats& forward = stats_["mix/residual forward"];
  EXPECT_EQ(forward.calls, 2);
  EXPECT_EQ(forward.bytes, n * 12.0 + n * 10.0);
  EXPECT_GT(forward.seconds, 0);
  std::vector<float> host(n);
  profiled_->download(host.data(), out, n);
  EXPECT_EQ(host[7], 0.5f);  // the wrapped backend computed it: 0.5 * 1

  float *dout = filled(n, 1.f), *da = filled(n, 0.f), *db = filled(n, 0.f), *dcoef = filled(2, 0.f);
  // dout, a and b read, da read and written (accumulating), db read and written.
  profiled_->mix_backward(da, nullptr, true, db, dcoef, dout, a, b, coef, n);
  EXPECT_EQ(stats_["mix/residual backward"].bytes, n * (4 + 4 + 4 + 8 + 8.0));
}

TEST_F(ProfilingBackendTest, RowOpsCountRowsTimesWidth) {
  const int rows = 6, dim = 32;
  const size_t n = static_cast<size_t>(rows) * dim;
  float *x = filled(n, 1.f), *out = allocated(n), *rstd = allocated(rows);
  std::vector<uint16_t> stored(n);
  profiled_->rmsnorm_forward_bf16(out, stored.data(), rstd, x, rows, dim, 1e-6f);  // x read; out, codes written
  EXPECT_EQ(stats_["rmsnorm forward"].bytes, n * 10.0);
  const int V = 48;
  float* logits = filled(static_cast<size_t>(rows) * V, 0.25f);
  std::vector<int32_t> targets_host(rows, 3);
  int32_t* targets = profiled_->alloc_i32(rows);
  owned_.push_back(targets);
  profiled_->upload_i32(targets, targets_host.data(), rows);
  float* loss = allocated(rows);
  profiled_->softcap_cross_entropy(logits, loss, targets, rows, V, 15.f, 1.f);  // logits read, overwritten
  EXPECT_EQ(stats_["softcap cross-entropy"].bytes, rows * V * 8.0);
  EXPECT_EQ(stats_["matmul"].bytes, 0);  // matmuls count FLOPs instead
}

}  // namespace
}  // namespace speedrun
