// Each CPU backend op's backward against central finite differences of its forward,
// and the forwards against direct formulas of SPEC §2.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "backends/low_precision.h"
#include "model/attention_mask.h"
#include "support/bf16_codes.h"
#include "support/finite_difference.h"
#include "util/error.h"

namespace speedrun {
namespace {

using testing::dot;
using testing::encoded;
using testing::numerical_gradient;
using testing::random_vector;
using testing::widened;
using testing::worst_error_ratio;

class CpuOps : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_cpu_backend();
};

// loss = <R, f(x)>: its gradient is the op's backward applied to R.
TEST_F(CpuOps, RmsnormBackwardMatchesFiniteDifferences) {
  const int rows = 3, dim = 16;
  const auto x = random_vector(rows * dim, 1);
  const auto R = random_vector(rows * dim, 2);
  auto loss = [&](const std::vector<float>& in) {
    std::vector<float> out(in.size()), rstd(rows);
    be->rmsnorm_forward(out.data(), nullptr, rstd.data(), in.data(), rows, dim, 1.1920929e-07f);
    return dot(out, R);
  };
  std::vector<float> out(x.size()), rstd(rows), dx(x.size());
  be->rmsnorm_forward(out.data(), nullptr, rstd.data(), x.data(), rows, dim, 1.1920929e-07f);
  be->rmsnorm_backward(dx.data(), nullptr, R.data(), out.data(), rstd.data(), rows, dim, false);
  EXPECT_LE(worst_error_ratio(dx, numerical_gradient(loss, x, 1e-2), 2e-3, 2e-2), 1.0);
}

TEST_F(CpuOps, RmsnormForwardHasNoScaleAndFloatEpsilon) {
  std::vector<float> x = {3.f, 4.f}, out(2), rstd(1);
  be->rmsnorm_forward(out.data(), nullptr, rstd.data(), x.data(), 1, 2, 1.1920929e-07f);
  const float expected = 1.f / std::sqrt(12.5f + 1.1920929e-07f);
  EXPECT_FLOAT_EQ(rstd[0], expected);
  EXPECT_FLOAT_EQ(out[0], 3.f * expected);
}

// out_codes: the bf16 codes of the very floats written to out (a held matmul operand), in
// place too; out itself is not rounded.
TEST_F(CpuOps, RmsnormForwardWritesTheCodesOfItsOutputWhenAsked) {
  const int rows = 5, dim = 24;
  const auto x = random_vector(rows * dim, 31, 3.f);
  std::vector<float> plain(x.size()), out(x.size()), rstd(rows);
  std::vector<uint16_t> codes(x.size());
  be->rmsnorm_forward(plain.data(), nullptr, rstd.data(), x.data(), rows, dim, 1e-6f);
  be->rmsnorm_forward(out.data(), codes.data(), rstd.data(), x.data(), rows, dim, 1e-6f);
  EXPECT_EQ(out, plain);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(codes[i], lowp::encode_bf16(out[i])) << i;
  std::vector<float> in_place = x;
  std::vector<uint16_t> in_place_codes(x.size());
  be->rmsnorm_forward(in_place.data(), in_place_codes.data(), rstd.data(), in_place.data(), rows, dim, 1e-6f);
  EXPECT_EQ(in_place, plain);
  EXPECT_EQ(in_place_codes, codes);
  std::vector<float> rounded(out.size());
  lowp::copy_rounded_to_bf16(rounded.data(), out.data(), out.size());
  EXPECT_NE(out, rounded) << "out was rounded";
}

// rmsnorm_backward (accumulating, as for d x1), mix_backward (in place, as for v's gradient)
// and add (a skip's share of an output gradient) write the codes of their final output when
// asked, changing nothing else.
TEST_F(CpuOps, BackwardOpsWriteTheCodesOfTheirFinalOutputWhenAsked) {
  const int rows = 5, dim = 24;
  const size_t n = static_cast<size_t>(rows) * dim;
  const auto x = random_vector(n, 32, 3.f), dout = random_vector(n, 33), dx0 = random_vector(n, 34);
  std::vector<float> out(n), rstd(rows);
  be->rmsnorm_forward(out.data(), nullptr, rstd.data(), x.data(), rows, dim, 1e-6f);
  std::vector<float> plain = dx0, dx = dx0;
  std::vector<uint16_t> codes(n);
  be->rmsnorm_backward(plain.data(), nullptr, dout.data(), out.data(), rstd.data(), rows, dim, true);
  be->rmsnorm_backward(dx.data(), codes.data(), dout.data(), out.data(), rstd.data(), rows, dim, true);
  EXPECT_EQ(dx, plain);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(codes[i], lowp::encode_bf16(dx[i])) << "rmsnorm_backward " << i;

  const auto a = random_vector(n, 35), b = random_vector(n, 36), coef = random_vector(2, 37);
  std::vector<float> da_plain = dout, da = dout, db = dx0, db_plain = dx0, dcoef(2), dcoef_plain(2);
  be->mix_backward(da_plain.data(), nullptr, false, db_plain.data(), true, dcoef_plain.data(), da_plain.data(),
                   a.data(), b.data(), coef.data(), n);
  be->mix_backward(da.data(), codes.data(), false, db.data(), true, dcoef.data(), da.data(), a.data(), b.data(),
                   coef.data(), n);
  EXPECT_EQ(da, da_plain);
  EXPECT_EQ(db, db_plain);
  EXPECT_EQ(dcoef, dcoef_plain);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(codes[i], lowp::encode_bf16(da[i])) << "mix_backward " << i;
  // The codes alone (v's gradient held for its products): da null, the rest as before.
  std::vector<uint16_t> alone(n);
  std::vector<float> db_alone = dx0, dcoef_alone(2);
  be->mix_backward(nullptr, alone.data(), false, db_alone.data(), true, dcoef_alone.data(), dout.data(), a.data(),
                   b.data(), coef.data(), n);
  EXPECT_EQ(alone, codes);
  EXPECT_EQ(db_alone, db_plain);
  EXPECT_EQ(dcoef_alone, dcoef_plain);
  EXPECT_THROW(be->mix_backward(nullptr, nullptr, false, db_alone.data(), true, dcoef_alone.data(), dout.data(),
                                a.data(), b.data(), coef.data(), n),
               Error);
  EXPECT_THROW(be->mix_backward(nullptr, alone.data(), true, db_alone.data(), true, dcoef_alone.data(), dout.data(),
                                a.data(), b.data(), coef.data(), n),
               Error);

  std::vector<float> sum = dx0, sum_plain = dx0;
  be->add(sum_plain.data(), nullptr, dout.data(), n);
  be->add(sum.data(), codes.data(), dout.data(), n);
  EXPECT_EQ(sum, sum_plain);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(codes[i], lowp::encode_bf16(sum[i])) << "add " << i;
}

// rotary and mix_forward keeping attention's q, k and v as bf16 activations: the result
// rounded (in place too) and its codes stored.
TEST_F(CpuOps, RotaryAndMixForwardRoundTheirOutputAndStoreItsCodesWhenAsked) {
  const int T = 40, H = 2, D = 16;
  const size_t n = static_cast<size_t>(T) * H * D;
  const auto x = random_vector(n, 38, 3.f), b = random_vector(n, 39, 3.f), coef = random_vector(2, 40);
  auto expect_kept = [](const std::vector<float>& got, const std::vector<uint16_t>& codes,
                        const std::vector<float>& unrounded, const char* op) {
    size_t changed = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(codes[i], lowp::encode_bf16(unrounded[i])) << op << " code " << i;
      ASSERT_EQ(got[i], lowp::decode_bf16(codes[i])) << op << " rounded " << i;
      changed += got[i] != unrounded[i];
    }
    EXPECT_GT(changed, got.size() / 2) << op << " did not round";
  };
  std::vector<float> plain = x, rotated = x;
  std::vector<uint16_t> codes(n, 0x7FC0);
  be->rotary(plain.data(), nullptr, T, H, D, 1024.f, false);
  be->rotary(rotated.data(), codes.data(), T, H, D, 1024.f, false);
  expect_kept(rotated, codes, plain, "rotary");

