// The CUDA backend against the CPU backend (the reference): every operation on fresh
// random inputs at several shapes, outputs poisoned with NaN before each run, then a whole
// GPT forward/backward, two optimiser steps and run-to-run determinism. Every test skips
// when no CUDA device is visible (and in builds without the CUDA backend).
//
// Tolerances (float32 against float32, different summation orders and FMA contraction):
//  - pure data movement (copy, transpose, embeddings, zero): bit-identical;
//  - elementwise arithmetic: 1e-5 relative, plus 1e-6 of the tensor's largest magnitude
//    to absorb cancellation where an FMA rounds once instead of twice;
//  - row reductions (rmsnorm, softmax statistics, the head): 1e-5 relative (a float sum of
//    a few hundred terms in another order differs by ~sqrt(n) ulp ~ 1e-6);
//  - matrix products and attention: 1e-4 relative to the sum of absolute products (worst
//    case K * 6e-8 ~ 2e-5 at these K; TF32 by mistake would miss it by 10x);
//  - float64 reductions (sum, dot products): 1e-12 relative to the sum of magnitudes;
//  - whole model: loss 1e-5 relative, each gradient tensor 1e-3 relative L2 (errors of
//    ~1e-6 per op compound through a dozen layers and the Newton-Schulz polynomial).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "backends/cuda_devices.h"
#include "backends/low_precision.h"
#include "backends/matmul_sweep.h"
#include "model/attention_mask.h"
#include "model/gpt.h"
#include "model/params.h"
#include "optim/optimizer.h"
#include "support/bf16_codes.h"
#include "support/device.h"
#include "util/error.h"

namespace speedrun {
namespace {

// Codes in a float buffer of ceil(n/2) words, poisoned with NaN codes in both halves.
constexpr uint32_t kNaNCodePair = 0x7FC07FC0u;

std::vector<uint16_t> codes_of(const std::vector<float>& words, size_t n) {
  std::vector<uint16_t> codes(words.size() * 2);
  std::memcpy(codes.data(), words.data(), words.size() * sizeof(float));
  codes.resize(n);
  return codes;
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

using speedrun::testing::DeviceFloats;
using speedrun::testing::gpu_available;

struct DeviceInts {
  Backend& be;
  int32_t* ptr;
  DeviceInts(Backend& b, const std::vector<int32_t>& host) : be(b), ptr(b.alloc_i32(host.size())) {
    be.upload_i32(ptr, host.data(), host.size());
  }
  ~DeviceInts() { be.release(ptr); }
  DeviceInts(const DeviceInts&) = delete;
};

std::vector<float> code_words(const std::vector<uint16_t>& codes) {
  std::vector<float> words((codes.size() + 1) / 2, 0.f);
  std::memcpy(words.data(), codes.data(), codes.size() * sizeof(uint16_t));
  return words;
}

using testing::encoded;
using testing::widened;

constexpr uint16_t kNaNCode = static_cast<uint16_t>(kNaNCodePair & 0xFFFF);

// bf16 codes in a backend's float buffer, starting `shift` codes in (1: two bytes off
// 16-byte alignment, where a kernel must fall back to narrow accesses; the codes before are
// NaN); get() reads the n codes back.
struct DeviceCodes {
  DeviceFloats words;
  size_t n, shift;
  uint16_t* ptr;
  DeviceCodes(Backend& be, const std::vector<uint16_t>& codes, size_t shift_codes = 0)
      : words(be, code_words(after_nan_codes(codes, shift_codes))),
        n(codes.size()),
        shift(shift_codes),
        ptr(reinterpret_cast<uint16_t*>(words.ptr) + shift_codes) {}
  // count NaN codes: an output poisoned.
  DeviceCodes(Backend& be, size_t count, size_t shift_codes = 0)
      : DeviceCodes(be, std::vector<uint16_t>(count, kNaNCode), shift_codes) {}
  std::vector<uint16_t> get() const {
    auto codes = codes_of(words.get(), n + shift);
    codes.erase(codes.begin(), codes.begin() + static_cast<std::ptrdiff_t>(shift));
    return codes;
  }
  static std::vector<uint16_t> after_nan_codes(const std::vector<uint16_t>& codes, size_t count) {
    std::vector<uint16_t> shifted(count, kNaNCode);
    shifted.insert(shifted.end(), codes.begin(), codes.end());
    return shifted;
  }
};

// ---------------------------------------------------------------------------------------
// Comparison helpers

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::abs(x)));
  return m;
}

// Every element finite and |got - want| <= atol_frac * max|want| + rtol |want|.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, double rtol, double atol_frac,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  const double atol = atol_frac * max_abs(want);
  size_t bad = 0, nonfinite = 0, first = got.size();
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      if (std::isfinite(want[i])) ++nonfinite;
      if (first == got.size()) first = i;
      continue;
    }
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    const double tol = atol + rtol * std::abs(want[i]);
    worst = std::max(worst, err / std::max(tol, 1e-300));
    if (err > tol) {
      ++bad;
      if (first == got.size()) first = i;
    }
  }
  EXPECT_EQ(nonfinite, 0u) << what << ": " << nonfinite << " non-finite outputs (NaN poison not overwritten?)";
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " outside tolerance; worst error/tol "
                     << worst << "; first at " << first << ": got " << got[first] << " want " << want[first];
}

void expect_identical(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      if (bad++ == 0) first = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " elements differ bitwise; first at " << first << ": got "
                     << (bad ? got[first] : 0.f) << " want " << (bad ? want[first] : 0.f);
}

double relative_l2(const std::vector<float>& got, const std::vector<float>& want, size_t begin, size_t end) {
  double diff = 0, ref = 0;
  for (size_t i = begin; i < end; ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    diff += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    ref += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(diff) / std::max(std::sqrt(ref), 1e-30);
}

// ---------------------------------------------------------------------------------------
// The fixture: both backends and a fresh random seed per test (printed on failure).

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_available()) GTEST_SKIP() << "no GPU: " << query_cuda_devices().error;
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    RecordProperty("seed", std::to_string(seed_));
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
  }
  std::string trace() const { return "seed " + std::to_string(seed_); }
  // Both backends with --matmul bf16 (the CPU's is the exact emulation); the GPU's choosing
  // its algorithms by timing `autotune` candidates when above 1.
  void use_bf16_matmuls(int autotune = 0) {
    BackendOptions bf16;
    bf16.matmul = MatmulPrecision::kBfloat16;
    cpu_ = make_cpu_backend(bf16);
    bf16.autotune_matmuls = autotune;
    gpu_ = make_cuda_backend(0, bf16);
  }

  std::vector<float> normal(size_t n, float scale = 1.f) {
    std::normal_distribution<float> dist(0.f, scale);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng_);
    return v;
  }
  std::vector<int32_t> uniform_ints(size_t n, int32_t bound) {
    std::uniform_int_distribution<int32_t> dist(0, bound - 1);
    std::vector<int32_t> v(n);
    for (int32_t& x : v) x = dist(rng_);
    return v;
  }
  // Document ids (non-decreasing, starting anywhere) with mean length `mean_length`, a
  // one-token document, and boundaries that fall inside attention blocks.
  std::vector<int32_t> documents(int T, int mean_length) {
    std::bernoulli_distribution boundary(1.0 / mean_length);
    std::vector<int32_t> doc(T);
    doc[0] = static_cast<int32_t>(rng_() % 5);
    for (int t = 1; t < T; ++t) doc[t] = doc[t - 1] + (boundary(rng_) ? 1 : 0);
    if (T > 8) {  // a document of exactly one token in the middle
      const int t = T / 2 + 3;
      for (int u = t; u < T; ++u) doc[u] += 1;
      for (int u = t + 1; u < T; ++u) doc[u] += 1;
    }
    return doc;
  }

  uint32_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<Backend> gpu_, cpu_;
};

// ---------------------------------------------------------------------------------------
// Memory and data movement

TEST_F(CudaBackendTest, AllocationsAreZeroFilledAndCopiesMoveExactBits) {
  SCOPED_TRACE(trace());
  for (size_t n : {size_t{1}, size_t{1000}, size_t{100003}}) {
    float* p = gpu_->alloc(n);
    std::vector<float> host(n, 1.f);
    gpu_->download(host.data(), p, n);
    EXPECT_EQ(std::count(host.begin(), host.end(), 0.f), static_cast<long>(n));
    gpu_->release(p);
    const auto x = normal(n);
    DeviceFloats src(*gpu_, x), dst(*gpu_, n, kNaN);
    gpu_->copy(dst.ptr, src.ptr, n);
    expect_identical(dst.get(), x, "copy");
    gpu_->copy(dst.ptr, dst.ptr, n);  // self-copy is a no-op
    expect_identical(dst.get(), x, "self copy");
    gpu_->zero(dst.ptr, n);
    expect_identical(dst.get(), std::vector<float>(n, 0.f), "zero");
  }
  // Overlapping copies behave as memmove, like the CPU backend's.
  const auto x = normal(5000);
  for (int shift : {-7, 7}) {
    std::vector<float> want = x;
    const size_t dst_off = shift > 0 ? shift : 0, src_off = shift > 0 ? 0 : -shift;
    std::memmove(want.data() + dst_off, want.data() + src_off, 4000 * sizeof(float));
    DeviceFloats buffer(*gpu_, x);
    gpu_->copy(buffer.ptr + dst_off, buffer.ptr + src_off, 4000);
    expect_identical(buffer.get(), want, "overlapping copy shift " + std::to_string(shift));
  }
}

TEST_F(CudaBackendTest, FailuresBecomeErrorsNamingTheCall) {
  try {
    gpu_->alloc(size_t{1} << 50);  // 4 PiB
    FAIL() << "an impossible allocation succeeded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaMalloc"), std::string::npos) << e.what();
  }
  // The failed allocation leaves the backend usable.
  const auto x = normal(100);
  DeviceFloats a(*gpu_, x);
  EXPECT_EQ(a.get(), x);
  AttentionShape too_wide{64, 1, 512, 64, 1, 0.12f};
  DeviceFloats q(*gpu_, 64 * 512, 0.f);
  DeviceInts doc(*gpu_, std::vector<int32_t>(64, 0));
  EXPECT_THROW(gpu_->attention_forward(q.ptr, nullptr, q.ptr, q.ptr, q.ptr, q.ptr, {}, doc.ptr, too_wide), Error);
}

TEST_F(CudaBackendTest, TransposeIsExact) {
  SCOPED_TRACE(trace());
  struct Case { int rows, cols, batch; };
  for (Case c : {Case{1, 1, 1}, Case{33, 65, 3}, Case{768, 3072, 1}, Case{64, 16, 2}}) {
    const size_t n = static_cast<size_t>(c.rows) * c.cols * c.batch;
    const auto x = normal(n);
    std::vector<float> want(n);
    cpu_->transpose(want.data(), x.data(), c.rows, c.cols, c.batch);
    DeviceFloats dx(*gpu_, x), out(*gpu_, n, kNaN);
    gpu_->transpose(out.ptr, dx.ptr, c.rows, c.cols, c.batch);
    expect_identical(out.get(), want, "transpose " + std::to_string(c.rows) + "x" + std::to_string(c.cols));
  }
}

// ---------------------------------------------------------------------------------------
// Matrix products

struct GemmCase {
  bool ta, tb;
  int M, N, K, pad;
  float alpha, beta;
  int batch;
};

class GemmTest : public CudaBackendTest {
 protected:
  void check(const GemmCase& g) {
    const std::string name = "gemm ta=" + std::to_string(g.ta) + " tb=" + std::to_string(g.tb) + " M=" +
                             std::to_string(g.M) + " N=" + std::to_string(g.N) + " K=" + std::to_string(g.K) +
                             " pad=" + std::to_string(g.pad) + " beta=" + std::to_string(g.beta) +
                             " batch=" + std::to_string(g.batch);
    SCOPED_TRACE(name);
    const int a_rows = g.ta ? g.K : g.M, a_cols = g.ta ? g.M : g.K;
    const int b_rows = g.tb ? g.N : g.K, b_cols = g.tb ? g.K : g.N;
    const int lda = a_cols + g.pad, ldb = b_cols + g.pad, ldc = g.N + g.pad;
    // Strides with a gap, so a batch offset of 0 (matrix 0 reused) cannot pass.
    const size_t sa = static_cast<size_t>(a_rows) * lda + 5, sb = static_cast<size_t>(b_rows) * ldb + 3,
                 sc = static_cast<size_t>(g.M) * ldc + 7;
    const auto A = normal(sa * g.batch), B = normal(sb * g.batch);
    const auto C0 = normal(sc * g.batch);
    std::vector<float> want = C0;
    cpu_->gemm_batched(g.ta, g.tb, g.M, g.N, g.K, g.alpha, A.data(), lda, sa, B.data(), ldb, sb, g.beta, want.data(),
                       ldc, sc, g.batch);
    // With beta == 0 the written region starts as NaN: C must not be read.
    std::vector<float> start = C0;
    if (g.beta == 0.f) {
      for (int b = 0; b < g.batch; ++b)
        for (int i = 0; i < g.M; ++i)
          for (int j = 0; j < g.N; ++j) start[b * sc + static_cast<size_t>(i) * ldc + j] = kNaN;
    }
    DeviceFloats dA(*gpu_, A), dB(*gpu_, B), dC(*gpu_, start);
    if (g.batch == 1) {
      gpu_->gemm(g.ta, g.tb, g.M, g.N, g.K, g.alpha, dA.ptr, lda, dB.ptr, ldb, g.beta, dC.ptr, ldc);
    } else {
      gpu_->gemm_batched(g.ta, g.tb, g.M, g.N, g.K, g.alpha, dA.ptr, lda, sa, dB.ptr, ldb, sb, g.beta, dC.ptr, ldc,
                         sc, g.batch);
    }
    const auto got = dC.get();
    // Per element: |got - want| <= 1e-4 * (|alpha| sum_k |a||b| + |beta c|); outside the
    // written region (padding, gaps) the bits are untouched.
    size_t bad = 0;
    for (int b = 0; b < g.batch; ++b) {
      for (int i = 0; i < g.M; ++i) {
        for (int j = 0; j < g.N; ++j) {
          double magnitude = 0;
          for (int k = 0; k < g.K; ++k) {
            const float a = g.ta ? A[b * sa + static_cast<size_t>(k) * lda + i] : A[b * sa + static_cast<size_t>(i) * lda + k];
            const float bb = g.tb ? B[b * sb + static_cast<size_t>(j) * ldb + k] : B[b * sb + static_cast<size_t>(k) * ldb + j];
            magnitude += std::abs(static_cast<double>(a) * bb);
          }
          const size_t at = b * sc + static_cast<size_t>(i) * ldc + j;
          magnitude = std::abs(g.alpha) * magnitude + std::abs(g.beta * C0[at]);
          const double err = std::abs(static_cast<double>(got[at]) - want[at]);
          if (!std::isfinite(got[at]) || err > 1e-4 * magnitude + 1e-30) {
            if (bad++ < 5) ADD_FAILURE() << "C[" << b << "][" << i << "][" << j << "] got " << got[at] << " want " << want[at];
          }
        }
        for (int j = g.N; j < ldc; ++j) {
          const size_t at = b * sc + static_cast<size_t>(i) * ldc + j;
          if (std::memcmp(&got[at], &C0[at], sizeof(float)) != 0 && bad++ < 5) ADD_FAILURE() << "padding written";
        }
      }
    }
    EXPECT_EQ(bad, 0u);
  }
  // gemm_to_bf16 at two shapes, with and without an addend (distinct or in place), bf16 and
  // float32 inputs, against the CPU's codes; backends made with `autotune` candidates.
  void check_products_into_codes(int autotune);
};

TEST_F(GemmTest, EveryTransposeShapeAndBetaMatchesCpu) {
  SCOPED_TRACE(trace());
  struct Shape { int M, N, K, pad; };
  for (Shape s : {Shape{1, 1, 1, 0}, Shape{37, 129, 65, 3}, Shape{128, 96, 300, 0}, Shape{5, 700, 33, 1}}) {
    for (int t = 0; t < 4; ++t) {
      for (float beta : {0.f, 1.3f}) check({(t & 1) != 0, (t & 2) != 0, s.M, s.N, s.K, s.pad, 0.7f, beta, 1});
    }
  }
}

TEST_F(GemmTest, StridedBatchesUseEveryMatrix) {
  SCOPED_TRACE(trace());
  // Newton-Schulz's three products (X X^T; c A A + b A; B X + a X) and odd shapes.
  check({false, true, 24, 24, 40, 0, 1.f, 0.f, 3});
  check({false, false, 24, 24, 24, 0, 2.0315f, -4.775f, 3});
  check({false, false, 24, 40, 24, 0, 1.f, 3.4445f, 3});
  check({true, false, 17, 9, 31, 2, -0.5f, 1.f, 4});
  check({true, true, 8, 33, 5, 1, 1.f, 0.f, 2});
}

TEST_F(GemmTest, ModelShapedProductsMatchCpu) {
  SCOPED_TRACE(trace());
  // The head (rows x V x d), its weight gradient (V x d x rows) and a linear layer.
  const int rows = 128, V = 2048 + 17, d = 96;
  check({false, true, rows, V, d, 0, 1.f, 0.f, 1});
  check({true, false, V, d, rows, 0, 1.f, 1.f, 1});
  check({false, false, rows, d, V, 0, 1.f, 0.f, 1});
}

// --matmul bf16: the GPU rounds both operands to bf16 exactly as the CPU emulation does and
// accumulates in float32, so the float32 band above holds between the two.
TEST_F(GemmTest, Bf16InputsMatchTheCpuEmulation) {
  SCOPED_TRACE(trace());
  use_bf16_matmuls();
  check({false, false, 37, 129, 65, 3, 0.7f, 1.3f, 1});
  check({true, true, 128, 96, 300, 0, 1.f, 0.f, 1});
  check({false, true, 24, 24, 40, 0, 1.f, 0.f, 3});  // Newton-Schulz's X X^T
  check({true, false, 17, 9, 31, 2, -0.5f, 1.f, 4});
  check({false, true, 128, 2048 + 17, 96, 0, 1.f, 0.f, 1});
}

