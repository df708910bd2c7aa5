// cpu::sgemm, every CPU product: the same bits at any thread count (OpenBLAS's own threading
// does not give that), the product cblas_sgemm defines for every transposition, leading
// dimension, alpha and beta, and tiles fixed by the shape alone.
#include "backends/cpu/cpu_gemm.h"

#include <gtest/gtest.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "support/finite_difference.h"

namespace speedrun {
namespace {

using testing::random_vector;

struct Product {
  bool ta, tb;
  int M, N, K, pad;  // pad: extra floats in each leading dimension
  float alpha, beta;
};

// Shapes like the tiny and micro models' products (the head's 50304 columns cut into tiles),
// each transposition, padded rows, alpha and beta, and K = 0 (C scaled by beta alone).
const std::vector<Product>& products() {
  static const std::vector<Product> list = {
      {false, true, 128, 50304, 64, 0, 1.f, 0.f}, {false, false, 128, 64, 50304, 0, 1.f, 0.f},
      {true, false, 50304, 64, 128, 0, 1.f, 1.f}, {false, true, 4096, 256, 64, 3, 1.f, 0.f},
      {true, true, 300, 700, 96, 5, 0.5f, -2.f},  {true, false, 64, 64, 4096, 0, 1.f, 0.f},
      {false, false, 37, 1000, 33, 1, 2.f, 0.25f}, {false, true, 9, 7, 0, 2, 1.f, 3.f},
  };
  return list;
}

struct Operands {
  std::vector<float> a, b, c;
  int lda, ldb, ldc;
};

Operands operands_for(const Product& p, uint64_t seed) {
  Operands o;
  o.lda = (p.ta ? p.M : p.K) + p.pad;
  o.ldb = (p.tb ? p.K : p.N) + p.pad;
  o.ldc = p.N + p.pad;
  o.a = random_vector(static_cast<size_t>(p.ta ? p.K : p.M) * o.lda, seed);
  o.b = random_vector(static_cast<size_t>(p.tb ? p.N : p.K) * o.ldb, seed + 1);
  o.c = random_vector(static_cast<size_t>(p.M) * o.ldc, seed + 2);
  return o;
}

std::vector<float> product_on_threads(const Product& p, const Operands& o, int threads) {
#ifdef _OPENMP
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
#endif
  std::vector<float> c = o.c;
  cpu::sgemm(p.ta, p.tb, p.M, p.N, p.K, p.alpha, o.a.data(), o.lda, o.b.data(), o.ldb, p.beta, c.data(), o.ldc);
#ifdef _OPENMP
  omp_set_num_threads(before);
#endif
  return c;
}

TEST(CpuGemm, TheThreadCountChangesNoBit) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP: one thread only";
#endif
  for (const Product& p : products()) {
    SCOPED_TRACE(std::to_string(p.M) + "x" + std::to_string(p.N) + "x" + std::to_string(p.K));
    const Operands o = operands_for(p, 11);
    const std::vector<float> one = product_on_threads(p, o, 1);
    for (int threads : {2, 3}) {
      const std::vector<float> many = product_on_threads(p, o, threads);
      EXPECT_EQ(std::memcmp(one.data(), many.data(), one.size() * sizeof(float)), 0) << threads << " threads";
    }
  }
}

// Against float64 sums: each output within float32's rounding of its sum of |products|, and
// the padding between rows of C untouched.
TEST(CpuGemm, ComputesTheCblasProductForEveryLayout) {
  for (const Product& p : products()) {
    SCOPED_TRACE(std::to_string(p.M) + "x" + std::to_string(p.N) + "x" + std::to_string(p.K) + " ta " +
                 std::to_string(p.ta) + " tb " + std::to_string(p.tb));
    const Operands o = operands_for(p, 5);
    const std::vector<float> c = product_on_threads(p, o, 2);
    size_t wrong = 0;
    // Every output of a small product; of a large one every `stride`-th, on every row and column.
    const int stride = static_cast<int>(std::max<int64_t>(1, int64_t{p.M} * p.N * std::max(p.K, 1) / 20'000'000)) | 1;
    for (int i = 0; i < p.M; ++i) {
      for (int j = i % stride; j < p.N; j += stride) {
        double sum = 0, magnitude = 0;
        for (int k = 0; k < p.K; ++k) {
          const double a = p.ta ? o.a[static_cast<size_t>(k) * o.lda + i] : o.a[static_cast<size_t>(i) * o.lda + k];
          const double b = p.tb ? o.b[static_cast<size_t>(j) * o.ldb + k] : o.b[static_cast<size_t>(k) * o.ldb + j];
          sum += a * b;
          magnitude += std::fabs(a * b);
        }
        const size_t at = static_cast<size_t>(i) * o.ldc + j;
        const double expected = p.alpha * sum + p.beta * o.c[at];
        const double bound = 1e-5 * (std::fabs(p.alpha) * magnitude + std::fabs(p.beta * o.c[at])) + 1e-30;
        wrong += !(std::fabs(c[at] - expected) <= bound);
      }
      for (int j = p.N; j < o.ldc; ++j) {
        const size_t at = static_cast<size_t>(i) * o.ldc + j;
        wrong += std::memcmp(&c[at], &o.c[at], sizeof(float)) != 0;
      }
    }
    EXPECT_EQ(wrong, 0u);
  }
}

TEST(CpuGemm, TilesAreFixedByTheShapeAndCoverTheOutput) {
  for (const Product& p : products()) {
    const cpu::GemmTiling t = cpu::gemm_tiling(p.M, p.N, p.K);
    const int extent = t.by_rows ? p.M : p.N;
    EXPECT_EQ(t.by_rows, p.M >= p.N);
    EXPECT_LE(t.tiles, 64);
    EXPECT_GE(static_cast<int64_t>(t.tiles) * t.tile, extent);
    EXPECT_LT(static_cast<int64_t>(t.tiles - 1) * t.tile, extent);
    EXPECT_TRUE(t.tile % 16 == 0 || t.tile == extent) << t.tile;
  }
  const cpu::GemmTiling head = cpu::gemm_tiling(512, 50304, 64);  // the tiny model's head
  EXPECT_FALSE(head.by_rows);
  EXPECT_EQ(head.tile, 800);
  EXPECT_EQ(head.tiles, 63);
  const cpu::GemmTiling small = cpu::gemm_tiling(64, 64, 64);  // too little work to share
  EXPECT_EQ(small.tiles, 1);
}

}  // namespace
}  // namespace speedrun