  for (const float* second : {b.data(), static_cast<const float*>(nullptr)}) {
    std::vector<float> mixed(n), mixed_plain(n), in_place = x;
    std::fill(codes.begin(), codes.end(), 0x7FC0);
    be->mix_forward(mixed_plain.data(), nullptr, x.data(), second, coef.data(), n);
    be->mix_forward(mixed.data(), codes.data(), x.data(), second, coef.data(), n);
    expect_kept(mixed, codes, mixed_plain, "mix_forward");
    std::vector<uint16_t> in_place_codes(n);
    be->mix_forward(in_place.data(), in_place_codes.data(), in_place.data(), second, coef.data(), n);
    EXPECT_EQ(in_place, mixed);
    EXPECT_EQ(in_place_codes, codes);
    std::vector<uint16_t> codes_alone(n);  // out null: the codes alone
    be->mix_forward(nullptr, codes_alone.data(), x.data(), second, coef.data(), n);
    EXPECT_EQ(codes_alone, codes);
  }
  EXPECT_THROW(be->mix_forward(nullptr, nullptr, x.data(), b.data(), coef.data(), n), Error);
}

TEST_F(CpuOps, RotaryMatchesSpecFormulaAndInverts) {
  const int T = 300, H = 2, D = 16;
  const auto x = random_vector(T * H * D, 3);
  std::vector<float> y(x);
  be->rotary(y.data(), nullptr, T, H, D, 1024.f, false);
  for (int t : {0, 1, 7, 299}) {
    for (int h = 0; h < H; ++h) {
      for (int i = 0; i < D / 2; ++i) {
        const float f = i < D / 4 ? static_cast<float>(std::pow(1.0 / 1024, static_cast<double>(i) / (D / 4 - 1))) : 0.f;
        const float theta = static_cast<float>(t) * f;
        const float* xr = &x[(t * H + h) * D];
        const float y1 = xr[i] * std::cos(theta) + xr[i + D / 2] * std::sin(theta);
        const float y2 = -xr[i] * std::sin(theta) + xr[i + D / 2] * std::cos(theta);
        EXPECT_NEAR(y[(t * H + h) * D + i], y1, 1e-5);
        EXPECT_NEAR(y[(t * H + h) * D + i + D / 2], y2, 1e-5);
      }
    }
  }
  // The second half of the frequencies are zero: those pairs are untouched.
  EXPECT_EQ(y[(5 * H + 1) * D + D / 4], x[(5 * H + 1) * D + D / 4]);
  be->rotary(y.data(), nullptr, T, H, D, 1024.f, true);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(y[i], x[i], 1e-5);
}

TEST_F(CpuOps, MixBackwardMatchesFiniteDifferences) {
  const size_t n = 40;
  const auto a = random_vector(n, 4), b = random_vector(n, 5), R = random_vector(n, 6);
  const std::vector<float> coef = {0.7f, -0.3f};
  auto loss_coef = [&](const std::vector<float>& c) {
    std::vector<float> out(n);
    be->mix_forward(out.data(), nullptr, a.data(), b.data(), c.data(), n);
    return dot(out, R);
  };
  auto loss_a = [&](const std::vector<float>& in) {
    std::vector<float> out(n);
    be->mix_forward(out.data(), nullptr, in.data(), b.data(), coef.data(), n);
    return dot(out, R);
  };
  std::vector<float> da(n), db(n, 0.f), dcoef(2, 0.f);
  be->mix_backward(da.data(), nullptr, false, db.data(), true, dcoef.data(), R.data(), a.data(), b.data(), coef.data(),
                   n);
  EXPECT_LE(worst_error_ratio(dcoef, numerical_gradient(loss_coef, coef, 1e-2), 1e-3, 1e-3), 1.0);
  EXPECT_LE(worst_error_ratio(da, numerical_gradient(loss_a, a, 1e-2), 1e-3, 1e-3), 1.0);
  for (size_t i = 0; i < n; ++i) EXPECT_FLOAT_EQ(db[i], -0.3f * R[i]);
  // db's first contribution is written: whatever was there (NaN here) is not read.
  std::vector<float> written(n, std::numeric_limits<float>::quiet_NaN()), added(n, 2.f), dcoef2(2, 0.f);
  be->mix_backward(da.data(), nullptr, false, written.data(), false, dcoef2.data(), R.data(), a.data(), b.data(),
                   coef.data(), n);
  be->mix_backward(da.data(), nullptr, false, added.data(), true, dcoef2.data(), R.data(), a.data(), b.data(),
                   coef.data(), n);
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(written[i], db[i]) << i;
    EXPECT_FLOAT_EQ(added[i], 2.f + db[i]) << i;  // within an FMA's rounding
  }
}

TEST_F(CpuOps, ScaledAddBackwardMatchesFiniteDifferences) {
  const size_t n = 30;
  const auto base = random_vector(n, 7), y = random_vector(n, 8), R = random_vector(n, 9);
  const std::vector<float> w = {1.3f};
  auto loss_w = [&](const std::vector<float>& weight) {
    std::vector<float> out(base);
    be->scaled_add_forward(out.data(), y.data(), weight.data(), n);
    return dot(out, R);
  };
  std::vector<float> dy(n, 0.f), dw(1, 0.f);
  be->scaled_add_backward(dy.data(), true, dw.data(), R.data(), y.data(), w.data(), n);
  EXPECT_LE(worst_error_ratio(dw, numerical_gradient(loss_w, w, 1e-2), 1e-3, 1e-3), 1.0);
  for (size_t i = 0; i < n; ++i) EXPECT_FLOAT_EQ(dy[i], 1.3f * R[i]);
  // Not accumulating, dy is written (NaN there is not read); accumulating, added to.
  std::vector<float> written(n, std::numeric_limits<float>::quiet_NaN()), added(n, 2.f), dw2(1, 0.f);
  be->scaled_add_backward(written.data(), false, dw2.data(), R.data(), y.data(), w.data(), n);
  be->scaled_add_backward(added.data(), true, dw2.data(), R.data(), y.data(), w.data(), n);
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(written[i], dy[i]) << i;
    EXPECT_FLOAT_EQ(added[i], 2.f + dy[i]) << i;  // within an FMA's rounding
  }
}

TEST_F(CpuOps, Relu2BackwardMatchesFiniteDifferences) {
  const size_t n = 50;
  auto x = random_vector(n, 10);
  for (float& v : x) v += (v > 0 ? 0.1f : -0.1f);  // keep away from the kink
  const auto R = random_vector(n, 11);
  auto loss = [&](const std::vector<float>& in) {
    std::vector<float> out(n);
    be->relu2_forward(out.data(), in.data(), n);
    return dot(out, R);
  };
  std::vector<float> dx(n);
  be->relu2_backward(dx.data(), R.data(), x.data(), n);
  EXPECT_LE(worst_error_ratio(dx, numerical_gradient(loss, x, 1e-3), 1e-3, 1e-2), 1.0);
}

