#include "backends/cpu/cpu_gemm.h"

#include <cblas.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>

namespace speedrun::cpu {
namespace {

constexpr int kMaxTiles = 64;                        // enough to share among a workstation's cores
constexpr int64_t kMinTileFlops = int64_t{1} << 23;  // below this a tile is mostly OpenBLAS's packing
constexpr int kTileMultiple = 16;                    // whole register blocks of OpenBLAS's kernels
constexpr int kMinTile = 128;                        // each tile packs the other operand whole again

// OpenBLAS on one thread: every product is cut by sgemm below. The pthread build keeps
// openblas_set_num_threads(1). The OpenMP build takes OpenMP's thread count anew at every
// call (and setting its own count resets OpenMP's, which is put back): it runs one thread
// inside a parallel region, and outside one the count is 1 around the call (OneThreadForBlas).
void use_single_threaded_openblas() {
  static std::once_flag once;
  std::call_once(once, [] {
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
    openblas_set_num_threads(1);
    omp_set_num_threads(threads);
#else
    openblas_set_num_threads(1);
#endif
  });
}

// OpenMP's thread count 1 while it lives (the calling thread's setting only).
class OneThreadForBlas {
 public:
#ifdef _OPENMP
  OneThreadForBlas() : threads_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneThreadForBlas() { omp_set_num_threads(threads_); }

 private:
  int threads_;
#endif
};

CBLAS_TRANSPOSE op(bool transpose) { return transpose ? CblasTrans : CblasNoTrans; }

}  // namespace

GemmTiling gemm_tiling(int M, int N, int K) {
  GemmTiling tiling;
  tiling.by_rows = M >= N;
  const int extent = tiling.by_rows ? M : N, other = tiling.by_rows ? N : M;
  int64_t tile = std::max<int64_t>(kMinTile, (extent + kMaxTiles - 1) / kMaxTiles);
  while (tile < extent && 2 * tile * other * std::max(K, 1) < kMinTileFlops) tile *= 2;
  tile = (tile + kTileMultiple - 1) / kTileMultiple * kTileMultiple;
  tiling.tile = static_cast<int>(std::min<int64_t>(tile, std::max(extent, 1)));
  tiling.tiles = extent == 0 ? 0 : (extent + tiling.tile - 1) / tiling.tile;
  return tiling;
}

void sgemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
           float beta, float* C, int ldc) {
  use_single_threaded_openblas();
  const GemmTiling tiling = gemm_tiling(M, N, K);
  const auto product = [&](int t) {
    const int begin = t * tiling.tile;
    const int count = std::min(tiling.tile, (tiling.by_rows ? M : N) - begin);
    const size_t b = static_cast<size_t>(begin);
    if (tiling.by_rows) {  // rows of op(A) and C: columns of a stored-transposed A
      cblas_sgemm(CblasRowMajor, op(ta), op(tb), count, N, K, alpha, ta ? A + b : A + b * lda, lda, B, ldb, beta,
                  C + b * ldc, ldc);
    } else {  // columns of op(B) and C: rows of a stored-transposed B
      cblas_sgemm(CblasRowMajor, op(ta), op(tb), M, count, K, alpha, A, lda, tb ? B + b * ldb : B + b, ldb, beta,
                  C + b, ldc);
    }
  };
  if (tiling.tiles == 1) {
    const OneThreadForBlas one_thread;
    return product(0);
  }
#pragma omp parallel for schedule(static)
  for (int t = 0; t < tiling.tiles; ++t) product(t);
}

}  // namespace speedrun::cpu
