#include "cli/backend_flags.h"

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
}

BackendOptions BackendFlags::resolve(const std::string& device, int head_dim) const {
  BackendOptions options;
  options.matmul = matmul == "auto" ? (device == "cuda" ? MatmulPrecision::kBfloat16 : MatmulPrecision::kFloat32)
                                    : parse_matmul_precision(matmul);
  options.attention =
      attention == "auto" ? default_attention_kernel(device, head_dim) : parse_attention_kernel(attention);
  return options;
}

std::string BackendFlags::non_default_arguments() const {
  const BackendFlags defaults;
  std::string words;
  if (matmul != defaults.matmul) words += " --matmul " + matmul;
  if (attention != defaults.attention) words += " --attention-kernel " + attention;
  return words;
}

}  // namespace speedrun::cli
