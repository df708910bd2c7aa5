// How a backend computes where SPEC §6 leaves a choice: the precision of matmul inputs,
// the attention kernel, and (for tests) the FP8 head's emulated path. The defaults are the
// float32 reference; `speedrun train --device cuda` asks for SPEC §6's bf16 matmuls.
#pragma once

#include <string>

namespace speedrun {

enum class MatmulPrecision {
  kFloat32,   // float32 inputs and products (the CPU reference)
  kBfloat16,  // inputs rounded to bfloat16 (nearest even), products accumulated in float32
};

enum class AttentionKernel {
  kReference,  // float32 throughout
  kFlash,      // CUDA only: the bf16 FlashAttention-2-style kernel (q, k, v rounded to bf16)
};

struct BackendOptions {
  MatmulPrecision matmul = MatmulPrecision::kFloat32;
  AttentionKernel attention = AttentionKernel::kReference;
  // CUDA: run the FP8 head's casts into float32 products even where FP8 tensor cores exist
  // (the path GPUs below sm_89 take), so that it can be tested on any GPU.
  bool emulate_fp8_head = false;
  // CUDA: for each new product plan, time up to this many of cuBLASLt's heuristic candidates
  // on random operands laid out as the plan's and run the fastest (0 or 1: the heuristic's
  // first, untimed). Costs milliseconds per plan at its first product; the choice can differ
  // between processes, so runs are then reproducible within a process only.
  int autotune_matmuls = 0;
  // Rows of the lm_head's logits computed at a time (Backend::head_chunk_rows); 0: the
  // backend's default (kCpuHeadChunkRows, kCudaHeadChunkRows). Taller chunks hold more
  // logits and add into the head's dW less often.
  int head_chunk_rows = 0;
  // CPU: honour Backend::hold_operand (false: round every operand per product, so that a test
  // can show holding changes no result, only the copies made).
  bool hold_operands = true;
  // CPU: fill memory lent by Backend::lend_scratch with NaN, so that a test can show that
  // the lender reads none of it while lent and overwrites it before reading it afterwards.
  bool poison_lent_scratch = false;
};

// "fp32" / "bf16"; UsageError naming the flag otherwise.
MatmulPrecision parse_matmul_precision(const std::string& name);
std::string matmul_precision_name(MatmulPrecision precision);
// "reference" / "flash"; UsageError naming the flag otherwise.
AttentionKernel parse_attention_kernel(const std::string& name);
std::string attention_kernel_name(AttentionKernel kernel);
// --attention-kernel auto: the flash kernel on "cuda" where it has the head size (32, 64,
// 128), the reference attention otherwise.
AttentionKernel default_attention_kernel(const std::string& device, int head_dim);

}  // namespace speedrun
