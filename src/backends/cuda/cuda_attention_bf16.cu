// The float32 backend's attention through the bf16 flash kernel (cuda_flash_attention.cu),
// chosen with --attention-kernel flash (AttentionKernel::kFlash): q, k and v come as the
// codes their producers wrote (AttentionInputCodes) or are rounded to bf16 here, and the
// output is widened on the way out, so a model with float32 activations can use the fast
// kernel too. Never run on a GPU yet.
#include <cuda_bf16.h>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/flash_attention.h"

namespace speedrun::cuda {
namespace {

FlashAttentionShape flash_shape(const AttentionShape& a) {
  FlashAttentionShape f;
  f.T = a.T;
  f.H = a.H;
  f.D = a.D;
  f.block_size = a.block_size;
  f.window_blocks = a.window_blocks;
  f.scale = a.scale;
  check_flash_attention_shape(f);
  return f;
}

// `count` bf16 tensors of T*H*D (at most 5) and the kernel's workspace, carved from one scratch buffer.
struct Bf16Buffers {
  uint16_t* tensor[5];
  void* workspace;
};

Bf16Buffers carve_buffers(Scratch& scratch, const FlashAttentionShape& f, int count) {
  const size_t n = static_cast<size_t>(f.T) * f.H * f.D;
  const size_t workspace = flash_attention_workspace_bytes(f);
  Bf16Buffers b{};
  auto carve = [&](Carver& c) {
    for (int i = 0; i < count; ++i) b.tensor[i] = c.take<uint16_t>(n);
    b.workspace = c.take_bytes(workspace);
  };
  Carver measure;
  carve(measure);
  Carver cut(scratch.get(measure.size()));
  carve(cut);
  return b;
}

// q, k and v as the kernel reads them: the producers' codes when given, else copies rounded
// into the first three of `b`'s tensors.
struct Bf16Inputs {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
};

Bf16Inputs bf16_inputs(cudaStream_t s, const Bf16Buffers& b, const float* q, const float* k, const float* v,
                       const AttentionInputCodes& codes, size_t n) {
  if (codes.given()) return {codes.q, codes.k, codes.v};
  to_bf16(s, b.tensor[0], q, n);
  to_bf16(s, b.tensor[1], k, n);
  to_bf16(s, b.tensor[2], v, n);
  return {b.tensor[0], b.tensor[1], b.tensor[2]};
}

// How many bf16 tensors the wrapper rounds for itself: q, k, v unless given, then `others`.
int copies_needed(const AttentionInputCodes& codes, int others) { return (codes.given() ? 0 : 3) + others; }

}  // namespace

void flash_attention_forward_f32(cudaStream_t s, Scratch& scratch, float* y, uint16_t* y_codes, float* lse,
                                 const float* q, const float* k, const float* v, const AttentionInputCodes& codes,
                                 const int32_t* doc, const AttentionShape& shape) {
  const FlashAttentionShape f = flash_shape(shape);
  const size_t n = static_cast<size_t>(f.T) * f.H * f.D;
  const int copies = copies_needed(codes, y_codes ? 0 : 1);
  const Bf16Buffers b = carve_buffers(scratch, f, copies);
  const Bf16Inputs in = bf16_inputs(s, b, q, k, v, codes, n);
  uint16_t* out = y_codes ? y_codes : b.tensor[copies - 1];
  flash_attention_forward(s, b.workspace, out, lse, in.q, in.k, in.v, doc, f);
  if (y) widen_bf16(s, y, out, n);
}

void flash_attention_backward_f32(cudaStream_t s, Scratch& scratch, float* dq, float* dk, float* dv, const float* dy,
                                  const float* y, const float* lse, const float* q, const float* k, const float* v,
                                  const AttentionInputCodes& codes, const int32_t* doc,
                                  const AttentionShape& shape) {
  const FlashAttentionShape f = flash_shape(shape);
  const size_t n = static_cast<size_t>(f.T) * f.H * f.D;
  // y's and dy's codes: given, or rounded into the tensors after q's, k's and v's.
  const int copies = copies_needed(codes, (codes.y ? 0 : 1) + (codes.dy ? 0 : 1));
  const Bf16Buffers b = carve_buffers(scratch, f, copies);
  const Bf16Inputs in = bf16_inputs(s, b, q, k, v, codes, n);
  int next_copy = codes.given() ? 0 : 3;
  auto as_codes = [&](const uint16_t* given, const float* floats) -> const uint16_t* {
    if (given) return given;
    uint16_t* copy = b.tensor[next_copy++];
    to_bf16(s, copy, floats, n);
    return copy;
  };
  const uint16_t* y_bf16 = as_codes(codes.y, y);  // y was widened from bf16: exact
  const uint16_t* dy_bf16 = as_codes(codes.dy, dy);
  flash_attention_backward(s, b.workspace, dq, dk, dv, dy_bf16, y_bf16, lse, in.q, in.k, in.v, doc, f);
}

}  // namespace speedrun::cuda
