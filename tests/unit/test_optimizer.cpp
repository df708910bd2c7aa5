// One optimiser step against an independent double-precision hand computation of
// SPEC §4 (Adam with bias correction; Muon with Nesterov momentum and Newton-Schulz),
// and the schedules at named steps.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>

#include "backends/profiling_backend.h"
#include "model/params.h"
#include "optim/optimizer.h"
#include "support/finite_difference.h"

namespace speedrun {
namespace {

using Matrix = std::vector<std::vector<double>>;

Matrix matmul(const Matrix& a, const Matrix& b, bool transpose_b) {
  const size_t n = a.size(), k = a[0].size(), m = transpose_b ? b.size() : b[0].size();
  Matrix c(n, std::vector<double>(m, 0.0));
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < m; ++j)
      for (size_t l = 0; l < k; ++l) c[i][j] += a[i][l] * (transpose_b ? b[j][l] : b[l][j]);
  return c;
}

Matrix transpose(const Matrix& a) {
  Matrix t(a[0].size(), std::vector<double>(a.size()));
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < a[0].size(); ++j) t[j][i] = a[i][j];
  return t;
}

// SPEC §4's Muon direction for one matrix G (already the Nesterov update U).
Matrix newton_schulz(Matrix X, int steps) {
  const bool tall = X.size() > X[0].size();
  if (tall) X = transpose(X);
  double norm = 0;
  for (auto& row : X)
    for (double v : row) norm += v * v;
  norm = std::sqrt(norm) + 1e-7;
  for (auto& row : X)
    for (double& v : row) v /= norm;
  const double a = 3.4445, b = -4.7750, c = 2.0315;
  for (int it = 0; it < steps; ++it) {
    Matrix A = matmul(X, X, true);
    Matrix AA = matmul(A, A, false);
    Matrix B = A;
    for (size_t i = 0; i < A.size(); ++i)
      for (size_t j = 0; j < A.size(); ++j) B[i][j] = b * A[i][j] + c * AA[i][j];
    Matrix BX = matmul(B, X, false);
    for (size_t i = 0; i < X.size(); ++i)
      for (size_t j = 0; j < X[0].size(); ++j) X[i][j] = a * X[i][j] + BX[i][j];
  }
  return tall ? transpose(X) : X;
}

TEST(Schedules, LrMultiplierAndMomentumAtNamedSteps) {
  Config c;  // 1770 steps, cooldown 0.4, final 0.1
  EXPECT_DOUBLE_EQ(lr_multiplier(c, 0), 1.0);
  EXPECT_DOUBLE_EQ(lr_multiplier(c, 1062), 1.0);  // t = 0.4 exactly
  const double t = 1.0 - 1416.0 / 1770;             // inside the cooldown
  EXPECT_NEAR(lr_multiplier(c, 1416), (t / 0.4) + (1 - t / 0.4) * 0.1, 1e-15);
  EXPECT_NEAR(lr_multiplier(c, 1770), 0.1, 1e-15);
  EXPECT_DOUBLE_EQ(muon_momentum(c, 0), 0.85);
  EXPECT_NEAR(muon_momentum(c, 150), 0.90, 1e-15);
  EXPECT_NEAR(muon_momentum(c, 300), 0.95, 1e-15);
  EXPECT_NEAR(muon_momentum(c, 1000), 0.95, 1e-15);
}

class OptimizerStep : public ::testing::Test {
 protected:
  Config config = Config::preset("micro");
  ParamLayout layout{config};
  std::unique_ptr<Backend> be = make_cpu_backend();
  std::vector<float> params = testing::random_vector(layout.total(), 1);
  std::vector<std::vector<float>> grads = {testing::random_vector(layout.total(), 2),
                                           testing::random_vector(layout.total(), 3)};
  std::vector<float> zero_grad_tensor_ = std::vector<float>(layout.total(), 0.f);

  // Runs `steps` optimiser steps from `first_step` with grads[s % 2] and returns the params;
  // Muon batches of at most `muon_batch_floats` (0: the default).
  std::vector<float> run(int first_step, int steps, size_t muon_batch_floats = 0) {
    Optimizer opt(config, layout, *be, muon_batch_floats);
    std::vector<float> p(params);
    for (int s = first_step; s < first_step + steps; ++s) opt.step(p.data(), grads[(s - first_step) % 2].data(), s);
    return p;
  }
};

