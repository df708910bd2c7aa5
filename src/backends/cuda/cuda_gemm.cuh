// Row-major float32 matrix products through cuBLASLt, with the matmul descriptors and the
// chosen algorithm cached per shape, strides and alignment. Two kinds: float32 throughout
// (FP32 compute, no TF32), or SPEC §6's bf16 inputs: both operands rounded to bf16 (nearest
// even, exactly as the CPU backend's emulation) into scratch copies, multiplied on the
// tensor cores with float32 accumulation and a float32 C. The copies cost 6 bytes per
// operand element; they go away once activations are stored in bf16.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <vector>

#include "backends/backend.h"
#include "backends/cuda/cuda_common.cuh"
#include "backends/matmul_sweep.h"

namespace speedrun::cuda {

// cuBLASLt's heuristic choices for `desc` over the layouts a, b, c (input) and d (output)
// within LtGemm's workspace and the given operand alignments in bytes (D shares C's), best
// first, at most `wanted` of them; empty when it has none for this problem. A bf16 output
// (rounded_output) admits no split-K reduction in the output type: its partial sums would
// be rounded to bf16 before they are added.
std::vector<cublasLtMatmulAlgo_t> candidate_algorithms(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                       cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                       cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                                       uint32_t align_a, uint32_t align_b, uint32_t align_c,
                                                       int wanted, bool rounded_output = false);

// Floats (or codes) an operand spans: `batch` matrices of rows x cols (leading dimension ld),
// `stride` apart. A bf16 copy covers the gaps too, so that ld and stride apply to it unchanged.
size_t operand_extent(int rows, int cols, int ld, size_t stride, int batch);

class LtGemm {
 public:
  // autotune_candidates > 1: each new plan times up to that many of the heuristic's
  // candidates and runs the fastest (BackendOptions::autotune_matmuls).
  LtGemm(cudaStream_t stream, bool bf16_inputs, int autotune_candidates = 0);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // The Backend::gemm_batched contract: C[i] = alpha op(A[i]) op(B[i]) + beta C[i], row-major,
  // matrix i at pointer + i * stride. Requires K > 0 (the caller scales C when K == 0).
  void run(bool transpose_a, bool transpose_b, int M, int N, int K, float alpha, const float* A, int lda,
           size_t stride_a, const float* B, int ldb, size_t stride_b, float beta, float* C, int ldc, size_t stride_c,
           int batch);
  // Backend::gemm_to_bf16 with bf16 inputs: C (bf16 codes, leading dimension ldc) =
  // bf16(op(A) op(B) + addend), rounded by cuBLASLt's epilogue from the float32 accumulator
  // plus the addend (cuBLASLt's C, beta = 1: bf16 codes laid out as C, or null for none; it
  // may be C itself). Requires bf16 inputs and K > 0.
  // False, nothing written, when cuBLASLt has no algorithm with a bf16 output for it.
  bool run_to_bf16(bool transpose_a, bool transpose_b, int M, int N, int K, const float* A, int lda, const float* B,
                   int ldb, const uint16_t* addend, uint16_t* C, int ldc);
  bool bf16_inputs() const { return bf16_inputs_; }

  static constexpr size_t kWorkspaceBytes = size_t{32} << 20;
  // Backend::hold_operand / release_operand (no-ops with float32 inputs).
  void hold(int slot, const float* x, size_t count);
  // Backend::hold_produced_operand: the slot's code buffer (nullptr with float32 inputs).
  uint16_t* hold_produced(int slot, const float* x, size_t count);
  // Backend::hold_stored_operand: false (nothing held) with float32 inputs.
  bool hold_stored(int slot, const float* x, const uint16_t* codes, size_t count);
  void release(int slot);
  // Bytes the bf16 operand copies have moved so far (Backend::operand_copy_traffic_bytes).
  size_t operand_copy_traffic_bytes() const { return operand_copy_traffic_; }
  // The matmul sweep (matmul_sweep.h; in cuda_matmul_sweep.cu): up to `wanted` of the
  // heuristic's candidates for a dense product of `shape` with operands aligned as
  // cudaMalloc's, best first, each timed over `repeats` runs. Requires bf16 inputs.
  std::vector<AlgorithmTiming> time_candidates(const ProductShape& shape, int wanted, int repeats);
  // The plans whose algorithm was chosen by timing, in the order they were made.
  const std::vector<MatmulTuning>& tunings() const { return tunings_; }

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;  // cuBLAS's (column-major) operands
    cublasLtMatmulAlgo_t algo{};
  };
  // ta, tb, M, N, K, lda, ldb, ldc, strides a, b, c, batch, alignments a, b, c (the least of
  // C's and D's), C's type, whether C is read (gemm_to_bf16's addend; run()'s C in place when
  // beta != 0). The plan is built alike either way: the last entry keeps apart plans whose C
  // alignment was measured over different pointers, and tells a tuning what to time.
  using Key = std::array<int64_t, 17>;
  // The plan for key; nullptr when cuBLASLt has no algorithm for it (remembered).
  const Plan* plan_for(const Key& key);
  bool build_plan(const Key& key, Plan& plan);  // false when no algorithm exists
  void describe(const Key& key, Plan& plan);     // the plan's descriptor and layouts, no algorithm
  // Up to `wanted` of the heuristic's algorithms for a described plan, best first.
  std::vector<cublasLtMatmulAlgo_t> candidates(const Key& key, const Plan& plan, int wanted);
  static void destroy(const Plan& plan);        // frees what the plan holds (null members skipped)
  // (cuda_gemm_tuning.cu) Each of `algorithms`, candidates for the described plan of `key`,
  // timed over `repeats` runs on random operands laid out as the key says, in fresh device
  // memory (the plan's own operands are left alone: C may be accumulated into).
  std::vector<AlgorithmTiming> time_algorithms(const Key& key, const Plan& plan,
                                               const std::vector<cublasLtMatmulAlgo_t>& algorithms, int repeats);
  // The fastest of `algorithms` that ran (the first when none did), recorded in tunings_.
  cublasLtMatmulAlgo_t fastest(const Key& key, const Plan& plan, const std::vector<cublasLtMatmulAlgo_t>& algorithms);
  static ProductShape shape_of(const Key& key);

  // run() over a batch one matrix at a time: for a batched layout cuBLASLt has no algorithm for.
  void run_each(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, size_t stride_a,
                const float* B, int ldb, size_t stride_b, float beta, float* C, int ldc, size_t stride_c, int batch);
  // The bf16 copy of an operand spanning `extent` floats from x, in `buffer`.
  const void* rounded_operand(Scratch& buffer, const float* x, size_t extent);
  struct HeldOperand {
    explicit HeldOperand(cudaStream_t stream) : copy(stream) {}
    Scratch copy;
    const float* source = nullptr;
    size_t count = 0;
    const uint16_t* stored = nullptr;  // hold_stored's codes, read in place of `copy`
  };
  HeldOperand& held_slot(int slot);  // throws speedrun::Error for a slot out of range

  cudaStream_t stream_;
  const bool bf16_inputs_;
  const int autotune_candidates_;
  std::vector<MatmulTuning> tunings_;
  bool warned_unbatched_ = false;  // run_each's warning, printed once
  Scratch bf16_a_, bf16_b_;  // operand copies (bf16_inputs_); grown to the largest, never shrunk
  size_t operand_copy_traffic_ = 0;
  HeldOperand held_[Backend::kHeldOperands];
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::map<Key, Plan> plans_;
  std::set<Key> without_algorithm_;  // keys cuBLASLt's heuristic had nothing for
};

}  // namespace speedrun::cuda
