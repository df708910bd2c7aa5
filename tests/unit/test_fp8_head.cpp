// The CPU backend's FP8 lm_head (SPEC §6): against a float64 evaluation of the same
// quantised formula (tight), against the float32 head within the error FP8 quantisation
// predicts, saturation, the kept weight, and training of the micro preset with it.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "backends/low_precision.h"
#include "data/shard.h"
#include "model/gpt.h"
#include "support/files.h"
#include "support/finite_difference.h"
#include "support/temp_dir.h"
#include "train/trainer.h"

namespace speedrun {
namespace {

using lowp::Fp8Format;
using lowp::round_to_bf16;
using lowp::round_to_fp8;

constexpr double kFloatEps = 0x1p-24;

std::vector<float> normal(size_t n, float stddev, uint64_t seed) {
  return speedrun::testing::random_vector(n, seed, stddev);
}

// A head of realistic magnitudes: x rmsnormed (entries ~1, so 2x spans e4m3's normal
// range), W ~ 0.03 (2^9 W ~ 15), and a few entries large enough to saturate.
struct HeadCase {
  int rows = 37, V = 208, d = 48;
  std::vector<float> x = normal(static_cast<size_t>(rows) * d, 1.f, 1);
  std::vector<float> W = normal(static_cast<size_t>(V) * d, 0.03f, 2);
  // Gradients of a mean loss over ~50k tokens are ~1e-5; times 2^19 they sit inside e5m2.
  std::vector<float> dlogits = normal(static_cast<size_t>(rows) * V, 2e-5f, 3);
  HeadCase() {
    x[3] = 400.f;   // 2x = 800 saturates to 448
    W[5] = -2.f;    // 2^9 W = -1024 saturates to -448
    dlogits[7] = 1.f;  // 2^19 saturates to 57344
    dlogits[8] = 1e-13f;  // underflows to zero in e5m2
  }
};

std::vector<float> quantized(const std::vector<float>& v, float scale, Fp8Format format) {
  std::vector<float> q(v.size());
  for (size_t i = 0; i < v.size(); ++i) q[i] = round_to_fp8(v[i] * scale, format);
  return q;
}

// |got - want| <= one bf16 rounding (2^-8 relative) plus float32 summation error.
void expect_bf16_of(float got, double want, double abs_terms, int n, const std::string& what) {
  const double bound = 0x1p-8 * std::abs(want) + 2.0 * n * kFloatEps * abs_terms + 1e-30;
  ASSERT_LE(std::abs(got - want), bound) << what << ": got " << got << ", want " << want;
}

TEST(Fp8Head, ForwardMatchesTheQuantisedFormulaInFloat64) {
  HeadCase c;
  auto be = make_cpu_backend();
  std::vector<float> logits(static_cast<size_t>(c.rows) * c.V, NAN);
  be->fp8_head_forward(logits.data(), c.x.data(), c.W.data(), c.rows, c.V, c.d, true);
  const auto xq = quantized(c.x, 2.f, Fp8Format::kE4M3), wq = quantized(c.W, 512.f, Fp8Format::kE4M3);
  int exactly_bf16_of_exact = 0;
  for (int r = 0; r < c.rows; ++r) {
    for (int v = 0; v < c.V; ++v) {
      double sum = 0, abs_terms = 0;
      for (int k = 0; k < c.d; ++k) {
        const double t = static_cast<double>(xq[r * c.d + k]) * wq[v * c.d + k];
        sum += t;
        abs_terms += std::abs(t);
      }
      const double want = sum / 1024.0;
      const float got = logits[static_cast<size_t>(r) * c.V + v];
      ASSERT_EQ(got, round_to_bf16(got)) << "logits are bf16 values";
      expect_bf16_of(got, want, abs_terms / 1024.0, c.d, "logit " + std::to_string(r) + "," + std::to_string(v));
      exactly_bf16_of_exact += got == round_to_bf16(static_cast<float>(want));
    }
  }
  // The float32 sum differs from the exact one by ~1e-7 relative: only values within that of
  // a bf16 rounding boundary may round the other way.
  EXPECT_GE(exactly_bf16_of_exact, c.rows * c.V - c.rows * c.V / 100);
}

TEST(Fp8Head, BackwardMatchesTheQuantisedFormulaInFloat64) {
  HeadCase c;
  auto be = make_cpu_backend();
  const float s = 0.25f;  // output_scale: 1/world_size in training
  std::vector<float> logits(static_cast<size_t>(c.rows) * c.V);
  be->fp8_head_forward(logits.data(), c.x.data(), c.W.data(), c.rows, c.V, c.d, true);
  std::vector<float> dx(static_cast<size_t>(c.rows) * c.d, NAN);
  const std::vector<float> dW0 = normal(static_cast<size_t>(c.V) * c.d, 1e-3f, 4);
  std::vector<float> dW = dW0;
  be->fp8_head_backward(dx.data(), dW.data(), c.dlogits.data(), c.x.data(), c.W.data(), c.rows, c.V, c.d, s);
  const auto xq = quantized(c.x, 2.f, Fp8Format::kE4M3), wq = quantized(c.W, 512.f, Fp8Format::kE4M3);
  const auto gq = quantized(c.dlogits, 524288.f, Fp8Format::kE5M2);
  EXPECT_EQ(gq[7], 57344.f);
  EXPECT_EQ(gq[8], 0.f);
  for (int r = 0; r < c.rows; ++r) {
    for (int k = 0; k < c.d; ++k) {
      double sum = 0, abs_terms = 0;
      for (int v = 0; v < c.V; ++v) {
        const double t = static_cast<double>(gq[r * c.V + v]) * wq[v * c.d + k];
        sum += t;
        abs_terms += std::abs(t);
      }
      const double scale = s / (524288.0 * 512.0);
      const float got = dx[r * c.d + k];
      ASSERT_EQ(got, round_to_bf16(got)) << "dx is bf16";
      expect_bf16_of(got, sum * scale, abs_terms * scale, c.V, "dx " + std::to_string(r) + "," + std::to_string(k));
    }
  }
  for (int v = 0; v < c.V; ++v) {
    for (int k = 0; k < c.d; ++k) {
      double sum = 0, abs_terms = 0;
      for (int r = 0; r < c.rows; ++r) {
        const double t = static_cast<double>(gq[r * c.V + v]) * xq[r * c.d + k];
        sum += t;
        abs_terms += std::abs(t);
      }
      const double scale = s / (524288.0 * 2.0);
      const size_t i = static_cast<size_t>(v) * c.d + k;
      const double want = dW0[i] + sum * scale;
      const double bound = 2.0 * (c.rows + 1) * kFloatEps * (std::abs(dW0[i]) + abs_terms * scale) + 1e-30;
      ASSERT_LE(std::abs(dW[i] - want), bound) << "dW " << v << "," << k;
    }
  }
}

// The float32 head's products x W against the FP8 ones: each e4m3 operand carries a
// relative rounding error of at most 2^-4 (e5m2: 2^-3) in its normal range, plus half a
// subnormal quantum (absolute) below it; the result one more bf16 rounding.
TEST(Fp8Head, StaysWithinTheQuantisationErrorOfTheFloatHead) {
  HeadCase c;
  c.x[3] = 1.f;  // no saturation here: it is no rounding error
  c.W[5] = 0.01f;
  c.dlogits[7] = 1e-5f;
  auto be = make_cpu_backend();
  std::vector<float> logits(static_cast<size_t>(c.rows) * c.V);
  be->fp8_head_forward(logits.data(), c.x.data(), c.W.data(), c.rows, c.V, c.d, true);
  double max_error = 0;
  for (int r = 0; r < c.rows; ++r) {
    for (int v = 0; v < c.V; ++v) {
      double exact = 0, bound = 0;
      for (int k = 0; k < c.d; ++k) {
        const double a = c.x[r * c.d + k], b = c.W[v * c.d + k];
        exact += a * b;
        // (2x)(1 + e1) / 2 + x-subnormal quantum 2^-9 / 2 / 2 and likewise for W.
        bound += (std::abs(a) + 0x1p-11) * (std::abs(b) + 0x1p-19) * (1 + 0x1p-4) * (1 + 0x1p-4) -
                 std::abs(a) * std::abs(b);
      }
      bound += 0x1p-8 * (std::abs(exact) + bound);
      const double error = std::abs(logits[static_cast<size_t>(r) * c.V + v] - exact);
      ASSERT_LE(error, bound) << r << "," << v;
      max_error = std::max(max_error, error);
    }
  }
  EXPECT_GT(max_error, 1e-4) << "the FP8 head must not be the float head";

  std::vector<float> dx(static_cast<size_t>(c.rows) * c.d);
  std::vector<float> dW(static_cast<size_t>(c.V) * c.d, 0.f);
  be->fp8_head_backward(dx.data(), dW.data(), c.dlogits.data(), c.x.data(), c.W.data(), c.rows, c.V, c.d, 1.f);
  for (int r = 0; r < c.rows; ++r) {
    for (int k = 0; k < c.d; ++k) {
      double exact = 0, bound = 0;
      for (int v = 0; v < c.V; ++v) {
        const double g = c.dlogits[r * c.V + v], w = c.W[v * c.d + k];
        exact += g * w;
        bound += (std::abs(g) + 0x1p-36) * (std::abs(w) + 0x1p-19) * (1 + 0x1p-3) * (1 + 0x1p-4) -
                 std::abs(g) * std::abs(w);
      }
      bound += 0x1p-8 * (std::abs(exact) + bound);
      ASSERT_LE(std::abs(dx[r * c.d + k] - exact), bound) << "dx " << r << "," << k;
    }
  }
  for (int v = 0; v < c.V; ++v) {
    for (int k = 0; k < c.d; ++k) {
      double exact = 0, bound = 0;
      for (int r = 0; r < c.rows; ++r) {
        const double g = c.dlogits[r * c.V + v], a = c.x[r * c.d + k];
        exact += g * a;
        bound += (std::abs(g) + 0x1p-36) * (std::abs(a) + 0x1p-11) * (1 + 0x1p-3) * (1 + 0x1p-4) -
                 std::abs(g) * std::abs(a);
      }
      bound += 1e-6 * (std::abs(exact) + bound);
      ASSERT_LE(std::abs(dW[static_cast<size_t>(v) * c.d + k] - exact), bound) << "dW " << v << "," << k;
    }
  }
}

TEST(Fp8Head, SaturatesLargeInputsInsteadOfOverflowing) {
  const int rows = 2, V = 3, d = 16;
  std::vector<float> x(rows * d, 1000.f), W(V * d, 5.f);  // 2x -> 448, 2^9 W -> 448
  W[2 * d] = -1e30f;                                       // -> -448
  x[d] = INFINITY;                                         // -> 448
  auto be = make_cpu_backend();
  std::vector<float> logits(rows * V);
  be->fp8_head_forward(logits.data(), x.data(), W.data(), rows, V, d, true);
  const float full = d * 448.f * 448.f / 1024.f;  // 3136, a bf16 value
  EXPECT_EQ(logits[0], full);
  EXPECT_EQ(logits[V], full);
  EXPECT_EQ(logits[2], round_to_bf16(full - 2 * 448.f * 448.f / 1024.f));  // 2744 -> 2752 (tie to even)
  std::vector<float> dlogits(rows * V, 1.f);  // 2^19 -> 57344
  std::vector<float> dx(rows * d), dW(V * d, 0.f);
  be->fp8_head_backward(dx.data(), dW.data(), dlogits.data(), x.data(), W.data(), rows, V, d, 1.f);
  // dx = sum over V of 57344 * 448 / 2^28; dW = sum over rows of 57344 * 448 / 2^20.
  EXPECT_EQ(dx[1], round_to_bf16(3 * 57344.f * 448.f / 0x1p28f));
  EXPECT_EQ(dx[0], round_to_bf16(57344.f * 448.f / 0x1p28f));  // -448 + 448 + 448 over V
  EXPECT_EQ(dW[d + 1], 2 * 57344.f * 448.f / 0x1p20f);
  for (float v : logits) EXPECT_TRUE(std::isfinite(v));
  for (float v : dx) EXPECT_TRUE(std::isfinite(v));
}

TEST(Fp8Head, KeepsTheQuantisedWeightUntilAskedToRequantise) {
  const int rows = 1, V = 2, d = 16;
  std::vector<float> x(d, 0.5f), W(V * d, 0.25f / 512.f * 8.f);  // 2^9 W = 2 exactly
  auto be = make_cpu_backend();
  std::vector<float> logits(rows * V);
  be->fp8_head_forward(logits.data(), x.data(), W.data(), rows, V, d, true);
  EXPECT_EQ(logits[0], d * 1.f * 2.f / 1024.f);
  for (float& w : W) w *= 2.f;
  be->fp8_head_forward(logits.data(), x.data(), W.data(), rows, V, d, false);
  EXPECT_EQ(logits[0], d * 1.f * 2.f / 1024.f) << "the kept weight is used";
  be->fp8_head_forward(logits.data(), x.data(), W.data(), rows, V, d, true);
  EXPECT_EQ(logits[0], d * 1.f * 4.f / 1024.f);
  std::vector<float> other = W;  // another pointer: requantised whatever the flag says
  for (float& w : other) w *= 2.f;
  be->fp8_head_forward(logits.data(), x.data(), other.data(), rows, V, d, false);
  EXPECT_EQ(logits[0], d * 1.f * 8.f / 1024.f);
}

// ---------------------------------------------------------------------------------------
// In the model

std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

// fp8_head_loss is forward, softcap cross-entropy and backward in turn (the CPU's own
// definition; a GPU fuses them and is tested against this).
TEST(Fp8Head, LossInOneCallIsTheThreeStepsInTurn) {
  auto fused = make_cpu_backend(), in_turn = make_cpu_backend();
  const HeadCase c;
  std::vector<int32_t> targets(c.rows);
  for (int r = 0; r < c.rows; ++r) targets[r] = (r * 37) % c.V;
  const std::vector<float> dW0 = normal(c.W.size(), 1e-3f, 4);
  std::vector<float> logits(static_cast<size_t>(c.rows) * c.V), loss(c.rows), dx(c.x.size()), dW = dW0;
  fused->fp8_head_loss(logits.data(), loss.data(), dx.data(), dW.data(), c.x.data(), c.W.data(), targets.data(), c.rows,
                       c.V, c.d, 15.f, 1.f / c.rows, 0.5f, true);
  std::vector<float> logits2(logits.size()), loss2(c.rows), dx2(c.x.size()), dW2 = dW0;
  in_turn->fp8_head_forward(logits2.data(), c.x.data(), c.W.data(), c.rows, c.V, c.d, true);
  in_turn->softcap_cross_entropy(logits2.data(), loss2.data(), targets.data(), c.rows, c.V, 15.f, 1.f / c.rows);
  in_turn->fp8_head_backward(dx2.data(), dW2.data(), logits2.data(), c.x.data(), c.W.data(), c.rows, c.V, c.d, 0.5f);
  EXPECT_EQ(loss, loss2);
  EXPECT_EQ(dx, dx2);
  EXPECT_EQ(dW, dW2);
  EXPECT_NE(dW, dW0);
}

TEST(Fp8Head, ModelTrainsWithItAndEvaluatesWithThePlainHead) {
  auto be = make_cpu_backend();
  Config fp32 = Config::preset("micro");
  Config fp8 = fp32;
  fp8.lm_head_fp8 = 1;
  GPT a(fp32, *be, 64, 64), b(fp8, *be, 64, 64);
  // Random parameters everywhere, the head at a realistic scale.
  std::vector<float> params = normal(a.layout().total(), 0.3f, 9);
  for (const ParamSpec& s : a.layout().specs()) {
    if (s.name.find("lambdas") != std::string::npos || s.name == "skip_weights") {
      for (size_t i = 0; i < s.count; ++i) params[s.offset + i] = 0.6f + 0.3f * params[s.offset + i];
    }
  }
  a.load_parameters(params);
  b.load_parameters(params);
  const auto inputs = random_tokens(64, fp32.vocab_size, 1), targets = random_tokens(64, fp32.vocab_size, 2);
  EXPECT_EQ(a.forward(inputs, targets, 2), b.forward(inputs, targets, 2)) << "evaluation uses the plain head";
  a.zero_grad();
  b.zero_grad();
  const double la = a.forward_backward(inputs, targets, 2, 0.5f), lb = b.forward_backward(inputs, targets, 2, 0.5f);
  EXPECT_NE(la, lb) << "training uses the FP8 head";
  EXPECT_NEAR(lb, la, 0.02 * la);
  const auto ga = a.gradients_to_host(), gb = b.gradients_to_host();
  for (const ParamSpec& s : a.layout().specs()) {
    double diff = 0, norm = 0;
    for (size_t i = s.offset; i < s.offset + s.count; ++i) {
      diff += (ga[i] - gb[i]) * static_cast<double>(ga[i] - gb[i]);
      norm += ga[i] * static_cast<double>(ga[i]);
    }
    // FP8 operands carry ~3% relative error each; gradients stay within ~10% in L2.
    EXPECT_LE(std::sqrt(diff), 0.15 * std::sqrt(norm) + 1e-12) << s.name;
  }
}

void write_micro_shards(const testing::TempDir& dir) {
  write_shard(dir / "train_000000.bin", testing::rule_tokens(6000, 1));
  write_shard(dir / "train_000001.bin", testing::rule_tokens(6000, 2));
  write_shard(dir / "val_000000.bin", testing::rule_tokens(600, 3));
}

TEST(Fp8Head, MicroTrainingStartsAtTheFloatHeadsLossAndStaysClose) {
  testing::TempDir data("fp8_head_train");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  auto options = [&](int fp8, const std::string& out) {
    TrainOptions o;
    o.config = Config::preset("micro");
    o.config.lm_head_fp8 = fp8;
    o.train_glob = data / "train_*.bin";
    o.val_glob = data / "val_*.bin";
    o.steps = 12;
    o.out_dir = out;
    o.quiet = true;
    return o;
  };
  const TrainResult plain = train(options(0, data / "plain"), *be);
  const TrainResult fp8 = train(options(1, data / "fp8"), *be);
  ASSERT_EQ(plain.train_losses.size(), 12u);
  ASSERT_EQ(fp8.train_losses.size(), 12u);
  // The head starts at zero: every logit is 0 in both heads, so step 0 is identical.
  EXPECT_EQ(fp8.train_losses[0], plain.train_losses[0]);
  EXPECT_NEAR(fp8.train_losses[0], std::log(384.0), 1e-5);
  bool differs = false;
  for (size_t s = 1; s < 12; ++s) {
    differs = differs || fp8.train_losses[s] != plain.train_losses[s];
    EXPECT_NEAR(fp8.train_losses[s], plain.train_losses[s], 0.03 * plain.train_losses[s]) << "step " << s;
  }
  EXPECT_TRUE(differs) << "the FP8 head changes the training";
  EXPECT_LT(fp8.train_losses.back(), fp8.train_losses.front() - 0.3) << "and it learns";
}

}  // namespace
}  // namespace speedrun
