// cuBLASLt matrix products for the CUDA backend. cuBLASLt is column-major: a row-major
// matrix with leading dimension ld is the column-major transpose with the same ld, so the
// row-major C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T: cuBLAS's
// first operand is our B (op = transpose_b), its second our A (op = transpose_a).
#include "backends/cuda/cuda_gemm.cuh"

#include <algorithm>
#include <cstdio>
#include <string>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {
namespace {

// The largest power of two (<= 256) dividing every matrix's address in bytes.
int64_t alignment_bytes(const void* pointer, size_t stride_elements, size_t element_bytes, int batch) {
  uint64_t bits = reinterpret_cast<uint64_t>(pointer);
  if (batch > 1) bits |= stride_elements * element_bytes;
  bits |= 256;
  return static_cast<int64_t>(bits & (~bits + 1));
}

cublasLtMatrixLayout_t make_layout(cudaDataType_t type, uint64_t rows, uint64_t cols, int64_t ld, int batch,
                                   int64_t stride) {
  cublasLtMatrixLayout_t layout = nullptr;
  SPEEDRUN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld));
  const int32_t count = batch;
  SPEEDRUN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                         sizeof(count)));
  // Set on every layout: the offset defaults to 0, which would silently reuse matrix 0.
  SPEEDRUN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                         &stride, sizeof(stride)));
  return layout;
}

}  // namespace

size_t operand_extent(int rows, int cols, int ld, size_t stride, int batch) {
  if (rows == 0 || cols == 0 || batch == 0) return 0;
  return static_cast<size_t>(batch - 1) * stride + static_cast<size_t>(rows - 1) * ld + cols;
}

LtGemm::LtGemm(cudaStream_t stream, bool bf16_inputs, int autotune_candidates)
    : stream_(stream),
      bf16_inputs_(bf16_inputs),
      autotune_candidates_(autotune_candidates),
      bf16_a_(stream),
      bf16_b_(stream),
      held_{HeldOperand(stream), HeldOperand(stream)} {
  SPEEDRUN_CUBLAS_CHECK(cublasLtCreate(&handle_));
  check_cuda(cudaMalloc(&workspace_, kWorkspaceBytes), "cudaMalloc (cuBLASLt workspace)");
}

void LtGemm::destroy(const Plan& plan) {
  if (plan.a) cublasLtMatrixLayoutDestroy(plan.a);
  if (plan.b) cublasLtMatrixLayoutDestroy(plan.b);
  if (plan.c) cublasLtMatrixLayoutDestroy(plan.c);
  if (plan.desc) cublasLtMatmulDescDestroy(plan.desc);
}