// gemm_to_bf16 (the MLP's h kept as codes alone; with an addend, a residual add onto the
// bf16 stream, in place or into another buffer): the codes of the CPU's gemm_to_bf16 up to
// one bf16 ulp plus the float32 sums' order-dependent error, padding untouched; with float32
// products too (the fallback through scratch). The addend's padding holds NaN codes: an
// addend read with the wrong leading dimension would carry them into C.
TEST_F(GemmTest, ProductsIntoCodesAreTheRoundedProduct) {
  SCOPED_TRACE(trace());
  check_products_into_codes(0);
}

void GemmTest::check_products_into_codes(int autotune) {
  enum class Addend { kNone, kDistinct, kInPlace };
  const char* const addend_names[] = {"no addend", "addend", "addend in place"};
  for (bool bf16_inputs : {true, false}) {
    if (bf16_inputs) use_bf16_matmuls(autotune);
    else {
      BackendOptions float32;
      float32.autotune_matmuls = autotune;
      gpu_ = make_cuda_backend(0, float32);
      cpu_ = make_cpu_backend();
    }
    struct Shape { bool ta, tb; int M, N, K, pad; };
    for (Shape p : {Shape{false, true, 300, 768, 128, 0}, Shape{true, false, 37, 129, 65, 3}}) {
      const int lda = (p.ta ? p.M : p.K) + p.pad, ldb = (p.tb ? p.K : p.N) + p.pad, ldc = p.N + p.pad;
      const size_t count = static_cast<size_t>(p.M) * ldc;
      const auto A = normal(static_cast<size_t>(p.ta ? p.K : p.M) * lda);
      const auto B = normal(static_cast<size_t>(p.tb ? p.N : p.K) * ldb);
      // sum_k |a||b| per element: the scale of the float32 sums' order-dependent error.
      std::vector<float> magnitude(count);
      std::vector<float> abs_a = A, abs_b = B;
      for (float& v : abs_a) v = std::abs(v);
      for (float& v : abs_b) v = std::abs(v);
      make_cpu_backend()->gemm(p.ta, p.tb, p.M, p.N, p.K, 1.f, abs_a.data(), lda, abs_b.data(), ldb, 0.f,
                               magnitude.data(), ldc);
      // The stream the product is added onto, on the product's scale (sums cancel often).
      auto addend = encoded(normal(count, 8.f));
      for (int r = 0; r < p.M; ++r) {
        for (int c = p.N; c < ldc; ++c) addend[static_cast<size_t>(r) * ldc + c] = kNaNCode;
      }
      DeviceFloats dA(*gpu_, A), dB(*gpu_, B);
      for (Addend mode : {Addend::kNone, Addend::kDistinct, Addend::kInPlace}) {
        SCOPED_TRACE(std::string(bf16_inputs ? "bf16" : "fp32") + " M=" + std::to_string(p.M) + " " +
                     addend_names[static_cast<int>(mode)]);
        const uint16_t* cpu_addend = mode == Addend::kNone ? nullptr : addend.data();
        std::vector<uint16_t> want(count);
        cpu_->gemm_to_bf16(p.ta, p.tb, p.M, p.N, p.K, A.data(), lda, B.data(), ldb, cpu_addend, want.data(), ldc);
        DeviceCodes dC(*gpu_, mode == Addend::kInPlace ? addend : std::vector<uint16_t>(count, kNaNCode));
        DeviceCodes dAddend(*gpu_, addend);
        const uint16_t* gpu_addend = mode == Addend::kNone ? nullptr : mode == Addend::kInPlace ? dC.ptr : dAddend.ptr;
        gpu_->gemm_to_bf16(p.ta, p.tb, p.M, p.N, p.K, dA.ptr, lda, dB.ptr, ldb, gpu_addend, dC.ptr, ldc);
        const auto codes = dC.get();
        size_t bad = 0;
        for (int r = 0; r < p.M; ++r) {
          for (int c = 0; c < ldc; ++c) {
            const size_t i = static_cast<size_t>(r) * ldc + c;
            if (c >= p.N) {
              if (codes[i] != kNaNCode && bad++ < 5) ADD_FAILURE() << "padding written at " << r << "," << c;
              continue;
            }
            const float got = lowp::decode_bf16(codes[i]), rounded = lowp::decode_bf16(want[i]);
            if (!(std::abs(got - rounded) <= std::abs(rounded) * 0x1p-7 + 1e-4 * magnitude[i] + 1e-30) &&
                bad++ < 5) {
              ADD_FAILURE() << "C[" << r << "][" << c << "] got " << got << " want " << rounded;
            }
          }
        }
        EXPECT_EQ(bad, 0u);
      }
    }
  }
}

// ...and really rounds: against float32 the same product misses that band.
TEST_F(GemmTest, Bf16InputsDifferFromFloat32) {
  SCOPED_TRACE(trace());
  use_bf16_matmuls();
  cpu_ = make_cpu_backend();  // the float32 product
  const int n = 64;
  const auto A = normal(n * n), B = normal(n * n);
  std::vector<float> want(n * n);
  cpu_->gemm(false, false, n, n, n, 1.f, A.data(), n, B.data(), n, 0.f, want.data(), n);
  DeviceFloats dA(*gpu_, A), dB(*gpu_, B), dC(*gpu_, n * n, kNaN);
  gpu_->gemm(false, false, n, n, n, 1.f, dA.ptr, n, dB.ptr, n, 0.f, dC.ptr, n);
  const auto got = dC.get();
  size_t outside = 0;
  for (int i = 0; i < n * n; ++i) outside += std::abs(got[i] - want[i]) > 1e-4 * std::sqrt(n);
  EXPECT_GT(outside, static_cast<size_t>(n * n / 2)) << "bf16 products indistinguishable from float32";
}

// ---------------------------------------------------------------------------------------
// Embeddings

// Backend::hold_operand: products reading held bf16 copies (both operands, a transposed
// one, a held operand used twice) match the CPU emulation; after release_operand a product
// rounds the operand's new values, never the held copy.
TEST_F(GemmTest, HeldOperandsServeTheirProductsUntilReleased) {
  SCOPED_TRACE(trace());
  use_bf16_matmuls();
  const int M = 96, N = 80, K = 64;
  auto A = normal(static_cast<size_t>(M) * K), B = normal(static_cast<size_t>(K) * N);
  DeviceFloats dA(*gpu_, A), dB(*gpu_, B), dC(*gpu_, static_cast<size_t>(M) * N, kNaN);
  DeviceFloats dCt(*gpu_, static_cast<size_t>(K) * N, kNaN);
  std::vector<float> want(static_cast<size_t>(M) * N), want_t(static_cast<size_t>(K) * N);
  gpu_->hold_operand(0, dA.ptr, A.size());
  gpu_->hold_operand(1, dB.ptr, B.size());
  gpu_->gemm(false, false, M, N, K, 1.f, dA.ptr, K, dB.ptr, N, 0.f, dC.ptr, N);
  gpu_->gemm(true, false, K, N, M, 1.f, dA.ptr, K, dC.ptr, N, 0.f, dCt.ptr, N);  // A^T C: A held, transposed
  cpu_->gemm(false, false, M, N, K, 1.f, A.data(), K, B.data(), N, 0.f, want.data(), N);
  const auto got = dC.get();
  expect_close(got, want, 1e-4, 1e-4, "held A and B");
  cpu_->gemm(true, false, K, N, M, 1.f, A.data(), K, got.data(), N, 0.f, want_t.data(), N);
  expect_close(dCt.get(), want_t, 1e-4, 1e-4, "held A transposed");
  gpu_->release_operand(0);
  gpu_->release_operand(1);
  for (float& x : A) x = -2.f * x;
  DeviceFloats fresh(*gpu_, A);
  gpu_->copy(dA.ptr, fresh.ptr, A.size());
  gpu_->gemm(false, false, M, N, K, 1.f, dA.ptr, K, dB.ptr, N, 0.f, dC.ptr, N);
  cpu_->gemm(false, false, M, N, K, 1.f, A.data(), K, B.data(), N, 0.f, want.data(), N);
  expect_close(dC.get(), want, 1e-4, 1e-4, "released: the new A");
}

// Backend::hold_produced_operand: relu^2 writes its output's codes into the held slot and
// the product reads them; the CPU emulation does the same.
TEST_F(GemmTest, AProducedOperandIsReadFromTheCodesItsProducerWrote) {
  SCOPED_TRACE(trace());
  use_bf16_matmuls();
  const int M = 128, N = 96, K = 256;
  const auto h = normal(static_cast<size_t>(M) * K, 2.f), B = normal(static_cast<size_t>(K) * N);
  std::vector<float> g(h.size()), want(static_cast<size_t>(M) * N);
  uint16_t* cpu_codes = cpu_->hold_produced_operand(0, g.data(), g.size());
  ASSERT_NE(cpu_codes, nullptr);
  cpu_->relu2_forward_bf16(g.data(), cpu_codes, nullptr, h.data(), g.size());
  cpu_->gemm(false, false, M, N, K, 1.f, g.data(), K, B.data(), N, 0.f, want.data(), N);
  cpu_->release_operand(0);
  DeviceFloats dh(*gpu_, h), dg(*gpu_, g.size(), kNaN), dB(*gpu_, B), dC(*gpu_, want.size(), kNaN);
  uint16_t* codes = gpu_->hold_produced_operand(0, dg.ptr, g.size());
  ASSERT_NE(codes, nullptr);
  gpu_->relu2_forward_bf16(dg.ptr, codes, nullptr, dh.ptr, g.size());
  gpu_->gemm(false, false, M, N, K, 1.f, dg.ptr, K, dB.ptr, N, 0.f, dC.ptr, N);
  gpu_->release_operand(0);
  expect_close(dC.get(), want, 1e-4, 1e-4, "product of the produced codes");
  expect_identical(dg.get(), g, "relu2 output beside its codes");
}

// A produced operand held over three adjacent matrices (the model's q, k and v gradients):
// a batched product over the parts with one shared B (batch stride 0) and a product starting
// inside it read the codes the parts' producers wrote (the floats stay NaN), as on the CPU.
TEST_F(GemmTest, AHeldOperandServesProductsOfItsParts) {
  SCOPED_TRACE(trace());
  use_bf16_matmuls();
  const int M = 128, N = 96, K = 256, kParts = 3;
  const size_t part = static_cast<size_t>(M) * K, out = static_cast<size_t>(M) * N;
  const auto h = normal(kParts * part, 2.f), B = normal(static_cast<size_t>(K) * N);
  std::vector<float> g(h.size()), want(kParts * out);
  cpu_->relu2_forward_bf16(g.data(), nullptr, nullptr, h.data(), g.size());
  cpu_->gemm_batched(false, false, M, N, K, 1.f, g.data(), K, part, B.data(), N, 0, 0.f, want.data(), N, out, kParts);
  DeviceFloats dh(*gpu_, h), dg(*gpu_, g.size(), kNaN), dB(*gpu_, B), dC(*gpu_, want.size(), kNaN),
      d_last(*gpu_, out, kNaN);
  uint16_t* codes = gpu_->hold_produced_operand(0, dg.ptr, g.size());
  ASSERT_NE(codes, nullptr);
  for (int i = 0; i < kParts; ++i) {
    gpu_->relu2_forward_bf16(nullptr, codes + i * part, nullptr, dh.ptr + i * part, part);
  }
  gpu_->gemm_batched(false, false, M, N, K, 1.f, dg.ptr, K, part, dB.ptr, N, 0, 0.f, dC.ptr, N, out, kParts);
  gpu_->gemm(false, false, M, N, K, 1.f, dg.ptr + 2 * part, K, dB.ptr, N, 0.f, d_last.ptr, N);
  gpu_->release_operand(0);
  expect_close(dC.get(), want, 1e-4, 1e-4, "batched over the held parts, B shared");
  expect_close(d_last.get(), std::vector<float>(want.end() - out, want.end()), 1e-4, 1e-4, "the last part alone");
}

TEST_F(CudaBackendTest, EmbeddingForwardAndBackwardAreBitIdenticalToCpu) {
  SCOPED_TRACE(trace());
  struct Case { int V, T, dim; };
  // V = 3 and 2: runs of one id thousands of tokens long (a frequent token's). V = 50257,
  // T = 5000: more runs than the kernel's blocks, which stride over them. T = 1: one run.
  for (Case c : {Case{300, 64, 16}, Case{50257, 1000, 64}, Case{7, 333, 33}, Case{300, 2048, 768}, Case{3, 5000, 130},
                 Case{2, 4097, 8}, Case{50257, 5000, 16}, Case{300, 1, 8}}) {
    SCOPED_TRACE("V=" + std::to_string(c.V) + " T=" + std::to_string(c.T) + " dim=" + std::to_string(c.dim));
    const auto table = normal(static_cast<size_t>(c.V) * c.dim);
    const auto tokens = uniform_ints(c.T, c.V);
    const auto dout = normal(static_cast<size_t>(c.T) * c.dim);
    std::vector<float> out(static_cast<size_t>(c.T) * c.dim), dtable = normal(table.size());
    const std::vector<float> dtable0 = dtable;
    cpu_->embedding_forward(out.data(), table.data(), tokens.data(), c.T, c.dim);
    cpu_->embedding_backward(dtable.data(), dout.data(), tokens.data(), c.T, c.dim);
    DeviceFloats d_table(*gpu_, table), d_out(*gpu_, out.size(), kNaN), d_dout(*gpu_, dout),
        d_dtable(*gpu_, dtable0);
    DeviceInts d_tokens(*gpu_, tokens);
    gpu_->embedding_forward(d_out.ptr, d_table.ptr, d_tokens.ptr, c.T, c.dim);
    gpu_->embedding_backward(d_dtable.ptr, d_dout.ptr, d_tokens.ptr, c.T, c.dim);
    expect_identical(d_out.get(), out, "embedding_forward");
    // Same additions in the same order (stored value, then tokens by position).
    expect_identical(d_dtable.get(), dtable, "embedding_backward");
  }
}

// ---------------------------------------------------------------------------------------
// Normalisation and rotary

// rmsnorm's test shapes: one row of 8, rows of the speedrun's 768, many short rows, an odd
// width (no groups of 4); and float32's epsilon, as the model's.
struct RowShape { int rows, dim; };
constexpr RowShape kRmsnormShapes[] = {{1, 8}, {7, 768}, {1000, 128}, {33, 33}};
constexpr float kRmsnormEps = 1.1920929e-07f;

TEST_F(CudaBackendTest, RmsnormForwardAndBackwardMatchCpuIncludingInPlace) {
  SCOPED_TRACE(trace());
  const float eps = kRmsnormEps;
  for (RowShape c : kRmsnormShapes) {
    SCOPED_TRACE("rows=" + std::to_string(c.rows) + " dim=" + std::to_string(c.dim));
    const size_t n = static_cast<size_t>(c.rows) * c.dim;
    const auto x = normal(n, 3.f);
    std::vector<float> out(n), rstd(c.rows);
    cpu_->rmsnorm_forward(out.data(), nullptr, rstd.data(), x.data(), c.rows, c.dim, eps);
    {
      DeviceFloats dx(*gpu_, x), dout(*gpu_, n, kNaN), drstd(*gpu_, c.rows, kNaN);
      gpu_->rmsnorm_forward(dout.ptr, nullptr, drstd.ptr, dx.ptr, c.rows, c.dim, eps);
      expect_close(dout.get(), out, 1e-5, 1e-6, "rmsnorm_forward out");
      expect_close(drstd.get(), rstd, 1e-5, 0, "rmsnorm_forward rstd");
      DeviceFloats dcodes(*gpu_, (n + 1) / 2, std::bit_cast<float>(kNaNCodePair));
      gpu_->rmsnorm_forward(dx.ptr, reinterpret_cast<uint16_t*>(dcodes.ptr), drstd.ptr, dx.ptr, c.rows, c.dim,
                            eps);  // out == x, with its codes
      const auto in_place = dx.get();
      expect_close(in_place, out, 1e-5, 1e-6, "rmsnorm_forward in place");
      const auto codes = codes_of(dcodes.get(), n);
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(codes[i], lowp::encode_bf16(in_place[i])) << "rmsnorm_forward codes at " << i;
      }
    }
    const auto grad = normal(n), dx0 = normal(n);
    for (bool accumulate : {false, true}) {
      std::vector<float> want = dx0;
      cpu_->rmsnorm_backward(want.data(), nullptr, grad.data(), out.data(), rstd.data(), c.rows, c.dim, accumulate);
      DeviceFloats dgrad(*gpu_, grad), dout(*gpu_, out), drstd(*gpu_, rstd);
      DeviceFloats ddx(*gpu_, accumulate ? dx0 : std::vector<float>(n, kNaN));
      DeviceFloats dcodes(*gpu_, (n + 1) / 2, std::bit_cast<float>(kNaNCodePair));
      gpu_->rmsnorm_backward(ddx.ptr, reinterpret_cast<uint16_t*>(dcodes.ptr), dgrad.ptr, dout.ptr, drstd.ptr, c.rows,
                             c.dim, accumulate);
      const auto got = ddx.get();
      expect_close(got, want, 1e-5, 1e-5, accumulate ? "rmsnorm_backward accumulate" : "rmsnorm_backward");
      const auto codes = codes_of(dcodes.get(), n);  // of the final dx (accumulated)
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(codes[i], lowp::encode_bf16(got[i])) << "rmsnorm_backward codes at " << i;
      if (!accumulate) {  // dx == dout, as GPT calls it for the q/k norms
        gpu_->rmsnorm_backward(dgrad.ptr, nullptr, dgrad.ptr, dout.ptr, drstd.ptr, c.rows, c.dim, false);
        expect_close(dgrad.get(), want, 1e-5, 1e-5, "rmsnorm_backward in place");
      }
    }
  }
}