TEST_F(OptimizerStep, AdamGroupsMatchHandComputation) {
  const int first = 1000, steps = 2;  // inside the cooldown: the multiplier matters
  const std::vector<float> got = run(first, steps);
  for (const ParamSpec& spec : layout.specs()) {
    if (spec.group == ParamGroup::kMuon) continue;
    const double lr = spec.group == ParamGroup::kLmHead ? 0.008 : spec.group == ParamGroup::kEmbedding ? 0.6 : 0.04;
    for (size_t i = 0; i < spec.count; i += std::max<size_t>(1, spec.count / 50)) {
      double p = params[spec.offset + i], m = 0, v = 0;
      for (int k = 0; k < steps; ++k) {
        const double g = grads[k % 2][spec.offset + i];
        const int t = first + k + 1;  // updates so far including this one
        m = 0.8 * m + 0.2 * g;
        v = 0.95 * v + 0.05 * g * g;
        const double mult = lr_multiplier(config, first + k);
        p -= lr * mult * (m / (1 - std::pow(0.8, t))) / (std::sqrt(v) / std::sqrt(1 - std::pow(0.95, t)) + 1e-10);
      }
      ASSERT_NEAR(got[spec.offset + i], p, 2e-6 + 2e-5 * std::abs(p)) << spec.name << "[" << i << "]";
    }
  }
}