LtGemm::~LtGemm() {
  for (auto& [key, plan] : plans_) destroy(plan);
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

const LtGemm::Plan* LtGemm::plan_for(const Key& key) {
  auto found = plans_.find(key);
  if (found != plans_.end()) return &found->second;
  if (without_algorithm_.count(key)) return nullptr;
  Plan plan;
  try {
    if (!build_plan(key, plan)) {
      destroy(plan);
      without_algorithm_.insert(key);
      return nullptr;
    }
  } catch (...) {
    destroy(plan);  // what was created before the failure
    throw;
  }
  return &plans_.emplace(key, plan).first->second;
}

bool LtGemm::build_plan(const Key& key, Plan& plan) {
  describe(key, plan);
  const bool tuned = autotune_candidates_ > 1;
  const auto algorithms = candidates(key, plan, tuned ? autotune_candidates_ : 1);
  if (algorithms.empty()) return false;
  plan.algo = tuned ? fastest(key, plan, algorithms) : algorithms.front();
  return true;
}

std::vector<cublasLtMatmulAlgo_t> LtGemm::candidates(const Key& key, const Plan& plan, int wanted) {
  const uint32_t align_first = static_cast<uint32_t>(key[13]);   // our B
  const uint32_t align_second = static_cast<uint32_t>(key[12]);  // our A
  const uint32_t align_c = static_cast<uint32_t>(key[14]);
  return candidate_algorithms(handle_, plan.desc, plan.a, plan.b, plan.c, plan.c, align_first, align_second, align_c,
                              wanted, key[15] == CUDA_R_16BF);
}

void LtGemm::describe(const Key& key, Plan& plan) {
  const bool ta = key[0], tb = key[1];
  const int64_t M = key[2], N = key[3], K = key[4], lda = key[5], ldb = key[6], ldc = key[7];
  const int64_t stride_a = key[8], stride_b = key[9], stride_c = key[10];
  const int batch = static_cast<int>(key[11]);
  SPEEDRUN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_first = tb ? CUBLAS_OP_T : CUBLAS_OP_N;   // applied to our B
  const cublasOperation_t op_second = ta ? CUBLAS_OP_T : CUBLAS_OP_N;  // applied to our A
  SPEEDRUN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  SPEEDRUN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  // Stored (pre-op) column-major shapes: our B is [K,N] row-major (or [N,K] transposed),
  // i.e. column-major N x K (or K x N); likewise our A; C^T is N x M.
  const cudaDataType_t input = bf16_inputs_ ? CUDA_R_16BF : CUDA_R_32F;
  plan.a = make_layout(input, tb ? K : N, tb ? N : K, ldb, batch, stride_b);
  plan.b = make_layout(input, ta ? M : K, ta ? K : M, lda, batch, stride_a);
  plan.c = make_layout(static_cast<cudaDataType_t>(key[15]), N, M, ldc, batch, stride_c);
}

std::vector<cublasLtMatmulAlgo_t> candidate_algorithms(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                       cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                       cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                                       uint32_t align_a, uint32_t align_b, uint32_t align_c,
                                                       int wanted, bool rounded_output) {
  cublasLtMatmulPreference_t preference = nullptr;
  SPEEDRUN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
  const uint64_t workspace = LtGemm::kWorkspaceBytes;
  auto set = [&](cublasLtMatmulPreferenceAttributes_t attribute, const void* value, size_t size) {
    SPEEDRUN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, attribute, value, size));
  };
  std::vector<cublasLtMatmulHeuristicResult_t> results(static_cast<size_t>(std::max(wanted, 1)));
  int returned = 0;
  try {
    set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace));
    set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a));
    set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b));
    set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c));
    set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(align_c));
    if (rounded_output) {  // no split-K, or partial sums kept in the float32 compute type
      const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
      set(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes));
    }
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
        handle, desc, a, b, c, d, preference, static_cast<int>(results.size()), results.data(), &returned);
    // Some releases say "no algorithm" with NOT_SUPPORTED rather than a count of 0: the
    // caller's message, naming the shape, says more than the status.
    if (status == CUBLAS_STATUS_NOT_SUPPORTED) returned = 0;
    else SPEEDRUN_CUBLAS_CHECK(status);
  } catch (...) {
    cublasLtMatmulPreferenceDestroy(preference);
    throw;
  }
  cublasLtMatmulPreferenceDestroy(preference);
  std::vector<cublasLtMatmulAlgo_t> algorithms;
  for (int i = 0; i < returned; ++i) {
    if (results[i].state == CUBLAS_STATUS_SUCCESS) algorithms.push_back(results[i].algo);
  }
  return algorithms;
}

LtGemm::HeldOperand& LtGemm::held_slot(int slot) {
  if (slot < 0 || slot >= Backend::kHeldOperands) throw Error("held operand: no slot " + std::to_string(slot));
  return held_[slot];
}

// A held copy is a produced operand whose producer is the copy itself.
void LtGemm::hold(int slot, const float* x, size_t count) {
  uint16_t* codes = hold_produced(slot, x, count);
  if (!codes) return;
  to_bf16(stream_, codes, x, count);
  operand_copy_traffic_ += count * (sizeof(float) + sizeof(uint16_t));  // x read, its copy written
}

uint16_t* LtGemm::hold_produced(int slot, const float* x, size_t count) {
  HeldOperand& held = held_slot(slot);
  if (!bf16_inputs_) return nullptr;
  auto* codes = static_cast<uint16_t*>(held.copy.get(count * sizeof(uint16_t)));
  held.source = x;
  held.count = count;
  held.stored = nullptr;
  return codes;
}

bool LtGemm::hold_stored(int slot, const float* x, const uint16_t* codes, size_t count) {
  HeldOperand& held = held_slot(slot);
  if (!bf16_inputs_) return false;
  held.source = x;
  held.count = count;
  held.stored = codes;
  return true;
}

void LtGemm::release(int slot) {
  HeldOperand& held = held_slot(slot);
  held.source = nullptr;
  held.count = 0;
  held.stored = nullptr;
}

// A held operand's copy when one holds [x, x + extent) (from its start or inside it), else a
// fresh copy in `buffer`.
const void* LtGemm::rounded_operand(Scratch& buffer, const float* x, size_t extent) {
  for (HeldOperand& held : held_) {
    if (!held.source || !Backend::held_floats_cover(held.source, held.count, x, extent)) continue;
    const auto* codes =
        held.stored ? held.stored : static_cast<const uint16_t*>(held.copy.get(held.count * sizeof(uint16_t)));
    return codes + (x - held.source);
  }
  auto* copy = static_cast<uint16_t*>(buffer.get(extent * sizeof(uint16_t)));
  to_bf16(stream_, copy, x, extent);
  operand_copy_traffic_ += extent * (sizeof(float) + sizeof(uint16_t));
  return copy;
}