TEST_F(CudaBackendTest, RotaryMatchesCpuAndInverts) {
  SCOPED_TRACE(trace());
  // Same float theta on both; cosf/sinf differ from glibc by <= 2 ulp, so 1e-5 of |x|.
  struct Case { int T, H, D; };
  for (Case c : {Case{64, 2, 8}, Case{4096, 6, 128}, Case{262144, 1, 8}, Case{100, 3, 12}}) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) + " D=" + std::to_string(c.D));
    const size_t n = static_cast<size_t>(c.T) * c.H * c.D;
    const auto x = normal(n);
    for (bool inverse : {false, true}) {
      std::vector<float> want = x;
      cpu_->rotary(want.data(), nullptr, c.T, c.H, c.D, 1024.f, inverse);
      DeviceFloats dx(*gpu_, x);
      gpu_->rotary(dx.ptr, nullptr, c.T, c.H, c.D, 1024.f, inverse);
      expect_close(dx.get(), want, 1e-5, 1e-5, inverse ? "rotary inverse" : "rotary");
      gpu_->rotary(dx.ptr, nullptr, c.T, c.H, c.D, 1024.f, !inverse);
      expect_close(dx.get(), x, 1e-5, 1e-5, "rotary round trip");
    }
    // Kept as bf16 (attention's input): the rotation rounded, and its codes stored.
    DeviceFloats plain(*gpu_, x), kept(*gpu_, x), dcodes(*gpu_, (n + 1) / 2, std::bit_cast<float>(kNaNCodePair));
    gpu_->rotary(plain.ptr, nullptr, c.T, c.H, c.D, 1024.f, false);
    gpu_->rotary(kept.ptr, reinterpret_cast<uint16_t*>(dcodes.ptr), c.T, c.H, c.D, 1024.f, false);
    const auto unrounded = plain.get(), rounded = kept.get();
    const auto codes = codes_of(dcodes.get(), n);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(codes[i], lowp::encode_bf16(unrounded[i])) << "rotary codes at " << i;
      ASSERT_EQ(rounded[i], lowp::decode_bf16(codes[i])) << "rounded rotary at " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Elementwise operations and their coefficient gradients

TEST_F(CudaBackendTest, ElementwiseOperationsMatchCpu) {
  SCOPED_TRACE(trace());
  for (size_t n : {size_t{1}, size_t{1000}, size_t{100003}}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const auto a = normal(n), b = normal(n), dout = normal(n), coef = normal(2);
    auto x = normal(n);
    for (size_t i = 0; i < n; i += 5) x[i] = 0.f;  // relu's edge
    DeviceFloats da(*gpu_, a), db(*gpu_, b), ddout(*gpu_, dout), dcoef(*gpu_, coef), dx(*gpu_, x);
    std::vector<float> want(n);
    {
      cpu_->mix_forward(want.data(), nullptr, a.data(), b.data(), coef.data(), n);
      DeviceFloats out(*gpu_, n, kNaN);
      gpu_->mix_forward(out.ptr, nullptr, da.ptr, db.ptr, dcoef.ptr, n);
      expect_close(out.get(), want, 1e-5, 1e-6, "mix_forward");
      cpu_->mix_forward(want.data(), nullptr, a.data(), nullptr, coef.data(), n);
      DeviceFloats in_place(*gpu_, a);
      gpu_->mix_forward(in_place.ptr, nullptr, in_place.ptr, nullptr, dcoef.ptr, n);  // out == a, no b
      expect_close(in_place.get(), want, 1e-5, 1e-6, "mix_forward in place without b");
      for (float* second : {db.ptr, static_cast<float*>(nullptr)}) {  // kept as bf16: rounded, codes stored
        DeviceFloats plain(*gpu_, n, kNaN), kept(*gpu_, n, kNaN);
        DeviceFloats codes(*gpu_, (n + 1) / 2, std::bit_cast<float>(kNaNCodePair));
        gpu_->mix_forward(plain.ptr, nullptr, da.ptr, second, dcoef.ptr, n);
        gpu_->mix_forward(kept.ptr, reinterpret_cast<uint16_t*>(codes.ptr), da.ptr, second, dcoef.ptr, n);
        const auto unrounded = plain.get(), rounded = kept.get();
        const auto got_codes = codes_of(codes.get(), n);
        for (size_t i = 0; i < n; ++i) {
          ASSERT_EQ(got_codes[i], lowp::encode_bf16(unrounded[i])) << "mix codes at " << i;
          ASSERT_EQ(rounded[i], lowp::decode_bf16(got_codes[i])) << "rounded mix at " << i;
        }
        DeviceFloats alone(*gpu_, (n + 1) / 2, std::bit_cast<float>(kNaNCodePair));  // out null: codes alone
        gpu_->mix_forward(nullptr, reinterpret_cast<uint16_t*>(alone.ptr), da.ptr, second, dcoef.ptr, n);
        EXPECT_EQ(codes_of(alone.get(), n), got_codes) << "mix codes alone";
      }
    }
    {
      std::vector<float> acc = a;
      cpu_->scaled_add_forward(acc.data(), b.data(), coef.data(), n);
      DeviceFloats out(*gpu_, a);
      gpu_->scaled_add_forward(out.ptr, db.ptr, dcoef.ptr, n);
      expect_close(out.get(), acc, 1e-5, 1e-6, "scaled_add_forward");
      acc = a;
      cpu_->add(acc.data(), nullptr, b.data(), n);
      DeviceFloats sum(*gpu_, a), sum_codes(*gpu_, (n + 1) / 2, std::bit_cast<float>(kNaNCodePair));
      gpu_->add(sum.ptr, reinterpret_cast<uint16_t*>(sum_codes.ptr), db.ptr, n);
      const auto got_sum = sum.get();
      expect_close(got_sum, acc, 1e-6, 0, "add");
      const auto codes = codes_of(sum_codes.get(), n);  // of the sum
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(codes[i], lowp::encode_bf16(got_sum[i])) << "add codes at " << i;
    }
    {
      cpu_->relu2_forward(want.data(), x.data(), n);
      DeviceFloats out(*gpu_, n, kNaN);
      gpu_->relu2_forward(out.ptr, dx.ptr, n);
      expect_close(out.get(), want, 1e-6, 0, "relu2_forward");
      std::vector<float> grad = dout;
      cpu_->relu2_backward(grad.data(), grad.data(), x.data(), n);
      DeviceFloats g(*gpu_, dout);
      gpu_->relu2_backward(g.ptr, g.ptr, dx.ptr, n);  // dx == dout, as GPT calls it
      expect_close(g.get(), grad, 1e-6, 0, "relu2_backward in place");
    }
  }
}

// ---------------------------------------------------------------------------------------
// bf16 activation storage. Rounding is elementwise and deterministic, so relu^2's codes of
// the same h are identical on both; rmsnorm's float32 outputs differ by noise before they
// are rounded, which can move a value by one bf16 ulp (2^-8 relative).

TEST_F(CudaBackendTest, Bf16ActivationStorageMatchesCpu) {
  SCOPED_TRACE(trace());
  const float poison = std::bit_cast<float>(kNaNCodePair);
  for (size_t n : {size_t{1}, size_t{1000}, size_t{100003}}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    auto h = normal(n, 3.f);
    for (size_t i = 0; i < n; i += 5) h[i] = 0.f;
    std::vector<float> g(n);
    std::vector<uint16_t> codes(n), g_codes(n);
    cpu_->relu2_forward_bf16(g.data(), g_codes.data(), codes.data(), h.data(), n);
    DeviceFloats dh(*gpu_, h), dh0(*gpu_, h), dcodes(*gpu_, (n + 1) / 2, poison), dg(*gpu_, n, kNaN);
    DeviceFloats dg_codes(*gpu_, (n + 1) / 2, poison);
    auto* device_codes = reinterpret_cast<uint16_t*>(dcodes.ptr);
    auto* device_g_codes = reinterpret_cast<uint16_t*>(dg_codes.ptr);
    gpu_->relu2_forward_bf16(dg.ptr, device_g_codes, device_codes, dh.ptr, n);
    EXPECT_EQ(codes_of(dcodes.get(), n), codes) << "relu2_forward_bf16 codes";
    EXPECT_EQ(codes_of(dg_codes.get(), n), g_codes) << "relu2_forward_bf16 output codes";
    expect_identical(dg.get(), g, "relu2_forward_bf16");
    gpu_->relu2_forward_bf16(dh.ptr, nullptr, nullptr, dh.ptr, n);  // in place, nothing kept
    expect_identical(dh.get(), g, "relu2_forward_bf16 in place");
    DeviceFloats again(*gpu_, n, kNaN), wide(*gpu_, n, kNaN), again_codes(*gpu_, (n + 1) / 2, poison);
    gpu_->relu2_from_bf16(again.ptr, reinterpret_cast<uint16_t*>(again_codes.ptr), device_codes, n);
    expect_identical(again.get(), g, "relu2_from_bf16");
    EXPECT_EQ(codes_of(again_codes.get(), n), g_codes) << "relu2_from_bf16 output codes";
    DeviceFloats only_codes(*gpu_, (n + 1) / 2, poison), only_from_codes(*gpu_, (n + 1) / 2, poison);
    gpu_->relu2_forward_bf16(nullptr, reinterpret_cast<uint16_t*>(only_codes.ptr), nullptr, dh0.ptr, n);
    gpu_->relu2_from_bf16(nullptr, reinterpret_cast<uint16_t*>(only_from_codes.ptr), device_codes, n);
    EXPECT_EQ(codes_of(only_codes.get(), n), g_codes) << "relu2_forward_bf16, codes alone";
    EXPECT_EQ(codes_of(only_from_codes.get(), n), g_codes) << "relu2_from_bf16, codes alone";
    gpu_->widen_bf16(wide.ptr, device_codes, n);
    expect_identical(wide.get(), widened(codes), "widen_bf16");
    const auto dout = normal(n);
    std::vector<float> want = dout;
    std::vector<uint16_t> want_codes(n);
    cpu_->relu2_backward_bf16(want.data(), want_codes.data(), want.data(), codes.data(), n);
    DeviceFloats dgrad(*gpu_, dout), dgrad_codes(*gpu_, (n + 1) / 2, poison);
    gpu_->relu2_backward_bf16(dgrad.ptr, reinterpret_cast<uint16_t*>(dgrad_codes.ptr), dgrad.ptr, device_codes, n);
    expect_close(dgrad.get(), want, 1e-6, 0, "relu2_backward_bf16 in place");
    // 2 h dout rounds identically unless the product's last bit differs (fma contraction).
    const auto device_dx_codes = codes_of(dgrad_codes.get(), n);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_NEAR(lowp::decode_bf16(device_dx_codes[i]), lowp::decode_bf16(want_codes[i]),
                  std::abs(want[i]) * 0x1p-7 + 1e-30)
          << "relu2_backward_bf16 output codes at " << i;
    }
    // The codes alone (dx null): the same codes, dout untouched.
    DeviceFloats dout_again(*gpu_, dout), codes_alone(*gpu_, (n + 1) / 2, poison);
    gpu_->relu2_backward_bf16(nullptr, reinterpret_cast<uint16_t*>(codes_alone.ptr), dout_again.ptr, device_codes, n);
    EXPECT_EQ(codes_of(codes_alone.get(), n), device_dx_codes) << "relu2_backward_bf16, codes alone";
    expect_identical(dout_again.get(), dout, "relu2_backward_bf16's dout, codes alone");
  }
  const float eps = 1.1920929e-07f;
  struct Case { int rows, dim; };
  for (Case c : {Case{7, 768}, Case{1000, 128}, Case{33, 33}}) {
    SCOPED_TRACE("rows=" + std::to_string(c.rows) + " dim=" + std::to_string(c.dim));
    const size_t n = static_cast<size_t>(c.rows) * c.dim;
    const auto x = normal(n, 3.f);
    std::vector<float> out(n), rstd(c.rows);
    std::vector<uint16_t> codes(n);
    cpu_->rmsnorm_forward_bf16(out.data(), codes.data(), rstd.data(), x.data(), c.rows, c.dim, eps);
    DeviceFloats dx(*gpu_, x), dout(*gpu_, n, kNaN), drstd(*gpu_, c.rows, kNaN), dcodes(*gpu_, (n + 1) / 2, poison);
    gpu_->rmsnorm_forward_bf16(dout.ptr, reinterpret_cast<uint16_t*>(dcodes.ptr), drstd.ptr, dx.ptr, c.rows, c.dim,
                               eps);
    const auto gpu_out = dout.get();
    // One bf16 ulp is 2^-8 to 2^-7 of the value (the bottom of a binade needs 2^-7).
    expect_close(gpu_out, out, 1.0 / 128, 0, "rmsnorm_forward_bf16 out (one bf16 ulp)");
    expect_identical(widened(codes_of(dcodes.get(), n)), gpu_out, "rmsnorm_forward_bf16 codes decode to out");
    expect_close(drstd.get(), rstd, 1e-5, 0, "rmsnorm_forward_bf16 rstd");
    gpu_->rmsnorm_forward_bf16(dx.ptr, nullptr, drstd.ptr, dx.ptr, c.rows, c.dim, eps);
    expect_identical(dx.get(), gpu_out, "rmsnorm_forward_bf16 in place");
    // The backward from the CPU's codes on both.
    const auto grad = normal(n);
    std::vector<float> want = grad;
    cpu_->rmsnorm_backward_bf16(want.data(), nullptr, want.data(), codes.data(), rstd.data(), c.rows, c.dim, false);
    DeviceFloats dgrad(*gpu_, grad), cpu_codes(*gpu_, code_words(codes)), cpu_rstd(*gpu_, rstd);
    DeviceFloats dgrad_codes(*gpu_, (n + 1) / 2, poison);
    gpu_->rmsnorm_backward_bf16(dgrad.ptr, reinterpret_cast<uint16_t*>(dgrad_codes.ptr), dgrad.ptr,
                                reinterpret_cast<const uint16_t*>(cpu_codes.ptr), cpu_rstd.ptr, c.rows, c.dim, false);
    const auto gpu_dx = dgrad.get();
    expect_close(gpu_dx, want, 1e-5, 1e-5, "rmsnorm_backward_bf16 in place");
    const auto dx_codes = codes_of(dgrad_codes.get(), n);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(dx_codes[i], lowp::encode_bf16(gpu_dx[i])) << "rmsnorm_backward_bf16 codes of its dx at " << i;
    }
    DeviceFloats grad_again(*gpu_, grad), codes_alone(*gpu_, (n + 1) / 2, poison);
    gpu_->rmsnorm_backward_bf16(nullptr, reinterpret_cast<uint16_t*>(codes_alone.ptr), grad_again.ptr,
                                reinterpret_cast<const uint16_t*>(cpu_codes.ptr), cpu_rstd.ptr, c.rows, c.dim, false);
    EXPECT_EQ(codes_of(codes_alone.get(), n), dx_codes) << "rmsnorm_backward_bf16, codes alone";
    expect_identical(grad_again.get(), grad, "rmsnorm_backward_bf16's dout, codes alone");
  }
}

// q and k's norm and rotary in one pass: the GPU's own unfused ops in sequence give the same
// bits (the fused kernels repeat their arithmetic); the CPU's composition the same values up
// to a bf16 ulp (its sums run in another order). D = 128, 64, 32 and 8 take the fused
// kernels (below 128 with idle lanes), D = 12 the unfused fallback.
TEST_F(CudaBackendTest, FusedHeadNormAndRotaryAreTheOpsInSequence) {
  SCOPED_TRACE(trace());
  const float eps = 1.1920929e-07f, base = 1024.f, poison = std::bit_cast<float>(kNaNCodePair);
  struct Case { int T, H, D; };
  for (Case c : {Case{300, 6, 128}, Case{77, 4, 64}, Case{64, 2, 32}, Case{40, 3, 8}, Case{50, 3, 12}}) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) + " D=" + std::to_string(c.D));
    const int rows = c.T * c.H;
    const size_t n = static_cast<size_t>(rows) * c.D, words = (n + 1) / 2;
    const auto x = normal(n, 3.f), dout = normal(n);
    auto codes = [&](DeviceFloats& f) { return reinterpret_cast<uint16_t*>(f.ptr); };
    // Unfused, on the GPU.
    DeviceFloats ux(*gpu_, x), unormed(*gpu_, words, poison), urotated(*gpu_, words, poison), urstd(*gpu_, rows, kNaN);
    gpu_->rmsnorm_forward_bf16(ux.ptr, codes(unormed), urstd.ptr, ux.ptr, rows, c.D, eps);
    gpu_->rotary(ux.ptr, codes(urotated), c.T, c.H, c.D, base, false);
    // Fused, with and without the floats.
    DeviceFloats fx(*gpu_, x), fout(*gpu_, n, kNaN), fnormed(*gpu_, words, poison), frotated(*gpu_, words, poison),
        frstd(*gpu_, rows, kNaN), again(*gpu_, words, poison), again_out(*gpu_, n, kNaN);
    gpu_->rmsnorm_rotary_bf16(fout.ptr, codes(fnormed), codes(frotated), frstd.ptr, fx.ptr, c.T, c.H, c.D, eps, base);
    expect_identical(fnormed.get(), unormed.get(), "normalised codes");
    expect_identical(frotated.get(), urotated.get(), "rotated codes");
    expect_identical(fout.get(), ux.get(), "rotated floats");
    expect_identical(frstd.get(), urstd.get(), "rstd");
    expect_identical(fx.get(), x, "x untouched when out is elsewhere");
    DeviceFloats codes_only(*gpu_, words, poison), no_normed(*gpu_, words, poison);
    gpu_->rmsnorm_rotary_bf16(nullptr, codes(fnormed), codes(codes_only), frstd.ptr, fx.ptr, c.T, c.H, c.D, eps, base);
    expect_identical(codes_only.get(), urotated.get(), "rotated codes, no floats");
    // A pass without a backward keeps no normalised codes.
    gpu_->rmsnorm_rotary_bf16(nullptr, nullptr, codes(no_normed), frstd.ptr, fx.ptr, c.T, c.H, c.D, eps, base);
    expect_identical(no_normed.get(), urotated.get(), "rotated codes, no normalised codes kept");
    // In place (out == x), and one float off alignment (the scalar accesses).
    DeviceFloats in_place(*gpu_, x), shifted(*gpu_, n + 1, 0.f), shifted_out(*gpu_, n + 1, kNaN);
    gpu_->rmsnorm_rotary_bf16(in_place.ptr, nullptr, codes(codes_only), frstd.ptr, in_place.ptr, c.T, c.H, c.D, eps,
                              base);
    expect_identical(in_place.get(), ux.get(), "rotated floats in place");
    gpu_->copy(shifted.ptr + 1, fx.ptr, n);
    gpu_->rmsnorm_rotary_bf16(shifted_out.ptr + 1, nullptr, codes(codes_only), frstd.ptr, shifted.ptr + 1, c.T, c.H,
                              c.D, eps, base);
    const auto shifted_values = shifted_out.get();
    expect_identical(std::vector<float>(shifted_values.begin() + 1, shifted_values.end()), ux.get(),
                     "rotated floats, unaligned");
    // Recomputed from the normalised codes.
    gpu_->rotary_from_bf16(again_out.ptr, codes(again), codes(fnormed), c.T, c.H, c.D, base);
    expect_identical(again.get(), urotated.get(), "recomputed rotated codes");
    expect_identical(again_out.get(), ux.get(), "recomputed rotated floats");
    // Against the CPU's composition.
    std::vector<float> cpu_out = x, cpu_rstd(rows);
    std::vector<uint16_t> cpu_normed(n), cpu_rotated(n);
    cpu_->rmsnorm_rotary_bf16(cpu_out.data(), cpu_normed.data(), cpu_rotated.data(), cpu_rstd.data(), x.data(), c.T,
                              c.H, c.D, eps, base);
    expect_close(fout.get(), cpu_out, 2.0 / 256, 2.0 / 256, "rotated floats against the CPU (a bf16 ulp or two)");
    expect_close(frstd.get(), cpu_rstd, 1e-5, 0, "rstd against the CPU");
    // The backward: unfused (inverse rotary in place, then the norm's backward) and fused,
    // the fused one into codes alone and with dx aliasing dout.
    DeviceFloats ug(*gpu_, dout), udx_codes(*gpu_, words, poison);
    gpu_->rotary(ug.ptr, nullptr, c.T, c.H, c.D, base, true);
    gpu_->rmsnorm_backward_bf16(ug.ptr, codes(udx_codes), ug.ptr, codes(fnormed), frstd.ptr, rows, c.D, false);
    DeviceFloats fg(*gpu_, dout), fdx_codes(*gpu_, words, poison), alone(*gpu_, words, poison), kept(*gpu_, dout);
    gpu_->rotary_rmsnorm_backward_bf16(fg.ptr, codes(fdx_codes), fg.ptr, codes(fnormed), frstd.ptr, c.T, c.H, c.D,
                                       base);
    expect_identical(fg.get(), ug.get(), "backward dx");
    expect_identical(fdx_codes.get(), udx_codes.get(), "backward dx codes");
    gpu_->rotary_rmsnorm_backward_bf16(nullptr, codes(alone), kept.ptr, codes(fnormed), frstd.ptr, c.T, c.H, c.D,
                                       base);
    expect_identical(alone.get(), udx_codes.get(), "backward dx codes alone");
    expect_identical(kept.get(), dout, "dout untouched");
    std::vector<float> cpu_dx(n);
    cpu_->rotary_rmsnorm_backward_bf16(cpu_dx.data(), nullptr, dout.data(), codes_of(fnormed.get(), n).data(),
                                       frstd.get().data(), c.T, c.H, c.D, base);
    expect_close(fg.get(), cpu_dx, 1e-5, 1e-5, "backward dx against the CPU");
  }
}

