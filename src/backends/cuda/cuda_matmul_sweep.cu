// `speedrun bench --sweep-matmuls`: cuBLASLt's candidate algorithms for one product of the
// step, each timed alone on random operands (matmul_sweep.h). The descriptors are LtGemm's
// own (LtGemm::describe) and the clock its tuning's (cuda_gemm_tuning.cu), so what is timed
// is what the backend would run.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/cuda_common.cuh"
#include "backends/cuda/cuda_gemm.cuh"
#include "backends/matmul_sweep.h"

namespace speedrun {
namespace cuda {
namespace {

void check_sweep_arguments(const ProductShape& s, int wanted, int repeats) {
  if (s.M <= 0 || s.N <= 0 || s.K <= 0 || s.batch < 1 || wanted < 1 || repeats < 1) {
    throw Error("matmul sweep: invalid request '" + product_shape_name(s) + "', " + std::to_string(wanted) +
                " candidates, " + std::to_string(repeats) + " repeats");
  }
}

}  // namespace

std::vector<AlgorithmTiming> LtGemm::time_candidates(const ProductShape& s, int wanted, int repeats) {
  if (!bf16_inputs_) throw Error("LtGemm::time_candidates needs bf16 inputs");
  check_sweep_arguments(s, wanted, repeats);
  const size_t count_a = static_cast<size_t>(s.M) * s.K, count_b = static_cast<size_t>(s.K) * s.N;
  const size_t count_c = static_cast<size_t>(s.M) * s.N;
  const bool batched = s.batch > 1;
  constexpr int64_t kAligned = 256;  // cudaMalloc's
  // As run() and run_to_bf16() key a dense product (leading dimensions the row lengths).
  const Key key{s.transpose_a,
                s.transpose_b,
                s.M,
                s.N,
                s.K,
                s.transpose_a ? s.M : s.K,
                s.transpose_b ? s.K : s.N,
                s.N,
                batched ? static_cast<int64_t>(count_a) : 0,
                batched ? static_cast<int64_t>(count_b) : 0,
                batched ? static_cast<int64_t>(count_c) : 0,
                s.batch,
                kAligned,
                kAligned,
                kAligned,
                s.bf16_output ? CUDA_R_16BF : CUDA_R_32F,
                s.adds_to_c};
  Plan plan;
  struct Destroy {
    Plan& plan;
    ~Destroy() { LtGemm::destroy(plan); }
  } destroy_plan{plan};
  describe(key, plan);
  return time_algorithms(key, plan, candidates(key, plan, wanted), repeats);
}

}  // namespace cuda

std::vector<AlgorithmTiming> sweep_product_algorithms(int device, const ProductShape& shape, int candidates,
                                                      int repeats) {
  cuda::check_sweep_arguments(shape, candidates, repeats);
  SPEEDRUN_CUDA_CHECK(cudaSetDevice(device));
  cudaStream_t stream = nullptr;
  SPEEDRUN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct DestroyStream {
    cudaStream_t stream;
    ~DestroyStream() { cudaStreamDestroy(stream); }
  } destroy_stream{stream};
  cuda::LtGemm gemm(stream, /*bf16_inputs=*/true);
  return gemm.time_candidates(shape, candidates, repeats);
}

}  // namespace speedrun