// SPEC §5b: with gradients near 1e-10 (the lambdas' at step 1) Adam's update is set by
// its epsilon, 1e-10: lr * g / (|g| + 1e-10) on the first step.
TEST_F(OptimizerStep, AdamEpsilonSetsTheUpdateOfTinyGradients) {
  for (float& g : grads[0]) g *= 1e-10f;
  const std::vector<float> got = run(0, 1);
  int checked = 0;
  for (const ParamSpec& spec : layout.specs()) {
    if (spec.group == ParamGroup::kMuon) continue;
    const double lr = spec.group == ParamGroup::kLmHead ? 0.008 : spec.group == ParamGroup::kEmbedding ? 0.6 : 0.04;
    for (size_t i = 0; i < spec.count; i += std::max<size_t>(1, spec.count / 20)) {
      const double g = grads[0][spec.offset + i];
      const double expected = params[spec.offset + i] - lr * g / (std::abs(g) + 1e-10);  // t = 1: no bias left
      ASSERT_NEAR(got[spec.offset + i], expected, 1e-6 * lr + 1e-6 * std::abs(expected)) << spec.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 20);
}

// SPEC §4's groups, by name: lm_head (Adam 0.008), the four embedding tables (Adam 0.6),
// every lambdas and skip_weights (Adam 0.04), every matrix inside blocks (Muon 0.05).
TEST(OptimizerGroups, EachTensorIsInTheSpecsGroup) {
  const ParamLayout layout(Config::preset("speedrun-124m"));
  auto ends_with = [](const std::string& name, const std::string& end) {
    return name.size() >= end.size() && name.compare(name.size() - end.size(), end.size(), end) == 0;
  };
  int muon = 0;
  for (const ParamSpec& spec : layout.specs()) {
    ParamGroup expected = ParamGroup::kMuon;
    if (spec.name == "lm_head.weight") {
      expected = ParamGroup::kLmHead;
    } else if (spec.name == "embed.weight" || spec.name.rfind("value_embeds.embed.", 0) == 0) {
      expected = ParamGroup::kEmbedding;
    } else if (ends_with(spec.name, "lambdas") || spec.name == "skip_weights") {
      expected = ParamGroup::kScalar;
    } else {
      ASSERT_EQ(spec.name.rfind("blocks.", 0), 0u) << spec.name;
      ASSERT_TRUE(ends_with(spec.name, "attn.qkv_w") || ends_with(spec.name, "c_proj.weight") ||
                  ends_with(spec.name, "mlp.c_fc.weight"))
          << spec.name;
      ++muon;
    }
    EXPECT_EQ(spec.group, expected) << spec.name;
  }
  EXPECT_EQ(muon, 11 * 2 + 12 * 2);  // qkv_w and attn.c_proj in 11 blocks, c_fc and c_proj in 12
}

TEST_F(OptimizerStep, MuonMatchesHandComputation) {
  const int first = 3, steps = 2;  // momentum still warming up (micro: 10 steps)
  const std::vector<float> got = run(first, steps);
  int checked = 0;
  for (const ParamSpec& spec : layout.specs()) {
    if (spec.group != ParamGroup::kMuon) continue;
    for (int b = 0; b < spec.matrices; ++b) {
      const size_t base = spec.offset + static_cast<size_t>(b) * spec.rows * spec.cols;
      Matrix W(spec.rows, std::vector<double>(spec.cols)), buf(spec.rows, std::vector<double>(spec.cols, 0.0));
      for (int r = 0; r < spec.rows; ++r)
        for (int c = 0; c < spec.cols; ++c) W[r][c] = params[base + r * spec.cols + c];
      for (int k = 0; k < steps; ++k) {
        const double mom = muon_momentum(config, first + k);
        Matrix U(spec.rows, std::vector<double>(spec.cols));
        for (int r = 0; r < spec.rows; ++r) {
          for (int c = 0; c < spec.cols; ++c) {
            const double g = grads[k % 2][base + r * spec.cols + c];
            buf[r][c] = mom * buf[r][c] + (1 - mom) * g;
            U[r][c] = (1 - mom) * g + mom * buf[r][c];
          }
        }
        const Matrix X = newton_schulz(U, 5);
        const double scale = 0.05 * lr_multiplier(config, first + k) *
                             std::sqrt(std::max(1.0, static_cast<double>(spec.rows) / spec.cols));
        for (int r = 0; r < spec.rows; ++r)
          for (int c = 0; c < spec.cols; ++c) W[r][c] -= scale * X[r][c];
      }
      for (int r = 0; r < spec.rows; ++r)
        for (int c = 0; c < spec.cols; ++c)
          ASSERT_NEAR(got[base + r * spec.cols + c], W[r][c], 1e-5) << spec.name << " matrix " << b << " (" << r << ","
                                                                   << c << ")";
      ++checked;
    }
  }
  // micro: 3 attention layers x 3 (qkv) + 3 c_proj + 4 x 2 MLP matrices.
  EXPECT_EQ(checked, 3 * 3 + 3 + 4 * 2);
}

// Muon's matrices of one shape are orthogonalised together (SPEC §4's batched Newton-Schulz):
// micro's 3 qkv tensors (3 matrices each) and 3 c_proj of 16 x 16 in one group; its 4 c_fc
// (64 x 16, tall: transposed) and 4 MLP c_proj (16 x 64) in another.
TEST_F(OptimizerStep, MuonGroupsTheMatricesOfOneShape) {
  Optimizer opt(config, layout, *be);
  const auto& groups = opt.muon_groups();
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_EQ(groups[0].r, 16);
  EXPECT_EQ(groups[0].c, 16);
  EXPECT_EQ(groups[1].r, 16);
  EXPECT_EQ(groups[1].c, 64);
  std::map<std::string, int> named;
  for (const auto& g : groups) {
    for (size_t i : g.specs) {
      const ParamSpec& spec = layout.specs()[i];
      EXPECT_EQ(spec.group, ParamGroup::kMuon) << spec.name;
      EXPECT_EQ(std::min(spec.rows, spec.cols), g.r) << spec.name;
      EXPECT_EQ(std::max(spec.rows, spec.cols), g.c) << spec.name;
      ++named[spec.name];
    }
  }
  EXPECT_EQ(groups[0].specs.size(), 6u);
  EXPECT_EQ(groups[1].specs.size(), 8u);
  for (const ParamSpec& spec : layout.specs()) {
    EXPECT_EQ(named[spec.name], spec.group == ParamGroup::kMuon ? 1 : 0) << spec.name;
  }
}

// Batching is how the work is issued, not what it computes: a tensor per batch, a few, or a
// whole group per batch give the same bits; and the default issues one batch per group, so
// one step's Newton-Schulz products are groups x steps x 3.
TEST_F(OptimizerStep, MuonBatchesOfAnySizeGiveTheSameBits) {
  const std::vector<float> whole_groups = run(3, 2);
  const std::vector<float> tensor_at_a_time = run(3, 2, 1);  // the bound rises to the largest tensor
  const std::vector<float> a_few = run(3, 2, 2 * 64 * 16);
  ASSERT_EQ(whole_groups.size(), tensor_at_a_time.size());
  for (size_t i = 0; i < whole_groups.size(); ++i) {
    ASSERT_EQ(std::bit_cast<uint32_t>(whole_groups[i]), std::bit_cast<uint32_t>(tensor_at_a_time[i])) << i;
    ASSERT_EQ(std::bit_cast<uint32_t>(whole_groups[i]), std::bit_cast<uint32_t>(a_few[i])) << i;
  }
  std::map<std::string, OpStats> stats;
  auto profiled = make_profiling_backend(*be, stats);
  Optimizer opt(config, layout, *profiled);
  std::vector<float> p(params);
  opt.step(p.data(), grads[0].data(), 3);
  EXPECT_EQ(stats["matmul (batched)"].calls, 2 * config.ns_steps * 3);
}

// speedrun-124m's Muon scratch: a momentum update of the largest tensor (768 x 3072), two
// batches of 8M floats (the 768 x 768 group goes 14 matrices at a time: 12, as its tensors
// are whole) and two sets of 14 Gram matrices of 768 x 768. 142 MB, where a tensor at a time
// needed 42 MB.
TEST(OptimizerMemory, MuonScratchIsBoundedByTheBatch) {
  const Config config = Config::preset("speedrun-124m");
  const ParamLayout layout(config);
  size_t state = 0;
  for (const ParamSpec& spec : layout.specs()) state += (spec.group == ParamGroup::kMuon ? 1 : 2) * spec.count;
  const size_t scratch = 768 * 3072 + 2 * Optimizer::kMuonBatchFloats + 2 * 14 * 768 * 768;
  EXPECT_EQ(Optimizer::memory_bytes(layout), (state + scratch) * sizeof(float));
  // A bound below the largest tensor rises to it; the Gram matrices follow the batch.
  const size_t smallest = 768 * 3072 + 2 * 768 * 3072 + 2 * 4 * 768 * 768;
  EXPECT_EQ(Optimizer::memory_bytes(layout, 1), (state + smallest) * sizeof(float));
}

TEST_F(OptimizerStep, OrthogonalizeRefusesMoreThanABatch) {
  Optimizer opt(config, layout, *be, 1);  // the bound: micro's largest tensor, a c_fc of 64 x 16
  std::vector<float> x = testing::random_vector(5 * 16 * 16, 4);
  EXPECT_NO_THROW(opt.orthogonalize(x.data(), 4, 16, 16));
  try {
    opt.orthogonalize(x.data(), 5, 16, 16);
    FAIL() << "5 matrices of 16 x 16 fit a batch of 1024 floats";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("5 matrices of 16 x 16"), std::string::npos) << e.what();
  }
}

