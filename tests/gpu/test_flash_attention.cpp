// The bf16 flash attention (backends/flash_attention.h) against the CPU backend's fp32
// attention fed the same bf16-rounded inputs: random documents with boundaries inside
// tiles, several T, H, D and windows, outputs poisoned with NaN before every run, the
// document bounds computed on the device, and run-to-run bit-identical results. Skips with
// "no GPU" when no CUDA device is visible or the build has no CUDA backend.
//
// Tolerances (METHOD.md's band for bf16 operands is 1e-3 .. 1e-2 relative L2):
//  - y: 5e-3 relative L2. The reference is fp32 on bf16-exact inputs; the kernel rounds P
//    to bf16 before P V and y to bf16 on output (each ~2^-9 relative per element, rms
//    ~1e-3), with fp32 accumulation everywhere.
//  - lse: 2e-3 absolute (natural-log units): fp32 statistics, exp2 with the scale folded in.
//  - dq, dk, dv: 1e-2 relative L2: P and dS go into the tensor cores as bf16 and delta comes
//    from the bf16 y, so the softmax backward's cancellation (dP - delta) amplifies the
//    rounding a little beyond the forward's.
//  NaN or an unwritten (still poisoned) element never passes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backends/attention_tiles.h"
#include "backends/backend.h"
#include "backends/cuda_devices.h"
#include "backends/flash_attention.h"
#include "backends/low_precision.h"
#include "support/device.h"
#include "util/error.h"

#ifdef SPEEDRUN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace speedrun {
namespace {

TEST(FlashAttention, RejectsUnsupportedShapes) {
  FlashAttentionShape shape{256, 2, 96, 128, 3, 0.12f};
  try {
    check_flash_attention_shape(shape);
    FAIL() << "D = 96 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("D=96"), std::string::npos) << e.what();
  }
  shape.D = 128;
  EXPECT_NO_THROW(check_flash_attention_shape(shape));
  shape.T = 0;
  EXPECT_THROW(check_flash_attention_shape(shape), Error);
  shape.T = 256;
  for (float scale : {0.f, -0.12f, std::numeric_limits<float>::quiet_NaN()}) {
    shape.scale = scale;
    EXPECT_THROW(check_flash_attention_shape(shape), Error) << scale;  // the online softmax needs scale > 0
  }
  shape.scale = 0.12f;
  shape.forward_blocks_per_sm = 3;
  EXPECT_NO_THROW(check_flash_attention_shape(shape));
  for (int blocks : {0, 1, 4}) {
    shape.forward_blocks_per_sm = blocks;
    try {
      check_flash_attention_shape(shape);
      FAIL() << "forward_blocks_per_sm = " << blocks << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("forward_blocks_per_sm=" + std::to_string(blocks)), std::string::npos)
          << e.what();
    }
  }
}

#ifndef SPEEDRUN_HAVE_CUDA
TEST(FlashAttention, CpuOnlyBuildSaysSo) {
  try {
    flash_attention_workspace_bytes(FlashAttentionShape{256, 1, 128, 128, 1, 0.12f});
    FAIL() << "the stub returned";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no CUDA backend"), std::string::npos) << e.what();
  }
}
#endif

#ifdef SPEEDRUN_HAVE_CUDA

using speedrun::testing::gpu_available;

#define SKIP_WITHOUT_GPU() \
  if (!gpu_available()) GTEST_SKIP() << "no GPU"

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(status));
}