TEST_F(CudaBackendTest, MixAndSkipBackwardMatchCpuInEveryMode) {
  SCOPED_TRACE(trace());
  for (size_t n : {size_t{1}, size_t{4097}, size_t{300007}}) {
    for (int mode = 0; mode < 16; ++mode) {
      const bool has_b = mode & 1, accumulate = mode & 2, alias = mode & 4, accumulate_db = mode & 8;
      if (alias && accumulate) continue;  // GPT aliases da with dout only when overwriting
      if (!has_b && accumulate_db) continue;
      SCOPED_TRACE("n=" + std::to_string(n) + " b=" + std::to_string(has_b) + " acc=" + std::to_string(accumulate) +
                   " alias=" + std::to_string(alias) + " acc_db=" + std::to_string(accumulate_db));
      const auto a = normal(n), b = normal(n), dout = normal(n), coef = normal(2), dcoef0 = normal(2);
      const auto da0 = normal(n), db0 = normal(n);
      std::vector<float> da = alias ? dout : da0, db = db0, dcoef = dcoef0, grad = dout;
      cpu_->mix_backward(alias ? grad.data() : da.data(), nullptr, accumulate, has_b ? db.data() : nullptr,
                         accumulate_db, dcoef.data(), grad.data(), a.data(), has_b ? b.data() : nullptr, coef.data(),
                         n);
      if (alias) da = grad;
      DeviceFloats g_a(*gpu_, a), g_b(*gpu_, b), g_dout(*gpu_, dout), g_coef(*gpu_, coef), g_dcoef(*gpu_, dcoef0);
      // What is only written starts as NaN: reading it would show.
      DeviceFloats g_db(*gpu_, accumulate_db ? db0 : std::vector<float>(n, kNaN));
      DeviceFloats g_da(*gpu_, accumulate ? da0 : std::vector<float>(n, kNaN));
      float* da_ptr = alias ? g_dout.ptr : g_da.ptr;
      DeviceFloats g_codes(*gpu_, (n + 1) / 2, std::bit_cast<float>(kNaNCodePair));
      gpu_->mix_backward(da_ptr, reinterpret_cast<uint16_t*>(g_codes.ptr), accumulate, has_b ? g_db.ptr : nullptr,
                         accumulate_db, g_dcoef.ptr, g_dout.ptr, g_a.ptr, has_b ? g_b.ptr : nullptr, g_coef.ptr, n);
      const auto got_da = alias ? g_dout.get() : g_da.get();
      expect_close(got_da, da, 1e-5, 1e-6, "mix_backward da");
      const auto codes = codes_of(g_codes.get(), n);  // of the final da
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(codes[i], lowp::encode_bf16(got_da[i])) << "mix_backward codes at " << i;
      if (has_b) expect_close(g_db.get(), db, 1e-5, 1e-6, "mix_backward db");
      // dcoef += float(float64 dot): the two float64 sums differ by ~1e-16, so at most 1 ulp.
      expect_close(g_dcoef.get(), dcoef, 1e-6, 0, "mix_backward dcoef");
    }
    for (bool accumulate : {true, false}) {
      SCOPED_TRACE(accumulate ? "skip backward accumulating" : "skip backward writing");
      const auto y = normal(n), dout = normal(n), weight = normal(1), dy0 = normal(n), dweight0 = normal(1);
      std::vector<float> dy = dy0, dweight = dweight0;
      cpu_->scaled_add_backward(dy.data(), accumulate, dweight.data(), dout.data(), y.data(), weight.data(), n);
      DeviceFloats g_dy(*gpu_, accumulate ? dy0 : std::vector<float>(n, kNaN)), g_dweight(*gpu_, dweight0),
          g_dout(*gpu_, dout), g_y(*gpu_, y), g_w(*gpu_, weight);
      gpu_->scaled_add_backward(g_dy.ptr, accumulate, g_dweight.ptr, g_dout.ptr, g_y.ptr, g_w.ptr, n);
      expect_close(g_dy.get(), dy, 1e-5, 1e-6, "scaled_add_backward dy");
      expect_close(g_dweight.get(), dweight, 1e-6, 0, "scaled_add_backward dweight");
    }
  }
}

// mix_backward(_bf16) with a null da writes da's codes alone (v's gradient held for its
// products), the same codes, db and dcoef as with da's floats; a null da accumulating, or
// without codes, is refused.
TEST_F(CudaBackendTest, MixBackwardWritesTheCodesAloneWhenDaIsNull) {
  SCOPED_TRACE(trace());
  const size_t n = 300007;
  const auto a = encoded(normal(n)), b = encoded(normal(n));
  const auto dout = normal(n), coef = normal(2), db0 = normal(n);
  std::vector<float> da(n), db = db0, dcoef(2, 0.f);
  std::vector<uint16_t> codes(n);
  cpu_->mix_backward_bf16(da.data(), codes.data(), false, db.data(), true, dcoef.data(), dout.data(), a.data(),
                          b.data(), coef.data(), n);
  DeviceCodes g_a(*gpu_, a), g_b(*gpu_, b), g_codes(*gpu_, n);
  DeviceFloats g_dout(*gpu_, dout), g_coef(*gpu_, coef), g_db(*gpu_, db0), g_dcoef(*gpu_, std::vector<float>(2, 0.f));
  gpu_->mix_backward_bf16(nullptr, g_codes.ptr, false, g_db.ptr, true, g_dcoef.ptr, g_dout.ptr, g_a.ptr, g_b.ptr,
                          g_coef.ptr, n);
  // Written, da is coef[0] * dout: one float32 multiply, the same bits on both.
  EXPECT_EQ(g_codes.get(), codes);
  expect_close(g_db.get(), db, 1e-5, 1e-6, "db");
  expect_close(g_dcoef.get(), dcoef, 1e-6, 0, "dcoef");
  expect_identical(g_dout.get(), dout, "dout untouched");
  EXPECT_THROW(gpu_->mix_backward_bf16(nullptr, nullptr, false, g_db.ptr, true, g_dcoef.ptr, g_dout.ptr, g_a.ptr,
                                       g_b.ptr, g_coef.ptr, n),
               Error);
  EXPECT_THROW(gpu_->mix_backward_bf16(nullptr, g_codes.ptr, true, g_db.ptr, true, g_dcoef.ptr, g_dout.ptr, g_a.ptr,
                                       g_b.ptr, g_coef.ptr, n),
               Error);
}

// The kernels read and write 16 bytes at a time where every pointer is 16-byte aligned,
// one element at a time otherwise, and their sums run in an order set by the shape alone:
// operands one element off their alignment (as a view into a larger buffer can be) must
// give the same bits, reductions included.
std::vector<float> after_one(const std::vector<float>& x) {
  std::vector<float> shifted(x.size() + 1, 7.f);
  std::copy(x.begin(), x.end(), shifted.begin() + 1);
  return shifted;
}

std::vector<float> dropping_first(const std::vector<float>& x) { return {x.begin() + 1, x.end()}; }

TEST_F(CudaBackendTest, UnalignedOperandsGiveTheAlignedResults) {
  SCOPED_TRACE(trace());
  const int rows = 33, dim = 128, H = 1;
  const size_t n = static_cast<size_t>(rows) * dim;
  const auto a = normal(n), b = normal(n), dout = normal(n), coef = normal(2);
  const float poison = std::bit_cast<float>(kNaNCodePair);
  DeviceFloats g_coef(*gpu_, coef);
  // out[0 .. n) of one op on aligned operands, and on operands one element past alignment
  // (codes two bytes past); `run` gets (a, b, dout, out, codes) pointers.
  auto both = [&](const char* what, auto run) {
    DeviceFloats a0(*gpu_, a), b0(*gpu_, b), d0(*gpu_, dout), out0(*gpu_, a), codes0(*gpu_, n / 2 + 1, poison);
    DeviceFloats a1(*gpu_, after_one(a)), b1(*gpu_, after_one(b)), d1(*gpu_, after_one(dout)),
        out1(*gpu_, after_one(a)), codes1(*gpu_, n / 2 + 2, poison);
    auto* c0 = reinterpret_cast<uint16_t*>(codes0.ptr);
    auto* c1 = reinterpret_cast<uint16_t*>(codes1.ptr) + 1;
    run(a0.ptr, b0.ptr, d0.ptr, out0.ptr, c0);
    run(a1.ptr + 1, b1.ptr + 1, d1.ptr + 1, out1.ptr + 1, c1);
    expect_identical(dropping_first(out1.get()), out0.get(), std::string(what) + " out");
    const auto codes_aligned = codes_of(codes0.get(), n);
    auto codes_shifted = codes_of(codes1.get(), n + 1);
    codes_shifted.erase(codes_shifted.begin());
    EXPECT_EQ(codes_shifted, codes_aligned) << what << " codes";
  };
  both("mix_forward", [&](float* x, float* y, float*, float* out, uint16_t* codes) {
    gpu_->mix_forward(out, codes, x, y, g_coef.ptr, n);
  });
  both("add", [&](float* x, float*, float*, float* out, uint16_t* codes) { gpu_->add(out, codes, x, n); });
  both("relu2_forward_bf16", [&](float* x, float*, float*, float* out, uint16_t* codes) {
    gpu_->relu2_forward_bf16(out, codes, nullptr, x, n);
  });
  both("relu2_backward_bf16", [&](float* x, float*, float* d, float* out, uint16_t* codes) {
    gpu_->relu2_forward_bf16(nullptr, nullptr, codes, x, n);  // codes = bf16(x): the stored h
    gpu_->relu2_backward_bf16(out, nullptr, d, codes, n);
  });
  both("rotary", [&](float* x, float*, float*, float* out, uint16_t* codes) {
    gpu_->copy(out, x, n);
    gpu_->rotary(out, codes, rows, H, dim, 1024.f, false);
  });
  both("rmsnorm_forward_bf16", [&](float* x, float*, float*, float* out, uint16_t* codes) {
    DeviceFloats rstd(*gpu_, rows, kNaN);
    gpu_->rmsnorm_forward_bf16(out, codes, rstd.ptr, x, rows, dim, 1e-6f);
  });
  both("rmsnorm_backward", [&](float* x, float*, float* d, float* out, uint16_t* codes) {
    DeviceFloats rstd(*gpu_, std::vector<float>(rows, 0.5f));
    gpu_->rmsnorm_backward(out, codes, d, x, rstd.ptr, rows, dim, true);
  });
  std::vector<float> dcoef[2];  // by whether the operands were aligned (0) or not (1)
  both("mix_backward", [&](float* x, float* y, float* d, float* out, uint16_t* codes) {
    DeviceFloats g_dcoef(*gpu_, 2, 0.f), db(*gpu_, n, 0.f);
    gpu_->mix_backward(out, codes, true, db.ptr, true, g_dcoef.ptr, d, x, y, g_coef.ptr, n);
    dcoef[reinterpret_cast<uintptr_t>(x) % 16 != 0] = g_dcoef.get();
  });
  expect_identical(dcoef[1], dcoef[0], "mix_backward dcoef");
  const int V = 384;  // softcap cross-entropy over 33 rows, gradient and loss
  DeviceInts targets(*gpu_, uniform_ints(rows, V));
  const auto logits = normal(static_cast<size_t>(rows) * V, 8.f);
  std::vector<float> loss[2], gradient[2];
  for (int shifted : {0, 1}) {
    DeviceFloats z(*gpu_, shifted ? after_one(logits) : logits), row_loss(*gpu_, rows, kNaN);
    gpu_->softcap_cross_entropy(z.ptr + shifted, row_loss.ptr, targets.ptr, rows, V, 15.f, 1.f / rows);
    loss[shifted] = row_loss.get();
    gradient[shifted] = shifted ? dropping_first(z.get()) : z.get();
  }
  expect_identical(loss[1], loss[0], "softcap cross-entropy loss");
  expect_identical(gradient[1], gradient[0], "softcap cross-entropy gradient");
}

// ---------------------------------------------------------------------------------------
// The bf16 residual stream: ops that read the stream as codes and write it rounded. Where
// the GPU contracts a * b + c into an FMA (the mix with b, the skip add) its float32 sum can
// differ from the CPU's in the last bit, which can move the rounding by one bf16 ulp; a mix
// without b is one product, rounded alike on both. Each op on codes must also give the very
// bits of its float32 form on the codes' widening (the same kernel instantiated for codes),
// which pins its arithmetic and its summation order.

// bf16 codes against the CPU's, at most one bf16 ulp apart: 2^-7 of a value admits one ulp,
// never two; 1e-6 of the largest magnitude absorbs the cancellation where an FMA's single
// rounding moves a small sum by more, relatively. A NaN poison code left in place fails.
void expect_within_a_bf16_ulp(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want,
                              const std::string& what) {
  expect_close(widened(got), widened(want), 0x1p-7, 1e-6, what);
}

TEST_F(CudaBackendTest, Bf16StreamMixAndSkipMatchCpu) {
  SCOPED_TRACE(trace());
  for (size_t n : {size_t{1}, size_t{1000}, size_t{100003}}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    const auto a = encoded(normal(n)), b = encoded(normal(n));
    const auto coef = normal(2), weight = normal(1);
    DeviceCodes g_a(*gpu_, a), g_b(*gpu_, b);
    DeviceFloats g_coef(*gpu_, coef), g_weight(*gpu_, weight), one(*gpu_, std::vector<float>{1.f});
    {
      std::vector<uint16_t> want(n);
      cpu_->mix_forward_bf16(want.data(), a.data(), b.data(), coef.data(), n);
      DeviceCodes out(*gpu_, n), over_a(*gpu_, a), over_b(*gpu_, b), from_floats(*gpu_, n);
      gpu_->mix_forward_bf16(out.ptr, g_a.ptr, g_b.ptr, g_coef.ptr, n);
      const auto got = out.get();
      expect_within_a_bf16_ulp(got, want, "mix_forward_bf16");
      DeviceFloats wide_a(*gpu_, widened(a)), wide_b(*gpu_, widened(b));
      gpu_->mix_forward(nullptr, from_floats.ptr, wide_a.ptr, wide_b.ptr, g_coef.ptr, n);
      EXPECT_EQ(got, from_floats.get()) << "mix_forward_bf16 against mix_forward's codes of the widening";
      gpu_->mix_forward_bf16(over_a.ptr, over_a.ptr, g_b.ptr, g_coef.ptr, n);
      gpu_->mix_forward_bf16(over_b.ptr, g_a.ptr, over_b.ptr, g_coef.ptr, n);
      EXPECT_EQ(over_a.get(), got) << "mix_forward_bf16 with out == a";
      EXPECT_EQ(over_b.get(), got) << "mix_forward_bf16 with out == b";
    }
    {
      std::vector<uint16_t> want(n);
      cpu_->mix_forward_bf16(want.data(), a.data(), nullptr, coef.data(), n);
      DeviceCodes out(*gpu_, n), over_a(*gpu_, a);
      gpu_->mix_forward_bf16(out.ptr, g_a.ptr, nullptr, g_coef.ptr, n);
      gpu_->mix_forward_bf16(over_a.ptr, over_a.ptr, nullptr, g_coef.ptr, n);
      EXPECT_EQ(out.get(), want) << "mix_forward_bf16 without b (one product: the CPU's bits)";
      EXPECT_EQ(over_a.get(), want) << "mix_forward_bf16 without b, out == a";
    }
    {
      std::vector<uint16_t> want(n);
      cpu_->scaled_add_forward_bf16(want.data(), a.data(), b.data(), weight.data(), n);
      DeviceCodes out(*gpu_, n), over_x(*gpu_, a), from_floats(*gpu_, n);
      gpu_->scaled_add_forward_bf16(out.ptr, g_a.ptr, g_b.ptr, g_weight.ptr, n);
      const auto got = out.get();
      expect_within_a_bf16_ulp(got, want, "scaled_add_forward_bf16");
      gpu_->scaled_add_forward_bf16(over_x.ptr, over_x.ptr, g_b.ptr, g_weight.ptr, n);
      EXPECT_EQ(over_x.get(), got) << "scaled_add_forward_bf16 with out == x";
      // scaled_add_forward on the widening, rounded by a mix that multiplies by 1 (exact).
      DeviceFloats sum(*gpu_, widened(a)), wide_b(*gpu_, widened(b));
      gpu_->scaled_add_forward(sum.ptr, wide_b.ptr, g_weight.ptr, n);
      gpu_->mix_forward(nullptr, from_floats.ptr, sum.ptr, nullptr, one.ptr, n);
      EXPECT_EQ(got, from_floats.get()) << "scaled_add_forward_bf16 against scaled_add_forward of the widening";
    }
  }
}