// bf16 activation storage: each op is its float32 op on the values rounded to bf16, and
// the codes it keeps decode to exactly the float32 values it passes on.
TEST_F(CpuOps, Bf16RmsnormRoundsItsOutputAndBackpropagatesFromTheCodes) {
  const int rows = 5, dim = 24;
  const auto x = random_vector(rows * dim, 21, 3.f);
  std::vector<float> exact(x.size()), rstd_exact(rows);
  be->rmsnorm_forward(exact.data(), nullptr, rstd_exact.data(), x.data(), rows, dim, 1e-6f);
  std::vector<float> out(x.size()), rstd(rows);
  std::vector<uint16_t> codes(x.size());
  be->rmsnorm_forward_bf16(out.data(), codes.data(), rstd.data(), x.data(), rows, dim, 1e-6f);
  EXPECT_EQ(rstd, rstd_exact);
  int changed = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(out[i], lowp::round_to_bf16(exact[i])) << i;
    ASSERT_EQ(codes[i], lowp::encode_bf16(exact[i])) << i;
    changed += out[i] != exact[i];
  }
  EXPECT_GT(changed, static_cast<int>(x.size()) / 2);  // the rounding is real
  std::vector<float> in_place = x, rstd_in_place(rows);
  be->rmsnorm_forward_bf16(in_place.data(), nullptr, rstd_in_place.data(), in_place.data(), rows, dim, 1e-6f);
  EXPECT_EQ(in_place, out);

  const auto dout = random_vector(x.size(), 22);
  std::vector<float> dx_codes(x.size(), 1.f), dx_floats(x.size(), 1.f);
  std::vector<uint16_t> dx_out_codes(x.size());
  be->rmsnorm_backward_bf16(dx_codes.data(), dx_out_codes.data(), dout.data(), codes.data(), rstd.data(), rows, dim,
                            true);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(dx_out_codes[i], lowp::encode_bf16(dx_codes[i])) << i;
  be->rmsnorm_backward(dx_floats.data(), nullptr, dout.data(), out.data(), rstd.data(), rows, dim, true);
  // The same function; the row's dot product may be vectorised in another order.
  for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(dx_codes[i], dx_floats[i], 1e-6f * (1 + std::abs(dx_floats[i]))) << i;
  // The codes alone (dx null, as when they are a held operand): the same codes, and the
  // floats dout came in untouched.
  std::vector<float> with_floats(x.size());
  std::vector<uint16_t> codes_with_floats(x.size()), codes_alone(x.size());
  be->rmsnorm_backward_bf16(with_floats.data(), codes_with_floats.data(), dout.data(), codes.data(), rstd.data(), rows,
                            dim, false);
  std::vector<float> dout_copy = dout;
  be->rmsnorm_backward_bf16(nullptr, codes_alone.data(), dout_copy.data(), codes.data(), rstd.data(), rows, dim, false);
  EXPECT_EQ(codes_alone, codes_with_floats);
  EXPECT_EQ(dout_copy, dout);
  EXPECT_THROW(be->rmsnorm_backward_bf16(nullptr, codes_alone.data(), dout.data(), codes.data(), rstd.data(), rows, dim,
                                         true),
               Error);  // nothing to accumulate into
  EXPECT_THROW(be->rmsnorm_backward_bf16(nullptr, nullptr, dout.data(), codes.data(), rstd.data(), rows, dim, false),
               Error);  // nothing to write at all
}

// q's and k's norm-then-rotary in one op: the ops in sequence, recomputable from the
// normalised codes, and a backward that is the gradient of the (float32) forward up to the
// bf16 rounding of the normalised values it reads.
TEST_F(CpuOps, FusedHeadNormAndRotaryAreTheOpsInSequenceWithTheirGradient) {
  const int T = 6, H = 2, D = 16, rows = T * H;
  const size_t n = static_cast<size_t>(rows) * D;
  const float eps = 1e-6f, base = 1024.f;
  const auto x = random_vector(n, 41, 2.f);
  std::vector<float> out(n), rstd(rows), seq = x, seq_rstd(rows);
  std::vector<uint16_t> normed(n), rotated(n), seq_normed(n), seq_rotated(n);
  be->rmsnorm_rotary_bf16(out.data(), normed.data(), rotated.data(), rstd.data(), x.data(), T, H, D, eps, base);
  be->rmsnorm_forward_bf16(seq.data(), seq_normed.data(), seq_rstd.data(), seq.data(), rows, D, eps);
  be->rotary(seq.data(), seq_rotated.data(), T, H, D, base, false);
  EXPECT_EQ(normed, seq_normed);
  EXPECT_EQ(rotated, seq_rotated);
  EXPECT_EQ(out, seq);
  EXPECT_EQ(rstd, seq_rstd);
  std::vector<uint16_t> again(n), alone(n);
  std::vector<float> again_out(n);
  be->rotary_from_bf16(again_out.data(), again.data(), normed.data(), T, H, D, base);
  EXPECT_EQ(again, rotated);
  EXPECT_EQ(again_out, out);
  be->rmsnorm_rotary_bf16(nullptr, normed.data(), alone.data(), rstd.data(), x.data(), T, H, D, eps, base);
  EXPECT_EQ(alone, rotated);

  // L(x) = <w, rotary(rmsnorm(x))> in float32; its gradient from the fused backward.
  const auto w = random_vector(n, 42), u = random_vector(n, 43);
  auto loss = [&](const std::vector<float>& at) {
    std::vector<float> y(n), r(rows);
    be->rmsnorm_forward(y.data(), nullptr, r.data(), at.data(), rows, D, eps);
    be->rotary(y.data(), nullptr, T, H, D, base, false);
    return dot(w, y);
  };
  std::vector<float> dx(n);
  std::vector<uint16_t> dx_codes(n), codes_alone(n);
  be->rotary_rmsnorm_backward_bf16(dx.data(), dx_codes.data(), w.data(), normed.data(), rstd.data(), T, H, D, base);
  const double numeric = testing::directional_derivative(loss, x, u, 1e-3);
  const double band = 1e-2 * std::abs(numeric) + 1e-3;  // normed read as bf16: ~2^-8 relative
  EXPECT_NEAR(dot(dx, u), numeric, band);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(dx_codes[i], lowp::encode_bf16(dx[i])) << i;
  // Rotation and norm in the other order are not the gradient: the test can tell.
  std::vector<float> wrong = w;
  be->rmsnorm_backward_bf16(wrong.data(), nullptr, wrong.data(), normed.data(), rstd.data(), rows, D, false);
  be->rotary(wrong.data(), nullptr, T, H, D, base, true);
  EXPECT_GT(std::abs(dot(wrong, u) - numeric), 3 * band);
  // The codes alone, dout untouched; dx aliasing dout.
  std::vector<float> dout = w;
  be->rotary_rmsnorm_backward_bf16(nullptr, codes_alone.data(), dout.data(), normed.data(), rstd.data(), T, H, D, base);
  EXPECT_EQ(codes_alone, dx_codes);
  EXPECT_EQ(dout, w);
  be->rotary_rmsnorm_backward_bf16(dout.data(), nullptr, dout.data(), normed.data(), rstd.data(), T, H, D, base);
  EXPECT_EQ(dout, dx);
  EXPECT_THROW(be->rotary_rmsnorm_backward_bf16(nullptr, nullptr, w.data(), normed.data(), rstd.data(), T, H, D, base),
               Error);
}

