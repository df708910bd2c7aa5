#include "cli/activation_flags.h"

namespace speedrun::cli {

void ActivationFlags::add_to(CLI::App* command) {
  CLI::Option* all = command->add_flag(
      "--recompute-activations", recompute,
      "recompute the rmsnorm outputs, mixed v and relu^2 in the backward instead of keeping them (speedrun-124m "
      "with bf16 activations: 4.6 GiB less for one more pass of those ops; same gradients; see speedrun memory)");
  command
      ->add_flag("--recompute-relu2", recompute_relu2,
                 "keep every activation but relu(h)^2, recomputed from h in the backward (speedrun-124m with bf16 "
                 "activations: 3.1 GiB less for one more relu^2 pass; same gradients)")
      ->excludes(all);
  command
      ->add_option("--activations", precision,
                   "storage precision of the activations (residual stream, norms, q/k/v, attention output, MLP): "
                   "bf16 (rounded where computed and kept as 16-bit codes; SPEC §6) or fp32; auto = bf16 on cuda, "
                   "fp32 on cpu")
      ->check(CLI::IsMember({"auto", "bf16", "fp32"}))
      ->capture_default_str();
}

ActivationOptions ActivationFlags::resolve(const std::string& device) const {
  ActivationOptions options;
  options.memory = recompute         ? ActivationMemory::kRecompute
                   : recompute_relu2 ? ActivationMemory::kRecomputeRelu2
                                     : ActivationMemory::kStore;
  const bool bf16 = precision == "auto" ? device == "cuda" : precision == "bf16";
  options.precision = bf16 ? ActivationPrecision::kBfloat16 : ActivationPrecision::kFloat32;
  return options;
}

std::string ActivationFlags::non_default_arguments() const {
  std::string words;
  if (recompute) words += " --recompute-activations";
  if (recompute_relu2) words += " --recompute-relu2";
  if (precision != ActivationFlags{}.precision) words += " --activations " + precision;
  return words;
}

std::string ActivationFlags::precision_name(ActivationPrecision precision) {
  return precision == ActivationPrecision::kBfloat16 ? "bf16" : "fp32";
}

std::string ActivationFlags::memory_name(ActivationMemory memory) {
  switch (memory) {
    case ActivationMemory::kRecompute: return "recomputed";
    case ActivationMemory::kRecomputeRelu2: return "stored, relu^2 recomputed";
    case ActivationMemory::kStore: break;
  }
  return "stored";
}

std::string ActivationFlags::describe(const ActivationOptions& options) {
  return memory_name(options.memory) + ", " + precision_name(options.precision);
}

}  // namespace speedrun::cli