// mix_backward_bf16 in every mode of MixAndSkipBackwardMatchCpuInEveryMode, and
// scaled_add_backward_bf16: the CPU's values within those tests' tolerances, and the bits of
// the float32 ops on the widened codes (dcoef and dweight: the same sums in the same order).
TEST_F(CudaBackendTest, Bf16StreamBackwardMatchesCpuInEveryMode) {
  SCOPED_TRACE(trace());
  struct MixGradients {
    std::vector<float> da;
    std::vector<uint16_t> da_codes;
    std::vector<float> db, dcoef;
  };
  for (size_t n : {size_t{1}, size_t{4097}, size_t{300007}}) {
    for (int mode = 0; mode < 8; ++mode) {
      const bool has_b = mode & 1, accumulate = mode & 2, alias = mode & 4;
      if (alias && accumulate) continue;  // GPT aliases da with dout only when overwriting
      // db written (not read) in the modes that alias, as dx0's and dve's first contributions are.
      const bool accumulate_db = !alias;
      SCOPED_TRACE("n=" + std::to_string(n) + " b=" + std::to_string(has_b) + " acc=" + std::to_string(accumulate) +
                   " alias=" + std::to_string(alias));
      const auto a = encoded(normal(n)), b = encoded(normal(n));
      const auto dout = normal(n), coef = normal(2), dcoef0 = normal(2), da0 = normal(n), db0 = normal(n);
      std::vector<float> da = alias ? dout : da0, db = db0, dcoef = dcoef0, grad = dout;
      cpu_->mix_backward_bf16(alias ? grad.data() : da.data(), nullptr, accumulate, has_b ? db.data() : nullptr,
                              accumulate_db, dcoef.data(), grad.data(), a.data(), has_b ? b.data() : nullptr,
                              coef.data(), n);
      if (alias) da = grad;
      DeviceCodes g_a(*gpu_, a), g_b(*gpu_, b);
      DeviceFloats wide_a(*gpu_, widened(a)), wide_b(*gpu_, widened(b)), g_coef(*gpu_, coef);
      // One GPU run on fresh outputs; `call` gets (da, da_codes, db, dcoef, dout).
      auto run = [&](auto call) {
        DeviceFloats g_dout(*gpu_, dout), g_dcoef(*gpu_, dcoef0);
        DeviceFloats g_db(*gpu_, accumulate_db ? db0 : std::vector<float>(n, kNaN));
        DeviceFloats g_da(*gpu_, accumulate ? da0 : std::vector<float>(n, kNaN));
        DeviceCodes g_codes(*gpu_, n);
        call(alias ? g_dout.ptr : g_da.ptr, g_codes.ptr, has_b ? g_db.ptr : nullptr, g_dcoef.ptr, g_dout.ptr);
        return MixGradients{alias ? g_dout.get() : g_da.get(), g_codes.get(), g_db.get(), g_dcoef.get()};
      };
      const auto got = run([&](float* d_a, uint16_t* codes, float* d_b, float* d_coef, float* d_out) {
        gpu_->mix_backward_bf16(d_a, codes, accumulate, d_b, accumulate_db, d_coef, d_out, g_a.ptr,
                                has_b ? g_b.ptr : nullptr, g_coef.ptr, n);
      });
      const auto from_floats = run([&](float* d_a, uint16_t* codes, float* d_b, float* d_coef, float* d_out) {
        gpu_->mix_backward(d_a, codes, accumulate, d_b, accumulate_db, d_coef, d_out, wide_a.ptr,
                           has_b ? wide_b.ptr : nullptr, g_coef.ptr, n);
      });
      expect_close(got.da, da, 1e-5, 1e-6, "mix_backward_bf16 da");
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(got.da_codes[i], lowp::encode_bf16(got.da[i])) << "mix_backward_bf16 codes at " << i;
      }
      if (has_b) expect_close(got.db, db, 1e-5, 1e-6, "mix_backward_bf16 db");
      expect_close(got.dcoef, dcoef, 1e-6, 0, "mix_backward_bf16 dcoef");
      expect_identical(got.da, from_floats.da, "mix_backward_bf16 da against mix_backward of the widening");
      EXPECT_EQ(got.da_codes, from_floats.da_codes) << "mix_backward_bf16 codes against mix_backward's";
      expect_identical(got.db, from_floats.db, "mix_backward_bf16 db against mix_backward's");
      expect_identical(got.dcoef, from_floats.dcoef, "mix_backward_bf16 dcoef against mix_backward's");
    }
    for (bool accumulate : {true, false}) {
      SCOPED_TRACE(accumulate ? "skip backward accumulating" : "skip backward writing");
      const auto y = encoded(normal(n));
      const auto dout = normal(n), weight = normal(1), dy0 = normal(n), dweight0 = normal(1);
      std::vector<float> dy = dy0, dweight = dweight0;
      cpu_->scaled_add_backward_bf16(dy.data(), accumulate, dweight.data(), dout.data(), y.data(), weight.data(), n);
      DeviceCodes g_y(*gpu_, y);
      DeviceFloats wide_y(*gpu_, widened(y)), g_dout(*gpu_, dout), g_w(*gpu_, weight);
      const std::vector<float> dy_start = accumulate ? dy0 : std::vector<float>(n, kNaN);
      DeviceFloats g_dy(*gpu_, dy_start), g_dweight(*gpu_, dweight0), f_dy(*gpu_, dy_start),
          f_dweight(*gpu_, dweight0);
      gpu_->scaled_add_backward_bf16(g_dy.ptr, accumulate, g_dweight.ptr, g_dout.ptr, g_y.ptr, g_w.ptr, n);
      gpu_->scaled_add_backward(f_dy.ptr, accumulate, f_dweight.ptr, g_dout.ptr, wide_y.ptr, g_w.ptr, n);
      const auto got_dy = g_dy.get(), got_dweight = g_dweight.get();
      expect_close(got_dy, dy, 1e-5, 1e-6, "scaled_add_backward_bf16 dy");
      expect_close(got_dweight, dweight, 1e-6, 0, "scaled_add_backward_bf16 dweight");
      expect_identical(got_dy, f_dy.get(), "scaled_add_backward_bf16 dy against scaled_add_backward of the widening");
      expect_identical(got_dweight, f_dweight.get(), "scaled_add_backward_bf16 dweight against scaled_add_backward's");
    }
  }
}

// rmsnorm_forward_from_bf16 (the blocks' norms of the stream): out rounded as
// rmsnorm_forward_bf16's, within a bf16 ulp of the CPU's (and bit for bit the GPU's own
// rmsnorm_forward_bf16 of the widening), its codes those of out, either output alone; and
// rmsnorm_forward_bf16 into codes alone (x0 on the stream).
TEST_F(CudaBackendTest, RmsnormOnTheBf16StreamMatchesCpu) {
  SCOPED_TRACE(trace());
  const float eps = kRmsnormEps;
  for (RowShape c : kRmsnormShapes) {
    SCOPED_TRACE("rows=" + std::to_string(c.rows) + " dim=" + std::to_string(c.dim));
    const size_t n = static_cast<size_t>(c.rows) * c.dim;
    const auto x = encoded(normal(n, 3.f));
    std::vector<float> out(n), rstd(c.rows);
    std::vector<uint16_t> codes(n);
    cpu_->rmsnorm_forward_from_bf16(out.data(), codes.data(), rstd.data(), x.data(), c.rows, c.dim, eps);
    DeviceCodes g_x(*gpu_, x), g_codes(*gpu_, n), codes_alone(*gpu_, n);
    DeviceFloats g_out(*gpu_, n, kNaN), g_rstd(*gpu_, c.rows, kNaN), alone_rstd(*gpu_, c.rows, kNaN);
    gpu_->rmsnorm_forward_from_bf16(g_out.ptr, g_codes.ptr, g_rstd.ptr, g_x.ptr, c.rows, c.dim, eps);
    const auto got = g_out.get(), got_rstd = g_rstd.get();
    const auto got_codes = g_codes.get();
    expect_close(got_rstd, rstd, 1e-5, 0, "rmsnorm_forward_from_bf16 rstd");
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(got[i], lowp::decode_bf16(got_codes[i])) << "rmsnorm_forward_from_bf16 out rounded as its codes at " << i;
    }
    expect_within_a_bf16_ulp(got_codes, codes, "rmsnorm_forward_from_bf16 codes against the CPU's");
    DeviceFloats wide_x(*gpu_, widened(x)), f_out(*gpu_, n, kNaN), f_rstd(*gpu_, c.rows, kNaN);
    gpu_->rmsnorm_forward_bf16(f_out.ptr, nullptr, f_rstd.ptr, wide_x.ptr, c.rows, c.dim, eps);
    expect_identical(got, f_out.get(), "rmsnorm_forward_from_bf16 against rmsnorm_forward_bf16 of the widening");
    expect_identical(got_rstd, f_rstd.get(), "rmsnorm_forward_from_bf16 rstd against rmsnorm_forward_bf16's");
    gpu_->rmsnorm_forward_from_bf16(nullptr, codes_alone.ptr, alone_rstd.ptr, g_x.ptr, c.rows, c.dim, eps);
    EXPECT_EQ(codes_alone.get(), got_codes) << "rmsnorm_forward_from_bf16, codes alone";
    expect_identical(alone_rstd.get(), got_rstd, "rmsnorm_forward_from_bf16 rstd, codes alone");
    DeviceFloats floats_alone(*gpu_, n, kNaN);
    gpu_->rmsnorm_forward_from_bf16(floats_alone.ptr, nullptr, alone_rstd.ptr, g_x.ptr, c.rows, c.dim, eps);
    expect_identical(floats_alone.get(), got, "rmsnorm_forward_from_bf16, floats alone");
    EXPECT_THROW(gpu_->rmsnorm_forward_from_bf16(nullptr, nullptr, g_rstd.ptr, g_x.ptr, c.rows, c.dim, eps), Error);

    const auto x0 = normal(n, 3.f);
    std::vector<uint16_t> want_x0(n);
    std::vector<float> x0_rstd(c.rows);
    cpu_->rmsnorm_forward_bf16(nullptr, want_x0.data(), x0_rstd.data(), x0.data(), c.rows, c.dim, eps);
    DeviceFloats g_x0(*gpu_, x0), kept(*gpu_, n, kNaN), kept_rstd(*gpu_, c.rows, kNaN), r(*gpu_, c.rows, kNaN);
    DeviceCodes with_out(*gpu_, n), x0_alone(*gpu_, n);
    gpu_->rmsnorm_forward_bf16(kept.ptr, with_out.ptr, kept_rstd.ptr, g_x0.ptr, c.rows, c.dim, eps);
    gpu_->rmsnorm_forward_bf16(nullptr, x0_alone.ptr, r.ptr, g_x0.ptr, c.rows, c.dim, eps);
    const auto got_x0 = x0_alone.get();
    EXPECT_EQ(got_x0, with_out.get()) << "rmsnorm_forward_bf16, codes alone";
    expect_identical(r.get(), kept_rstd.get(), "rmsnorm_forward_bf16 rstd, codes alone");
    expect_identical(g_x0.get(), x0, "rmsnorm_forward_bf16's x, codes alone");
    expect_within_a_bf16_ulp(got_x0, want_x0, "rmsnorm_forward_bf16 codes alone against the CPU's");
    EXPECT_THROW(gpu_->rmsnorm_forward_bf16(nullptr, nullptr, r.ptr, g_x0.ptr, c.rows, c.dim, eps), Error);
  }
}

// The stream's ops on operands one element off 16-byte alignment (codes two bytes, floats
// four) give the bits they give on aligned ones, sums included; gemm_to_bf16's fallback
// (float32 products) adds a misaligned addend with the same kernel.
TEST_F(CudaBackendTest, UnalignedStreamOperandsGiveTheAlignedResults) {
  SCOPED_TRACE(trace());
  const int rows = 33, dim = 128;
  const size_t n = static_cast<size_t>(rows) * dim;
  const auto a = encoded(normal(n)), b = encoded(normal(n));
  const auto dout = normal(n), coef = normal(2), W = normal(static_cast<size_t>(dim) * dim);
  DeviceFloats g_coef(*gpu_, coef), g_W(*gpu_, W), g_dout(*gpu_, dout);
  struct Outputs {
    std::vector<uint16_t> codes;
    std::vector<float> out, more, sums;
  };
  // One op with its operands `shift` elements in; `op` gets (a, b, dout: codes, codes,
  // floats; out, more: floats, NaN and zeros; codes out; sums: rows zeros, aligned).
  auto run = [&](size_t shift, auto op) {
    DeviceCodes g_a(*gpu_, a, shift), g_b(*gpu_, b, shift), codes(*gpu_, n, shift);
    DeviceFloats d(*gpu_, shift ? after_one(dout) : dout), out(*gpu_, n + shift, kNaN), more(*gpu_, n + shift, 0.f),
        sums(*gpu_, rows, 0.f);
    op(g_a.ptr, g_b.ptr, d.ptr + shift, out.ptr + shift, more.ptr + shift, codes.ptr, sums.ptr);
    auto drop = [shift](std::vector<float> v) { return shift ? dropping_first(v) : v; };
    return Outputs{codes.get(), drop(out.get()), drop(more.get()), sums.get()};
  };
  auto both = [&](const std::string& what, auto op) {
    const Outputs aligned = run(0, op), shifted = run(1, op);
    EXPECT_EQ(shifted.codes, aligned.codes) << what << " codes";
    expect_identical(shifted.out, aligned.out, what + " out");
    expect_identical(shifted.more, aligned.more, what + " second output");
    expect_identical(shifted.sums, aligned.sums, what + " sums");
  };
  both("mix_forward_bf16", [&](uint16_t* x, uint16_t* y, float*, float*, float*, uint16_t* codes, float*) {
    gpu_->mix_forward_bf16(codes, x, y, g_coef.ptr, n);
  });
  both("scaled_add_forward_bf16", [&](uint16_t* x, uint16_t* y, float*, float*, float*, uint16_t* codes, float*) {
    gpu_->scaled_add_forward_bf16(codes, x, y, g_coef.ptr, n);
  });
  both("mix_backward_bf16", [&](uint16_t* x, uint16_t* y, float* d, float* da, float* db, uint16_t* codes,
                                float* dcoef) {
    gpu_->mix_backward_bf16(da, codes, false, db, true, dcoef, d, x, y, g_coef.ptr, n);
  });
  both("scaled_add_backward_bf16", [&](uint16_t*, uint16_t* y, float* d, float*, float* dy, uint16_t*,
                                       float* dweight) {
    gpu_->scaled_add_backward_bf16(dy, true, dweight, d, y, g_coef.ptr, n);
  });
  both("rmsnorm_forward_from_bf16", [&](uint16_t* x, uint16_t*, float*, float* out, float*, uint16_t* codes,
                                        float* rstd) {
    gpu_->rmsnorm_forward_from_bf16(out, codes, rstd, x, rows, dim, 1e-6f);
  });
  // float32 products (this backend's): the product of aligned operands lands in aligned
  // scratch (the same algorithm both times), then is added to the shifted addend.
  both("gemm_to_bf16 with an addend", [&](uint16_t* x, uint16_t*, float*, float*, float*, uint16_t* codes, float*) {
    gpu_->gemm_to_bf16(false, false, rows, dim, dim, g_dout.ptr, dim, g_W.ptr, dim, x, codes, dim);
  });
}

// ---------------------------------------------------------------------------------------
// Ops reading bf16 codes where their twins read float32 (an activation a product computed
// as bf16, a value embedding as a bf16 activation): each gives the bits of its twin on the
// codes' widening (into codes: the twin's output encoded), aligned or one element off, and
// the CPU's values within its twin's tolerance.

