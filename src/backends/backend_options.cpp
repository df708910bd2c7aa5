#include "backends/backend_options.h"

#include "backends/flash_attention.h"
#include "util/error.h"

namespace speedrun {

MatmulPrecision parse_matmul_precision(const std::string& name) {
  if (name == "fp32") return MatmulPrecision::kFloat32;
  if (name == "bf16") return MatmulPrecision::kBfloat16;
  throw UsageError("--matmul '" + name + "': expected fp32 or bf16");
}

std::string matmul_precision_name(MatmulPrecision precision) {
  return precision == MatmulPrecision::kBfloat16 ? "bf16" : "fp32";
}

AttentionKernel parse_attention_kernel(const std::string& name) {
  if (name == "reference") return AttentionKernel::kReference;
  if (name == "flash") return AttentionKernel::kFlash;
  throw UsageError("--attention-kernel '" + name + "': expected reference or flash");
}

AttentionKernel default_attention_kernel(const std::string& device, int head_dim) {
  const bool flash = device == "cuda" && flash_attention_supports_head_size(head_dim);
  return flash ? AttentionKernel::kFlash : AttentionKernel::kReference;
}

std::string attention_kernel_name(AttentionKernel kernel) {
  return kernel == AttentionKernel::kFlash ? "flash" : "reference";
}

}  // namespace speedrun
