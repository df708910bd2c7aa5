// Host-side launchers of the CUDA backend's kernels. Every launcher enqueues on the given
// stream, checks the launch, and computes the same function as the CPU backend's operation
// of the same name (src/backends/cpu/cpu_backend.cpp); see each kernel for its formula.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backends/backend.h"
#include "backends/cuda/cuda_common.cuh"

namespace speedrun::cuda {

// --- elementwise, normalisation, position, optimisers (cuda_elementwise.cu) -------------
void embedding_forward(cudaStream_t s, float* out, const float* table, const int32_t* tokens, int T, int dim);
void embedding_forward_bf16(cudaStream_t s, uint16_t* out, const float* table, const int32_t* tokens, int T,
                            int dim);
void rmsnorm_forward(cudaStream_t s, float* out, uint16_t* out_codes, float* rstd, const float* x, int rows, int dim,
                     float eps);
void rmsnorm_backward(cudaStream_t s, float* dx, uint16_t* dx_codes, const float* dout, const float* out,
                      const float* rstd, int rows, int dim, bool accumulate);
// freq: device array of D/2 angular frequencies (D/4 of them then zeros).
// stored (unless null): bf16 activations, the output rounded and its codes stored.
void rotary(cudaStream_t s, float* x, uint16_t* stored, int T, int H, int D, const float* freq, bool inverse);
void mix_forward(cudaStream_t s, float* out, uint16_t* stored, const float* a, const float* b, const float* coef,
                 size_t n);
void scaled_add_forward(cudaStream_t s, float* out, const float* y, const float* weight, size_t n);
// dy (+)= weight[0] dout: the skip's gradient, added or (its first contribution) written.
void scaled_add_backward_elementwise(cudaStream_t s, float* dy, bool accumulate, const float* dout,
                                     const float* weight, size_t n);
void add(cudaStream_t s, float* out, uint16_t* out_codes, const float* x, size_t n);
void relu2_forward(cudaStream_t s, float* out, const float* x, size_t n);
void relu2_backward(cudaStream_t s, float* dx, const float* dout, const float* x, size_t n);
// bf16 activation storage: the Backend operations of the same names.
void rmsnorm_forward_bf16(cudaStream_t s, float* out, uint16_t* stored, float* rstd, const float* x, int rows,
                          int dim, float eps);
void rmsnorm_backward_bf16(cudaStream_t s, float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* out,
                           const float* rstd, int rows, int dim, bool accumulate);
void relu2_forward_bf16(cudaStream_t s, float* out, uint16_t* out_codes, uint16_t* stored, const float* x, size_t n);
void relu2_from_bf16(cudaStream_t s, float* out, uint16_t* out_codes, const uint16_t* x, size_t n);
void relu2_backward_bf16(cudaStream_t s, float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* x,
                         size_t n);
void relu2_backward_from_bf16(cudaStream_t s, float* dx, uint16_t* dx_codes, const uint16_t* dout,
                              const uint16_t* x, size_t n);
void widen_bf16(cudaStream_t s, float* out, const uint16_t* x, size_t n);
// The bf16 residual stream: the Backend operations of the same names (the backward ones in
// cuda_reduce.cu, below).
void mix_forward_bf16(cudaStream_t s, uint16_t* out, const uint16_t* a, const uint16_t* b, const float* coef,
                      size_t n);
void scaled_add_forward_bf16(cudaStream_t s, uint16_t* out, const uint16_t* x, const uint16_t* y,
                             const float* weight, size_t n);
void rmsnorm_forward_from_bf16(cudaStream_t s, float* out, uint16_t* out_codes, float* rstd, const uint16_t* x,
                               int rows, int dim, float eps);
// Every tensor in launches of up to kAdamTensorsPerLaunch, the list passed by value.
void adam_update(cudaStream_t s, const AdamTensor* tensors, size_t count, float beta1, float beta2, float eps,
                 const AdamBiasCorrection& bias, const int32_t* skip);
void muon_momentum(cudaStream_t s, float* out, float* buf, const float* grad, size_t n, float momentum,
                   const int32_t* skip);
void apply_update(cudaStream_t s, float* param, const float* update, size_t n, float scale, const int32_t* skip);
// x[b * count + i] *= scale[b] (scale on the device).
void scale_batches(cudaStream_t s, float* x, const float* scale, size_t count, int batch);
// C[M, N] (row-major, leading dimension ldc, `batch` matrices stride_c apart) = beta * C,
// or 0 when beta == 0: a product with K == 0.
void scale_matrix(cudaStream_t s, float* C, int M, int N, int ldc, size_t stride_c, int batch, float beta);
void transpose(cudaStream_t s, float* out, const float* x, int rows, int cols, int batch);
// x[i] = the codes of a bf16 uniform in [-amplitude, amplitude), a hash of (seed, i):
// benchmark operands.
void fill_random_bf16(cudaStream_t s, uint16_t* x, size_t n, uint32_t seed, float amplitude);
// out[i] = the bits of bf16(in[i]), nearest even (the CPU's lowp::round_to_bf16).
void to_bf16(cudaStream_t s, uint16_t* out, const float* in, size_t n);
// out[i] = the bits of bf16(in[i] + float32(addend[i])), one rounding; out may alias addend.
void to_bf16_plus(cudaStream_t s, uint16_t* out, const float* in, const uint16_t* addend, size_t n);

// --- q and k: per-head rmsnorm and rotary in one pass (cuda_qk_norm_rotary.cu) ----------
// The Backend operations of the same names; freq as rotary's. scratch: for head sizes the
// fused kernels lack (D % 8 != 0 or D > 128), which run the unfused ones in sequence.
void rmsnorm_rotary_bf16(cudaStream_t s, Scratch& scratch, float* out, uint16_t* normed, uint16_t* rotated,
                         float* rstd, const float* x, int T, int H, int D, float eps, const float* freq);
void rmsnorm_rotary_from_bf16(cudaStream_t s, Scratch& scratch, float* out, uint16_t* normed, uint16_t* rotated,
                              float* rstd, const uint16_t* x, int T, int H, int D, float eps, const float* freq);
void rotary_from_bf16(cudaStream_t s, Scratch& scratch, float* out, uint16_t* rotated, const uint16_t* normed, int T,
                      int H, int D, const float* freq);
void rotary_rmsnorm_backward_bf16(cudaStream_t s, Scratch& scratch, float* dx, uint16_t* dx_codes, const float* dout,
                                  const uint16_t* normed, const float* rstd, int T, int H, int D, const float* freq);

// --- reductions and the head (cuda_reduce.cu) ---------------------------------------------
enum class DotResult {
  kAccumulateFloat,  // out (float*)[b] += float(total)
  kStoreDouble,      // out (double*)[b] = total
  kInverseNorm,      // out (float*)[b] = float(1 / (sqrt(total) + eps))
};
// total[b] = sum_i a[b*stride + i] * b[b*stride + i] over i < n (or sum of a when b is null),
// in float64, in a fixed order that depends only on n and on whether the operands allow
// 16-byte loads. scratch: partial sums.
void dot_reduce(cudaStream_t s, Scratch& scratch, const float* a, const float* b, size_t n, size_t stride, int batch,
                DotResult result, void* out, float eps = 0.f);
// The same with b given as bf16 codes (widened exactly): the same sums in the same order as
// dot_reduce of b's widening. Named apart so that dot_reduce's null b stays unambiguous.
void dot_reduce_bf16(cudaStream_t s, Scratch& scratch, const float* a, const uint16_t* b, size_t n, size_t stride,
                     int batch, DotResult result, void* out, float eps = 0.f);
// Backend::mix_backward in one pass over its operands (dcoef through partial sums in scratch).
void mix_backward(cudaStream_t s, Scratch& scratch, float* da, uint16_t* da_codes, bool accumulate_da, float* db,
                  bool accumulate_db, float* dcoef, const float* dout, const float* a, const float* b,
                  const float* coef, size_t n);
// The same with a and b as bf16 codes (Backend::mix_backward_bf16): the same sums in the same
// order as mix_backward of their widening.
void mix_backward_bf16(cudaStream_t s, Scratch& scratch, float* da, uint16_t* da_codes, bool accumulate_da, float* db,
                       bool accumulate_db, float* dcoef, const float* dout, const uint16_t* a, const uint16_t* b,
                       const float* coef, size_t n);
void softcap_cross_entropy(cudaStream_t s, float* logits, float* row_loss, const int32_t* targets, int rows, int V,
                           float softcap, float grad_scale);
// The same from logits kept as bf16 codes, its gradient written as the e5m2 codes of
// e5m2_scale times it (saturating: the FP8 head's cast) into gradient [rows, V] (bytes).
void softcap_cross_entropy_to_e5m2(cudaStream_t s, uint8_t* gradient, float e5m2_scale, float* row_loss,
                                   const uint16_t* logits, const int32_t* targets, int rows, int V, float softcap,
                                   float grad_scale);

// --- step control (cuda_step_control.cu) -----------------------------------------------
void fill_i32(cudaStream_t s, int32_t* dst, int32_t value, size_t count);
// flag[0] = 1 when any x[i] is NaN or infinite (left alone otherwise).
void flag_nonfinite(cudaStream_t s, int32_t* flag, const float* x, size_t n);
// doc[t] = number of `separator` tokens in tokens[0..t].
void document_ids(cudaStream_t s, int32_t* doc, const int32_t* tokens, int T, int32_t separator);

// --- document ranges (cuda_document_bounds.cu) -----------------------------------------
// Scratch bytes document_bounds needs for T tokens.
size_t document_bounds_scratch_bytes(int T);
// start[t], end[t] = the range [start, end) of t's document (adjacent equal ids), using
// `scratch` of document_bounds_scratch_bytes(T) bytes.
void document_bounds(cudaStream_t s, void* scratch, int32_t* start, int32_t* end, const int32_t* doc, int T);

// --- embedding backward (cuda_embedding.cu) -------------------------------------------
void embedding_backward(cudaStream_t s, Scratch& scratch, float* dtable, const float* dout, const int32_t* tokens,
                        int T, int dim);

// --- attention (cuda_attention.cu) ------------------------------------------------------
void attention_forward(cudaStream_t s, Scratch& scratch, float* y, float* lse, const float* q, const float* k,
                       const float* v, const int32_t* doc, const AttentionShape& shape);
void attention_backward(cudaStream_t s, Scratch& scratch, float* dq, float* dk, float* dv, const float* dy,
                        const float* y, const float* lse, const float* q, const float* k, const float* v,
                        const int32_t* doc, const AttentionShape& shape);

// --- attention through the bf16 flash kernel (cuda_attention_bf16.cu) ----------------
// The same contract as attention_forward/backward above, computed in bf16 with fp32
// statistics; an Error for head sizes the kernel lacks (it has 32, 64, 128).
// y_codes (unless null) receives the kernel's bf16 output itself, widened into y (unless
// null: the codes alone; then y_codes is required). The
// kernel reads `codes` when given, else rounds its own copies of q, k and v (and y in the
// backward: codes.y when given).
void flash_attention_forward_f32(cudaStream_t s, Scratch& scratch, float* y, uint16_t* y_codes, float* lse,
                                 const float* q, const float* k, const float* v, const AttentionInputCodes& codes,
                                 const int32_t* doc, const AttentionShape& shape);
void flash_attention_backward_f32(cudaStream_t s, Scratch& scratch, float* dq, float* dk, float* dv, const float* dy,
                                  const float* y, const float* lse, const float* q, const float* k, const float* v,
                                  const AttentionInputCodes& codes, const int32_t* doc,
                                  const AttentionShape& shape);

}  // namespace speedrun::cuda