// The looked-up rows rounded to bf16: the CPU's bits and those of embedding_forward's rows
// encoded. Infinities and overflow round alike on both; a NaN stays a NaN (any quiet NaN:
// its code need not be the CPU's), written over a poison that is no NaN.
TEST_F(CudaBackendTest, EmbeddingIntoCodesIsTheRoundedLookup) {
  SCOPED_TRACE(trace());
  struct Case { int V, T, dim; };
  for (Case c : {Case{300, 64, 16}, Case{50257, 1000, 64}, Case{7, 333, 33}, Case{300, 2048, 768}, Case{2, 4097, 6}}) {
    SCOPED_TRACE("V=" + std::to_string(c.V) + " T=" + std::to_string(c.T) + " dim=" + std::to_string(c.dim));
    const size_t n = static_cast<size_t>(c.T) * c.dim;
    auto table = normal(static_cast<size_t>(c.V) * c.dim);
    const auto tokens = uniform_ints(c.T, c.V);
    std::vector<uint16_t> want(n);
    cpu_->embedding_forward_bf16(want.data(), table.data(), tokens.data(), c.T, c.dim);
    DeviceFloats g_table(*gpu_, table), shifted_table(*gpu_, after_one(table)), floats(*gpu_, n, kNaN);
    DeviceInts g_tokens(*gpu_, tokens);
    DeviceCodes out(*gpu_, n), shifted_out(*gpu_, n, 1);
    gpu_->embedding_forward_bf16(out.ptr, g_table.ptr, g_tokens.ptr, c.T, c.dim);
    gpu_->embedding_forward(floats.ptr, g_table.ptr, g_tokens.ptr, c.T, c.dim);
    const auto got = out.get();
    EXPECT_EQ(got, want) << "embedding_forward_bf16 against the CPU's";
    EXPECT_EQ(got, encoded(floats.get())) << "embedding_forward_bf16 against embedding_forward's rows encoded";
    gpu_->embedding_forward_bf16(shifted_out.ptr, shifted_table.ptr + 1, g_tokens.ptr, c.T, c.dim);
    EXPECT_EQ(shifted_out.get(), got) << "embedding_forward_bf16, operands one element off alignment";

    float* row = table.data() + static_cast<size_t>(tokens[0]) * c.dim;  // looked up at t = 0 at least
    row[0] = kNaN;
    row[1] = std::numeric_limits<float>::max();  // rounds up to infinity
    row[c.dim - 1] = -std::numeric_limits<float>::infinity();
    cpu_->embedding_forward_bf16(want.data(), table.data(), tokens.data(), c.T, c.dim);
    DeviceFloats special(*gpu_, table);
    DeviceCodes special_out(*gpu_, std::vector<uint16_t>(n, 0));
    gpu_->embedding_forward_bf16(special_out.ptr, special.ptr, g_tokens.ptr, c.T, c.dim);
    const auto got_special = special_out.get();
    size_t bad = 0, nan = 0;
    for (size_t i = 0; i < n; ++i) {
      const bool want_nan = std::isnan(lowp::decode_bf16(want[i]));
      nan += want_nan;
      if (want_nan ? !std::isnan(lowp::decode_bf16(got_special[i])) : got_special[i] != want[i]) ++bad;
    }
    EXPECT_GT(nan, 0u);
    EXPECT_EQ(bad, 0u) << "embedding_forward_bf16 of non-finite entries: " << bad << " codes differ";
  }
}

// relu2_backward_from_bf16 (c_proj's input gradient as codes): dx and its codes the bits of
// relu2_backward_bf16 on the widened gradient, either output alone, aligned or not; neither
// is an error; the CPU's within relu2_backward_bf16's tolerance.
TEST_F(CudaBackendTest, Relu2BackwardFromCodesIsTheBackwardOfTheWidenedGradient) {
  SCOPED_TRACE(trace());
  for (size_t n : {size_t{1}, size_t{1000}, size_t{100003}}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    auto h = normal(n, 3.f);
    for (size_t i = 0; i < n; i += 5) h[i] = 0.f;  // relu's edge
    const auto x = encoded(h), dout = encoded(normal(n));
    DeviceCodes g_x(*gpu_, x), g_dout(*gpu_, dout), twin_codes(*gpu_, n);
    DeviceFloats wide_dout(*gpu_, widened(dout)), twin_dx(*gpu_, n, kNaN);
    gpu_->relu2_backward_bf16(twin_dx.ptr, twin_codes.ptr, wide_dout.ptr, g_x.ptr, n);
    const auto want_dx = twin_dx.get();
    const auto want_codes = twin_codes.get();
    // (dx, dx_codes) of one run on fresh poisoned outputs, the operands `shift` elements in.
    auto run = [&](size_t shift, bool with_dx, bool with_codes) {
      DeviceCodes xs(*gpu_, x, shift), ds(*gpu_, dout, shift), codes(*gpu_, n, shift);
      DeviceFloats dx(*gpu_, n + shift, kNaN);
      gpu_->relu2_backward_from_bf16(with_dx ? dx.ptr + shift : nullptr, with_codes ? codes.ptr : nullptr, ds.ptr,
                                     xs.ptr, n);
      auto floats = dx.get();
      floats.erase(floats.begin(), floats.begin() + static_cast<std::ptrdiff_t>(shift));
      return std::make_pair(floats, codes.get());
    };
    const auto got = run(0, true, true);
    expect_identical(got.first, want_dx, "relu2_backward_from_bf16 against relu2_backward_bf16 of the widening");
    EXPECT_EQ(got.second, want_codes) << "relu2_backward_from_bf16 codes against relu2_backward_bf16's";
    const auto shifted = run(1, true, true);
    expect_identical(shifted.first, want_dx, "relu2_backward_from_bf16, one element off alignment");
    EXPECT_EQ(shifted.second, want_codes) << "relu2_backward_from_bf16 codes, one element off alignment";
    EXPECT_EQ(run(0, false, true).second, want_codes) << "relu2_backward_from_bf16, codes alone";
    expect_identical(run(0, true, false).first, want_dx, "relu2_backward_from_bf16, dx alone");
    EXPECT_THROW(gpu_->relu2_backward_from_bf16(nullptr, nullptr, g_dout.ptr, g_x.ptr, n), Error);

    std::vector<float> cpu_dx(n);
    std::vector<uint16_t> cpu_codes(n);
    cpu_->relu2_backward_from_bf16(cpu_dx.data(), cpu_codes.data(), dout.data(), x.data(), n);
    expect_close(got.first, cpu_dx, 1e-6, 0, "relu2_backward_from_bf16 against the CPU");
    for (size_t i = 0; i < n; ++i) {
      ASSERT_NEAR(lowp::decode_bf16(got.second[i]), lowp::decode_bf16(cpu_codes[i]),
                  std::abs(cpu_dx[i]) * 0x1p-7 + 1e-30)
          << "relu2_backward_from_bf16 codes against the CPU's at " << i;
    }
  }
}

// rmsnorm_rotary_from_bf16 (q or k from a product computed as bf16): normed, rotated, rstd
// and out the bits of rmsnorm_rotary_bf16 on the widened codes, through the fused kernel
// (D = 128, 32, 8) and the unfused fallback (D = 12; D = 6: n not a multiple of 4), with out
// or normed dropped and the operands one element off alignment; the CPU's values within the
// fused test's tolerance.
TEST_F(CudaBackendTest, NormRotaryFromCodesIsTheOpOnTheWidenedCodes) {
  SCOPED_TRACE(trace());
  const float eps = 1.1920929e-07f, base = 1024.f;
  struct Case { int T, H, D; };
  struct Outputs {
    std::vector<float> out;
    std::vector<uint16_t> normed, rotated;
    std::vector<float> rstd;
  };
  for (Case c : {Case{300, 6, 128}, Case{64, 2, 32}, Case{40, 3, 8}, Case{50, 3, 12}, Case{33, 1, 6}}) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) + " D=" + std::to_string(c.D));
    const int rows = c.T * c.H;
    const size_t n = static_cast<size_t>(rows) * c.D;
    const auto x = encoded(normal(n, 3.f));
    DeviceCodes g_x(*gpu_, x), shifted_x(*gpu_, x, 1);
    DeviceFloats wide_x(*gpu_, widened(x));
    // One op on fresh poisoned outputs, `shift` elements in; `op` gets (out, normed, rotated,
    // rstd, shift), out or normed null unless asked for.
    auto run = [&](auto op, size_t shift, bool with_out, bool with_normed) {
      DeviceFloats out(*gpu_, n + shift, kNaN), rstd(*gpu_, rows, kNaN);
      DeviceCodes normed(*gpu_, n, shift), rotated(*gpu_, n, shift);
      op(with_out ? out.ptr + shift : nullptr, with_normed ? normed.ptr : nullptr, rotated.ptr, rstd.ptr, shift);
      auto floats = out.get();
      floats.erase(floats.begin(), floats.begin() + static_cast<std::ptrdiff_t>(shift));
      return Outputs{floats, normed.get(), rotated.get(), rstd.get()};
    };
    auto from_floats = [&](float* out, uint16_t* normed, uint16_t* rotated, float* rstd, size_t) {
      gpu_->rmsnorm_rotary_bf16(out, normed, rotated, rstd, wide_x.ptr, c.T, c.H, c.D, eps, base);
    };
    auto from_codes = [&](float* out, uint16_t* normed, uint16_t* rotated, float* rstd, size_t shift) {
      gpu_->rmsnorm_rotary_from_bf16(out, normed, rotated, rstd, shift ? shifted_x.ptr : g_x.ptr, c.T, c.H, c.D, eps,
                                     base);
    };
    const Outputs twin = run(from_floats, 0, true, true);
    auto expect_twin = [&](const Outputs& got, bool with_out, bool with_normed, const std::string& what) {
      if (with_out) expect_identical(got.out, twin.out, what + ": out");
      if (with_normed) {
        EXPECT_EQ(got.normed, twin.normed) << what << ": normalised codes";
      }
      EXPECT_EQ(got.rotated, twin.rotated) << what << ": rotated codes";
      expect_identical(got.rstd, twin.rstd, what + ": rstd");
    };
    const Outputs got = run(from_codes, 0, true, true);
    expect_twin(got, true, true, "rmsnorm_rotary_from_bf16 against rmsnorm_rotary_bf16 of the widening");
    expect_twin(run(from_codes, 1, true, true), true, true, "rmsnorm_rotary_from_bf16, one element off alignment");
    expect_twin(run(from_codes, 0, false, true), false, true, "rmsnorm_rotary_from_bf16, out null");
    expect_twin(run(from_codes, 0, true, false), true, false, "rmsnorm_rotary_from_bf16, normed null");
    expect_twin(run(from_codes, 0, false, false), false, false, "rmsnorm_rotary_from_bf16, the rotated codes alone");
    expect_identical(got.out, widened(got.rotated), "rmsnorm_rotary_from_bf16 out is its rotated codes widened");
    EXPECT_EQ(g_x.get(), x) << "rmsnorm_rotary_from_bf16's x untouched";

    std::vector<float> cpu_out(n), cpu_rstd(rows);
    std::vector<uint16_t> cpu_normed(n), cpu_rotated(n);
    cpu_->rmsnorm_rotary_from_bf16(cpu_out.data(), cpu_normed.data(), cpu_rotated.data(), cpu_rstd.data(), x.data(),
                                   c.T, c.H, c.D, eps, base);
    expect_close(got.out, cpu_out, 2.0 / 256, 2.0 / 256, "rotated floats against the CPU (a bf16 ulp or two)");
    expect_close(widened(got.normed), widened(cpu_normed), 2.0 / 256, 2.0 / 256,
                 "normalised codes against the CPU (a bf16 ulp or two)");
    expect_close(got.rstd, cpu_rstd, 1e-5, 0, "rstd against the CPU");
  }
}

TEST_F(CudaBackendTest, SumToHostIsFloat64AndDeterministic) {
  SCOPED_TRACE(trace());
  auto sum_on = [](Backend& be, const float* x, size_t n) {
    double* out = static_cast<double*>(be.alloc_host(sizeof(double)));
    *out = std::numeric_limits<double>::quiet_NaN();
    be.sum_to_host(out, x, n);
    be.synchronize();
    const double total = *out;
    be.release_host(out);
    return total;
  };
  for (size_t n : {size_t{0}, size_t{1}, size_t{4097}, size_t{1000003}}) {
    const auto x = normal(n, 10.f);
    double magnitude = 0;
    for (float v : x) magnitude += std::abs(v);
    DeviceFloats dx(*gpu_, n == 0 ? std::vector<float>(1, kNaN) : x);
    const double got = sum_on(*gpu_, dx.ptr, n), again = sum_on(*gpu_, dx.ptr, n);
    EXPECT_NEAR(got, sum_on(*cpu_, x.data(), n), 1e-12 * magnitude) << "n=" << n;
    EXPECT_EQ(got, again);
  }
}

// ---------------------------------------------------------------------------------------
// Attention

struct AttentionCase {
  int T, H, D, block;
  std::vector<int> windows;
  int mean_document;
};

// Random inputs for one attention call over T tokens in 2 heads of 128 (window 3 blocks of
// 128), its outputs poisoned.
struct FlashCall {
  AttentionShape shape;
  size_t n;
  DeviceFloats q, k, v, y, lse;
  DeviceInts doc;
  FlashCall(Backend& be, int T, const std::function<std::vector<float>(size_t)>& normal,
            const std::vector<int32_t>& documents)
      : shape{T, 2, 128, 128, 3, 0.12f},
        n(static_cast<size_t>(T) * 2 * 128),
        q(be, normal(n)),
        k(be, normal(n)),
        v(be, normal(n)),
        y(be, n, kNaN),
        lse(be, static_cast<size_t>(2) * T, kNaN),
        doc(be, documents) {}
};

class AttentionTest : public CudaBackendTest {
 protected:
  // Switches gpu_ to the flash kernel and makes one call's inputs.
  std::unique_ptr<FlashCall> flash(int T, int mean_document) {
    BackendOptions options;
    options.attention = AttentionKernel::kFlash;
    gpu_ = make_cuda_backend(0, options);
    return std::make_unique<FlashCall>(*gpu_, T, [this](size_t n) { return normal(n); }, documents(T, mean_document));
  }
  void check(const AttentionCase& c) {
    const size_t n = static_cast<size_t>(c.T) * c.H * c.D;
    const auto doc = documents(c.T, c.mean_document);
    for (int window : c.windows) {
      SCOPED_TRACE("T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) + " D=" + std::to_string(c.D) +
                   " B=" + std::to_string(c.block) + " N=" + std::to_string(window));
      const AttentionShape shape{c.T, c.H, c.D, c.block, window, 0.12f};
      const auto q = normal(n), k = normal(n), v = normal(n), dy = normal(n);
      std::vector<float> y(n), lse(static_cast<size_t>(c.H) * c.T), dq(n), dk(n), dv(n);
      cpu_->attention_forward(y.data(), nullptr, lse.data(), q.data(), k.data(), v.data(), {}, doc.data(), shape);
      cpu_->attention_backward(dq.data(), dk.data(), dv.data(), dy.data(), y.data(), lse.data(), q.data(), k.data(),
                               v.data(), {}, doc.data(), shape);
      DeviceFloats g_q(*gpu_, q), g_k(*gpu_, k), g_v(*gpu_, v), g_dy(*gpu_, dy);
      DeviceInts g_doc(*gpu_, doc);
      DeviceFloats g_y(*gpu_, n, kNaN), g_lse(*gpu_, lse.size(), kNaN);
      DeviceFloats g_codes(*gpu_, (n + 1) / 2, std::bit_cast<float>(kNaNCodePair));
      gpu_->attention_forward(g_y.ptr, reinterpret_cast<uint16_t*>(g_codes.ptr), g_lse.ptr, g_q.ptr, g_k.ptr, g_v.ptr,
                              {}, g_doc.ptr, shape);
      const auto got_y = g_y.get();
      expect_close(got_y, y, 1e-4, 1e-5, "attention y");
      expect_close(g_lse.get(), lse, 1e-5, 1e-6, "attention lse");
      const auto y_codes = codes_of(g_codes.get(), n);  // the codes of the y written beside them
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(y_codes[i], lowp::encode_bf16(got_y[i])) << "attention y codes at " << i;
      // The backward from the CPU's y and lse, so that only the backward is compared.
      DeviceFloats c_y(*gpu_, y), c_lse(*gpu_, lse);
      DeviceFloats g_dq(*gpu_, n, kNaN), g_dk(*gpu_, n, kNaN), g_dv(*gpu_, n, kNaN);
      gpu_->attention_backward(g_dq.ptr, g_dk.ptr, g_dv.ptr, g_dy.ptr, c_y.ptr, c_lse.ptr, g_q.ptr, g_k.ptr, g_v.ptr,
                               {}, g_doc.ptr, shape);
      const auto got_dq = g_dq.get(), got_dk = g_dk.get(), got_dv = g_dv.get();
      expect_close(got_dq, dq, 1e-4, 1e-4, "attention dq");
      expect_close(got_dk, dk, 1e-4, 1e-4, "attention dk");
      expect_close(got_dv, dv, 1e-4, 1e-4, "attention dv");
      // Deterministic: a second run gives the same bits.
      gpu_->attention_backward(g_dq.ptr, g_dk.ptr, g_dv.ptr, g_dy.ptr, c_y.ptr, c_lse.ptr, g_q.ptr, g_k.ptr, g_v.ptr,
                               {}, g_doc.ptr, shape);
      expect_identical(g_dq.get(), got_dq, "attention dq rerun");
      expect_identical(g_dk.get(), got_dk, "attention dk rerun");
      expect_identical(g_dv.get(), got_dv, "attention dv rerun");
    }
  }
};

TEST_F(AttentionTest, EveryWindowOnSmallHeads) {
  SCOPED_TRACE(trace());
  std::vector<int> all_windows(15);
  std::iota(all_windows.begin(), all_windows.end(), 0);
  check({256, 2, 8, 16, all_windows, 20});
  check({64, 2, 8, 8, {0, 1, 2, 3, 8}, 11});
}

TEST_F(AttentionTest, OddShapesAndWideHeads) {
  SCOPED_TRACE(trace());
  check({200, 3, 12, 16, {0, 1, 2, 5}, 50});   // T not a multiple of the block
  check({300, 1, 40, 32, {3}, 60});           // D not a multiple of 32
  check({512, 1, 256, 64, {2, 9}, 100});      // the widest head supported
  check({1024, 2, 64, 128, {1, 3, 14}, 300});
}

TEST_F(AttentionTest, SpeedrunHeadsOverThousandsOfTokens) {
  SCOPED_TRACE(trace());
  check({3072, 2, 128, 128, {0, 7, 14}, 1000});
  check({2048, 1, 128, 128, {14}, 100000});  // (almost) one document: full windows
}

