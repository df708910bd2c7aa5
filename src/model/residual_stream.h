// The residual stream: x0, each block's input, lambda mix and attention residual, the
// U-net's skip stack and the last block's output. SPEC §6: the reference keeps all of it in
// bf16; with bf16 activations so does the model (codes, rounded where each op writes them),
// with float32 activations it is float32. The gradients flowing back are float32 in both.
#pragma once

#include <cstddef>
#include <cstdint>

#include "backends/backend.h"
#include "model/arena_carver.h"

namespace speedrun {

// One tensor of the stream: floats or bf16 codes, as the stream is held (both null while
// an arena is only counted).
struct StreamTensor {
  float* floats = nullptr;
  uint16_t* codes = nullptr;
  StreamTensor at(size_t offset) const {
    return {floats ? floats + offset : nullptr, codes ? codes + offset : nullptr};
  }
  bool empty() const { return !floats && !codes; }
  bool operator==(const StreamTensor&) const = default;
};

// The stream's ops, each the float32 op or its bf16 twin (Backend's "bf16 residual stream"
// ops) as the stream is held. Tensors passed must all be held the one way.
class ResidualStream {
 public:
  ResidualStream(Backend& backend, bool bf16) : backend_(backend), bf16_(bf16) {}
  bool bf16() const { return bf16_; }

  // n elements of a stream held as bf16 codes (bf16) or floats, from the arena.
  static StreamTensor take(ArenaCarver& arena, size_t n, bool bf16);

  // out = coef[0] a + coef[1] b (b may be empty); out may alias a.
  void mix(StreamTensor out, StreamTensor a, StreamTensor b, const float* coef, size_t n);
  void mix_backward(float* da, uint16_t* da_codes, bool accumulate_da, float* db, bool accumulate_db, float* dcoef,
                    const float* dout, StreamTensor a, StreamTensor b, const float* coef, size_t n);
  // out = x + weight[0] y (a U-net skip); out may alias x.
  void skip_add(StreamTensor out, StreamTensor x, StreamTensor y, const float* weight, size_t n);
  // dy = weight[0] dout (written: a skip's output has no other reader); dweight[0] += <dout, y>.
  void skip_add_backward(float* dy, float* dweight, const float* dout, StreamTensor y, const float* weight, size_t n);
  // rmsnorm of the stream: float32, rmsnorm_forward (out exact, out_codes its codes); bf16,
  // rmsnorm_forward_from_bf16 (out rounded to bf16 as the reference's norm of a bf16 stream).
  void rmsnorm(float* out, uint16_t* out_codes, float* rstd, StreamTensor x, int rows, int dim, float eps);
  // out = addend + x W^T: a linear layer's output added onto the stream (W [out_dim, in_dim],
  // x [rows, in_dim], operands held as the caller arranged); out must not alias addend
  // with float32 activations. bf16: one rounding of the float32 sum, in the product itself.
  void add_linear(StreamTensor out, StreamTensor addend, const float* x, const float* weight, int rows, int out_dim,
                  int in_dim);
  // out = rmsnorm(embedded) (x0), bf16: rounded. embedded may be out's floats (float32);
  // it is scratch afterwards.
  void normalized(StreamTensor out, float* rstd, float* embedded, int rows, int dim, float eps);
  // dx = rmsnorm's backward of normalized()'s out (overwritten).
  void normalized_backward(float* dx, const float* dout, StreamTensor out, const float* rstd, int rows, int dim);

 private:
  Backend& backend_;
  const bool bf16_;
};

}  // namespace speedrun
