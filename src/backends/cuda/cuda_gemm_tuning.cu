// Choosing a product's cuBLASLt algorithm by timing: LtGemm's candidates for one plan, each
// run alone on random operands laid out as the plan's (--autotune-matmuls), and the
// configuration text the matmul sweep and the tunings report.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "backends/cuda/cuda_bench_support.cuh"
#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/cuda_gemm.cuh"
#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kTuningRepeats = 5;  // after median_ms's two untimed runs

// One attribute of an algorithm's configuration as text, "?" where cuBLASLt has no value
// for it (a description must not fail what it describes).
template <class T>
std::string config_attribute(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attribute) {
  T value{};
  size_t written = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoConfigGetAttribute(&algo, attribute, &value, sizeof(value), &written);
  if (status != CUBLAS_STATUS_SUCCESS || written != sizeof(value)) return "?";
  return std::to_string(value);
}

// Random finite values in `count` elements of `bytes_per_element` (2: bf16 codes; 4: float32,
// whose upper half is a random bf16 code and lower half random mantissa bits, little-endian).
void fill_random(cudaStream_t stream, void* x, size_t count, size_t bytes_per_element, uint32_t seed) {
  fill_random_bf16(stream, static_cast<uint16_t*>(x), count * (bytes_per_element / sizeof(uint16_t)), seed, 1.f);
}

// An algorithm's configuration as text: cuBLASLt's algorithm id, tile and stages ids (the
// numbers cublasLt.h enumerates), split-K, reduction, swizzle, cluster.
std::string describe_algorithm(const cublasLtMatmulAlgo_t& algo) {
  return "algo " + config_attribute<int32_t>(algo, CUBLASLT_ALGO_CONFIG_ID) +
         " tile " + config_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_TILE_ID) +
         " stages " + config_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID) +
         " split-k " + config_attribute<int32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) +
         " reduction " + config_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME) +
         " swizzle " + config_attribute<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING) +
         " cluster " + config_attribute<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID);
}

}  // namespace

ProductShape LtGemm::shape_of(const Key& key) {
  ProductShape shape;
  shape.transpose_a = key[0] != 0;
  shape.transpose_b = key[1] != 0;
  shape.M = static_cast<int>(key[2]);
  shape.N = static_cast<int>(key[3]);
  shape.K = static_cast<int>(key[4]);
  shape.batch = static_cast<int>(key[11]);
  shape.bf16_output = key[15] == CUDA_R_16BF;
  shape.adds_to_c = key[16] != 0;
  return shape;
}

std::vector<AlgorithmTiming> LtGemm::time_algorithms(const Key& key, const Plan& plan,
                                                     const std::vector<cublasLtMatmulAlgo_t>& algorithms,
                                                     int repeats) {
  const ProductShape s = shape_of(key);
  const int lda = static_cast<int>(key[5]), ldb = static_cast<int>(key[6]), ldc = static_cast<int>(key[7]);
  const size_t count_a = operand_extent(s.transpose_a ? s.K : s.M, s.transpose_a ? s.M : s.K, lda, key[8], s.batch);
  const size_t count_b = operand_extent(s.transpose_b ? s.N : s.K, s.transpose_b ? s.K : s.N, ldb, key[9], s.batch);
  const size_t count_c = operand_extent(s.M, s.N, ldc, key[10], s.batch);
  const size_t input_bytes = bf16_inputs_ ? sizeof(uint16_t) : sizeof(float);
  const size_t output_bytes = s.bf16_output ? sizeof(uint16_t) : sizeof(float);
  // A bf16 output reads its addend from a buffer of its own; a float32 one adds in place, as run() does.
  const bool addend = s.bf16_output && s.adds_to_c;
  DeviceBuffer<unsigned char> a(count_a * input_bytes), b(count_b * input_bytes), c(count_c * output_bytes);
  DeviceBuffer<unsigned char> addend_codes(addend ? count_c * output_bytes : 0);
  fill_random(stream_, a.ptr, count_a, input_bytes, 1);
  fill_random(stream_, b.ptr, count_b, input_bytes, 2);
  fill_random(stream_, c.ptr, count_c, output_bytes, 3);
  if (addend) fill_random(stream_, addend_codes.ptr, count_c, output_bytes, 4);
  const float alpha = 1.f, beta = s.adds_to_c ? 1.f : 0.f;
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
  SPEEDRUN_CUDA_CHECK(cudaStreamSynchronize(stream_));  // before the buffers are freed
  return timings;
}

cublasLtMatmulAlgo_t LtGemm::fastest(const Key& key, const Plan& plan,
                                     const std::vector<cublasLtMatmulAlgo_t>& algorithms) {
  MatmulTuning tuning;
  tuning.shape = product_shape_name(shape_of(key));
  std::vector<AlgorithmTiming> timings;
  try {
    timings = time_algorithms(key, plan, algorithms, kTuningRepeats);
  } catch (const Error& e) {
    // No memory for the timing's operands (the run itself may still fit), or another failure
    // of the timing alone: the heuristic's first, said so in the record, rather than a
    // failed step. The allocation's error is not sticky; it is cleared so that the next
    // launch check does not report it.
    cudaGetLastError();
    tuning.config = std::string("not timed: ") + e.what();
    tunings_.push_back(tuning);
    return algorithms.front();
  }
  size_t chosen = 0;
  for (size_t i = 0; i < timings.size(); ++i) {
    if (timings[i].ms >= 0 && (timings[chosen].ms < 0 || timings[i].ms < timings[chosen].ms)) chosen = i;
  }
  if (timings.empty() || timings[chosen].ms < 0) {  // every candidate refused at the call: as untuned
    tuning.config = "not timed: cuBLASLt refused every candidate at the call";
    tunings_.push_back(tuning);
    return algorithms.front();
  }
  tuning.timed = static_cast<int>(timings.size());
  tuning.chosen_rank = static_cast<int>(chosen);
  tuning.heuristic_ms = timings.front().ms;
  tuning.chosen_ms = timings[chosen].ms;
  tuning.config = timings[chosen].config;
  tunings_.push_back(tuning);
  return algorithms[chosen];
}

}  // namespace speedrun::cuda