TEST_F(CpuOps, Bf16Relu2RoundsItsInputAndBackpropagatesFromTheCodes) {
  const size_t n = 300;
  auto h = random_vector(n, 23, 4.f);
  h[0] = std::numeric_limits<float>::quiet_NaN();
  h[1] = 0.f;
  std::vector<float> rounded(n);
  for (size_t i = 0; i < n; ++i) rounded[i] = lowp::round_to_bf16(h[i]);
  std::vector<float> expected(n);
  be->relu2_forward(expected.data(), rounded.data(), n);
  std::vector<float> g(n);
  std::vector<uint16_t> codes(n), g_codes(n);
  be->relu2_forward_bf16(g.data(), g_codes.data(), codes.data(), h.data(), n);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(codes[i], lowp::encode_bf16(h[i])) << i;
    ASSERT_EQ(g_codes[i], lowp::encode_bf16(g[i])) << i;  // the output's codes, for a held operand
    if (i > 0) ASSERT_EQ(g[i], expected[i]) << i;
  }
  EXPECT_TRUE(std::isnan(lowp::decode_bf16(codes[0])));
  std::vector<float> in_place = h;
  be->relu2_forward_bf16(in_place.data(), nullptr, nullptr, in_place.data(), n);
  for (size_t i = 1; i < n; ++i) ASSERT_EQ(in_place[i], g[i]) << i;
  std::vector<float> again(n);
  std::vector<uint16_t> again_codes(n);
  be->relu2_from_bf16(again.data(), again_codes.data(), codes.data(), n);
  for (size_t i = 1; i < n; ++i) ASSERT_EQ(again[i], g[i]) << i;
  EXPECT_EQ(again_codes, g_codes);
  // The codes alone (no float output), from either op.
  std::vector<uint16_t> only_codes(n), only_from_codes(n);
  be->relu2_forward_bf16(nullptr, only_codes.data(), nullptr, h.data(), n);
  be->relu2_from_bf16(nullptr, only_from_codes.data(), codes.data(), n);
  EXPECT_EQ(only_codes, g_codes);
  EXPECT_EQ(only_from_codes, g_codes);

  const auto dout = random_vector(n, 24);
  std::vector<float> dx_codes = dout, dx_floats(n), widened(n);
  be->widen_bf16(widened.data(), codes.data(), n);
  for (size_t i = 1; i < n; ++i) ASSERT_EQ(widened[i], rounded[i]) << i;
  std::vector<uint16_t> dx_out_codes(n);
  // In place, as the model runs it.
  be->relu2_backward_bf16(dx_codes.data(), dx_out_codes.data(), dx_codes.data(), codes.data(), n);
  be->relu2_backward(dx_floats.data(), dout.data(), rounded.data(), n);
  for (size_t i = 1; i < n; ++i) ASSERT_EQ(dx_codes[i], dx_floats[i]) << i;
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(dx_out_codes[i], lowp::encode_bf16(dx_codes[i])) << i;
  // The codes alone: the same codes, dout untouched.
  std::vector<uint16_t> codes_alone(n);
  std::vector<float> dout_copy = dout;
  be->relu2_backward_bf16(nullptr, codes_alone.data(), dout_copy.data(), codes.data(), n);
  EXPECT_EQ(codes_alone, dx_out_codes);
  EXPECT_EQ(std::memcmp(dout_copy.data(), dout.data(), n * sizeof(float)), 0);
  EXPECT_THROW(be->relu2_backward_bf16(nullptr, nullptr, dout.data(), codes.data(), n), Error);
}

// The bf16 residual stream: each op reads the stream as codes and is exactly its float32
// twin on their widened values, its stream output rounded once (in place too), a NaN
// passed on; the gradients stay float32.
std::vector<uint16_t> stream_codes(size_t n, uint64_t seed) {
  const auto values = random_vector(n, seed, 2.f);
  std::vector<uint16_t> codes(n);
  for (size_t i = 0; i < n; ++i) codes[i] = lowp::encode_bf16(values[i]);
  return codes;
}

TEST_F(CpuOps, StreamMixAndSkipAddAreTheirFloatTwinsRoundedOnce) {
  const size_t n = 203;
  auto a = stream_codes(n, 31);
  const auto b = stream_codes(n, 32);
  a[7] = 0x7FC0;  // NaN
  const std::vector<float> coef = {0.83f, -0.41f}, weight = {1.37f};
  for (bool with_b : {true, false}) {
    SCOPED_TRACE(with_b ? "a and b" : "a alone");
    std::vector<float> twin(n);
    be->mix_forward(twin.data(), nullptr, widened(a).data(), with_b ? widened(b).data() : nullptr, coef.data(), n);
    std::vector<uint16_t> out(n, 0x1234);
    be->mix_forward_bf16(out.data(), a.data(), with_b ? b.data() : nullptr, coef.data(), n);
    EXPECT_EQ(out, encoded(twin));
    EXPECT_TRUE(std::isnan(lowp::decode_bf16(out[7])));
    std::vector<uint16_t> in_place = a;
    be->mix_forward_bf16(in_place.data(), in_place.data(), with_b ? b.data() : nullptr, coef.data(), n);
    EXPECT_EQ(in_place, out);
  }
  std::vector<float> sum = widened(a);
  be->scaled_add_forward(sum.data(), widened(b).data(), weight.data(), n);
  std::vector<uint16_t> skipped(n, 0x1234);
  be->scaled_add_forward_bf16(skipped.data(), a.data(), b.data(), weight.data(), n);
  EXPECT_EQ(skipped, encoded(sum));
  int changed = 0;  // the sum is rounded: not every value is a bf16 already
  for (size_t i = 0; i < n; ++i) changed += lowp::decode_bf16(skipped[i]) != sum[i];
  EXPECT_GT(changed, static_cast<int>(n) / 2);
  std::vector<uint16_t> in_place = a;
  be->scaled_add_forward_bf16(in_place.data(), in_place.data(), b.data(), weight.data(), n);
  EXPECT_EQ(in_place, skipped);
}

TEST_F(CpuOps, StreamBackwardsReadTheCodesAsTheirFloatTwinsReadTheValues) {
  const size_t n = 157;
  const auto a = stream_codes(n, 33), b = stream_codes(n, 34);
  const auto dout = random_vector(n, 35);
  const std::vector<float> coef = {0.83f, -0.41f}, weight = {1.37f};
  for (bool accumulate : {false, true}) {
    SCOPED_TRACE(accumulate ? "accumulating" : "overwriting");
    std::vector<float> da(n, 0.5f), db(n, 0.25f), dcoef = {0.1f, 0.2f};
    std::vector<uint16_t> da_codes(n);
    be->mix_backward(da.data(), da_codes.data(), accumulate, db.data(), accumulate, dcoef.data(), dout.data(),
                     widened(a).data(), widened(b).data(), coef.data(), n);
    std::vector<float> da2(n, 0.5f), db2(n, 0.25f), dcoef2 = {0.1f, 0.2f};
    std::vector<uint16_t> da_codes2(n);
    be->mix_backward_bf16(da2.data(), da_codes2.data(), accumulate, db2.data(), accumulate, dcoef2.data(),
                          dout.data(), a.data(), b.data(), coef.data(), n);
    EXPECT_EQ(da2, da);
    EXPECT_EQ(db2, db);
    EXPECT_EQ(dcoef2, dcoef);
    EXPECT_EQ(da_codes2, da_codes);
    std::vector<float> dy(n, 0.5f), dw = {0.3f}, dy2(n, 0.5f), dw2 = {0.3f};
    be->scaled_add_backward(dy.data(), accumulate, dw.data(), dout.data(), widened(b).data(), weight.data(), n);
    be->scaled_add_backward_bf16(dy2.data(), accumulate, dw2.data(), dout.data(), b.data(), weight.data(), n);
    EXPECT_EQ(dy2, dy);
    EXPECT_EQ(dw2, dw);
    EXPECT_NE(dw[0], 0.3f);
  }
}

TEST_F(CpuOps, StreamRmsnormReadsCodesRoundsItsOutputAndX0IsWrittenAsCodesAlone) {
  const int rows = 6, dim = 40;
  const size_t n = static_cast<size_t>(rows) * dim;
  const auto x = stream_codes(n, 36);
  std::vector<float> twin(n), twin_rstd(rows);
  std::vector<uint16_t> twin_codes(n);
  be->rmsnorm_forward_bf16(twin.data(), twin_codes.data(), twin_rstd.data(), widened(x).data(), rows, dim, 1e-6f);
  std::vector<float> out(n), rstd(rows);
  std::vector<uint16_t> codes(n);
  be->rmsnorm_forward_from_bf16(out.data(), codes.data(), rstd.data(), x.data(), rows, dim, 1e-6f);
  EXPECT_EQ(out, twin);  // rounded: the bf16 activation, widened
  EXPECT_EQ(codes, twin_codes);
  std::vector<float> exact(n);
  be->rmsnorm_forward(exact.data(), nullptr, rstd.data(), widened(x).data(), rows, dim, 1e-6f);
  EXPECT_NE(out, exact);
  EXPECT_EQ(rstd, twin_rstd);
  std::vector<uint16_t> codes_alone(n);
  be->rmsnorm_forward_from_bf16(nullptr, codes_alone.data(), rstd.data(), x.data(), rows, dim, 1e-6f);
  EXPECT_EQ(codes_alone, twin_codes);
  EXPECT_THROW(be->rmsnorm_forward_from_bf16(nullptr, nullptr, rstd.data(), x.data(), rows, dim, 1e-6f), Error);

  // x0: rmsnorm_forward_bf16's codes without its floats.
  const auto embedded = random_vector(n, 37, 3.f);
  std::vector<float> rounded(n), rounded_rstd(rows);
  std::vector<uint16_t> x0(n), x0_alone(n);
  be->rmsnorm_forward_bf16(rounded.data(), x0.data(), rounded_rstd.data(), embedded.data(), rows, dim, 1e-6f);
  be->rmsnorm_forward_bf16(nullptr, x0_alone.data(), rstd.data(), embedded.data(), rows, dim, 1e-6f);
  EXPECT_EQ(x0_alone, x0);
  EXPECT_EQ(rstd, rounded_rstd);
  EXPECT_THROW(be->rmsnorm_forward_bf16(nullptr, nullptr, rstd.data(), embedded.data(), rows, dim, 1e-6f), Error);
}

