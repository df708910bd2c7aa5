#include "cli/backend_flags.h"

#include <string>

#include "backends/backend.h"
#include "util/error.h"

namespace speedrun::cli {

void BackendFlags::add_to(CLI::App* command) {
  command
      ->add_option("--matmul", matmul,
                   "matmul inputs: bf16 (rounded, float32 accumulation; SPEC §6) or fp32; auto = bf16 on cuda, "
                   "fp32 on cpu")
      ->check(CLI::IsMember({"auto", "bf16", "fp32"}))
      ->capture_default_str();
  command
      ->add_option("--attention-kernel", attention,
                   "cuda attention: reference (float32) or flash (bf16 FlashAttention-2-style kernel, head sizes "
                   "32, 64, 128); auto = flash on cuda where it has the model's head size, else reference")
      ->check(CLI::IsMember({"auto", "reference", "flash"}))
      ->capture_default_str();
  command
      ->add_option("--autotune-matmuls", autotune_matmuls,
                   "cuda: time up to N of cuBLASLt's candidate algorithms for each new product plan (at its "
                   "first product, on random operands) and run the fastest; 0 = the heuristic's first. The "
                   "choice can differ between processes")
      ->check(CLI::Range(0, 64))
      ->capture_default_str();
  add_head_chunk_rows(command, head_chunk_rows);
}

CLI::Option* BackendFlags::add_head_chunk_rows(CLI::App* command, int& rows) {
  return command
      ->add_option("--head-chunk-rows", rows,
                   "rows of lm_head logits computed at a time (memory: rows x padded vocabulary floats; taller "
                   "chunks add into the head's weight gradient less often); 0 = the backend's default (cpu " +
                       std::to_string(kCpuHeadChunkRows) + ", cuda " + std::to_string(kCudaHeadChunkRows) + ")")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
}

BackendOptions BackendFlags::resolve(const std::string& device, int head_dim) const {
  BackendOptions options;
  options.matmul = matmul == "auto" ? (device == "cuda" ? MatmulPrecision::kBfloat16 : MatmulPrecision::kFloat32)
                                    : parse_matmul_precision(matmul);
  options.attention =
      attention == "auto" ? default_attention_kernel(device, head_dim) : parse_attention_kernel(attention);
  if (autotune_matmuls > 0 && device != "cuda") {
    throw UsageError("--autotune-matmuls times cuBLASLt's algorithms: it needs --device cuda");
  }
  options.autotune_matmuls = autotune_matmuls;
  options.head_chunk_rows = head_chunk_rows;
  return options;
}

std::string BackendFlags::non_default_arguments() const {
  const BackendFlags defaults;
  std::string words;
  if (matmul != defaults.matmul) words += " --matmul " + matmul;
  if (attention != defaults.attention) words += " --attention-kernel " + attention;
  if (autotune_matmuls != defaults.autotune_matmuls) words += " --autotune-matmuls " + std::to_string(autotune_matmuls);
  if (head_chunk_rows != defaults.head_chunk_rows) words += " --head-chunk-rows " + std::to_string(head_chunk_rows);
  return words;
}

}  // namespace speedrun::cli