// Backend::lend_scratch: while memory is lent the flash kernel's bf16 copies and workspace
// come from it (the device's memory in use does not grow); withdrawn, the backend grows
// scratch of its own. The same result either way.
TEST_F(AttentionTest, FlashKernelTakesItsTemporariesFromLentMemory) {
  SCOPED_TRACE(trace());
  const auto call = flash(8192, 1000);
  auto& [shape, n, q, k, v, y, lse, doc] = *call;
  DeviceFloats loan(*gpu_, 4 * n, kNaN);  // 16 bytes per element: more than 3 bf16 copies and the workspace
  gpu_->synchronize();
  const size_t before = gpu_->device_memory_in_use();
  gpu_->lend_scratch(loan.ptr, 4 * n * sizeof(float));
  gpu_->attention_forward(y.ptr, nullptr, lse.ptr, q.ptr, k.ptr, v.ptr, {}, doc.ptr, shape);
  gpu_->withdraw_scratch();
  gpu_->synchronize();
  EXPECT_EQ(gpu_->device_memory_in_use(), before) << "scratch grew although memory was lent";
  const auto lent_y = y.get(), lent_lse = lse.get();
  DeviceFloats y2(*gpu_, n, kNaN), lse2(*gpu_, lent_lse.size(), kNaN);
  gpu_->synchronize();
  const size_t unlent = gpu_->device_memory_in_use();
  gpu_->attention_forward(y2.ptr, nullptr, lse2.ptr, q.ptr, k.ptr, v.ptr, {}, doc.ptr, shape);
  gpu_->synchronize();
  EXPECT_GT(gpu_->device_memory_in_use(), unlent) << "withdrawn memory still served";
  expect_identical(lent_y, y2.get(), "flash y from lent scratch");
  expect_identical(lent_lse, lse2.get(), "flash lse from lent scratch");
}

// The flash kernel's output is bf16: given y_codes it writes them there (the held operand of
// c_proj) instead of into its own scratch, and y is their widening, the same bits either way.
TEST_F(AttentionTest, FlashKernelWritesTheCodesOfItsOutputWhenAsked) {
  SCOPED_TRACE(trace());
  const auto call = flash(1024, 300);
  auto& [shape, n, q, k, v, y, lse, doc] = *call;
  gpu_->attention_forward(y.ptr, nullptr, lse.ptr, q.ptr, k.ptr, v.ptr, {}, doc.ptr, shape);
  const auto want_y = y.get(), want_lse = lse.get();
  DeviceFloats y2(*gpu_, n, kNaN), lse2(*gpu_, want_lse.size(), kNaN);
  DeviceFloats codes(*gpu_, (n + 1) / 2, std::bit_cast<float>(kNaNCodePair));
  gpu_->attention_forward(y2.ptr, reinterpret_cast<uint16_t*>(codes.ptr), lse2.ptr, q.ptr, k.ptr, v.ptr, {}, doc.ptr,
                          shape);
  expect_identical(y2.get(), want_y, "flash y beside its codes");
  expect_identical(lse2.get(), want_lse, "flash lse beside y's codes");
  const auto got_codes = codes_of(codes.get(), n);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(got_codes[i], lowp::encode_bf16(want_y[i])) << "flash y codes at " << i;
}

// attention_forward_bf16 (bf16 activations), reference and flash: y rounded where computed
// and its codes stored (the flash kernel's output as it is; the reference's rounded after),
// lse as attention_forward's; the backward given those codes (AttentionInputCodes::y), with
// y's floats NaN, gives the bits of the backward reading the rounded floats.
TEST_F(AttentionTest, Bf16OutputIsRoundedAndItsCodesServeTheBackward) {
  SCOPED_TRACE(trace());
  for (bool use_flash : {false, true}) {
    SCOPED_TRACE(use_flash ? "flash" : "reference");
    BackendOptions options;
    options.attention = use_flash ? AttentionKernel::kFlash : AttentionKernel::kReference;
    gpu_ = make_cuda_backend(0, options);
    const int T = 1024;
    const AttentionShape shape{T, 2, 128, 128, 3, 0.12f};
    const size_t n = static_cast<size_t>(T) * 2 * 128;
    DeviceFloats q(*gpu_, normal(n)), k(*gpu_, normal(n)), v(*gpu_, normal(n)), dy(*gpu_, normal(n));
    DeviceInts doc(*gpu_, documents(T, 300));
    DeviceFloats y(*gpu_, n, kNaN), lse(*gpu_, 2 * T, kNaN), y16(*gpu_, n, kNaN), lse16(*gpu_, 2 * T, kNaN);
    DeviceFloats stored(*gpu_, n / 2, std::bit_cast<float>(kNaNCodePair));
    auto* stored_codes = reinterpret_cast<uint16_t*>(stored.ptr);
    gpu_->attention_forward(y.ptr, nullptr, lse.ptr, q.ptr, k.ptr, v.ptr, {}, doc.ptr, shape);
    gpu_->attention_forward_bf16(y16.ptr, stored_codes, lse16.ptr, q.ptr, k.ptr, v.ptr, {}, doc.ptr, shape);
    expect_identical(lse16.get(), lse.get(), "lse beside a rounded y");
    const auto plain = y.get(), rounded = y16.get();
    const auto codes = codes_of(stored.get(), n);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(codes[i], lowp::encode_bf16(plain[i])) << "stored code at " << i;
      ASSERT_EQ(rounded[i], lowp::decode_bf16(codes[i])) << "rounded y at " << i;
    }
    DeviceFloats alone(*gpu_, n / 2, std::bit_cast<float>(kNaNCodePair));  // the codes alone
    gpu_->attention_forward_bf16(nullptr, reinterpret_cast<uint16_t*>(alone.ptr), lse16.ptr, q.ptr, k.ptr, v.ptr, {},
                                 doc.ptr, shape);
    EXPECT_EQ(codes_of(alone.get(), n), codes) << "the codes alone";
    DeviceFloats dq(*gpu_, n, kNaN), dk(*gpu_, n, kNaN), dv(*gpu_, n, kNaN);
    DeviceFloats dq2(*gpu_, n, kNaN), dk2(*gpu_, n, kNaN), dv2(*gpu_, n, kNaN), stale(*gpu_, n, kNaN);
    gpu_->attention_backward(dq.ptr, dk.ptr, dv.ptr, dy.ptr, y16.ptr, lse16.ptr, q.ptr, k.ptr, v.ptr, {}, doc.ptr,
                             shape);
    AttentionInputCodes y_codes;
    y_codes.y = stored_codes;
    gpu_->attention_backward(dq2.ptr, dk2.ptr, dv2.ptr, dy.ptr, stale.ptr, lse16.ptr, q.ptr, k.ptr, v.ptr, y_codes,
                             doc.ptr, shape);
    expect_identical(dq2.get(), dq.get(), "dq from y's codes");
    expect_identical(dk2.get(), dk.get(), "dk from y's codes");
    expect_identical(dv2.get(), dv.get(), "dv from y's codes");
    // dy given as codes too (c_proj's product wrote them): the gradients of the widened codes.
    const auto dy_codes = encoded(dy.get());
    DeviceCodes g_dy_codes(*gpu_, dy_codes);
    DeviceFloats dy_rounded(*gpu_, widened(dy_codes));
    gpu_->attention_backward(dq.ptr, dk.ptr, dv.ptr, dy_rounded.ptr, y16.ptr, lse16.ptr, q.ptr, k.ptr, v.ptr, {},
                             doc.ptr, shape);
    AttentionInputCodes both = y_codes;
    both.dy = g_dy_codes.ptr;
    gpu_->attention_backward(dq2.ptr, dk2.ptr, dv2.ptr, stale.ptr, stale.ptr, lse16.ptr, q.ptr, k.ptr, v.ptr, both,
                             doc.ptr, shape);
    expect_identical(dq2.get(), dq.get(), "dq from dy's codes");
    expect_identical(dk2.get(), dk.get(), "dk from dy's codes");
    expect_identical(dv2.get(), dv.get(), "dv from dy's codes");
  }
}

// Given its inputs' codes (AttentionInputCodes, kept by rotary and the v mix) the flash
// kernel reads them instead of rounding copies of q, k and v: the same bits forward and
// backward. And it does read them, not the floats: the codes of -v give exactly -y (the
// kernel's sums are symmetric in sign), the same lse.
TEST_F(AttentionTest, FlashKernelReadsTheInputCodesItIsGiven) {
  SCOPED_TRACE(trace());
  const auto call = flash(2048, 300);
  auto& [shape, n, q, k, v, y, lse, doc] = *call;
  auto codes_on_device = [&](const std::vector<float>& x, float sign) {
    std::vector<uint16_t> codes(x.size() + x.size() % 2, 0);
    for (size_t i = 0; i < x.size(); ++i) codes[i] = lowp::encode_bf16(sign * x[i]);
    std::vector<float> words(codes.size() / 2);
    std::memcpy(words.data(), codes.data(), words.size() * sizeof(float));
    return std::make_unique<DeviceFloats>(*gpu_, words);
  };
  const auto q_codes = codes_on_device(q.get(), 1.f), k_codes = codes_on_device(k.get(), 1.f);
  const auto v_codes = codes_on_device(v.get(), 1.f), minus_v_codes = codes_on_device(v.get(), -1.f);
  auto given = [&](const DeviceFloats& v_words) {
    auto as_codes = [](const DeviceFloats& words) { return reinterpret_cast<const uint16_t*>(words.ptr); };
    return AttentionInputCodes{as_codes(*q_codes), as_codes(*k_codes), as_codes(v_words)};
  };
  gpu_->attention_forward(y.ptr, nullptr, lse.ptr, q.ptr, k.ptr, v.ptr, {}, doc.ptr, shape);
  const auto want_y = y.get(), want_lse = lse.get();
  DeviceFloats y2(*gpu_, n, kNaN), lse2(*gpu_, want_lse.size(), kNaN);
  gpu_->attention_forward(y2.ptr, nullptr, lse2.ptr, q.ptr, k.ptr, v.ptr, given(*v_codes), doc.ptr, shape);
  expect_identical(y2.get(), want_y, "flash y from input codes");
  expect_identical(lse2.get(), want_lse, "flash lse from input codes");

  DeviceFloats dy(*gpu_, normal(n));
  DeviceFloats dq(*gpu_, n, kNaN), dk(*gpu_, n, kNaN), dv(*gpu_, n, kNaN);
  DeviceFloats dq2(*gpu_, n, kNaN), dk2(*gpu_, n, kNaN), dv2(*gpu_, n, kNaN);
  gpu_->attention_backward(dq.ptr, dk.ptr, dv.ptr, dy.ptr, y.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, {}, doc.ptr, shape);
  gpu_->attention_backward(dq2.ptr, dk2.ptr, dv2.ptr, dy.ptr, y.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, given(*v_codes),
                           doc.ptr, shape);
  expect_identical(dq2.get(), dq.get(), "flash dq from input codes");
  expect_identical(dk2.get(), dk.get(), "flash dk from input codes");
  expect_identical(dv2.get(), dv.get(), "flash dv from input codes");

  gpu_->attention_forward(y2.ptr, nullptr, lse2.ptr, q.ptr, k.ptr, v.ptr, given(*minus_v_codes), doc.ptr, shape);
  const auto negated = y2.get();
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(negated[i], -want_y[i]) << "y from the codes of -v at " << i;
  expect_identical(lse2.get(), want_lse, "flash lse from the codes of -v");
}

// ---------------------------------------------------------------------------------------
// The head

TEST_F(CudaBackendTest, SoftcapCrossEntropyMatchesCpu) {
  SCOPED_TRACE(trace());
  struct Case { int rows, V; };
  for (Case c : {Case{1, 384}, Case{5, 50304}, Case{64, 1000}, Case{3, 50257}}) {
    for (float grad_scale : {0.f, 1.f / c.rows}) {
      SCOPED_TRACE("rows=" + std::to_string(c.rows) + " V=" + std::to_string(c.V) +
                   " grad_scale=" + std::to_string(grad_scale));
      const auto logits = normal(static_cast<size_t>(c.rows) * c.V, 8.f);
      const auto targets = uniform_ints(c.rows, c.V);
      std::vector<float> want = logits, loss(c.rows);
      cpu_->softcap_cross_entropy(want.data(), loss.data(), targets.data(), c.rows, c.V, 15.f, grad_scale);
      DeviceFloats g_logits(*gpu_, logits), g_loss(*gpu_, c.rows, kNaN);
      DeviceInts g_targets(*gpu_, targets);
      gpu_->softcap_cross_entropy(g_logits.ptr, g_loss.ptr, g_targets.ptr, c.rows, c.V, 15.f, grad_scale);
      expect_close(g_loss.get(), loss, 1e-5, 0, "row loss");
      // Softcapped values, or gradients (a softmax probability times 4 s (1-s)).
      expect_close(g_logits.get(), want, 1e-4, 1e-6, grad_scale == 0.f ? "softcapped logits" : "logit gradients");
    }
  }
}

// ---------------------------------------------------------------------------------------
// Optimiser building blocks

// One multi-tensor Adam call over more tensors than one launch takes (32), of sizes from 0
// to 100003 and each its own rate, against the CPU's: every tensor updated, none twice.
TEST_F(CudaBackendTest, MultiTensorAdamMatchesCpuOverSeveralLaunches) {
  SCOPED_TRACE(trace());
  std::vector<std::vector<float>> p, g, m, v;
  for (int k = 0; k < 45; ++k) {
    const size_t n = k == 3 ? 0 : k == 7 ? 100003 : static_cast<size_t>(1 + 97 * k);
    p.push_back(normal(n));
    g.push_back(normal(n, 0.1f));
    m.push_back(normal(n, 0.05f));
    v.push_back(normal(n, 0.01f));
    for (float& x : v.back()) x = x * x;
  }
  std::vector<std::unique_ptr<DeviceFloats>> dp, dg, dm, dv;
  std::vector<AdamTensor> host, device;
  for (size_t k = 0; k < p.size(); ++k) {
    dp.push_back(std::make_unique<DeviceFloats>(*gpu_, p[k]));
    dg.push_back(std::make_unique<DeviceFloats>(*gpu_, g[k]));
    dm.push_back(std::make_unique<DeviceFloats>(*gpu_, m[k]));
    dv.push_back(std::make_unique<DeviceFloats>(*gpu_, v[k]));
    const float lr = 0.001f * static_cast<float>(k + 1);
    host.push_back({p[k].data(), g[k].data(), m[k].data(), v[k].data(), p[k].size(), lr});
    device.push_back({dp[k]->ptr, dg[k]->ptr, dm[k]->ptr, dv[k]->ptr, p[k].size(), lr});
  }
  cpu_->adam_update(host.data(), host.size(), 0.8f, 0.95f, 1e-10f, 5, nullptr);
  gpu_->adam_update(device.data(), device.size(), 0.8f, 0.95f, 1e-10f, 5, nullptr);
  for (size_t k = 0; k < p.size(); ++k) {
    if (p[k].empty()) continue;
    expect_close(dp[k]->get(), p[k], 1e-5, 1e-7, "adam param of tensor " + std::to_string(k));
    expect_close(dm[k]->get(), m[k], 1e-5, 1e-7, "adam m of tensor " + std::to_string(k));
    expect_close(dv[k]->get(), v[k], 1e-5, 1e-7, "adam v of tensor " + std::to_string(k));
  }
}

TEST_F(CudaBackendTest, OptimizerKernelsMatchCpu) {
  SCOPED_TRACE(trace());
  const size_t n = 100003;
  const auto param = normal(n), grad = normal(n, 0.1f), m0 = normal(n, 0.05f);
  auto v0 = normal(n, 0.01f);
  for (float& x : v0) x = x * x;
  for (int step : {1, 2, 10}) {
    std::vector<float> p = param, m = m0, v = v0;
    const AdamTensor host{p.data(), grad.data(), m.data(), v.data(), n, 0.008f};
    cpu_->adam_update(&host, 1, 0.8f, 0.95f, 1e-10f, step, nullptr);
    DeviceFloats gp(*gpu_, param), gg(*gpu_, grad), gm(*gpu_, m0), gv(*gpu_, v0);
    const AdamTensor device{gp.ptr, gg.ptr, gm.ptr, gv.ptr, n, 0.008f};
    gpu_->adam_update(&device, 1, 0.8f, 0.95f, 1e-10f, step, nullptr);
    expect_close(gp.get(), p, 1e-5, 1e-7, "adam param step " + std::to_string(step));
    expect_close(gm.get(), m, 1e-5, 1e-7, "adam m");
    expect_close(gv.get(), v, 1e-5, 1e-7, "adam v");
  }
  {
    std::vector<float> out(n), buf = m0;
    cpu_->muon_momentum(out.data(), buf.data(), grad.data(), n, 0.9f, nullptr);
    DeviceFloats g_out(*gpu_, grad), g_buf(*gpu_, m0);
    gpu_->muon_momentum(g_out.ptr, g_buf.ptr, g_out.ptr, n, 0.9f, nullptr);  // out == grad
    expect_close(g_out.get(), out, 1e-5, 1e-7, "muon_momentum out");
    expect_close(g_buf.get(), buf, 1e-5, 1e-7, "muon_momentum buf");
    std::vector<float> p = param;
    cpu_->apply_update(p.data(), out.data(), n, 0.05f, nullptr);
    DeviceFloats gp(*gpu_, param);
    gpu_->apply_update(gp.ptr, g_out.ptr, n, 0.05f, nullptr);
    expect_close(gp.get(), p, 1e-5, 1e-7, "apply_update");
  }
  struct Norm { size_t count; int batch; };
  for (Norm c : {Norm{1, 1}, Norm{1000, 3}, Norm{768 * 768, 3}, Norm{5, 7}}) {
    const auto x = normal(c.count * c.batch, 2.f);
    std::vector<float> want = x;
    cpu_->normalize_frobenius(want.data(), c.count, c.batch, 1e-7f);
    DeviceFloats gx(*gpu_, x);
    gpu_->normalize_frobenius(gx.ptr, c.count, c.batch, 1e-7f);
    expect_close(gx.get(), want, 1e-6, 0, "normalize_frobenius count " + std::to_string(c.count));
  }
}