// Products computing bf16 activations as codes alone (q, k and v before their norms and mix,
// relu(h)^2's gradient) feed ops that read codes: each is its float twin on the widened
// codes; a value embedding is looked up rounded.
TEST_F(CpuOps, OpsReadingCodesFromProductsAreTheirFloatTwins) {
  const int T = 5, H = 3, D = 8;
  const size_t n = static_cast<size_t>(T) * H * D;
  const auto x = stream_codes(n, 41);
  std::vector<float> twin(n), twin_rstd(T * H), out(n), rstd(T * H);
  std::vector<uint16_t> twin_normed(n), twin_rotated(n), normed(n), rotated(n);
  be->rmsnorm_rotary_bf16(twin.data(), twin_normed.data(), twin_rotated.data(), twin_rstd.data(), widened(x).data(), T,
                          H, D, 1e-6f, 1024.f);
  be->rmsnorm_rotary_from_bf16(out.data(), normed.data(), rotated.data(), rstd.data(), x.data(), T, H, D, 1e-6f,
                               1024.f);
  EXPECT_EQ(out, twin);
  EXPECT_EQ(normed, twin_normed);
  EXPECT_EQ(rotated, twin_rotated);
  EXPECT_EQ(rstd, twin_rstd);
  std::vector<uint16_t> rotated_alone(n);
  be->rmsnorm_rotary_from_bf16(nullptr, nullptr, rotated_alone.data(), rstd.data(), x.data(), T, H, D, 1e-6f, 1024.f);
  EXPECT_EQ(rotated_alone, twin_rotated);

  const auto dg = stream_codes(n, 42), h = stream_codes(n, 43);
  std::vector<float> dh_twin(n), dh(n);
  std::vector<uint16_t> dh_twin_codes(n), dh_codes(n), dh_codes_alone(n);
  be->relu2_backward_bf16(dh_twin.data(), dh_twin_codes.data(), widened(dg).data(), h.data(), n);
  be->relu2_backward_from_bf16(dh.data(), dh_codes.data(), dg.data(), h.data(), n);
  EXPECT_EQ(dh, dh_twin);
  EXPECT_EQ(dh_codes, dh_twin_codes);
  be->relu2_backward_from_bf16(nullptr, dh_codes_alone.data(), dg.data(), h.data(), n);
  EXPECT_EQ(dh_codes_alone, dh_twin_codes);
  EXPECT_THROW(be->relu2_backward_from_bf16(nullptr, nullptr, dg.data(), h.data(), n), Error);

  const int vocab = 7, dim = 12;
  auto table = random_vector(static_cast<size_t>(vocab) * dim, 44, 2.f);
  table[3 * dim + 1] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<int32_t> tokens = {3, 0, 6, 3, 2};
  std::vector<float> rows(tokens.size() * dim);
  be->embedding_forward(rows.data(), table.data(), tokens.data(), static_cast<int>(tokens.size()), dim);
  std::vector<uint16_t> codes(rows.size());
  be->embedding_forward_bf16(codes.data(), table.data(), tokens.data(), static_cast<int>(tokens.size()), dim);
  EXPECT_EQ(codes, encoded(rows));
  EXPECT_TRUE(std::isnan(lowp::decode_bf16(codes[1])));
}

TEST_F(CpuOps, EmbeddingBackwardScatterAddsRepeatedTokens) {
  const int V = 5, dim = 3;
  std::vector<int32_t> tokens = {1, 3, 1};
  std::vector<float> dout = {1, 2, 3, 4, 5, 6, 7, 8, 9}, dtable(V * dim, 0.f);
  be->embedding_backward(dtable.data(), dout.data(), tokens.data(), 3, dim);
  EXPECT_EQ(dtable, (std::vector<float>{0, 0, 0, 8, 10, 12, 0, 0, 0, 4, 5, 6, 0, 0, 0}));
  std::vector<float> table = random_vector(V * dim, 12), out(9);
  be->embedding_forward(out.data(), table.data(), tokens.data(), 3, dim);
  EXPECT_EQ(out[3], table[3 * dim]);
}

// Softcap cross-entropy: value against a direct double computation, gradient against FD.
TEST_F(CpuOps, SoftcapCrossEntropyValueAndGradient) {
  const int rows = 3, V = 11;
  const auto z = random_vector(rows * V, 13, 8.f);
  const std::vector<int32_t> targets = {0, 5, 10};
  auto loss = [&](const std::vector<float>& in) {
    std::vector<float> logits(in), row_loss(rows);
    be->softcap_cross_entropy(logits.data(), row_loss.data(), targets.data(), rows, V, 15.f, 0.f);
    double s = 0;
    for (float l : row_loss) s += l;
    return s;
  };
  for (int r = 0; r < rows; ++r) {
    double total = 0, target_y = 0;
    for (int j = 0; j < V; ++j) {
      const double y = 30.0 / (1.0 + std::exp(-z[r * V + j] / 7.5));
      total += std::exp(y);
      if (j == targets[r]) target_y = y;
    }
    std::vector<float> logits(z), row_loss(rows);
    be->softcap_cross_entropy(logits.data(), row_loss.data(), targets.data(), rows, V, 15.f, 0.f);
    EXPECT_NEAR(row_loss[r], std::log(total) - target_y, 1e-4);
  }
  std::vector<float> grad(z), row_loss(rows);
  be->softcap_cross_entropy(grad.data(), row_loss.data(), targets.data(), rows, V, 15.f, 1.f);
  EXPECT_LE(worst_error_ratio(grad, numerical_gradient(loss, z, 1e-2), 1e-3, 1e-2), 1.0);
}

// A NaN logit must reach its row's loss (the fault check reads the losses), as on the GPU;
// +-infinity saturates through the softcap to a finite loss, as in the reference.
TEST_F(CpuOps, SoftcapCrossEntropyPassesNanOnButSaturatesInfinity) {
  const int rows = 3, V = 8;
  std::vector<float> logits = random_vector(rows * V, 5, 2.f);
  const std::vector<int32_t> targets = {1, 2, 3};
  logits[0 * V + 6] = std::numeric_limits<float>::quiet_NaN();
  logits[1 * V + 2] = std::numeric_limits<float>::infinity();
  logits[1 * V + 4] = -std::numeric_limits<float>::infinity();
  for (float grad_scale : {0.f, 1.f}) {
    std::vector<float> z(logits), row_loss(rows);
    be->softcap_cross_entropy(z.data(), row_loss.data(), targets.data(), rows, V, 15.f, grad_scale);
    EXPECT_TRUE(std::isnan(row_loss[0])) << grad_scale;
    EXPECT_TRUE(std::isfinite(row_loss[1])) << grad_scale;
    EXPECT_TRUE(std::isfinite(row_loss[2])) << grad_scale;
    if (grad_scale != 0.f) {
      EXPECT_TRUE(std::isnan(z[0 * V + 6]));
      for (int j = V; j < rows * V; ++j) EXPECT_TRUE(std::isfinite(z[j])) << j;
    }
  }
}

