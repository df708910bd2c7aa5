// `speedrun bench --sweep-matmuls`: cuBLASLt's candidate algorithms for one product of the
// step, each timed alone on random operands (matmul_sweep.h). The descriptors are LtGemm's
// own (LtGemm::describe), so what is timed is what the backend would run.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/cuda_common.cuh"
#include "backends/cuda/cuda_gemm.cuh"
#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/cuda_bench_support.cuh"
#include "backends/matmul_sweep.h"

namespace speedrun {
namespace cuda {
namespace {

// One attribute of an algorithm's configuration as text, "?" where cuBLASLt has no value
// for it (a description must not fail the sweep it describes).
template <class T>
std::string config_attribute(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attribute) {
  T value{};
  size_t written = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoConfigGetAttribute(&algo, attribute, &value, sizeof(value), &written);
  if (status != CUBLAS_STATUS_SUCCESS || written != sizeof(value)) return "?";
  return std::to_string(value);
}

// The ids cublasLt.h enumerates (tile, stages, cluster shape) as numbers, the rest as values.
std::string describe_algorithm(const cublasLtMatmulAlgo_t& algo) {
  return "algo " + config_attribute<int32_t>(algo, CUBLASLT_ALGO_CONFIG_ID) +
         " tile " + config_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_TILE_ID) +
         " stages " + config_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID) +
         " split-k " + config_attribute<int32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) +
         " reduction " + config_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME) +
         " swizzle " + config_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING) +
         " cluster " + config_attribute<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID);
}

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
  const size_t count_c = static_cast<size_t>(s.M) * s.N, batch = static_cast<size_t>(s.batch);
  const bool batched = s.batch > 1, addend = s.bf16_output && s.adds_to_c;
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
                addend};
  Plan plan;
  struct Destroy {
    Plan& plan;
    ~Destroy() { LtGemm::destroy(plan); }
  } destroy_plan{plan};
  describe(key, plan);
  const std::vector<cublasLtMatmulAlgo_t> algorithms = candidates(key, plan, wanted);

  const size_t c_bytes = count_c * batch * (s.bf16_output ? sizeof(uint16_t) : sizeof(float));
  DeviceBuffer<uint16_t> a(count_a * batch), b(count_b * batch), addend_codes(addend ? count_c * batch : 0);
  DeviceBuffer<unsigned char> c(c_bytes);
  fill_random_bf16(stream_, a.ptr, count_a * batch, 1, 1.f);
  fill_random_bf16(stream_, b.ptr, count_b * batch, 2, 1.f);
  if (addend) fill_random_bf16(stream_, addend_codes.ptr, count_c * batch, 3, 1.f);
  SPEEDRUN_CUDA_CHECK(cudaMemsetAsync(c.ptr, 0, c_bytes, stream_));
  const float alpha = 1.f, beta = s.adds_to_c ? 1.f : 0.f;
  // float32 +C adds in place, as run() does
  const void* c_in = addend ? static_cast<const void*>(addend_codes.ptr) : c.ptr;

  std::vector<AlgorithmTiming> timings;
  for (size_t i = 0; i < algorithms.size(); ++i) {
    AlgorithmTiming timing;
    timing.rank = static_cast<int>(i);
    timing.config = describe_algorithm(algorithms[i]);
    // cuBLAS's first operand is our B, its second our A (cuda_gemm.cu's header).
    const auto launch = [&] {
      return cublasLtMatmul(handle_, plan.desc, &alpha, b.ptr, plan.a, a.ptr, plan.b, &beta, c_in, plan.c, c.ptr,
                            plan.c, &algorithms[i], workspace_, kWorkspaceBytes, stream_);
    };
    const cublasStatus_t status = launch();
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) {
      SPEEDRUN_CUBLAS_CHECK(status);
      timing.ms = median_ms(stream_, repeats, [&] { SPEEDRUN_CUBLAS_CHECK(launch()); });
    }
    timings.push_back(timing);
  }
  SPEEDRUN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return timings;
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
