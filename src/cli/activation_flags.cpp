#include "cli/activation_flags.h"

namespace speedrun::cli {

void ActivationFlags::add_to(CLI::App* command) {
  command->add_flag("--recompute-activations", recompute,
                    "recompute the lambda mix, rmsnorm outputs, rotated q/k, mixed v and relu^2 in the backward "
                    "instead of keeping them (a third less activation memory, same gradients; see speedrun memory)");
  command
      ->add_option("--activations", precision,
                   "storage of the MLP's pre-activation and the normalised q and k: bf16 (rounded where computed "
                   "and kept as 16-bit codes; SPEC §6) or fp32; auto = bf16 on cuda, fp32 on cpu")
      ->check(CLI::IsMember({"auto", "bf16", "fp32"}))
      ->capture_default_str();
}

ActivationOptions ActivationFlags::resolve(const std::string& device) const {
  ActivationOptions options;
  options.memory = recompute ? ActivationMemory::kRecompute : ActivationMemory::kStore;
  const bool bf16 = precision == "auto" ? device == "cuda" : precision == "bf16";
  options.precision = bf16 ? ActivationPrecision::kBfloat16 : ActivationPrecision::kFloat32;
  return options;
}

std::string ActivationFlags::non_default_arguments() const {
  std::string words;
  if (recompute) words += " --recompute-activations";
  if (precision != ActivationFlags{}.precision) words += " --activations " + precision;
  return words;
}

std::string ActivationFlags::precision_name(ActivationPrecision precision) {
  return precision == ActivationPrecision::kBfloat16 ? "bf16" : "fp32";
}

std::string ActivationFlags::describe(const ActivationOptions& options) {
  return std::string(options.memory == ActivationMemory::kRecompute ? "recomputed" : "stored") + ", " +
         precision_name(options.precision);
}

}  // namespace speedrun::cli
