// --matmul bf16 on the CPU backend: the emulation the CUDA backend's tensor-core products
// are tested against. A product must be the float32 product of the bf16-rounded operands,
// bit for bit (the same sgemm runs on the same numbers), with C and alpha/beta untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "backends/backend.h"
#include "backends/low_precision.h"
#include "model/config.h"
#include "model/gpt.h"
#include "support/finite_difference.h"
#include "util/error.h"

namespace speedrun {
namespace {

using testing::random_vector;

BackendOptions bf16_matmuls() {
  BackendOptions options;
  options.matmul = MatmulPrecision::kBfloat16;
  return options;
}

std::vector<float> rounded(std::vector<float> x) {
  for (float& v : x) v = lowp::round_to_bf16(v);
  return x;
}

struct Product {
  bool ta, tb;
  int M, N, K, pad;
};

TEST(Bf16Matmul, EqualsTheFloat32ProductOfRoundedOperandsBitForBit) {
  auto bf16 = make_cpu_backend(bf16_matmuls());
  auto fp32 = make_cpu_backend();
  for (const Product p : {Product{false, false, 5, 7, 9, 0}, Product{true, false, 6, 3, 11, 2},
                          Product{false, true, 4, 8, 5, 1}, Product{true, true, 9, 9, 9, 3}}) {
    SCOPED_TRACE("ta=" + std::to_string(p.ta) + " tb=" + std::to_string(p.tb));
    const int lda = (p.ta ? p.M : p.K) + p.pad, ldb = (p.tb ? p.K : p.N) + p.pad, ldc = p.N + p.pad;
    const auto A = random_vector(static_cast<size_t>(p.ta ? p.K : p.M) * lda, 1);
    const auto B = random_vector(static_cast<size_t>(p.tb ? p.N : p.K) * ldb, 2);
    const auto C0 = random_vector(static_cast<size_t>(p.M) * ldc, 3);  // not bf16 values
    std::vector<float> got = C0, want = C0, plain = C0;
    bf16->gemm(p.ta, p.tb, p.M, p.N, p.K, 0.7f, A.data(), lda, B.data(), ldb, 1.3f, got.data(), ldc);
    const auto Ar = rounded(A), Br = rounded(B);
    fp32->gemm(p.ta, p.tb, p.M, p.N, p.K, 0.7f, Ar.data(), lda, Br.data(), ldb, 1.3f, want.data(), ldc);
    fp32->gemm(p.ta, p.tb, p.M, p.N, p.K, 0.7f, A.data(), lda, B.data(), ldb, 1.3f, plain.data(), ldc);
    EXPECT_EQ(got, want);
    EXPECT_NE(got, plain) << "the operands were not rounded";
  }
}

// gemm_to_bf16: the codes of the product gemm computes (alpha 1, beta 0), padding between
// rows left alone, with either kind of product.
TEST(Bf16Matmul, ProductIntoCodesIsTheRoundedProduct) {
  for (bool bf16_inputs : {true, false}) {
    auto be = bf16_inputs ? make_cpu_backend(bf16_matmuls()) : make_cpu_backend();
    for (const Product p : {Product{false, true, 5, 7, 9, 0}, Product{true, false, 6, 3, 11, 2}}) {
      SCOPED_TRACE(std::string(bf16_inputs ? "bf16" : "fp32") + " ta=" + std::to_string(p.ta));
      const int lda = (p.ta ? p.M : p.K) + p.pad, ldb = (p.tb ? p.K : p.N) + p.pad, ldc = p.N + p.pad;
      const auto A = random_vector(static_cast<size_t>(p.ta ? p.K : p.M) * lda, 4);
      const auto B = random_vector(static_cast<size_t>(p.tb ? p.N : p.K) * ldb, 5);
      std::vector<float> product(static_cast<size_t>(p.M) * ldc, 0.f);
      be->gemm(p.ta, p.tb, p.M, p.N, p.K, 1.f, A.data(), lda, B.data(), ldb, 0.f, product.data(), ldc);
      std::vector<uint16_t> codes(product.size(), 0xABCD);
      be->gemm_to_bf16(p.ta, p.tb, p.M, p.N, p.K, A.data(), lda, B.data(), ldb, nullptr, codes.data(), ldc);
      for (int r = 0; r < p.M; ++r) {
        for (int c = 0; c < ldc; ++c) {
          const size_t i = static_cast<size_t>(r) * ldc + c;
          ASSERT_EQ(codes[i], c < p.N ? lowp::encode_bf16(product[i]) : 0xABCD) << r << "," << c;
        }
      }
      // With an addend (the bf16 residual stream's add): one rounding of the float32 sum,
      // into a separate output and in place.
      std::vector<uint16_t> addend(product.size());
      for (size_t i = 0; i < addend.size(); ++i) addend[i] = lowp::encode_bf16(0.37f * static_cast<float>(i % 11) - 1.f);
      std::vector<uint16_t> sum(product.size(), 0xABCD);
      be->gemm_to_bf16(p.ta, p.tb, p.M, p.N, p.K, A.data(), lda, B.data(), ldb, addend.data(), sum.data(), ldc);
      std::vector<uint16_t> in_place = addend;
      be->gemm_to_bf16(p.ta, p.tb, p.M, p.N, p.K, A.data(), lda, B.data(), ldb, in_place.data(), in_place.data(),
                       ldc);
      for (int r = 0; r < p.M; ++r) {
        for (int c = 0; c < ldc; ++c) {
          const size_t i = static_cast<size_t>(r) * ldc + c;
          const uint16_t expected =
              c < p.N ? lowp::encode_bf16(product[i] + lowp::decode_bf16(addend[i])) : uint16_t{0xABCD};
          ASSERT_EQ(sum[i], expected) << r << "," << c;
          ASSERT_EQ(in_place[i], c < p.N ? expected : addend[i]) << r << "," << c;
        }
      }
    }
  }
}

TEST(Bf16Matmul, LeavesTheOperandsUnchanged) {
  auto bf16 = make_cpu_backend(bf16_matmuls());
  const auto A = random_vector(12 * 10, 4), B = random_vector(10 * 8, 5);
  std::vector<float> a = A, b = B, c(12 * 8);
  bf16->gemm(false, false, 12, 8, 10, 1.f, a.data(), 10, b.data(), 8, 0.f, c.data(), 8);
  EXPECT_EQ(a, A);
  EXPECT_EQ(b, B);
}

// Newton-Schulz's X X^T passes one matrix as both operands; batches sit `stride` apart.
TEST(Bf16Matmul, BatchesAndAliasedOperandsRoundEveryMatrix) {
  auto bf16 = make_cpu_backend(bf16_matmuls());
  auto fp32 = make_cpu_backend();
  const int rows = 6, cols = 10, batch = 3;
  const size_t stride = rows * cols + 4;
  const auto X = random_vector(stride * batch, 6);
  std::vector<float> got(rows * rows * batch, 0.f), want = got;
  bf16->gemm_batched(false, true, rows, rows, cols, 1.f, X.data(), cols, stride, X.data(), cols, stride, 0.f,
                     got.data(), rows, rows * rows, batch);
  const auto Xr = rounded(X);
  fp32->gemm_batched(false, true, rows, rows, cols, 1.f, Xr.data(), cols, stride, Xr.data(), cols, stride, 0.f,
                     want.data(), rows, rows * rows, batch);
  EXPECT_EQ(got, want);
}

TEST(Bf16Matmul, NonFiniteOperandsStayNonFinite) {
  auto bf16 = make_cpu_backend(bf16_matmuls());
  std::vector<float> A = {1.f, NAN, 2.f, 3.f}, B = {1.f, 1.f, 1.f, 1.f}, C(4);
  bf16->gemm(false, false, 2, 2, 2, 1.f, A.data(), 2, B.data(), 2, 0.f, C.data(), 2);
  EXPECT_TRUE(std::isnan(C[0]));
  EXPECT_TRUE(std::isnan(C[1]));
  EXPECT_EQ(C[2], lowp::round_to_bf16(2.f) + lowp::round_to_bf16(3.f));
}

// The model's loss moves by bf16 rounding (~2^-9 per operand), not by more: micro's step-0
// loss within 1% of float32's, and not equal to it (the option reaches every product).
// T tokens and targets spread over the vocabulary, the same every run.
std::pair<std::vector<int32_t>, std::vector<int32_t>> fixed_sequence(const Config& config, int T) {
  std::vector<int32_t> inputs(T), targets(T);
  for (int t = 0; t < T; ++t) {
    inputs[t] = (t * 7919) % config.vocab_size;
    targets[t] = (t * 104729 + 13) % config.vocab_size;
  }
  return {inputs, targets};
}

void load_same_random_parameters(GPT& a, GPT& b, uint64_t seed) {
  const auto params = random_vector(a.layout().total(), seed, 0.3f);
  a.load_parameters(params);
  b.load_parameters(params);
}

TEST(Bf16Matmul, ModelLossStaysWithinBf16OfFloat32) {
  const Config config = Config::preset("micro");
  auto bf16 = make_cpu_backend(bf16_matmuls());
  auto fp32 = make_cpu_backend();
  const int T = 128;
  const auto [inputs, targets] = fixed_sequence(config, T);
  GPT a(config, *bf16, T, T), b(config, *fp32, T, T);
  load_same_random_parameters(a, b, 7);
  const double loss_bf16 = a.forward(inputs, targets, 2), loss_fp32 = b.forward(inputs, targets, 2);
  ASSERT_TRUE(std::isfinite(loss_bf16));
  EXPECT_NEAR(loss_bf16, loss_fp32, 1e-2 * loss_fp32);
  EXPECT_NE(loss_bf16, loss_fp32);
}

// Held operands (Backend::hold_operand, hold_produced_operand) save copies, never change a
// number: a training pass and a forward-only pass give the same bits with and without them,
// for exactly the copies the model shares (micro, T = 64: one head chunk, layer 2 without
// attention), with activations in float32 or bf16, stored or recomputed.
TEST(Bf16Matmul, HeldOperandsChangeNoResultOnlyTheCopies) {
  Config config = Config::preset("micro");
  config.lm_head_fp8 = 0;
  BackendOptions unheld_options = bf16_matmuls();
  unheld_options.hold_operands = false;
  const int T = 64;
  const auto [inputs, targets] = fixed_sequence(config, T);
  for (const ActivationMemory memory : {ActivationMemory::kStore, ActivationMemory::kRecompute}) {
    for (const ActivationPrecision precision : {ActivationPrecision::kFloat32, ActivationPrecision::kBfloat16}) {
      const bool bf16_activations = precision == ActivationPrecision::kBfloat16;
      const bool recompute = memory == ActivationMemory::kRecompute;
      SCOPED_TRACE(std::string(bf16_activations ? "bf16" : "fp32") + (recompute ? ", recomputed" : ", stored"));
      auto held = make_cpu_backend(bf16_matmuls()), unheld = make_cpu_backend(unheld_options);
      GPT a(config, *held, T, T, {memory, precision}), b(config, *unheld, T, T, {memory, precision});
      load_same_random_parameters(a, b, 9);
      a.zero_grad();
      b.zero_grad();
      EXPECT_EQ(a.forward_backward(inputs, targets, 2, 1.f), b.forward_backward(inputs, targets, 2, 1.f));
      EXPECT_EQ(a.gradients_to_host(), b.gradients_to_host());
      EXPECT_EQ(a.forward(inputs, targets, 2), b.forward(inputs, targets, 2));

      // Bytes not moved, per training pass then forward-only pass. A copy moves 6 bytes per
      // element; an op writing the codes of its own output makes none. A linear layer's two
      // backward products read one copy of their output gradient. The block rmsnorms write
      // their output's codes (forward, and backward when recomputed), which q, k and v share
      // (the stored attention norm is copied once for the three in the backward); with bf16
      // activations those codes are the norms' kept output, read in place by every product
      // that reads the norm, forward and backward, stored or recomputed; attention writes
      // those of y (with bf16 activations they are y's kept codes, which c_proj reads in the
      // forward and the backward). Every linear layer's output gradient is written as codes
      // by the op that computes it (the final norm's backward, the previous block's mix
      // backward or the skip add for the MLP's c_proj; the MLP norm's backward for
      // attention's; the head norms' backward for q and k; the v mix's backward for v),
      // except c_fc's with float32 activations (copied once). The head holds one copy of W
      // and, in the backward, of the logits gradient. With bf16 activations relu(h)^2's codes
      // are the activation itself, and the relu^2 backward writes the codes of the MLP's
      // hidden gradient.
      const size_t d = config.model_dim, hd = config.hidden_dim(), mlp = config.mlp_dim();
      const size_t V = config.padded_vocab();
      const size_t passes = recompute ? 2 : 1;  // a recomputed activation is produced twice
      size_t saved = 0;
      for (int i = 0; i < config.num_layers; ++i) {
        saved += 12 * T * d;                             // c_proj's output gradient
        saved += (bf16_activations ? 12 : 6) * T * mlp;  // c_fc's output gradient
        // relu(h)^2: its codes (kept, or recomputed into one buffer) the products' operand in
        // place, forward and backward.
        if (bf16_activations) saved += (6 + 6) * T * mlp;
        saved += (bf16_activations ? 6 + 6 : passes * 6) * T * d;  // the MLP's rmsnorm
        if (config.layer_has_attention(i)) {
          // attention's rmsnorm
          saved += bf16_activations ? (18 + 18) * T * d : 18 * T * d + (recompute ? 18 : 18 - 6) * T * d;
          saved += 12 * (T * d + 3 * T * hd);               // the output gradients of c_proj, q, k and v
          saved += (bf16_activations ? 6 + 6 : 6) * T * hd;  // y, for c_proj (bf16: both passes)
        }
      }
      saved += 6 * (V * d + T * V);  // training head: W for dx, the logits gradient for dx
      for (int i = 0; i < config.num_layers; ++i) {
        if (config.layer_has_attention(i)) saved += 18 * T * d + 6 * T * hd;
        saved += 6 * T * d;
        if (bf16_activations) saved += 6 * T * mlp;
      }
      EXPECT_EQ(unheld->operand_copy_traffic_bytes() - held->operand_copy_traffic_bytes(), saved);
    }
  }
}

// hold_produced_operand: the op producing x writes the codes every product of x then reads;
// nothing is held where matmuls do not round or holding is off.
TEST(Bf16Matmul, AProducedOperandIsReadFromTheCodesItsProducerWrote) {
  const int M = 6, N = 5, K = 7;
  const auto h = random_vector(static_cast<size_t>(M) * K, 11, 2.f), B = random_vector(static_cast<size_t>(K) * N, 12);
  auto bf16 = make_cpu_backend(bf16_matmuls());
  std::vector<float> g(h.size()), want(static_cast<size_t>(M) * N), got(want.size());
  bf16->relu2_forward_bf16(g.data(), nullptr, nullptr, h.data(), g.size());
  bf16->gemm(false, false, M, N, K, 1.f, g.data(), K, B.data(), N, 0.f, want.data(), N);
  const size_t copied = bf16->operand_copy_traffic_bytes();

  uint16_t* codes = bf16->hold_produced_operand(0, g.data(), g.size());
  ASSERT_NE(codes, nullptr);
  std::vector<float> g_again(g.size());
  bf16->relu2_forward_bf16(g_again.data(), codes, nullptr, h.data(), g.size());
  EXPECT_EQ(bf16->operand_copy_traffic_bytes(), copied) << "the producer's codes are no copy";
  for (size_t i = 0; i < g.size(); ++i) ASSERT_EQ(codes[i], lowp::encode_bf16(g[i])) << i;
  // The product reads the codes, not g: g's floats changed behind the held copy do not count.
  for (float& x : g) x = 1e6f;
  bf16->gemm(false, false, M, N, K, 1.f, g.data(), K, B.data(), N, 0.f, got.data(), N);
  EXPECT_EQ(got, want);
  EXPECT_EQ(bf16->operand_copy_traffic_bytes() - copied, B.size() * 6) << "only B was copied";
  bf16->release_operand(0);
  bf16->gemm(false, false, M, N, K, 1.f, g.data(), K, B.data(), N, 0.f, got.data(), N);
  EXPECT_NE(got, want) << "released: the product rounds g's floats again";

  BackendOptions unheld_options = bf16_matmuls();
  unheld_options.hold_operands = false;
  EXPECT_EQ(make_cpu_backend(unheld_options)->hold_produced_operand(0, g.data(), g.size()), nullptr);
  EXPECT_EQ(make_cpu_backend()->hold_produced_operand(1, g.data(), g.size()), nullptr);
  EXPECT_ANY_THROW(bf16->hold_produced_operand(Backend::kHeldOperands, g.data(), g.size()));
}

// A produced operand held over several adjacent matrices (the model's q, k and v gradients)
// serves products of each part, a batch over the parts with one shared B (stride 0), and
// single products starting inside it: all read the codes the parts' producers wrote, with
// no copy of them, and give what products of the rounded floats give.
TEST(Bf16Matmul, AHeldOperandServesProductsOfItsParts) {
  const int M = 6, N = 5, K = 7, kParts = 3;
  const size_t part = static_cast<size_t>(M) * K;
  const auto h = random_vector(kParts * part, 13, 2.f), B = random_vector(static_cast<size_t>(K) * N, 14);
  auto bf16 = make_cpu_backend(bf16_matmuls());
  std::vector<float> g(h.size());
  bf16->relu2_forward_bf16(g.data(), nullptr, nullptr, h.data(), g.size());  // the floats the codes round
  std::vector<float> want(kParts * static_cast<size_t>(M) * N), got(want.size(), 0.f), one(static_cast<size_t>(M) * N);
  for (int i = 0; i < kParts; ++i) {
    bf16->gemm(false, false, M, N, K, 1.f, g.data() + i * part, K, B.data(), N, 0.f, want.data() + i * M * N, N);
  }
  uint16_t* codes = bf16->hold_produced_operand(1, g.data(), g.size());
  ASSERT_NE(codes, nullptr);
  for (int i = 0; i < kParts; ++i) {  // each part's producer writes its own codes
    bf16->relu2_forward_bf16(nullptr, codes + i * part, nullptr, h.data() + i * part, part);
  }
  for (float& x : g) x = std::numeric_limits<float>::quiet_NaN();  // read through the codes only
  const size_t copied = bf16->operand_copy_traffic_bytes();
  bf16->gemm_batched(false, false, M, N, K, 1.f, g.data(), K, part, B.data(), N, 0, 0.f, got.data(), N,
                     static_cast<size_t>(M) * N, kParts);
  EXPECT_EQ(got, want);
  for (int i = 1; i < kParts; ++i) {
    bf16->gemm(false, false, M, N, K, 1.f, g.data() + i * part, K, B.data(), N, 0.f, one.data(), N);
    EXPECT_EQ(one, std::vector<float>(want.begin() + i * M * N, want.begin() + (i + 1) * M * N)) << i;
  }
  EXPECT_EQ(bf16->operand_copy_traffic_bytes() - copied, (kParts + kParts - 1) * B.size() * 6) << "B alone copied";
  bf16->release_operand(1);
}

// hold_stored_operand: codes kept elsewhere (an activation stored as bf16) are the operand,
// read where they are when the product runs (so they may be written after the hold), with
// no copy and no extra write counted; x's floats are not read. Refused (false) where matmuls
// do not round or holding is off.
TEST(Bf16Matmul, AStoredOperandIsReadFromItsCodesWithNoCopy) {
  const int M = 6, N = 5, K = 7;
  const auto x = random_vector(static_cast<size_t>(M) * K, 13, 2.f), B = random_vector(static_cast<size_t>(K) * N, 14);
  auto bf16 = make_cpu_backend(bf16_matmuls());
  std::vector<float> want(static_cast<size_t>(M) * N), got(want.size());
  bf16->gemm(false, false, M, N, K, 1.f, x.data(), K, B.data(), N, 0.f, want.data(), N);
  const size_t copied = bf16->operand_copy_traffic_bytes();
  std::vector<uint16_t> codes(x.size(), 0x7FC0);
  std::vector<float> stale(x.size(), std::numeric_limits<float>::quiet_NaN());
  ASSERT_TRUE(bf16->hold_stored_operand(1, stale.data(), codes.data(), codes.size()));
  for (size_t i = 0; i < x.size(); ++i) codes[i] = lowp::encode_bf16(x[i]);  // written after the hold
  bf16->gemm(false, false, M, N, K, 1.f, stale.data(), K, B.data(), N, 0.f, got.data(), N);
  EXPECT_EQ(got, want);
  EXPECT_EQ(bf16->operand_copy_traffic_bytes() - copied, B.size() * 3 * sizeof(uint16_t)) << "only B was copied";
  bf16->release_operand(1);

  BackendOptions unheld_options = bf16_matmuls();
  unheld_options.hold_operands = false;
  EXPECT_FALSE(make_cpu_backend(unheld_options)->hold_stored_operand(0, x.data(), codes.data(), codes.size()));
  EXPECT_FALSE(make_cpu_backend()->hold_stored_operand(0, x.data(), codes.data(), codes.size()));
}

TEST(Bf16Matmul, TheFlashKernelIsRefusedOnTheCpu) {
  BackendOptions options;
  options.attention = AttentionKernel::kFlash;
  EXPECT_THROW(make_cpu_backend(options), UsageError);
}

TEST(Bf16Matmul, OptionNamesRoundTripAndUnknownNamesAreUsageErrors) {
  for (auto p : {MatmulPrecision::kFloat32, MatmulPrecision::kBfloat16}) {
    EXPECT_EQ(parse_matmul_precision(matmul_precision_name(p)), p);
  }
  for (auto k : {AttentionKernel::kReference, AttentionKernel::kFlash}) {
    EXPECT_EQ(parse_attention_kernel(attention_kernel_name(k)), k);
  }
  EXPECT_THROW(parse_matmul_precision("tf32"), UsageError);
  EXPECT_THROW(parse_attention_kernel("fast"), UsageError);
}

// --attention-kernel auto: flash on cuda for the head sizes it has (the speedrun's 128,
// tiny's 32, and 64), the reference attention for others (micro's 8) and on the CPU.
TEST(Bf16Matmul, AutoAttentionKernelIsFlashOnCudaWhereItHasTheHeadSize) {
  for (int head_dim : {32, 64, 128}) {
    EXPECT_EQ(default_attention_kernel("cuda", head_dim), AttentionKernel::kFlash) << head_dim;
    EXPECT_EQ(default_attention_kernel("cpu", head_dim), AttentionKernel::kReference) << head_dim;
  }
  for (int head_dim : {8, 16, 48, 96, 256}) {
    EXPECT_EQ(default_attention_kernel("cuda", head_dim), AttentionKernel::kReference) << head_dim;
  }
  for (const char* preset : {"speedrun-124m", "tiny"}) {
    EXPECT_EQ(default_attention_kernel("cuda", Config::preset(preset).head_dim), AttentionKernel::kFlash) << preset;
  }
  EXPECT_EQ(default_attention_kernel("cuda", Config::preset("micro").head_dim), AttentionKernel::kReference);
}

}  // namespace
}  // namespace speedrun
