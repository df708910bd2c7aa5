// The activation flags that train, bench and memory share: --recompute-activations (or
// --recompute-relu2) and --activations (storage precision).
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "model/gpt.h"

namespace speedrun::cli {

struct ActivationFlags {
  bool recompute = false;
  bool recompute_relu2 = false;
  std::string precision = "auto";

  void add_to(CLI::App* command);
  // The options for `device` ("cpu" or "cuda"): --activations auto is SPEC §6's bf16 on
  // cuda and float32 on cpu.
  ActivationOptions resolve(const std::string& device) const;
  // " --recompute-activations --activations X" and the like, for the flags not at their
  // defaults.
  std::string non_default_arguments() const;
  // "stored, bf16" and the like, for run descriptions.
  static std::string describe(const ActivationOptions& options);
  // "stored", "recomputed" or "stored, relu^2 recomputed".
  static std::string memory_name(ActivationMemory memory);
  static std::string precision_name(ActivationPrecision precision);
};

}  // namespace speedrun::cli
