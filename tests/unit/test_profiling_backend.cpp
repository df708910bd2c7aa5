// The profiling decorator `speedrun bench` reports through: every op still computes what
// the wrapped backend computes, and each memory-bound op adds its floor of memory traffic
// (each input read once, each output written once) under its own name.
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "backends/product_shape.h"
#include "backends/profiling_backend.h"
#include "util/error.h"

namespace speedrun {
namespace {

class ProfilingBackendTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> cpu_ = make_cpu_backend();
  std::map<std::string, OpStats> stats_, shapes_;
  std::unique_ptr<Backend> profiled_ = make_profiling_backend(*cpu_, stats_, nullptr, &shapes_);

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
  profiled_->mix_backward(da, nullptr, true, db, true, dcoef, dout, a, b, coef, n);
  EXPECT_EQ(stats_["mix/residual backward"].bytes, n * (4 + 4 + 4 + 8 + 8.0));
  // Writing da and db without reading them first: 8 bytes less per element.
  profiled_->mix_backward(da, nullptr, false, db, false, dcoef, dout, a, b, coef, n);
  EXPECT_EQ(stats_["mix/residual backward"].bytes, n * (4 + 4 + 4 + 8 + 8.0) + n * (4 + 4 + 4 + 4 + 4.0));
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

TEST(ProductShape, NamesAreReadBackAndAnythingElseIsRefused) {
  const ProductShape forward{false, true, 49152, 2304, 768, true, false};
  const ProductShape weight_gradient{true, false, 768, 3072, 49152, false, true};
  const ProductShape batched{false, false, 8, 8, 16, false, true, 6};
  EXPECT_EQ(product_shape_name(forward), "NT 49152x2304x768 bf16");
  EXPECT_EQ(product_shape_name(weight_gradient), "TN 768x3072x49152 f32 +C");
  EXPECT_EQ(product_shape_name(batched), "NN 8x8x16 f32 +C x6");
  for (const ProductShape& s : {forward, weight_gradient, batched}) {
    EXPECT_EQ(parse_product_shape(product_shape_name(s)), s) << product_shape_name(s);
  }
  for (const char* bad : {"", "NT", "NX 1x2x3 f32", "NT 1x2 f32", "NT 1x2x3", "NT 1x2x3 f16", "NT 0x2x3 f32",
                          "NT 1x2x3 f32 x1", "NT 1x2x3 f32 +C +C", "NT 1x2x3 f32 x2 +C", "NT 1x2x3 f32 x2z",
                          "NT  1x2x3 f32", "NT 1x2x3y f32", "NT -1x2x3 f32"}) {
    try {
      parse_product_shape(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("'") + bad + "'"), std::string::npos) << e.what();
    }
  }
}

TEST_F(ProfilingBackendTest, ProductsAreCountedByShapeAsWellAsByOp) {
  const int M = 4, N = 3, K = 5;
  float *A = filled(M * K, 1.f), *B = filled(K * N, 2.f), *C = filled(M * N, 1.f);
  profiled_->gemm(false, false, M, N, K, 1.f, A, K, B, N, 1.f, C, N);  // C += A B
  profiled_->gemm(false, false, M, N, K, 1.f, A, K, B, N, 0.f, C, N);  // C = A B
  profiled_->gemm(false, false, M, N, K, 1.f, A, K, B, N, 0.f, C, N);
  std::vector<uint16_t> codes(M * M);
  profiled_->gemm_to_bf16(false, true, M, M, K, A, K, A, K, nullptr, codes.data(), M);  // A A^T
  profiled_->gemm_batched(true, false, K, K, M, 1.f, A, K, 0, A, K, 0, 0.f, filled(2 * K * K, 0.f), K, K * K, 2);

  EXPECT_EQ(shapes_.size(), 4u);
  EXPECT_EQ(shapes_["NN 4x3x5 f32 +C"].calls, 1);
  EXPECT_EQ(shapes_["NN 4x3x5 f32"].calls, 2);
  EXPECT_EQ(shapes_["NN 4x3x5 f32"].flops, 2 * 2.0 * M * N * K);
  EXPECT_EQ(shapes_["NT 4x4x5 bf16"].calls, 1);
  EXPECT_EQ(shapes_["TN 5x5x4 f32 x2"].flops, 2 * 2.0 * K * K * M);
  // Every product is in its op's row too, with the same time.
  EXPECT_EQ(stats_["matmul"].calls, 4);
  EXPECT_EQ(stats_["matmul (batched)"].calls, 1);
  double shape_seconds = 0;
  for (const auto& [name, s] : shapes_) shape_seconds += s.seconds;
  EXPECT_DOUBLE_EQ(shape_seconds, stats_["matmul"].seconds + stats_["matmul (batched)"].seconds);
  std::vector<float> host(M * N);
  profiled_->download(host.data(), C, M * N);
  EXPECT_EQ(host[0], 2.f * K);  // computed by the wrapped backend: C = A B, all ones times twos
}

}  // namespace
}  // namespace speedrun