// A device buffer of `count` elements, filled from the host or with a poison byte pattern.
template <class T>
struct Device {
  T* ptr = nullptr;
  size_t count;
  explicit Device(size_t n) : count(n) { check(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc"); }
  explicit Device(const std::vector<T>& host) : Device(host.size()) {
    check(cudaMemcpy(ptr, host.data(), count * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  ~Device() { cudaFree(ptr); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  // 0xFF bytes: NaN as float (0xFFFFFFFF), NaN as bf16 (0xFFFF), -1 as int32.
  void poison() { check(cudaMemset(ptr, 0xFF, count * sizeof(T)), "poison"); }
  std::vector<T> get() const {
    check(cudaDeviceSynchronize(), "kernel");
    std::vector<T> host(count);
    check(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return host;
  }
};

std::vector<int32_t> random_documents(int T, double p, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution starts(p);
  std::vector<int32_t> doc(T);
  int32_t id = 0;
  for (int t = 0; t < T; ++t) {
    id += t > 0 && (starts(rng) || t % 2999 == 63);  // and one boundary just inside a tile
    doc[t] = id;
  }
  return doc;
}

// Random normal values rounded to bf16: the codes for the device, their exact float values
// for the reference.
struct Bf16Tensor {
  std::vector<uint16_t> codes;
  std::vector<float> values;
};

Bf16Tensor random_bf16(size_t n, float sigma, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, sigma);
  Bf16Tensor t{std::vector<uint16_t>(n), std::vector<float>(n)};
  for (size_t i = 0; i < n; ++i) {
    t.codes[i] = lowp::encode_bf16(normal(rng));
    t.values[i] = lowp::decode_bf16(t.codes[i]);
  }
  return t;
}

std::vector<float> decode(const std::vector<uint16_t>& codes) {
  std::vector<float> out(codes.size());
  for (size_t i = 0; i < codes.size(); ++i) out[i] = lowp::decode_bf16(codes[i]);
  return out;
}

double relative_l2(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-300));
}

void expect_finite(const std::vector<float>& x, const std::string& what) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i]) && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " non-finite (unwritten?) elements, first at " << first;
}

// Within `tolerance` in relative L2 over the whole tensor, and every row of `row` values
// within ten times that, relative to its own norm plus the mean row norm: one wrong row
// of 49152 would vanish in the whole tensor's L2 (bf16 noise moves a row by ~4e-3).
void expect_close(const std::vector<float>& got, const std::vector<float>& want, double tolerance,
                  const std::string& what, size_t row) {
  expect_finite(got, what);
  const double error = relative_l2(got, want);
  EXPECT_LT(error, tolerance) << what << " relative L2 error";
  const size_t rows = want.size() / row;
  std::vector<double> gap(rows, 0.0), norm(rows, 0.0);
  double norms = 0;
  for (size_t r = 0; r < rows; ++r) {
    for (size_t i = r * row; i < (r + 1) * row; ++i) {
      gap[r] += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
      norm[r] += static_cast<double>(want[i]) * want[i];
    }
    norms += std::sqrt(norm[r]);
  }
  double worst = 0;
  size_t worst_row = 0;
  for (size_t r = 0; r < rows; ++r) {
    const double relative = std::sqrt(gap[r]) / (std::sqrt(norm[r]) + norms / std::max<size_t>(rows, 1));
    if (relative > worst) worst = relative, worst_row = r;
  }
  EXPECT_LT(worst, 10 * tolerance) << what << " worst row " << worst_row << " (token " << worst_row << " / heads)";
}

// Whether some document spans more blocks than the window lets a query see: else a kernel
// ignoring the window would pass.
bool window_cuts(const std::vector<int32_t>& doc, int block, int window) {
  size_t first = 0;
  for (size_t t = 1; t <= doc.size(); ++t) {
    if (t == doc.size() || doc[t] != doc[first]) {
      if (static_cast<int>((t - 1) / block) - static_cast<int>(first / block) >= std::max(window, 1)) return true;
      first = t;
    }
  }
  return false;
}

struct Case {
  int T, H, D, window;
  double document_probability;
  float q_sigma;  // larger: sharper softmax rows
  bool window_cuts = false;  // asserted: some document spans more blocks than the window
  int block = 128;
};

std::string describe(const Case& c) {
  char text[160];
  std::snprintf(text, sizeof(text), "T=%d H=%d D=%d block=%d window=%d p=%g q_sigma=%g", c.T, c.H, c.D, c.block,
                c.window, c.document_probability, c.q_sigma);
  return text;
}

// Forward and backward of one case on the device and on the CPU backend; compares all outputs.
void run_case(const Case& c, uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const FlashAttentionShape shape{c.T, c.H, c.D, c.block, c.window, 0.12f};
  const AttentionShape cpu_shape{c.T, c.H, c.D, c.block, c.window, 0.12f};
  const size_t n = static_cast<size_t>(c.T) * c.H * c.D;
  const size_t rows = static_cast<size_t>(c.T) * c.H;
  std::mt19937_64 rng(seed);
  const Bf16Tensor q = random_bf16(n, c.q_sigma, rng), k = random_bf16(n, 1.f, rng), v = random_bf16(n, 1.f, rng);
  const Bf16Tensor dy = random_bf16(n, 1.f, rng);
  const std::vector<int32_t> doc = random_documents(c.T, c.document_probability, seed + 99);
  if (c.window_cuts) ASSERT_TRUE(window_cuts(doc, c.block, c.window)) << "the case's window never cuts";

  // Reference.
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  std::vector<float> y_ref(n), lse_ref(rows), dq_ref(n), dk_ref(n), dv_ref(n);
  cpu->attention_forward(y_ref.data(), nullptr, lse_ref.data(), q.values.data(), k.values.data(), v.values.data(), {},
                         doc.data(), cpu_shape);
  cpu->attention_backward(dq_ref.data(), dk_ref.data(), dv_ref.data(), dy.values.data(), y_ref.data(),
                          lse_ref.data(), q.values.data(), k.values.data(), v.values.data(), {}, doc.data(), cpu_shape);

  // Device.
  Device<uint16_t> q_d(q.codes), k_d(k.codes), v_d(v.codes), dy_d(dy.codes), y_d(n);
  Device<float> lse_d(rows), dq_d(n), dk_d(n), dv_d(n);
  Device<int32_t> doc_d(doc);
  Device<unsigned char> workspace(flash_attention_workspace_bytes(shape));
  y_d.poison();
  lse_d.poison();
  flash_attention_forward(nullptr, workspace.ptr, y_d.ptr, lse_d.ptr, q_d.ptr, k_d.ptr, v_d.ptr, doc_d.ptr, shape);
  const std::vector<uint16_t> y_codes = y_d.get();
  const std::vector<float> y = decode(y_codes), lse = lse_d.get();
  expect_close(y, y_ref, 5e-3, "y", c.D);
  expect_finite(lse, "lse");
  double lse_error = 0;
  for (size_t i = 0; i < rows; ++i) lse_error = std::max(lse_error, std::fabs(static_cast<double>(lse[i]) - lse_ref[i]));
  EXPECT_LT(lse_error, 2e-3) << "lse max abs error";
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  // The compact forward (three blocks per SM, Q's tile in K's second stage) computes the same bits.
  FlashAttentionShape compact = shape;
  compact.forward_blocks_per_sm = 3;
  Device<uint16_t> y_compact(n);
  Device<float> lse_compact(rows);
  y_compact.poison();
  lse_compact.poison();
  flash_attention_forward(nullptr, workspace.ptr, y_compact.ptr, lse_compact.ptr, q_d.ptr, k_d.ptr, v_d.ptr, doc_d.ptr,
                          compact);
  EXPECT_TRUE(y_compact.get() == y_codes) << "the compact forward's y differs";
  EXPECT_TRUE(same_bits(lse_compact.get(), lse)) << "the compact forward's lse differs";

  dq_d.poison();
  dk_d.poison();
  dv_d.poison();
  flash_attention_backward(nullptr, workspace.ptr, dq_d.ptr, dk_d.ptr, dv_d.ptr, dy_d.ptr, y_d.ptr, lse_d.ptr, q_d.ptr,
                           k_d.ptr, v_d.ptr, doc_d.ptr, shape);
  const std::vector<float> dq = dq_d.get(), dk = dk_d.get(), dv = dv_d.get();
  expect_close(dq, dq_ref, 1e-2, "dq", c.D);
  expect_close(dk, dk_ref, 1e-2, "dk", c.D);
  expect_close(dv, dv_ref, 1e-2, "dv", c.D);

  // Run-to-run determinism: the same inputs give the same bits (poisoned again in between).
  y_d.poison();
  flash_attention_forward(nullptr, workspace.ptr, y_d.ptr, lse_d.ptr, q_d.ptr, k_d.ptr, v_d.ptr, doc_d.ptr, shape);
  EXPECT_TRUE(y_d.get() == y_codes) << "forward not bit-identical across runs";
  dq_d.poison();
  dk_d.poison();
  dv_d.poison();
  flash_attention_backward(nullptr, workspace.ptr, dq_d.ptr, dk_d.ptr, dv_d.ptr, dy_d.ptr, y_d.ptr, lse_d.ptr, q_d.ptr,
                           k_d.ptr, v_d.ptr, doc_d.ptr, shape);
  EXPECT_TRUE(same_bits(dq_d.get(), dq)) << "dq not bit-identical across runs";
  EXPECT_TRUE(same_bits(dk_d.get(), dk)) << "dk not bit-identical across runs";
  EXPECT_TRUE(same_bits(dv_d.get(), dv)) << "dv not bit-identical across runs";
}

TEST(FlashAttention, DocumentBoundsMatchHost) {
  SKIP_WITHOUT_GPU();
  for (int T : {1, 200, 1000, 4096, 49152}) {
    for (double p : {0.0, 0.01, 0.5}) {
      std::vector<int32_t> doc = random_documents(T, p, T + static_cast<uint64_t>(p * 1000));
      if (p == 0.5 && T > 1) doc[T / 2] = -7;  // ids need not increase: runs of equal ids are documents
      const tiles::DocumentBounds want = tiles::document_bounds(doc.data(), T);
      Device<int32_t> doc_d(doc), start(T), end(T);
      Device<unsigned char> workspace(flash_attention_workspace_bytes(FlashAttentionShape{T, 1, 128, 128, 1, 0.12f}));
      start.poison();
      end.poison();
      flash_attention_document_bounds(nullptr, workspace.ptr, start.ptr, end.ptr, doc_d.ptr, T);
      const std::vector<int32_t> got_start = start.get(), got_end = end.get();
      EXPECT_TRUE(std::equal(want.start.begin(), want.start.end(), got_start.begin())) << "T=" << T << " p=" << p;
      EXPECT_TRUE(std::equal(want.end.begin(), want.end.end(), got_end.begin())) << "T=" << T << " p=" << p;
    }
  }
}

TEST(FlashAttention, MatchesCpuOnShortSequences) {
  SKIP_WITHOUT_GPU();
  uint64_t seed = 1;
  for (int window : {1, 3, 14}) {
    run_case({256, 1, 128, window, 0.01, 1.f}, seed++);
    run_case({1024, 3, 128, window, 0.003, 1.f}, seed++);
    run_case({1024, 2, 64, window, 0.02, 1.f}, seed++);
    run_case({256, 2, 32, window, 0.05, 1.f}, seed++);
  }
}

// tiny's attention (blocks of 64, 2 heads of 32) at its windows: the block size reaches
// the kernels' tile arithmetic, and each window cuts.
TEST(FlashAttention, MatchesCpuWithBlocksOf64) {
  SKIP_WITHOUT_GPU();
  for (int window : {1, 3, 8}) run_case({1024, 2, 32, window, 0.002, 1.f, true, 64}, 400 + window);
}

TEST(FlashAttention, MatchesCpuWithManyDocumentsAndSharpRows) {
  SKIP_WITHOUT_GPU();
  // Length-1 and very short documents: rows whose only visible key is themselves, and many
  // tiles with boundaries inside; q scaled up so softmax rows are nearly one-hot.
  run_case({1024, 2, 128, 3, 0.3, 1.f}, 101);
  run_case({1024, 2, 128, 14, 0.002, 4.f}, 102);
  // T not a multiple of the tiles (the model always has T % 128 == 0; the kernels do not rely on it).
  run_case({1000, 2, 128, 3, 0.01, 1.f, true}, 103);
  run_case({77, 1, 64, 1, 0.05, 1.f}, 104);
  // Window 0 acts as 1.
  run_case({512, 1, 128, 0, 0.01, 1.f}, 105);
}

TEST(FlashAttention, MatchesCpuAtT4096) {
  SKIP_WITHOUT_GPU();
  run_case({4096, 6, 128, 14, 0.0002, 1.f, true}, 201);
  run_case({4096, 4, 128, 3, 0.001, 1.f, true}, 202);
  run_case({4096, 5, 64, 1, 0.001, 1.f, true}, 203);
}

TEST(FlashAttention, MatchesCpuOnTrainingLengthSequence) {
  SKIP_WITHOUT_GPU();
  run_case({49152, 1, 128, 14, 0.001, 1.f, true}, 301);
}

// Not a test of speed (nothing is asserted on time): prints forward and backward TFLOP/s at
// the training shape. Run with --gtest_also_run_disabled_tests on a GPU.
TEST(FlashAttention, DISABLED_Benchmark) {
  SKIP_WITHOUT_GPU();
  FlashAttentionBenchmark bench;
  bench.shape = FlashAttentionShape{49152, 6, 128, 128, 14, 0.12f};
  bench.document_length = 1000;
  run_flash_attention_benchmark(bench);
  std::printf(
      "flash attention T=%d H=%d D=%d window=%d, documents ~%d tokens: %.3g visible pairs per head\n"
      "  forward  %.3f ms  %.1f TFLOP/s (4 D per visible pair)\n"
      "  forward, compact (3 blocks per SM) %.3f ms  %.1f TFLOP/s\n"
      "  backward %.3f ms  %.1f TFLOP/s (10 D per visible pair; 14 D executed)\n",
      bench.shape.T, bench.shape.H, bench.shape.D, bench.shape.window_blocks, bench.document_length,
      bench.visible_pairs, bench.forward_ms, bench.forward_tflops, bench.compact_forward_ms,
      bench.compact_forward_tflops, bench.backward_ms, bench.backward_tflops);
  EXPECT_GT(bench.forward_tflops, 0);
}

#endif  // SPEEDRUN_HAVE_CUDA

}  // namespace
}  // namespace speedrun