void LtGemm::run(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, size_t stride_a,
                 const float* B, int ldb, size_t stride_b, float beta, float* C, int ldc, size_t stride_c, int batch) {
  const void* a = A;
  const void* b = B;
  size_t element_bytes = sizeof(float);
  if (bf16_inputs_) {
    const size_t extent_a = operand_extent(ta ? K : M, ta ? M : K, lda, stride_a, batch);
    const size_t extent_b = operand_extent(tb ? N : K, tb ? K : N, ldb, stride_b, batch);
    a = rounded_operand(bf16_a_, A, extent_a);
    // X X^T (Newton-Schulz) multiplies a matrix by itself: one copy serves both operands.
    b = (B == A && extent_b <= extent_a) ? a : rounded_operand(bf16_b_, B, extent_b);
    element_bytes = sizeof(uint16_t);
  }
  const Key key{ta,
                tb,
                M,
                N,
                K,
                lda,
                ldb,
                ldc,
                static_cast<int64_t>(stride_a),
                static_cast<int64_t>(stride_b),
                static_cast<int64_t>(stride_c),
                batch,
                alignment_bytes(a, stride_a, element_bytes, batch),
                alignment_bytes(b, stride_b, element_bytes, batch),
                alignment_bytes(C, stride_c, sizeof(float), batch),
                CUDA_R_32F,
                beta != 0.f};
  const Plan* found = plan_for(key);
  auto unbatched = [&] {
    if (!warned_unbatched_) {
      std::fprintf(stderr,
                   "speedrun: warning: cuBLASLt has no algorithm for a batch of %d products M=%d N=%d K=%d (batch "
                   "strides %zu, %zu, %zu); they run one at a time (same values, more launches)\n",
                   batch, M, N, K, stride_a, stride_b, stride_c);
      warned_unbatched_ = true;
    }
    run_each(ta, tb, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc, stride_c, batch);
  };
  if (!found && batch > 1) {  // e.g. a batch stride of 0 that this cuBLASLt has no algorithm for
    unbatched();
    return;
  }
  if (!found) {
    throw Error(std::string("cuBLASLt found no ") + (bf16_inputs_ ? "bf16-input" : "float32") +
                " algorithm for M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                " lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc) +
                " batch=" + std::to_string(batch));
  }
  const Plan& plan = *found;
  const cublasStatus_t status = cublasLtMatmul(handle_, plan.desc, &alpha, b, plan.a, a, plan.b, &beta, C, plan.c, C,
                                               plan.c, &plan.algo, workspace_, kWorkspaceBytes, stream_);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED && batch > 1) {
    // The heuristic's algorithm refused at the call (as FP8's are on the H200, cuda_fp8_head):
    // this batch shape runs one product at a time from now on.
    destroy(plan);
    plans_.erase(key);
    without_algorithm_.insert(key);
    unbatched();
    return;
  }
  SPEEDRUN_CUBLAS_CHECK(status);
}

// A batch as that many single products (the same sums, each matrix alone).
void LtGemm::run_each(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, size_t stride_a,
                      const float* B, int ldb, size_t stride_b, float beta, float* C, int ldc, size_t stride_c,
                      int batch) {
  for (int i = 0; i < batch; ++i) {
    run(ta, tb, M, N, K, alpha, A + i * stride_a, lda, 0, B + i * stride_b, ldb, 0, beta, C + i * stride_c, ldc, 0, 1);
  }
}

// The addend is cuBLASLt's C with beta = 1, in D's layout (bf16, ldc): D = AB + C is formed
// in the float32 compute type and rounded to bf16 once, by the epilogue. Without one, C is
// D itself with beta = 0 (never read).
bool LtGemm::run_to_bf16(bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                         const uint16_t* addend, uint16_t* C, int ldc) {
  if (!bf16_inputs_) throw Error("LtGemm::run_to_bf16 needs bf16 inputs");
  const void* a = rounded_operand(bf16_a_, A, operand_extent(ta ? K : M, ta ? M : K, lda, 0, 1));
  const void* b = rounded_operand(bf16_b_, B, operand_extent(tb ? N : K, tb ? K : N, ldb, 0, 1));
  const void* c = addend ? static_cast<const void*>(addend) : C;
  const Key key{ta, tb, M, N, K, lda, ldb, ldc, 0, 0, 0, 1,
                alignment_bytes(a, 0, sizeof(uint16_t), 1),
                alignment_bytes(b, 0, sizeof(uint16_t), 1),
                std::min(alignment_bytes(c, 0, sizeof(uint16_t), 1), alignment_bytes(C, 0, sizeof(uint16_t), 1)),
                CUDA_R_16BF,
                addend != nullptr};
  const Plan* plan = plan_for(key);
  if (!plan) return false;
  const float alpha = 1.f, beta = addend ? 1.f : 0.f;
  SPEEDRUN_CUBLAS_CHECK(cublasLtMatmul(handle_, plan->desc, &alpha, b, plan->a, a, plan->b, &beta, c, plan->c, C,
                                       plan->c, &plan->algo, workspace_, kWorkspaceBytes, stream_));
  return true;
}

}  // namespace speedrun::cuda