TEST_F(CpuOps, ZeroHeadGivesLogOfPaddedVocabulary) {
  const int V = 50304;
  std::vector<float> logits(V, 0.f), row_loss(1);
  std::vector<int32_t> target = {123};
  be->softcap_cross_entropy(logits.data(), row_loss.data(), target.data(), 1, V, 15.f, 0.f);
  EXPECT_NEAR(row_loss[0], std::log(50304.0), 4 * 1e-6);
}

// Attention: forward against a dense softmax with the element rule; backward against FD.
struct AttentionCase {
  int T, H, D, block, window;
  std::vector<int32_t> tokens;
};

std::vector<float> dense_attention(const AttentionCase& c, const std::vector<float>& q, const std::vector<float>& k,
                                   const std::vector<float>& v, float scale) {
  const std::vector<int32_t> doc = document_ids(c.tokens, 50256);
  std::vector<float> y(q.size(), 0.f);
  const int row = c.H * c.D;
  for (int h = 0; h < c.H; ++h) {
    for (int t = 0; t < c.T; ++t) {
      std::vector<double> p(c.T, 0.0);
      double m = -1e300, total = 0;
      for (int s = 0; s < c.T; ++s) {
        if (!key_visible(doc.data(), t, s, c.block, c.window)) continue;
        double sc = 0;
        for (int i = 0; i < c.D; ++i) sc += static_cast<double>(q[t * row + h * c.D + i]) * k[s * row + h * c.D + i];
        p[s] = scale * sc;
        m = std::max(m, p[s]);
      }
      for (int s = 0; s < c.T; ++s) {
        if (!key_visible(doc.data(), t, s, c.block, c.window)) { p[s] = 0; continue; }
        p[s] = std::exp(p[s] - m);
        total += p[s];
      }
      for (int s = 0; s < c.T; ++s) {
        for (int i = 0; i < c.D; ++i) y[t * row + h * c.D + i] += static_cast<float>(p[s] / total * v[s * row + h * c.D + i]);
      }
    }
  }
  return y;
}

// Short documents (about 5 tokens) over the first quarter, then one document to the end:
// the document mask cuts early on, the window late (the long document spans more blocks
// than any window these tests use: window_cuts checks).
AttentionCase make_case(int T, int H, int D, int block, int window, uint64_t seed) {
  AttentionCase c{T, H, D, block, window, std::vector<int32_t>(T, 5)};
  std::mt19937_64 rng(seed);
  for (int t = 0; t < T / 4; ++t) c.tokens[t] = (rng() % 5 == 0) ? 50256 : 5;
  c.tokens[T / 4] = 50256;
  return c;
}

// Whether the case's window hides pairs that one block more would show: else a wrong
// window rule could pass.
bool window_cuts(const AttentionCase& c) {
  const std::vector<int32_t> doc = document_ids(c.tokens, 50256);
  for (int q = 0; q < c.T; ++q) {
    for (int k = 0; k <= q; ++k) {
      if (key_visible(doc.data(), q, k, c.block, c.window + 1) != key_visible(doc.data(), q, k, c.block, c.window)) {
        return true;
      }
    }
  }
  return false;
}

TEST_F(CpuOps, AttentionForwardMatchesDenseMaskedSoftmax) {
  for (int window : {0, 1, 2, 3, 5}) {
    AttentionCase c = make_case(96, 2, 8, 8, window, 100 + window);
    ASSERT_TRUE(window == 0 || window_cuts(c)) << "window " << window;  // 0 acts as 1 (SPEC §3)
    const int n = c.T * c.H * c.D;
    const auto q = random_vector(n, 14, 2.f), k = random_vector(n, 15, 2.f), v = random_vector(n, 16);
    const std::vector<int32_t> doc = document_ids(c.tokens, 50256);
    std::vector<float> y(n), lse(c.H * c.T);
    be->attention_forward(y.data(), nullptr, lse.data(), q.data(), k.data(), v.data(), {}, doc.data(),
                          AttentionShape{c.T, c.H, c.D, c.block, c.window, 0.12f});
    const auto expected = dense_attention(c, q, k, v, 0.12f);
    for (int i = 0; i < n; ++i) ASSERT_NEAR(y[i], expected[i], 2e-5) << "window " << window << " index " << i;
  }
}

// y_codes: the bf16 codes of the y written beside them (c_proj's held operand), y unchanged.
TEST_F(CpuOps, AttentionForwardWritesTheCodesOfItsOutputWhenAsked) {
  AttentionCase c = make_case(48, 2, 8, 8, 2, 101);
  const int n = c.T * c.H * c.D;
  const auto q = random_vector(n, 14, 2.f), k = random_vector(n, 15, 2.f), v = random_vector(n, 16);
  const std::vector<int32_t> doc = document_ids(c.tokens, 50256);
  const AttentionShape shape{c.T, c.H, c.D, c.block, c.window, 0.12f};
  std::vector<float> y(n), lse(c.H * c.T), y2(n), lse2(c.H * c.T);
  std::vector<uint16_t> codes(n, 0x7FC0);
  be->attention_forward(y.data(), nullptr, lse.data(), q.data(), k.data(), v.data(), {}, doc.data(), shape);
  be->attention_forward(y2.data(), codes.data(), lse2.data(), q.data(), k.data(), v.data(), {}, doc.data(), shape);
  EXPECT_EQ(y2, y);
  EXPECT_EQ(lse2, lse);
  for (int i = 0; i < n; ++i) ASSERT_EQ(codes[i], lowp::encode_bf16(y[i])) << i;
}

// The inputs of one attention call and its backward: 48 tokens of 2 heads of 8 in blocks of 8,
// window 2, make_case's documents, random q, k, v and dy from `seed`.
struct AttentionCall {
  AttentionCase c;
  size_t n;
  std::vector<float> q, k, v, dy;
  std::vector<int32_t> doc;
  AttentionShape shape;
  explicit AttentionCall(uint64_t seed)
      : c(make_case(48, 2, 8, 8, 2, seed)),
        n(static_cast<size_t>(c.T) * c.H * c.D),
        q(random_vector(n, seed + 1, 2.f)),
        k(random_vector(n, seed + 2, 2.f)),
        v(random_vector(n, seed + 3)),
        dy(random_vector(n, seed + 4)),
        doc(document_ids(c.tokens, 50256)),
        shape{c.T, c.H, c.D, c.block, c.window, 0.12f} {}
};