// Backend::hold_stored_operand: codes kept elsewhere (y kept as bf16) are the operand, read
// in place when the product runs (written here after the hold; the floats behind them are
// NaN), with no copy made: the same bits as the product that rounds x itself, and only B's
// copy counted.
TEST_F(GemmTest, AStoredOperandIsReadFromItsCodesWithNoCopy) {
  SCOPED_TRACE(trace());
  use_bf16_matmuls();
  const int M = 128, N = 96, K = 256;
  const auto x = normal(static_cast<size_t>(M) * K), B = normal(static_cast<size_t>(K) * N);
  std::vector<uint16_t> codes(x.size());
  for (size_t i = 0; i < x.size(); ++i) codes[i] = lowp::encode_bf16(x[i]);
  std::vector<float> words(codes.size() / 2);
  std::memcpy(words.data(), codes.data(), words.size() * sizeof(float));
  DeviceFloats dx(*gpu_, x), stale(*gpu_, x.size(), kNaN), dcodes(*gpu_, words.size(), 0.f), dB(*gpu_, B);
  DeviceFloats want(*gpu_, static_cast<size_t>(M) * N, kNaN), got(*gpu_, static_cast<size_t>(M) * N, kNaN);
  gpu_->gemm(false, false, M, N, K, 1.f, dx.ptr, K, dB.ptr, N, 0.f, want.ptr, N);
  const size_t copied = gpu_->operand_copy_traffic_bytes();
  ASSERT_TRUE(gpu_->hold_stored_operand(0, stale.ptr, reinterpret_cast<const uint16_t*>(dcodes.ptr), codes.size()));
  DeviceFloats written(*gpu_, words);
  gpu_->copy(dcodes.ptr, written.ptr, words.size());  // the codes written after the hold, before the product
  gpu_->gemm(false, false, M, N, K, 1.f, stale.ptr, K, dB.ptr, N, 0.f, got.ptr, N);
  gpu_->release_operand(0);
  expect_identical(got.get(), want.get(), "product of stored codes");
  EXPECT_EQ(gpu_->operand_copy_traffic_bytes() - copied, B.size() * 6) << "only B copied";
  auto float32 = make_cuda_backend(0);
  EXPECT_FALSE(float32->hold_stored_operand(0, dx.ptr, reinterpret_cast<const uint16_t*>(dcodes.ptr), codes.size()));
}

// The matmul sweep (bench --sweep-matmuls) times the heuristic's candidates in its order for
// every kind of product the step makes: each runs (or is named as turned down) and its
// configuration is read back; rank 0 is the algorithm the backend's own plan runs.
TEST_F(GemmTest, TheSweepTimesEachCandidateInTheHeuristicsOrder) {
  const ProductShape shapes[] = {
      {false, true, 1024, 768, 256, true, false},   // a forward product into codes
      {false, true, 1024, 768, 256, true, true},    // the same adding the bf16 stream
      {true, false, 768, 256, 1024, false, true},   // a weight gradient, accumulated
      {false, false, 256, 256, 768, false, false, 3},  // Newton-Schulz's batches
  };
  for (const ProductShape& shape : shapes) {
    SCOPED_TRACE(product_shape_name(shape));
    const std::vector<AlgorithmTiming> timings = sweep_product_algorithms(0, shape, 4, 3);
    ASSERT_FALSE(timings.empty());
    ASSERT_LE(timings.size(), 4u);
    for (size_t i = 0; i < timings.size(); ++i) {
      EXPECT_EQ(timings[i].rank, static_cast<int>(i));
      EXPECT_EQ(timings[i].config.rfind("algo ", 0), 0u) << timings[i].config;
      EXPECT_TRUE(timings[i].ms > 0 || timings[i].ms == -1) << timings[i].ms;
      std::printf("  %s rank %zu: %.4f ms, %s\n", product_shape_name(shape).c_str(), i, timings[i].ms,
                  timings[i].config.c_str());
    }
    EXPECT_GT(timings.front().ms, 0) << "the backend's own choice must run";
  }
  EXPECT_THROW(sweep_product_algorithms(0, ProductShape{}, 4, 3), Error);
}

// --autotune-matmuls: each new plan times the heuristic's candidates on operands of its own
// and runs the fastest. The products still match the CPU, C accumulated into exactly once (the
// timing never touches the caller's C), and each plan's choice is recorded once.
TEST_F(GemmTest, AutotunedPlansRunTheFastestCandidateAndStillMatchCpu) {
  SCOPED_TRACE(trace());
  constexpr int kCandidates = 4;
  use_bf16_matmuls(kCandidates);
  const GemmCase cases[] = {
      {false, false, 37, 129, 65, 3, 0.7f, 1.3f, 1},
      {true, false, 768, 256, 1024, 0, 1.f, 1.f, 1},  // a weight gradient, accumulated
      {false, true, 24, 24, 40, 0, 1.f, 0.f, 3},      // Newton-Schulz's X X^T
  };
  for (const GemmCase& g : cases) check(g);
  const std::vector<MatmulTuning> tunings = gpu_->matmul_tunings();
  ASSERT_EQ(tunings.size(), std::size(cases));
  for (size_t i = 0; i < tunings.size(); ++i) {
    const GemmCase& g = cases[i];
    const MatmulTuning& t = tunings[i];
    EXPECT_EQ(t.shape, product_shape_name({g.ta, g.tb, g.M, g.N, g.K, false, g.beta != 0.f, g.batch}));
    EXPECT_GE(t.timed, 1);
    EXPECT_LE(t.timed, kCandidates);
    EXPECT_GE(t.chosen_rank, 0);
    EXPECT_LT(t.chosen_rank, t.timed);
    EXPECT_GT(t.chosen_ms, 0) << t.shape;
    if (t.heuristic_ms >= 0) EXPECT_LE(t.chosen_ms, t.heuristic_ms) << t.shape;
    EXPECT_EQ(t.config.rfind("algo ", 0), 0u) << t.config;
    std::printf("  %s: %d timed, rank %d chosen, %.4f ms against rank 0's %.4f, %s\n", t.shape.c_str(), t.timed,
                t.chosen_rank, t.chosen_ms, t.heuristic_ms, t.config.c_str());
  }
  check(cases[0]);  // a plan already made is not tuned again
  EXPECT_EQ(gpu_->matmul_tunings().size(), std::size(cases));
  // Products into codes too, bf16 and float32 inputs, with their addends.
  check_products_into_codes(kCandidates);
  EXPECT_FALSE(gpu_->matmul_tunings().empty());
  // Without the option nothing is timed.
  use_bf16_matmuls();
  check(cases[0]);
  EXPECT_TRUE(gpu_->matmul_tunings().empty());
}

// ---------------------------------------------------------------------------------------
// The whole model and the optimiser

// Documents of 1 to 97 tokens over the first quarter, then one to the end: the document
// mask cuts early on, the sliding window late (long_window_cuts checks it).
std::vector<int32_t> tokens_with_documents(std::mt19937_64& rng, int n, int vocab, int end_of_text) {
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
  for (int32_t& x : t) x = x == end_of_text ? (x + 1) % vocab : x;
  for (int i = 0; i < n / 4; i += 1 + static_cast<int>(rng() % 97)) t[i] = end_of_text;
  t[n / 4] = end_of_text;
  return t;
}

// Whether a long window of `window` blocks hides pairs that one block more would show:
// else the model tests could not tell a kernel that ignores the window.
bool long_window_cuts(const std::vector<int32_t>& tokens, int end_of_text, int block, int window) {
  const std::vector<int32_t> doc = document_ids(tokens, end_of_text);
  const int T = static_cast<int>(tokens.size());
  for (int q = 0; q < T; ++q) {
    for (int k = 0; k <= q; ++k) {
      if (key_visible(doc.data(), q, k, block, window) != key_visible(doc.data(), q, k, block, window + 1)) return true;
    }
  }
  return false;
}

// Random parameters everywhere (no zero head or projections) so every gradient path carries
// signal; lambdas and skip weights near their working range, as in tests/unit/test_gpt.cpp.
std::vector<float> random_parameters(const ParamLayout& layout, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.f, 0.5f);
  std::vector<float> p(layout.total());
  for (float& x : p) x = dist(rng);
  for (const ParamSpec& s : layout.specs()) {
    if (s.name.find("lambdas") != std::string::npos || s.name == "skip_weights") {
      for (size_t i = 0; i < s.count; ++i) p[s.offset + i] = 0.6f + 0.3f * p[s.offset + i];
    }
  }
  return p;
}

class ModelTest : public CudaBackendTest {
 protected:
  ActivationOptions gpu_activations_, cpu_activations_;

  // Tolerances default to float32 against float32 (see the top of this file).
  void compare_forward_backward(const Config& config, int T, int window, double loss_tolerance = 1e-5,
                                double gradient_tolerance = 1e-3) {
    SCOPED_TRACE("T=" + std::to_string(T) + " window=" + std::to_string(window));
    GPT on_cpu(config, *cpu_, T, T, cpu_activations_), on_gpu(config, *gpu_, T, T, gpu_activations_);
    const auto params = random_parameters(on_cpu.layout(), rng_);
    const int eot = config.document_separator;
    const auto inputs = tokens_with_documents(rng_, T, config.vocab_size, eot);
    const auto targets = tokens_with_documents(rng_, T, config.vocab_size, eot);
    ASSERT_TRUE(window == 0 || long_window_cuts(inputs, eot, config.attn_block_size, window));
    on_cpu.load_parameters(params);
    on_gpu.load_parameters(params);
    on_cpu.zero_grad();
    on_gpu.zero_grad();
    const double cpu_loss = on_cpu.forward_backward(inputs, targets, window, 1.f);
    const double gpu_loss = on_gpu.forward_backward(inputs, targets, window, 1.f);
    ASSERT_TRUE(std::isfinite(gpu_loss));
    EXPECT_NEAR(gpu_loss, cpu_loss, loss_tolerance * std::abs(cpu_loss));
    EXPECT_NEAR(on_gpu.forward(inputs, targets, window), cpu_loss, loss_tolerance * std::abs(cpu_loss));
    const auto cpu_grad = on_cpu.gradients_to_host(), gpu_grad = on_gpu.gradients_to_host();
    for (const ParamSpec& s : on_cpu.layout().specs()) {
      // A scalar's gradient (lambdas, skip weights) is one sum over every token's d-vector
      // product, which largely cancels: bf16 rounding upstream moves it by far more than it
      // moves any matrix's. Measured on an H200 (2026-11-30): up to 0.13 relative with the
      // flash kernel; with bf16 activations 0.048 while the stream was float32, 0.34 (one
      // layer's lambdas, one random draw) once it was bf16 too, while every matrix stayed
      // within 2e-2 and the loss within 1e-4. A sign error or a lost term still exceeds 0.5.
      const bool cancelling_scalar = s.group == ParamGroup::kScalar && gradient_tolerance > 1e-3;
      const double band = cancelling_scalar ? std::max(gradient_tolerance, 0.5) : gradient_tolerance;
      EXPECT_LE(relative_l2(gpu_grad, cpu_grad, s.offset, s.offset + s.count), band) << s.name;
    }
    // Determinism: the same step again gives the same bits.
    on_gpu.zero_grad();
    const double again = on_gpu.forward_backward(inputs, targets, window, 1.f);
    EXPECT_EQ(again, gpu_loss);
    expect_identical(on_gpu.gradients_to_host(), gpu_grad, "GPT gradients rerun");
  }
};

TEST_F(ModelTest, MicroForwardBackwardMatchesCpu) {
  SCOPED_TRACE(trace());
  const Config config = Config::preset("micro");
  compare_forward_backward(config, 64, 2);
  compare_forward_backward(config, 256, 3);
  compare_forward_backward(config, 256, 0);
}

TEST_F(ModelTest, TinyForwardBackwardMatchesCpuOverTheFullVocabulary) {
  SCOPED_TRACE(trace());
  compare_forward_backward(Config::preset("tiny"), 1024, 8);
  compare_forward_backward(Config::preset("tiny"), 1024, 3);  // long 3 blocks, short 1
}

// --attention-kernel flash: attention in bf16 inside the float32 model. The bands are
// estimates, not yet measured: q, k, v rounded to bf16 (relative 2^-9) and P rounded
// before P V move attention outputs by a few 1e-3, the loss by ~1e-3 relative, and the
// gradients through six layers by ~1e-2 relative L2.
TEST_F(ModelTest, TinyWithTheFlashAttentionKernelMatchesCpuWithinBf16) {
  SCOPED_TRACE(trace());
  BackendOptions options;
  options.attention = AttentionKernel::kFlash;
  gpu_ = make_cuda_backend(0, options);
  compare_forward_backward(Config::preset("tiny"), 1024, 8, 2e-3, 3e-2);
  compare_forward_backward(Config::preset("tiny"), 1024, 3, 2e-3, 3e-2);  // blocks of 64, windows 3 and 1
}

// --matmul bf16 on both backends: the GPU's tensor cores against the CPU's emulation, so
// only the summation order differs and the float32 bands hold... except that a product's
// inputs are rounded from activations that already differ by float32 noise, which bf16
// rounding turns into an occasional one-ulp (2^-8) flip; hence bands a little above
// float32's, far below bf16 against float32 (~1e-2 in the loss: test_bf16_matmul).
TEST_F(ModelTest, TinyWithBf16MatmulsMatchesTheCpuEmulation) {
  SCOPED_TRACE(trace());
  use_bf16_matmuls();
  compare_forward_backward(Config::preset("tiny"), 1024, 8, 1e-4, 2e-2);
}

// --recompute-activations: the backward recomputes norms, rotated q/k and relu^2 on the GPU.
TEST_F(ModelTest, TinyWithRecomputedActivationsMatchesCpu) {
  SCOPED_TRACE(trace());
  gpu_activations_.memory = ActivationMemory::kRecompute;
  compare_forward_backward(Config::preset("tiny"), 1024, 8);
}

// --activations bf16 on both backends (the CPU's is the exact emulation), kept, recomputed
// and with relu(h)^2 alone recomputed on the GPU: as with bf16 matmuls only summation order differs, until float32
// noise flips a rounding by one bf16 ulp; bands as for bf16 matmuls (estimates).
TEST_F(ModelTest, TinyWithBf16ActivationsMatchesTheCpuEmulation) {
  SCOPED_TRACE(trace());
  cpu_activations_.precision = ActivationPrecision::kBfloat16;
  gpu_activations_.precision = ActivationPrecision::kBfloat16;
  compare_forward_backward(Config::preset("tiny"), 1024, 8, 1e-4, 2e-2);
  gpu_activations_.memory = ActivationMemory::kRecompute;
  compare_forward_backward(Config::preset("tiny"), 1024, 8, 1e-4, 2e-2);
  gpu_activations_.memory = ActivationMemory::kRecomputeRelu2;
  compare_forward_backward(Config::preset("tiny"), 1024, 8, 1e-4, 2e-2);
}

// What `train --device cuda --recompute-activations --attention-kernel flash` runs (bf16
// matmuls and activations, the flash kernel) against the CPU's emulation of the bf16
// matmuls and activations with float32 attention: the flash kernel's bands (estimates).
TEST_F(ModelTest, TinyAsTrainedOnTheGpuMatchesTheCpuEmulation) {
  SCOPED_TRACE(trace());
  BackendOptions gpu_options, cpu_options;
  gpu_options.matmul = cpu_options.matmul = MatmulPrecision::kBfloat16;
  gpu_options.attention = AttentionKernel::kFlash;
  gpu_ = make_cuda_backend(0, gpu_options);
  cpu_ = make_cpu_backend(cpu_options);
  cpu_activations_.precision = ActivationPrecision::kBfloat16;
  gpu_activations_ = {ActivationMemory::kRecompute, ActivationPrecision::kBfloat16};
  compare_forward_backward(Config::preset("tiny"), 1024, 8, 2e-3, 3e-2);
}

TEST_F(ModelTest, TwoOptimizerStepsMatchCpu) {
  SCOPED_TRACE(trace());
  for (const char* preset : {"micro", "tiny"}) {
    SCOPED_TRACE(preset);
    const Config config = Config::preset(preset);
    const ParamLayout layout(config);
    const auto params = random_parameters(layout, rng_);
    std::vector<float> cpu_params = params;
    DeviceFloats gpu_params(*gpu_, params);
    Optimizer cpu_opt(config, layout, *cpu_), gpu_opt(config, layout, *gpu_);
    for (int step = 0; step < 2; ++step) {
      const auto grads = normal(layout.total(), 0.1f);
      DeviceFloats gpu_grads(*gpu_, grads);
      cpu_opt.step(cpu_params.data(), grads.data(), step);
      gpu_opt.step(gpu_params.ptr, gpu_grads.ptr, step);
    }
    // Compare the updates (new - old): the parameters themselves would hide their errors.
    // Muon's five Newton-Schulz steps amplify float32 rounding (~10x), hence 1e-3.
    const auto got = gpu_params.get();
    std::vector<float> cpu_update(params.size()), gpu_update(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      cpu_update[i] = cpu_params[i] - params[i];
      gpu_update[i] = got[i] - params[i];
    }
    for (const ParamSpec& s : layout.specs()) {
      const double tolerance = s.group == ParamGroup::kMuon ? 1e-3 : 1e-4;
      EXPECT_LE(relative_l2(gpu_update, cpu_update, s.offset, s.offset + s.count), tolerance) << s.name;
    }
    ASSERT_EQ(cpu_opt.state().size(), gpu_opt.state().size());
    for (size_t i = 0; i < cpu_opt.state().size(); ++i) {
      const auto& cs = cpu_opt.state()[i];
      const auto& gs = gpu_opt.state()[i];
      std::vector<float> want(cs.data, cs.data + cs.spec->count), got_state(gs.spec->count);
      gpu_->download(got_state.data(), gs.data, got_state.size());
      EXPECT_LE(relative_l2(got_state, want, 0, want.size()), 1e-5) << cs.name;
    }
  }
}

}  // namespace

// Without the CUDA backend compiled in, asking for it is a clear error (this one runs on
// every machine; the others skip there).
TEST(CudaBackendStub, BuildsWithoutCudaRefuseWithAnError) {
  if (cuda_compiled_in()) GTEST_SKIP() << "this build has the CUDA backend";
  EXPECT_THROW(make_cuda_backend(0), Error);
}

}  // namespace speedrun
