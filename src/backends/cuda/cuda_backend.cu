// The CUDA backend: float32 storage on one device and one stream (matmul inputs in bf16 and
// the bf16 flash attention kernel when BackendOptions ask), computing the same functions
// as the CPU backend (cuBLASLt for products, own kernels for the rest). Every CUDA and
// cuBLASLt call is checked; reductions and gradients are deterministic run to run.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backends/allocation_tracker.h"
#include "backends/backend.h"
#include "backends/cuda_devices.h"
#include "backends/cuda/cuda_gemm.cuh"
#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun {
namespace cuda {

// The FP8 lm_head (cuda_fp8_head.cu); Fp8Head keeps the quantised weight between calls.
class Fp8Head;
struct Fp8HeadDeleter {
  void operator()(Fp8Head* head) const;
};
std::unique_ptr<Fp8Head, Fp8HeadDeleter> make_fp8_head(cudaStream_t stream, LtGemm& gemm, bool emulate);
void fp8_head_forward(Fp8Head& head, float* logits, const float* x, const float* W, int rows, int V, int d,
                      bool requantize_weight);
void fp8_head_backward(Fp8Head& head, float* dx, float* dW, const float* dlogits, const float* x, const float* W,
                       int rows, int V, int d, float output_scale);
void fp8_head_loss(Fp8Head& head, float* logits, float* row_loss, float* dx, float* dW, const float* x, const float* W,
                   const int32_t* targets, int rows, int V, int d, float softcap, float loss_scale, float output_scale,
                   bool requantize_weight);

namespace {

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, const BackendOptions& options)
      : device_(device),
        flash_attention_(options.attention == AttentionKernel::kFlash),
        bf16_matmul_(options.matmul == MatmulPrecision::kBfloat16),
        emulate_fp8_head_(options.emulate_fp8_head),
        head_chunk_rows_(head_chunk_rows_for("cuda", options)) {
    // A machine without a GPU or its driver fails here: say so, not which call failed.
    const CudaDeviceQuery visible = query_cuda_devices();
    if (!visible.error.empty()) {
      throw Error("the CUDA backend: " + visible.error + "; `speedrun device` lists what this machine has");
    }
    const int count = static_cast<int>(visible.devices.size());
    if (device < 0 || device >= count) {
      throw Error("CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) +
                  " device(s) visible)");
    }
    SPEEDRUN_CUDA_CHECK(cudaSetDevice(device));
    SPEEDRUN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    gemm_ = std::make_unique<LtGemm>(stream_, bf16_matmul_, options.autotune_matmuls);
    reduce_scratch_ = std::make_unique<Scratch>(stream_);
    result_scratch_ = std::make_unique<Scratch>(stream_);
    op_scratch_ = std::make_unique<Scratch>(stream_);
    reference_inputs_ = std::make_unique<Scratch>(stream_);
  }

  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (auto& [key, freq] : rotary_freqs_) cudaFree(freq);
    fp8_head_.reset();
    op_scratch_.reset();
    reference_inputs_.reset();
    result_scratch_.reset();
    reduce_scratch_.reset();
    gemm_.reset();
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  // By default 2048 x 50304 floats = 412 MB: products of this height fill all 132 SMs of an
  // H100, and dW's [V, d] is read and written T / 2048 times instead of T / 256.
  int head_chunk_rows() const override { return head_chunk_rows_; }
  size_t peak_memory_bytes() const override { return allocations_.peak(); }
  size_t operand_copy_traffic_bytes() const override { return gemm_ ? gemm_->operand_copy_traffic_bytes() : 0; }
  std::vector<MatmulTuning> matmul_tunings() const override { return gemm_->tunings(); }
  void hold_operand(int slot, const float* x, size_t count) override { gemm_->hold(slot, x, count); }
  uint16_t* hold_produced_operand(int slot, const float* x, size_t count) override {
    return gemm_->hold_produced(slot, x, count);
  }
  bool hold_stored_operand(int slot, const float* x, const uint16_t* codes, size_t count) override {
    return gemm_->hold_stored(slot, x, codes, count);
  }
  void release_operand(int slot) override { gemm_->release(slot); }
  size_t device_memory_in_use() const override {
    size_t free_bytes = 0, total_bytes = 0;
    SPEEDRUN_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    return total_bytes - free_bytes;
  }