// attention_forward_bf16 (bf16 activations): y rounded to bf16 where computed and its codes
// stored (or the codes alone), lse unchanged; the backward given those codes
// (AttentionInputCodes::y), and dy's (::dy), reads them, not the floats, which may then be
// anything.
TEST_F(CpuOps, Bf16AttentionRoundsItsOutputAndBackpropagatesFromTheCodes) {
  const AttentionCall call(103);
  const auto& [c, n, q, k, v, dy, doc, shape] = call;
  std::vector<float> y(n), lse(c.H * c.T), y16(n), lse16(c.H * c.T);
  std::vector<uint16_t> stored(n, 0x7FC0);
  be->attention_forward(y.data(), nullptr, lse.data(), q.data(), k.data(), v.data(), {}, doc.data(), shape);
  be->attention_forward_bf16(y16.data(), stored.data(), lse16.data(), q.data(), k.data(), v.data(), {}, doc.data(),
                             shape);
  EXPECT_EQ(lse16, lse);
  size_t rounded = 0;
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(stored[i], lowp::encode_bf16(y[i])) << i;
    ASSERT_EQ(y16[i], lowp::decode_bf16(stored[i])) << i;
    rounded += y16[i] != y[i];
  }
  EXPECT_GT(rounded, n / 2) << "y was not rounded";
  std::vector<uint16_t> alone(n, 0x7FC0);  // the codes alone, y's floats not written
  be->attention_forward_bf16(nullptr, alone.data(), lse16.data(), q.data(), k.data(), v.data(), {}, doc.data(),
                             shape);
  EXPECT_EQ(alone, stored);

  std::vector<float> dq(n), dk(n), dv(n), dq2(n), dk2(n), dv2(n);
  be->attention_backward(dq.data(), dk.data(), dv.data(), dy.data(), y16.data(), lse16.data(), q.data(), k.data(),
                         v.data(), {}, doc.data(), shape);
  std::vector<float> stale(n, std::numeric_limits<float>::quiet_NaN());
  AttentionInputCodes y_codes;
  y_codes.y = stored.data();
  be->attention_backward(dq2.data(), dk2.data(), dv2.data(), dy.data(), stale.data(), lse16.data(), q.data(),
                         k.data(), v.data(), y_codes, doc.data(), shape);
  EXPECT_EQ(dq2, dq);
  EXPECT_EQ(dk2, dk);
  EXPECT_EQ(dv2, dv);

  // dy given as codes (c_proj's product computed it as bf16): read instead of dy's floats,
  // as the floats of the widened codes would be.
  std::vector<uint16_t> dy_codes(n);
  std::vector<float> dy_rounded(n);
  for (size_t i = 0; i < n; ++i) {
    dy_codes[i] = lowp::encode_bf16(dy[i]);
    dy_rounded[i] = lowp::decode_bf16(dy_codes[i]);
  }
  be->attention_backward(dq.data(), dk.data(), dv.data(), dy_rounded.data(), y16.data(), lse16.data(), q.data(),
                         k.data(), v.data(), {}, doc.data(), shape);
  AttentionInputCodes both = y_codes;
  both.dy = dy_codes.data();
  be->attention_backward(dq2.data(), dk2.data(), dv2.data(), stale.data(), stale.data(), lse16.data(), q.data(),
                         k.data(), v.data(), both, doc.data(), shape);
  EXPECT_EQ(dq2, dq);
  EXPECT_EQ(dk2, dk);
  EXPECT_EQ(dv2, dv);
}

// Attention given its inputs as codes (AttentionInputCodes: q, k, v kept as bf16) reads
// them, not the floats (NaN here): the result of attention on the widened codes, forward
// and backward; the codes of -v give exactly -y. Unless told the floats are current.
TEST_F(CpuOps, AttentionReadsTheInputCodesItIsGiven) {
  const AttentionCall call(102);
  const auto& [c, n, q, k, v, dy, doc, shape] = call;
  auto encoded = [](const std::vector<float>& x, float sign) {
    std::vector<uint16_t> codes(x.size());
    for (size_t i = 0; i < x.size(); ++i) codes[i] = lowp::encode_bf16(sign * x[i]);
    return codes;
  };
  auto widened = [](const std::vector<uint16_t>& codes) {
    std::vector<float> x(codes.size());
    for (size_t i = 0; i < codes.size(); ++i) x[i] = lowp::decode_bf16(codes[i]);
    return x;
  };
  const auto qc = encoded(q, 1.f), kc = encoded(k, 1.f), vc = encoded(v, 1.f), minus_vc = encoded(v, -1.f);
  const auto qw = widened(qc), kw = widened(kc), vw = widened(vc);
  const std::vector<float> nan(n, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> y(n), lse(c.H * c.T), y2(n), lse2(c.H * c.T), dq(n), dk(n), dv(n), dq2(n), dk2(n), dv2(n);
  be->attention_forward(y.data(), nullptr, lse.data(), qw.data(), kw.data(), vw.data(), {}, doc.data(), shape);
  const AttentionInputCodes given{qc.data(), kc.data(), vc.data()};
  be->attention_forward(y2.data(), nullptr, lse2.data(), nan.data(), nan.data(), nan.data(), given, doc.data(), shape);
  EXPECT_EQ(y2, y);
  EXPECT_EQ(lse2, lse);
  be->attention_backward(dq.data(), dk.data(), dv.data(), dy.data(), y.data(), lse.data(), qw.data(), kw.data(),
                         vw.data(), {}, doc.data(), shape);
  be->attention_backward(dq2.data(), dk2.data(), dv2.data(), dy.data(), y.data(), lse.data(), nan.data(), nan.data(),
                         nan.data(), given, doc.data(), shape);
  EXPECT_EQ(dq2, dq);
  EXPECT_EQ(dk2, dk);
  EXPECT_EQ(dv2, dv);
  const AttentionInputCodes negated{qc.data(), kc.data(), minus_vc.data()};
  be->attention_forward(y2.data(), nullptr, lse2.data(), nan.data(), nan.data(), nan.data(), negated, doc.data(),
                        shape);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(y2[i], -y[i]) << i;
  EXPECT_EQ(lse2, lse);
  // Told the floats are current (just computed), the CPU reads them and widens nothing: the
  // floats of -v beside the codes of v give -y.
  std::vector<float> minus_vw(n);
  for (size_t i = 0; i < n; ++i) minus_vw[i] = -vw[i];
  AttentionInputCodes current = given;
  current.floats_current = true;
  be->attention_forward(y2.data(), nullptr, lse2.data(), qw.data(), kw.data(), minus_vw.data(), current, doc.data(),
                        shape);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(y2[i], -y[i]) << "floats current, at " << i;
}

TEST_F(CpuOps, AttentionBackwardMatchesFiniteDifferences) {
  AttentionCase c = make_case(40, 2, 8, 8, 2, 77);
  ASSERT_TRUE(window_cuts(c));
  const int n = c.T * c.H * c.D;
  const auto q = random_vector(n, 17, 2.f), k = random_vector(n, 18, 2.f), v = random_vector(n, 19);
  const auto R = random_vector(n, 20);
  const std::vector<int32_t> doc = document_ids(c.tokens, 50256);
  const AttentionShape shape{c.T, c.H, c.D, c.block, c.window, 0.12f};
  auto run = [&](const std::vector<float>& qq, const std::vector<float>& kk, const std::vector<float>& vv) {
    std::vector<float> y(n), lse(c.H * c.T);
    be->attention_forward(y.data(), nullptr, lse.data(), qq.data(), kk.data(), vv.data(), {}, doc.data(), shape);
    return dot(y, R);
  };
  std::vector<float> y(n), lse(c.H * c.T), dq(n), dk(n), dv(n);
  be->attention_forward(y.data(), nullptr, lse.data(), q.data(), k.data(), v.data(), {}, doc.data(), shape);
  be->attention_backward(dq.data(), dk.data(), dv.data(), R.data(), y.data(), lse.data(), q.data(), k.data(),
                         v.data(), {}, doc.data(), shape);
  auto numeric_q = numerical_gradient([&](const std::vector<float>& x) { return run(x, k, v); }, q, 1e-2);
  auto numeric_k = numerical_gradient([&](const std::vector<float>& x) { return run(q, x, v); }, k, 1e-2);
  auto numeric_v = numerical_gradient([&](const std::vector<float>& x) { return run(q, k, x); }, v, 1e-2);
  EXPECT_LE(worst_error_ratio(dq, numeric_q, 1e-3, 2e-2), 1.0);
  EXPECT_LE(worst_error_ratio(dk, numeric_k, 1e-3, 2e-2), 1.0);
  EXPECT_LE(worst_error_ratio(dv, numeric_v, 1e-3, 2e-2), 1.0);
}

// The gradient checks' measure: a NaN or an infinity on either side is never within tolerance.
TEST(FiniteDifferenceCheck, ANonFiniteValueIsInfinitelyWrong) {
  EXPECT_LE(worst_error_ratio({1.f, 2.f}, {1.0, 2.0}, 1e-3, 1e-3), 1.0);
  EXPECT_EQ(worst_error_ratio({1.f, NAN}, {1.0, 2.0}, 1e-3, 1e-3), INFINITY);
  EXPECT_EQ(worst_error_ratio({1.f, 2.f}, {NAN, 2.0}, 1e-3, 1e-3), INFINITY);
  EXPECT_EQ(worst_error_ratio({INFINITY}, {1.0}, 1e-3, 1e-3), INFINITY);
  EXPECT_EQ(worst_error_ratio({1.f}, {1.0, 2.0}, 1e-3, 1e-3), INFINITY);  // sizes differ
}

TEST_F(CpuOps, GemmFollowsRowMajorConventions) {
  // C[2,2] = A[2,3] @ B^T with B stored [2,3].
  std::vector<float> A = {1, 2, 3, 4, 5, 6}, B = {1, 0, 1, 0, 1, 0}, C(4, 0.f);
  be->gemm(false, true, 2, 2, 3, 1.f, A.data(), 3, B.data(), 3, 0.f, C.data(), 2);
  EXPECT_EQ(C, (std::vector<float>{4, 2, 10, 5}));
}

TEST_F(CpuOps, FlagNonfiniteRaisesOnNanAndInfinityOnlyAndNeverClears) {
  const float inf = std::numeric_limits<float>::infinity();
  const float big = std::numeric_limits<float>::max();
  int32_t* flag = be->alloc_i32(1);
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), inf, -inf}) {
    for (size_t where : {size_t{0}, size_t{4095}, size_t{9999}}) {
      std::vector<float> x(10000, 1.f);
      x[where] = bad;
      be->fill_i32(flag, 0, 1);
      be->flag_nonfinite(flag, x.data(), x.size());
      EXPECT_EQ(flag[0], 1) << bad << " at " << where;
    }
  }
  std::vector<float> clean(10000, big);
  clean[17] = -big;
  clean[18] = std::numeric_limits<float>::denorm_min();
  be->fill_i32(flag, 0, 1);
  be->flag_nonfinite(flag, clean.data(), clean.size());
  EXPECT_EQ(flag[0], 0);
  be->fill_i32(flag, 1, 1);  // a raised flag stays raised over clean data
  be->flag_nonfinite(flag, clean.data(), clean.size());
  EXPECT_EQ(flag[0], 1);
  be->release(flag);
}

