// The small set of operations the model's forward and backward passes and the
// optimisers are written over. Pointers are the backend's memory (host memory for
// the CPU backend, device memory for CUDA). Matrices are row-major. Scalars that are
// parameters (lambdas, skip weights) are passed as pointers so that no backend has
// to read them back to the host. "accumulate" means out += result instead of out =.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace speedrun {

struct AttentionShape {
  int T;                  // tokens in the packed sequence
  int H;                  // heads
  int D;                  // head size; q, k, v, y are [T, H, D]
  int block_size;         // attention block size (SPEC §3)
  int window_blocks;      // window N; 0 behaves as 1
  float scale;            // logit scale (0.12)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // --- memory -----------------------------------------------------------------------
  virtual float* alloc(size_t count) = 0;            // zero-filled
  virtual int32_t* alloc_i32(size_t count) = 0;      // zero-filled
  virtual void release(void* pointer) = 0;
  virtual void upload(float* dst, const float* host, size_t count) = 0;
  virtual void download(float* host, const float* src, size_t count) = 0;
  virtual void upload_i32(int32_t* dst, const int32_t* host, size_t count) = 0;
  virtual void zero(float* dst, size_t count) = 0;
  virtual void copy(float* dst, const float* src, size_t count) = 0;
  virtual void synchronize() {}

  // --- dense linear algebra --------------------------------------------------------
  // C[M,N] = alpha * op(A) op(B) + beta * C; op(A) is [M,K], op(B) is [K,N].
  virtual void gemm(bool transpose_a, bool transpose_b, int M, int N, int K, float alpha, const float* A, int lda,
                    const float* B, int ldb, float beta, float* C, int ldc) = 0;
  // The same over `batch` matrices spaced by the given strides (in elements).
  virtual void gemm_batched(bool transpose_a, bool transpose_b, int M, int N, int K, float alpha, const float* A,
                            int lda, size_t stride_a, const float* B, int ldb, size_t stride_b, float beta, float* C,
                            int ldc, size_t stride_c, int batch) = 0;

  // --- embeddings ---------------------------------------------------------------------
  // out[t] = table[tokens[t]]; rows of width dim.
  virtual void embedding_forward(float* out, const float* table, const int32_t* tokens, int T, int dim) = 0;
  // dtable[tokens[t]] += dout[t], in a deterministic order.
  virtual void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int T, int dim) = 0;

  // --- normalisation and position ---------------------------------------------------
  // out = x / sqrt(mean(x^2) + eps) per row; rstd saved for the backward.
  virtual void rmsnorm_forward(float* out, float* rstd, const float* x, int rows, int dim, float eps) = 0;
  // dx (+)= rstd * (dout - out * mean(dout * out)), from the forward's out and rstd.
  virtual void rmsnorm_backward(float* dx, const float* dout, const float* out, const float* rstd, int rows, int dim,
                                bool accumulate) = 0;
  // Half-truncated rotary on x [T, H, D] in place (SPEC §2.6); inverse = rotate by -theta
  // (the backward of the rotation is the inverse rotation of the gradient).
  virtual void rotary(float* x, int T, int H, int D, float base, bool inverse) = 0;

  // --- elementwise --------------------------------------------------------------------
  // out = coef[0] * a + coef[1] * b (b may be null: out = coef[0] * a). out may alias a.
  virtual void mix_forward(float* out, const float* a, const float* b, const float* coef, size_t n) = 0;
  // da (+)= coef[0] * dout; db += coef[1] * dout; dcoef[0] += <dout, a>; dcoef[1] += <dout, b>.
  virtual void mix_backward(float* da, bool accumulate_da, float* db, float* dcoef, const float* dout,
                            const float* a, const float* b, const float* coef, size_t n) = 0;
  // out += weight[0] * y (a U-net skip).
  virtual void scaled_add_forward(float* out, const float* y, const float* weight, size_t n) = 0;
  // dy += weight[0] * dout; dweight[0] += <dout, y>.
  virtual void scaled_add_backward(float* dy, float* dweight, const float* dout, const float* y,
                                   const float* weight, size_t n) = 0;
  // out += x.
  virtual void add(float* out, const float* x, size_t n) = 0;
  // out = relu(x)^2.
  virtual void relu2_forward(float* out, const float* x, size_t n) = 0;
  // dx = dout * 2 relu(x).
  virtual void relu2_backward(float* dx, const float* dout, const float* x, size_t n) = 0;

  // --- attention (SPEC §2.5, §3) -------------------------------------------------------
  // y = softmax(scale q k^T + mask) v per head, visiting only the blocks the mask keeps;
  // lse [H, T] saved. doc = per-token document ids.
  virtual void attention_forward(float* y, float* lse, const float* q, const float* k, const float* v,
                                 const int32_t* doc, const AttentionShape& shape) = 0;
  // dq, dk, dv (overwritten) from dy, recomputing probabilities from lse.
  virtual void attention_backward(float* dq, float* dk, float* dv, const float* dy, const float* y,
                                  const float* lse, const float* q, const float* k, const float* v,
                                  const int32_t* doc, const AttentionShape& shape) = 0;

  // --- head ----------------------------------------------------------------------------
  // In place over logits [rows, V]: z -> y = 2c sigmoid(z / (c/2)); row_loss[r] =
  // logsumexp(y_r) - y_r[target_r]; when grad_scale != 0 the logits are replaced by
  // dloss/dz * grad_scale (the gradient of grad_scale * sum of row losses).
  virtual void softcap_cross_entropy(float* logits, float* row_loss, const int32_t* targets, int rows, int V,
                                     float softcap, float grad_scale) = 0;
  // Sum of x[0..n) in float64, returned to the host (a synchronisation point).
  virtual double sum(const float* x, size_t n) = 0;

  // --- optimisers (SPEC §4) -------------------------------------------------------------
  // Adam with bias correction, PyTorch's form; step = updates so far including this one.
  virtual void adam_update(float* param, const float* grad, float* m, float* v, size_t n, float lr, float beta1,
                           float beta2, float eps, int step) = 0;
  // buf = m*buf + (1-m)*g; out = (1-m)*g + m*buf (Nesterov). out may alias g.
  virtual void muon_momentum(float* out, float* buf, const float* grad, size_t n, float momentum) = 0;
  // x[b] /= (||x[b]||_F + eps) for each of `batch` contiguous matrices of `count` elements.
  virtual void normalize_frobenius(float* x, size_t count, int batch, float eps) = 0;
  // param -= scale * update.
  virtual void apply_update(float* param, const float* update, size_t n, float scale) = 0;
  // x[b] (rows x cols) -> out[b] (cols x rows) for `batch` matrices.
  virtual void transpose(float* out, const float* x, int rows, int cols, int batch) = 0;
};

// The CPU backend (float32, OpenMP + OpenBLAS): the reference all others are tested against.
std::unique_ptr<Backend> make_cpu_backend();

// The CUDA backend (float32, cuBLASLt + own kernels) on the given device. Throws
// speedrun::Error when the build has no CUDA backend or the device cannot be used.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

// "cpu" or "cuda" (GPU `device_index`, e.g. the process's local rank); UsageError otherwise.
std::unique_ptr<Backend> make_backend(const std::string& device, int device_index = 0);

}  // namespace speedrun
