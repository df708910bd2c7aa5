#include "model/residual_stream.h"

namespace speedrun {

StreamTensor ResidualStream::take(ArenaCarver& arena, size_t n, bool bf16) {
  if (bf16) return {nullptr, arena.take_codes(n)};
  return {arena.take(n), nullptr};
}

void ResidualStream::mix(StreamTensor out, StreamTensor a, StreamTensor b, const float* coef, size_t n) {
  if (bf16_) {
    backend_.mix_forward_bf16(out.codes, a.codes, b.codes, coef, n);
  } else {
    backend_.mix_forward(out.floats, nullptr, a.floats, b.floats, coef, n);
  }
}

void ResidualStream::mix_backward(float* da, uint16_t* da_codes, bool accumulate_da, float* db, bool accumulate_db,
                                  float* dcoef, const float* dout, StreamTensor a, StreamTensor b, const float* coef,
                                  size_t n) {
  if (bf16_) {
    backend_.mix_backward_bf16(da, da_codes, accumulate_da, db, accumulate_db, dcoef, dout, a.codes, b.codes, coef, n);
  } else {
    backend_.mix_backward(da, da_codes, accumulate_da, db, accumulate_db, dcoef, dout, a.floats, b.floats, coef, n);
  }
}

void ResidualStream::skip_add(StreamTensor out, StreamTensor x, StreamTensor y, const float* weight, size_t n) {
  if (bf16_) {
    backend_.scaled_add_forward_bf16(out.codes, x.codes, y.codes, weight, n);
    return;
  }
  if (out.floats != x.floats) backend_.copy(out.floats, x.floats, n);
  backend_.scaled_add_forward(out.floats, y.floats, weight, n);
}

void ResidualStream::skip_add_backward(float* dy, float* dweight, const float* dout, StreamTensor y,
                                       const float* weight, size_t n) {
  if (bf16_) {
    backend_.scaled_add_backward_bf16(dy, false, dweight, dout, y.codes, weight, n);
  } else {
    backend_.scaled_add_backward(dy, false, dweight, dout, y.floats, weight, n);
  }
}

void ResidualStream::rmsnorm(float* out, uint16_t* out_codes, float* rstd, StreamTensor x, int rows, int dim,
                             float eps) {
  if (bf16_) {
    backend_.rmsnorm_forward_from_bf16(out, out_codes, rstd, x.codes, rows, dim, eps);
  } else {
    backend_.rmsnorm_forward(out, out_codes, rstd, x.floats, rows, dim, eps);
  }
}

void ResidualStream::add_linear(StreamTensor out, StreamTensor addend, const float* x, const float* weight, int rows,
                                int out_dim, int in_dim) {
  if (bf16_) {  // out [rows, out] = bf16(addend + x [rows, in] @ W^T), W stored [out, in]
    backend_.gemm_to_bf16(false, true, rows, out_dim, in_dim, x, in_dim, weight, in_dim, addend.codes, out.codes,
                          out_dim);
    return;
  }
  backend_.gemm(false, true, rows, out_dim, in_dim, 1.f, x, in_dim, weight, in_dim, 0.f, out.floats, out_dim);
  backend_.add(out.floats, nullptr, addend.floats, static_cast<size_t>(rows) * out_dim);
}

void ResidualStream::normalized(StreamTensor out, float* rstd, float* embedded, int rows, int dim, float eps) {
  if (bf16_) {
    backend_.rmsnorm_forward_bf16(nullptr, out.codes, rstd, embedded, rows, dim, eps);
  } else {
    backend_.rmsnorm_forward(out.floats, nullptr, rstd, embedded, rows, dim, eps);
  }
}

void ResidualStream::normalized_backward(float* dx, const float* dout, StreamTensor out, const float* rstd, int rows,
                                         int dim) {
  if (bf16_) {
    backend_.rmsnorm_backward_bf16(dx, nullptr, dout, out.codes, rstd, rows, dim, false);
  } else {
    backend_.rmsnorm_backward(dx, nullptr, dout, out.floats, rstd, rows, dim, false);
  }
}

}  // namespace speedrun