TEST_F(CpuOps, DocumentIdsCountSeparatorsInclusively) {
  const std::vector<int32_t> tokens{50256, 5, 6, 50256, 50256, 7, 8, 9, 50256, 1};
  int32_t* doc = be->alloc_i32(tokens.size());
  be->document_ids(doc, tokens.data(), static_cast<int>(tokens.size()), 50256);
  EXPECT_EQ(std::vector<int32_t>(doc, doc + tokens.size()), (std::vector<int32_t>{1, 1, 1, 2, 3, 3, 3, 3, 4, 4}));
  EXPECT_EQ(std::vector<int32_t>(doc, doc + tokens.size()), document_ids(tokens, 50256));
  be->release(doc);
}

// One multi-tensor Adam call is each tensor's own update (sizes from 0 up, each its rate),
// bit for bit: PyTorch's formula, checked against it on the first tensor.
TEST_F(CpuOps, MultiTensorAdamIsEachTensorsOwnUpdate) {
  const std::vector<size_t> sizes = {1000, 0, 1, 37, 4096};
  std::vector<std::vector<float>> p, g, m, v;
  std::vector<AdamTensor> all;
  for (size_t k = 0; k < sizes.size(); ++k) {
    p.push_back(random_vector(sizes[k], 10 + k));
    g.push_back(random_vector(sizes[k], 20 + k));
    m.push_back(random_vector(sizes[k], 30 + k, 0.1f));
    v.push_back(random_vector(sizes[k], 40 + k, 0.1f));
    for (float& x : v.back()) x = x * x;
  }
  auto p1 = p, m1 = m, v1 = v;
  for (size_t k = 0; k < sizes.size(); ++k) {
    all.push_back({p[k].data(), g[k].data(), m[k].data(), v[k].data(), sizes[k], 0.01f * (k + 1)});
  }
  be->adam_update(all.data(), all.size(), 0.8f, 0.95f, 1e-10f, 4, nullptr);
  for (size_t k = 0; k < sizes.size(); ++k) {
    const AdamTensor one{p1[k].data(), g[k].data(), m1[k].data(), v1[k].data(), sizes[k], 0.01f * (k + 1)};
    be->adam_update(&one, 1, 0.8f, 0.95f, 1e-10f, 4, nullptr);
    EXPECT_EQ(p[k], p1[k]) << k;
    EXPECT_EQ(m[k], m1[k]) << k;
    EXPECT_EQ(v[k], v1[k]) << k;
  }
  // PyTorch's Adam at step 4 on the first tensor, in double.
  const auto p0 = random_vector(sizes[0], 10), m0 = random_vector(sizes[0], 30, 0.1f);
  auto v0 = random_vector(sizes[0], 40, 0.1f);
  for (float& x : v0) x = x * x;
  for (size_t i = 0; i < sizes[0]; ++i) {
    const double gi = g[0][i], mi = 0.8 * m0[i] + 0.2 * gi, vi = 0.95 * v0[i] + 0.05 * gi * gi;
    const double want = p0[i] - 0.01 * (mi / (1 - std::pow(0.8, 4))) / (std::sqrt(vi / (1 - std::pow(0.95, 4))) + 1e-10);
    ASSERT_NEAR(p[0][i], want, 1e-6 * std::max(1.0, std::abs(want))) << i;
  }
}

TEST_F(CpuOps, SkipFlagMakesEveryOptimizerUpdateANoOp) {
  const size_t n = 1000;
  const auto param = random_vector(n, 1), grad = random_vector(n, 2), m0 = random_vector(n, 3);
  std::vector<float> v0 = random_vector(n, 4);
  for (float& x : v0) x = x * x;
  int32_t* skip = be->alloc_i32(1);
  for (int32_t raised : {1, 0}) {
    be->fill_i32(skip, raised, 1);
    auto p = param, m = m0, v = v0, buf = m0, out = grad, p2 = param;
    const AdamTensor t{p.data(), grad.data(), m.data(), v.data(), n, 0.01f};
    be->adam_update(&t, 1, 0.8f, 0.95f, 1e-10f, 3, skip);
    be->muon_momentum(out.data(), buf.data(), grad.data(), n, 0.9f, skip);
    be->apply_update(p2.data(), grad.data(), n, 0.05f, skip);
    if (raised) {
      EXPECT_EQ(p, param);
      EXPECT_EQ(m, m0);
      EXPECT_EQ(v, v0);
      EXPECT_EQ(buf, m0);
      EXPECT_EQ(out, grad);
      EXPECT_EQ(p2, param);
    } else {  // a clear flag is the same as no flag
      auto q = param, mq = m0, vq = v0, bq = m0, oq = grad, q2 = param;
      const AdamTensor tq{q.data(), grad.data(), mq.data(), vq.data(), n, 0.01f};
      be->adam_update(&tq, 1, 0.8f, 0.95f, 1e-10f, 3, nullptr);
      be->muon_momentum(oq.data(), bq.data(), grad.data(), n, 0.9f, nullptr);
      be->apply_update(q2.data(), grad.data(), n, 0.05f, nullptr);
      EXPECT_EQ(p, q);
      EXPECT_NE(p, param);
      EXPECT_EQ(buf, bq);
      EXPECT_EQ(out, oq);
      EXPECT_EQ(p2, q2);
    }
  }
  be->release(skip);
}

TEST_F(CpuOps, SumToHostIsTheFloat64Sum) {
  const auto x = random_vector(10007, 5);
  double* out = static_cast<double*>(be->alloc_host(sizeof(double)));
  be->sum_to_host(out, x.data(), x.size());
  be->synchronize();
  double expected = 0;
  for (float v : x) expected += v;
  EXPECT_NEAR(*out, expected, 1e-12 * x.size());
  be->release_host(out);
}

}  // namespace
}  // namespace speedrun
