// Row-major float32 matrix products through OpenBLAS whose bits do not depend on the number
// of threads. OpenBLAS's own threading cuts a product by the thread count, and its kernels
// round the pieces' edges differently: on its Haswell kernels a 2-thread sgemm differs from
// the 1-thread one in 3-29% of the outputs, so a run, its resume and its eval would
// agree only at one thread count. Here the output is cut into tiles fixed by the shape
// alone, each multiplied by OpenBLAS on one thread, the tiles shared among OpenMP's threads.
#pragma once

namespace speedrun::cpu {

// C = alpha op(A) op(B) + beta C, as cblas_sgemm with CblasRowMajor (op = transpose when ta/tb).
void sgemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
           float beta, float* C, int ldc);

// How sgemm cuts a product: along C's rows (M >= N) or columns, `tile` of them at a time.
struct GemmTiling {
  bool by_rows = true;
  int tile = 0;
  int tiles = 0;
};
GemmTiling gemm_tiling(int M, int N, int K);

}  // namespace speedrun::cpu