// A batch bound of 1100 floats holds four of micro's 16 x 16 Gram matrices (1024 floats):
// one 33 x 33 matrix fits the batch (1089 floats) but its Gram matrix does not.
TEST_F(OptimizerStep, OrthogonalizeRefusesGramMatricesLargerThanTheLayouts) {
  Optimizer opt(config, layout, *be, 1100);
  std::vector<float> x = testing::random_vector(33 * 33, 5);
  try {
    opt.orthogonalize(x.data(), 1, 33, 33);
    FAIL() << "a 33 x 33 Gram matrix fits 1024 floats";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("1 matrices of 33 x 33 (1089 floats) do not fit the 1024"), std::string::npos)
        << e.what();
  }
  EXPECT_NO_THROW(opt.orthogonalize(x.data(), 1, 32, 32));
}

TEST_F(OptimizerStep, NewtonSchulzOutputIsRoughlyOrthogonal) {
  // After 5 iterations the singular values sit in roughly [0.7, 1.2] (the quintic's band).
  Optimizer opt(config, layout, *be);
  const int rows = 8, cols = 32;
  std::vector<float> x = testing::random_vector(rows * cols, 9);
  opt.orthogonalize(x.data(), 1, rows, cols);
  for (int i = 0; i < rows; ++i) {
    double norm = 0;
    for (int j = 0; j < cols; ++j) norm += x[i * cols + j] * x[i * cols + j];
    EXPECT_GT(std::sqrt(norm), 0.5);
    EXPECT_LT(std::sqrt(norm), 1.3);
  }
}

TEST_F(OptimizerStep, ZeroGradientStillUpdatesAdamAndAdvancesItsStep) {
  Optimizer opt(config, layout, *be);
  std::vector<float> p(params);
  opt.step(p.data(), grads[0].data(), 0);
  const std::vector<float> after_one = p;
  opt.step(p.data(), zero_grad_tensor_.data(), 1);
  const ParamSpec& emb = layout.at("embed.weight");
  // m decays but is nonzero: the parameter still moves.
  EXPECT_NE(p[emb.offset], after_one[emb.offset]);
}

}  // namespace
}  // namespace speedrun
