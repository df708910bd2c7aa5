// The activation flags that train, bench and memory share: --recompute-activations and
// --activations (storage precision).
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "model/gpt.h"

namespace speedrun::cli {

struct ActivationFlags {
  bool recompute = false;
  std::string precision = "auto";

  void add_to(CLI::App* command);
  // The options for `device` ("cpu" or "cuda"): --activations auto is SPEC §6's bf16 on
  // cuda and float32 on cpu.
  ActivationOptions resolve(const std::string& device) const;
  // " --recompute-activations --activations X" for the flags not at their defaults.
  std::string non_default_arguments() const;
  // "stored, bf16" and the like, for run descriptions.
  static std::string describe(const ActivationOptions& options);
  static std::string precision_name(ActivationPrecision precision);
};

}  // namespace speedrun::cli