  // --- memory ---------------------------------------------------------------------------
  // Lent memory serves the operations' temporaries: at validation that is the flash
  // kernel's bf16 copies of q, k and v (1.2 GB at 262144 tokens) and its workspace.
  void lend_scratch(float* memory, size_t bytes) override { op_scratch_->lend(memory, bytes); }
  void withdraw_scratch() override { op_scratch_->withdraw(); }
  float* alloc(size_t count) override { return static_cast<float*>(allocate_zeroed(count * sizeof(float))); }
  int32_t* alloc_i32(size_t count) override {
    return static_cast<int32_t*>(allocate_zeroed(count * sizeof(int32_t)));
  }
  void release(void* pointer) override {
    if (!pointer) return;
    // Called from destructors, so it reports instead of throwing; a failure here is an
    // earlier asynchronous error, which the next checked call reports as well.
    const cudaError_t sync = cudaStreamSynchronize(stream_);
    const cudaError_t status = sync != cudaSuccess ? sync : cudaFree(pointer);
    allocations_.released(pointer);
    if (status != cudaSuccess) {
      std::fprintf(stderr, "speedrun: warning: CUDA release failed: %s\n", cudaGetErrorString(status));
    }
  }
  void upload(float* dst, const float* host, size_t count) override { upload_bytes(dst, host, count * sizeof(float)); }
  void download(float* host, const float* src, size_t count) override {
    download_bytes(host, src, count * sizeof(float));
  }
  void upload_i32(int32_t* dst, const int32_t* host, size_t count) override {
    upload_bytes(dst, host, count * sizeof(int32_t));
  }
  void zero(float* dst, size_t count) override {
    if (count == 0) return;
    SPEEDRUN_CUDA_CHECK(cudaMemsetAsync(dst, 0, count * sizeof(float), stream_));
  }
  void copy(float* dst, const float* src, size_t count) override {
    if (count == 0 || dst == src) return;
    const bool overlap = dst < src + count && src < dst + count;
    if (!overlap) {
      SPEEDRUN_CUDA_CHECK(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
      return;
    }
    // memmove semantics (as the CPU backend) through a temporary.
    float* temp = static_cast<float*>(op_scratch_->get(count * sizeof(float)));
    SPEEDRUN_CUDA_CHECK(cudaMemcpyAsync(temp, src, count * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
    SPEEDRUN_CUDA_CHECK(cudaMemcpyAsync(dst, temp, count * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  }
  void synchronize() override { SPEEDRUN_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  void* native_stream() override { return stream_; }
  void fill_i32(int32_t* dst, int32_t value, size_t count) override { cuda::fill_i32(stream_, dst, value, count); }

  // --- host-visible results -------------------------------------------------------------
  // Pinned, so the copies into and out of it are truly asynchronous.
  // Also called from the prefetcher's thread, whose current device is not ours until set:
  // otherwise every process of a multi-GPU run would open a context on device 0.
  void* alloc_host(size_t bytes) override {
    SPEEDRUN_CUDA_CHECK(cudaSetDevice(device_));
    void* pointer = nullptr;
    const size_t size = std::max<size_t>(bytes, 1);
    check_cuda(cudaHostAlloc(&pointer, size, cudaHostAllocDefault),
               ("cudaHostAlloc of " + std::to_string(size) + " bytes").c_str());
    std::memset(pointer, 0, size);
    return pointer;
  }
  void release_host(void* pointer) override {
    if (!pointer) return;
    cudaSetDevice(device_);  // as alloc_host; a failure shows in the synchronisation below
    // Queued copies may still target it.
    const cudaError_t sync = cudaStreamSynchronize(stream_);
    const cudaError_t status = sync != cudaSuccess ? sync : cudaFreeHost(pointer);
    if (status != cudaSuccess) {
      std::fprintf(stderr, "speedrun: warning: CUDA host release failed: %s\n", cudaGetErrorString(status));
    }
  }
  void sum_to_host(double* host_out, const float* x, size_t n) override {
    double* total = static_cast<double*>(result_scratch_->get(sizeof(double)));
    dot_reduce(stream_, *reduce_scratch_, x, nullptr, n, 0, 1, DotResult::kStoreDouble, total);
    SPEEDRUN_CUDA_CHECK(cudaMemcpyAsync(host_out, total, sizeof(double), cudaMemcpyDeviceToHost, stream_));
  }
  void download_i32_async(int32_t* host, const int32_t* src, size_t count) override {
    if (count == 0) return;
    SPEEDRUN_CUDA_CHECK(cudaMemcpyAsync(host, src, count * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
  }
  void flag_nonfinite(int32_t* flag, const float* x, size_t n) override { cuda::flag_nonfinite(stream_, flag, x, n); }
  void document_ids(int32_t* doc, const int32_t* tokens, int T, int32_t separator) override {
    cuda::document_ids(stream_, doc, tokens, T, separator);
  }

  // --- dense linear algebra ---------------------------------------------------------------
  void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
            float beta, float* C, int ldc) override {
    gemm_batched(ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
  }

  void gemm_batched(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, size_t stride_a,
                    const float* B, int ldb, size_t stride_b, float beta, float* C, int ldc, size_t stride_c,
                    int batch) override {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    if (K <= 0) {  // the product is empty: C = beta C
      cuda::scale_matrix(stream_, C, M, N, ldc, stride_c, batch, beta);
      return;
    }
    gemm_->run(ta, tb, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc, stride_c, batch);
  }

  void gemm_to_bf16(bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                    const uint16_t* addend, uint16_t* C, int ldc) override {
    if (M <= 0 || N <= 0) return;
    // In place (C is the addend), cuBLASLt 13.1 rounds the product to bf16 before adding C:
    // two roundings, on the H200 for every algorithm its heuristic offered and every shape
    // tried (distinct C and D round once). In-place adds take the path below instead (the
    // model's residual adds write a distinct buffer).
    const bool in_place = addend != nullptr && addend == C;
    if (K > 0 && !in_place && gemm_->bf16_inputs() &&
        gemm_->run_to_bf16(ta, tb, M, N, K, A, lda, B, ldb, addend, C, ldc)) {
      return;
    }
    // float32 products, K == 0, in place, or no bf16-output algorithm for this shape: the
    // float result in scratch (M x ldc floats beyond the memory plan), then its codes (plus
    // the addend, one rounding of the float sum), row by row where rows are padded (the
    // padding is not the product's to write).
    const size_t count = static_cast<size_t>(M - 1) * ldc + N;
    float* result = static_cast<float*>(op_scratch_->get(count * sizeof(float)));
    gemm(ta, tb, M, N, K, 1.f, A, lda, B, ldb, 0.f, result, ldc);
    auto round = [&](size_t at, size_t n) {
      if (addend) cuda::to_bf16_plus(stream_, C + at, result + at, addend + at, n);
      else cuda::to_bf16(stream_, C + at, result + at, n);
    };
    if (ldc == N) {
      round(0, count);
      return;
    }
    for (int r = 0; r < M; ++r) round(static_cast<size_t>(r) * ldc, N);
  }

  // --- embeddings ---------------------------------------------------------------------------
  void embedding_forward(float* out, const float* table, const int32_t* tokens, int T, int dim) override {
    cuda::embedding_forward(stream_, out, table, tokens, T, dim);
  }
  void embedding_forward_bf16(uint16_t* out, const float* table, const int32_t* tokens, int T, int dim) override {
    cuda::embedding_forward_bf16(stream_, out, table, tokens, T, dim);
  }
  void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int T, int dim) override {
    cuda::embedding_backward(stream_, *op_scratch_, dtable, dout, tokens, T, dim);
  }

  // --- normalisation and position -------------------------------------------------------
  void rmsnorm_forward(float* out, uint16_t* out_codes, float* rstd, const float* x, int rows, int dim,
                       float eps) override {
    cuda::rmsnorm_forward(stream_, out, out_codes, rstd, x, rows, dim, eps);
  }
  void rmsnorm_backward(float* dx, uint16_t* dx_codes, const float* dout, const float* out, const float* rstd,
                        int rows, int dim, bool accumulate) override {
    cuda::rmsnorm_backward(stream_, dx, dx_codes, dout, out, rstd, rows, dim, accumulate);
  }
  void rotary(float* x, uint16_t* stored, int T, int H, int D, float base, bool inverse) override {
    cuda::rotary(stream_, x, stored, T, H, D, rotary_frequencies(D, base), inverse);
  }

  // --- elementwise --------------------------------------------------------------------------
  void mix_forward(float* out, uint16_t* stored, const float* a, const float* b, const float* coef,
                   size_t n) override {
    cuda::mix_forward(stream_, out, stored, a, b, coef, n);
  }
  void mix_backward(float* da, uint16_t* da_codes, bool accumulate_da, float* db, bool accumulate_db, float* dcoef,
                    const float* dout, const float* a, const float* b, const float* coef, size_t n) override {
    cuda::mix_backward(stream_, *reduce_scratch_, da, da_codes, accumulate_da, db, accumulate_db, dcoef, dout, a, b,
                       coef, n);
  }
  void scaled_add_forward(float* out, const float* y, const float* weight, size_t n) override {
    cuda::scaled_add_forward(stream_, out, y, weight, n);
  }
  void scaled_add_backward(float* dy, bool accumulate_dy, float* dweight, const float* dout, const float* y,
                           const float* weight, size_t n) override {
    dot_reduce(stream_, *reduce_scratch_, dout, y, n, 0, 1, DotResult::kAccumulateFloat, dweight);
    cuda::scaled_add_backward_elementwise(stream_, dy, accumulate_dy, dout, weight, n);
  }
  void add(float* out, uint16_t* out_codes, const float* x, size_t n) override {
    cuda::add(stream_, out, out_codes, x, n);
  }
  void relu2_forward(float* out, const float* x, size_t n) override { cuda::relu2_forward(stream_, out, x, n); }
  void relu2_backward(float* dx, const float* dout, const float* x, size_t n) override {
    cuda::relu2_backward(stream_, dx, dout, x, n);
  }

  // --- bf16 activation storage -----------------------------------------------------------------
  void rmsnorm_forward_bf16(float* out, uint16_t* stored, float* rstd, const float* x, int rows, int dim,
                            float eps) override {
    cuda::rmsnorm_forward_bf16(stream_, out, stored, rstd, x, rows, dim, eps);
  }
  void rmsnorm_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* out, const float* rstd,
                             int rows, int dim, bool accumulate) override {
    cuda::rmsnorm_backward_bf16(stream_, dx, dx_codes, dout, out, rstd, rows, dim, accumulate);
  }
  void relu2_forward_bf16(float* out, uint16_t* out_codes, uint16_t* stored, const float* x, size_t n) override {
    cuda::relu2_forward_bf16(stream_, out, out_codes, stored, x, n);
  }
  void relu2_from_bf16(float* out, uint16_t* out_codes, const uint16_t* x, size_t n) override {
    cuda::relu2_from_bf16(stream_, out, out_codes, x, n);
  }
  void relu2_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* x, size_t n) override {
    cuda::relu2_backward_bf16(stream_, dx, dx_codes, dout, x, n);
  }
  void relu2_backward_from_bf16(float* dx, uint16_t* dx_codes, const uint16_t* dout, const uint16_t* x,
                                size_t n) override {
    cuda::relu2_backward_from_bf16(stream_, dx, dx_codes, dout, x, n);
  }
  void widen_bf16(float* out, const uint16_t* x, size_t n) override { cuda::widen_bf16(stream_, out, x, n); }
  void rmsnorm_rotary_bf16(float* out, uint16_t* normed, uint16_t* rotated, float* rstd, const float* x, int T, int H,
                           int D, float eps, float base) override {
    cuda::rmsnorm_rotary_bf16(stream_, *op_scratch_, out, normed, rotated, rstd, x, T, H, D, eps,
                              rotary_frequencies(D, base));
  }
  void rmsnorm_rotary_from_bf16(float* out, uint16_t* normed, uint16_t* rotated, float* rstd, const uint16_t* x,
                                int T, int H, int D, float eps, float base) override {
    cuda::rmsnorm_rotary_from_bf16(stream_, *op_scratch_, out, normed, rotated, rstd, x, T, H, D, eps,
                                   rotary_frequencies(D, base));
  }
  void rotary_from_bf16(float* out, uint16_t* rotated, const uint16_t* normed, int T, int H, int D,
                        float base) override {
    cuda::rotary_from_bf16(stream_, *op_scratch_, out, rotated, normed, T, H, D, rotary_frequencies(D, base));
  }
  void rotary_rmsnorm_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* normed,
                                    const float* rstd, int T, int H, int D, float base) override {
    cuda::rotary_rmsnorm_backward_bf16(stream_, *op_scratch_, dx, dx_codes, dout, normed, rstd, T, H, D,
                                       rotary_frequencies(D, base));
  }

  // --- the bf16 residual stream: the float32 ops' kernels reading (and writing) codes ---------
  void mix_forward_bf16(uint16_t* out, const uint16_t* a, const uint16_t* b, const float* coef, size_t n) override {
    cuda::mix_forward_bf16(stream_, out, a, b, coef, n);
  }
  void mix_backward_bf16(float* da, uint16_t* da_codes, bool accumulate_da, float* db, bool accumulate_db,
                         float* dcoef, const float* dout, const uint16_t* a, const uint16_t* b, const float* coef,
                         size_t n) override {
    cuda::mix_backward_bf16(stream_, *reduce_scratch_, da, da_codes, accumulate_da, db, accumulate_db, dcoef, dout, a,
                            b, coef, n);
  }
  void scaled_add_forward_bf16(uint16_t* out, const uint16_t* x, const uint16_t* y, const float* weight,
                               size_t n) override {
    cuda::scaled_add_forward_bf16(stream_, out, x, y, weight, n);
  }
  void scaled_add_backward_bf16(float* dy, bool accumulate_dy, float* dweight, const float* dout, const uint16_t* y,
                                const float* weight, size_t n) override {
    dot_reduce_bf16(stream_, *reduce_scratch_, dout, y, n, 0, 1, DotResult::kAccumulateFloat, dweight);
    cuda::scaled_add_backward_elementwise(stream_, dy, accumulate_dy, dout, weight, n);
  }
  void rmsnorm_forward_from_bf16(float* out, uint16_t* out_codes, float* rstd, const uint16_t* x, int rows, int dim,
                                 float eps) override {
    cuda::rmsnorm_forward_from_bf16(stream_, out, out_codes, rstd, x, rows, dim, eps);
  }

  // --- attention ------------------------------------------------------------------------------
  void attention_forward(float* y, uint16_t* y_codes, float* lse, const float* q, const float* k, const float* v,
                         const AttentionInputCodes& codes, const int32_t* doc, const AttentionShape& shape) override {
    if (flash_attention_) {  // its output is bf16 already: written into y_codes when given
      cuda::flash_attention_forward_f32(stream_, *op_scratch_, y, y_codes, lse, q, k, v, codes, doc, shape);
      return;
    }
    const size_t n = static_cast<size_t>(shape.T) * shape.H * shape.D;
    const ReferenceInputs in = reference_inputs(codes, q, k, v, nullptr, false, n);
    cuda::attention_forward(stream_, *op_scratch_, y, lse, in.q, in.k, in.v, doc, shape);
    if (y_codes) cuda::to_bf16(stream_, y_codes, y, n);
  }
  void attention_forward_bf16(float* y, uint16_t* stored, float* lse, const float* q, const float* k, const float* v,
                              const AttentionInputCodes& codes, const int32_t* doc,
                              const AttentionShape& shape) override {
    if (flash_attention_) {  // its output is bf16: written into stored, y (unless null) their widening
      cuda::flash_attention_forward_f32(stream_, *op_scratch_, y, stored, lse, q, k, v, codes, doc, shape);
      return;
    }
    const size_t n = static_cast<size_t>(shape.T) * shape.H * shape.D;
    const ReferenceInputs in = reference_inputs(codes, q, k, v, nullptr, y == nullptr, n);
    float* out = y ? y : in.out;
    cuda::attention_forward(stream_, *op_scratch_, out, lse, in.q, in.k, in.v, doc, shape);
    cuda::to_bf16(stream_, stored, out, n);
    if (y) cuda::widen_bf16(stream_, y, stored, n);
  }
  void attention_backward(float* dq, float* dk, float* dv, const float* dy, const float* y, const float* lse,
                          const float* q, const float* k, const float* v, const AttentionInputCodes& codes,
                          const int32_t* doc, const AttentionShape& shape) override {
    if (flash_attention_) {
      cuda::flash_attention_backward_f32(stream_, *op_scratch_, dq, dk, dv, dy, y, lse, q, k, v, codes, doc, shape);
      return;
    }
    const ReferenceInputs in =
        reference_inputs(codes, q, k, v, y, false, static_cast<size_t>(shape.T) * shape.H * shape.D, dy);
    cuda::attention_backward(stream_, *op_scratch_, dq, dk, dv, in.dy, in.y, lse, in.q, in.k, in.v, doc, shape);
  }

  // The reference attention reads floats: the codes given (AttentionInputCodes) widened into
  // reference_inputs_, and room for an output whose floats the caller does not keep.
  struct ReferenceInputs {
    const float* q;
    const float* k;
    const float* v;
    const float* y;
    const float* dy;
    float* out;
  };
  ReferenceInputs reference_inputs(const AttentionInputCodes& codes, const float* q, const float* k, const float* v,
                                   const float* y, bool needs_out, size_t n, const float* dy = nullptr) {
    const bool widen_qkv = codes.given() && !codes.floats_current;
    const size_t count = (widen_qkv ? 3 : 0) + (codes.y ? 1 : 0) + (codes.dy ? 1 : 0) + (needs_out ? 1 : 0);
    float* next = count ? static_cast<float*>(reference_inputs_->get(count * n * sizeof(float))) : nullptr;
    auto widened = [&](const uint16_t* from) {
      float* into = next;
      next += n;
      cuda::widen_bf16(stream_, into, from, n);
      return into;
    };
    ReferenceInputs in{q, k, v, y, dy, nullptr};
    if (widen_qkv) {
      in.q = widened(codes.q);
      in.k = widened(codes.k);
      in.v = widened(codes.v);
    }
    if (codes.y) in.y = widened(codes.y);
    if (codes.dy) in.dy = widened(codes.dy);
    if (needs_out) in.out = next;
    return in;
  }

  // --- head -------------------------------------------------------------------------------------
  void softcap_cross_entropy(float* logits, float* row_loss, const int32_t* targets, int rows, int V, float softcap,
                             float grad_scale) override {
    cuda::softcap_cross_entropy(stream_, logits, row_loss, targets, rows, V, softcap, grad_scale);
  }
  void fp8_head_forward(float* logits, const float* x, const float* W, int rows, int V, int d,
                        bool requantize_weight) override {
    // Created lazily: its workspace is allocated only when the FP8 head is used.
    if (!fp8_head_) fp8_head_ = make_fp8_head(stream_, *gemm_, emulate_fp8_head_);
    cuda::fp8_head_forward(*fp8_head_, logits, x, W, rows, V, d, requantize_weight);
  }
  void fp8_head_backward(float* dx, float* dW, const float* dlogits, const float* x, const float* W, int rows, int V,
                         int d, float output_scale) override {
    if (!fp8_head_) fp8_head_ = make_fp8_head(stream_, *gemm_, emulate_fp8_head_);
    cuda::fp8_head_backward(*fp8_head_, dx, dW, dlogits, x, W, rows, V, d, output_scale);
  }
  void fp8_head_loss(float* logits, float* row_loss, float* dx, float* dW, const float* x, const float* W,
                     const int32_t* targets, int rows, int V, int d, float softcap, float loss_scale, float output_scale,
                     bool requantize_weight) override {
    if (!fp8_head_) fp8_head_ = make_fp8_head(stream_, *gemm_, emulate_fp8_head_);
    cuda::fp8_head_loss(*fp8_head_, logits, row_loss, dx, dW, x, W, targets, rows, V, d, softcap, loss_scale,
                        output_scale, requantize_weight);
  }

  // --- optimisers ----------------------------------------------------------------------------
  void adam_update(const AdamTensor* tensors, size_t count, float beta1, float beta2, float eps, int step,
                   const int32_t* skip) override {
    cuda::adam_update(stream_, tensors, count, beta1, beta2, eps, AdamBiasCorrection(beta1, beta2, step), skip);
  }
  void muon_momentum(float* out, float* buf, const float* grad, size_t n, float momentum,
                     const int32_t* skip) override {
    cuda::muon_momentum(stream_, out, buf, grad, n, momentum, skip);
  }
  void normalize_frobenius(float* x, size_t count, int batch, float eps) override {
    if (batch <= 0) return;
    float* scales = static_cast<float*>(result_scratch_->get(sizeof(float) * batch));
    dot_reduce(stream_, *reduce_scratch_, x, x, count, count, batch, DotResult::kInverseNorm, scales, eps);
    cuda::scale_batches(stream_, x, scales, count, batch);
  }
  void apply_update(float* param, const float* update, size_t n, float scale, const int32_t* skip) override {
    cuda::apply_update(stream_, param, update, n, scale, skip);
  }
  void transpose(float* out, const float* x, int rows, int cols, int batch) override {
    cuda::transpose(stream_, out, x, rows, cols, batch);
  }

 private:
  void* allocate_zeroed(size_t bytes) {
    void* pointer = nullptr;
    const size_t size = std::max<size_t>(bytes, 256);
    const cudaError_t allocated = cudaMalloc(&pointer, size);
    if (allocated == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // not sticky: clear it, so later calls report their own errors
      size_t free_bytes = 0, total_bytes = 0;
      cudaMemGetInfo(&free_bytes, &total_bytes);
      throw OutOfMemoryError("out of device memory allocating " + std::to_string(size) + " bytes (" +
                             std::to_string(free_bytes >> 20) + " MiB free of " + std::to_string(total_bytes >> 20) +
                             " MiB)");
    }
    check_cuda(allocated, ("cudaMalloc of " + std::to_string(size) + " bytes").c_str());
    const cudaError_t status = cudaMemsetAsync(pointer, 0, size, stream_);
    if (status != cudaSuccess) {
      cudaFree(pointer);
      check_cuda(status, "cudaMemsetAsync (zero-fill of a new allocation)");
    }
    allocations_.allocated(pointer, size);
    return pointer;
  }

  // From pageable memory the copy is staged before this returns, so the buffer may be
  // reused at once; from pinned memory (alloc_host) it is truly asynchronous and the
  // caller keeps the buffer until synchronize() (Backend::upload_i32's contract).
  void upload_bytes(void* dst, const void* host, size_t bytes) {
    if (bytes == 0) return;
    SPEEDRUN_CUDA_CHECK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void download_bytes(void* host, const void* src, size_t bytes) {
    if (bytes == 0) return;
    SPEEDRUN_CUDA_CHECK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, stream_));
    SPEEDRUN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  // The D/2 rotary frequencies computed on the host exactly as the CPU backend does
  // (float of a double pow), uploaded once per (D, base).
  const float* rotary_frequencies(int D, float base) {
    const auto key = std::make_pair(D, base);
    auto found = rotary_freqs_.find(key);
    if (found != rotary_freqs_.end()) return found->second;
    const int half = D / 2, quarter = D / 4;
    std::vector<float> freq(std::max(half, 1), 0.f);
    for (int i = 0; i < quarter; ++i) {
      const double exponent = quarter > 1 ? static_cast<double>(i) / (quarter - 1) : 0.0;
      freq[i] = static_cast<float>(std::pow(1.0 / base, exponent));
    }
    // A raw allocation, as the scratch buffers': a backend constant, not part of the
    // model's memory that peak_memory_bytes() counts against `speedrun memory`'s plan.
    float* device = nullptr;
    check_cuda(cudaMalloc(&device, freq.size() * sizeof(float)), "cudaMalloc (rotary frequencies)");
    rotary_freqs_.emplace(key, device);
    upload_bytes(device, freq.data(), freq.size() * sizeof(float));
    return device;
  }

  const int device_;
  const bool flash_attention_;  // the bf16 flash kernel instead of the float32 warp-per-query one
  const bool bf16_matmul_;      // operands rounded to bf16 copies, float32 accumulation
  const bool emulate_fp8_head_;
  const int head_chunk_rows_;
  cudaStream_t stream_ = nullptr;
  // Model, optimiser and scratch allocations through alloc (cuBLASLt's workspace and
  // the scratch buffers' own growth are not counted).
  AllocationTracker allocations_;
  std::unique_ptr<LtGemm> gemm_;
  std::unique_ptr<Scratch> reduce_scratch_;  // partial sums of dot_reduce
  std::unique_ptr<Scratch> result_scratch_;  // reduction results read by a later kernel or the host
  std::unique_ptr<Scratch> op_scratch_;      // temporaries of one operation (sort, scans, copies)
  std::unique_ptr<Scratch> reference_inputs_;  // the reference attention's float inputs widened from codes
  std::map<std::pair<int, float>, float*> rotary_freqs_;
  std::unique_ptr<Fp8Head, Fp8HeadDeleter> fp8_head_;
};

}  // namespace
}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(int device, const BackendOptions& options) {
  return std::make_unique<cuda::CudaBackend>(device, options);
}

}  // namespace speedrun
