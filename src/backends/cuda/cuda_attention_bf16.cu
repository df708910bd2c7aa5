// The float32 backend's attention through the bf16 flash kernel (cuda_flash_attention.cu),
// chosen with --attention-kernel flash (AttentionKernel::kFlash): inputs are rounded to bf16 on the way in and
// the output widened on the way out, so a model can be trained and timed with the fast
// kernel before the activations themselves are bf16. Never run on a GPU yet.
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

// `count` bf16 tensors of T*H*D and the kernel's workspace, carved from one scratch buffer.
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

}  // namespace

void flash_attention_forward_f32(cudaStream_t s, Scratch& scratch, float* y, uint16_t* y_codes, float* lse,
                                 const float* q, const float* k, const float* v, const int32_t* doc,
                                 const AttentionShape& shape) {
  const FlashAttentionShape f = flash_shape(shape);
  const size_t n = static_cast<size_t>(f.T) * f.H * f.D;
  const Bf16Buffers b = carve_buffers(scratch, f, y_codes ? 3 : 4);
  to_bf16(s, b.tensor[0], q, n);
  to_bf16(s, b.tensor[1], k, n);
  to_bf16(s, b.tensor[2], v, n);
  uint16_t* out = y_codes ? y_codes : b.tensor[3];
  flash_attention_forward(s, b.workspace, out, lse, b.tensor[0], b.tensor[1], b.tensor[2], doc, f);
  widen_bf16(s, y, out, n);
}

void flash_attention_backward_f32(cudaStream_t s, Scratch& scratch, float* dq, float* dk, float* dv, const float* dy,
                                  const float* y, const float* lse, const float* q, const float* k, const float* v,
                                  const int32_t* doc, const AttentionShape& shape) {
  const FlashAttentionShape f = flash_shape(shape);
  const size_t n = static_cast<size_t>(f.T) * f.H * f.D;
  const Bf16Buffers b = carve_buffers(scratch, f, 5);
  to_bf16(s, b.tensor[0], q, n);
  to_bf16(s, b.tensor[1], k, n);
  to_bf16(s, b.tensor[2], v, n);
  to_bf16(s, b.tensor[3], y, n);  // y was widened from bf16: this is exact
  to_bf16(s, b.tensor[4], dy, n);
  flash_attention_backward(s, b.workspace, dq, dk, dv, b.tensor[4], b.tensor[3], lse, b.tensor[0], b.tensor[1],
                           b.tensor[2], doc, f);
}

}  // namespace speedrun::cuda
