// The backend flags that train and bench share: --matmul and --attention-kernel.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "backends/backend_options.h"

namespace speedrun::cli {

struct BackendFlags {
  std::string matmul = "auto";
  std::string attention = "auto";

  void add_to(CLI::App* command);
  // The options for `device` ("cpu" or "cuda") and a model of head size `head_dim`: --matmul
  // auto is SPEC §6's bf16 on cuda and the float32 reference on cpu; --attention-kernel auto
  // is the flash kernel on cuda where it has the head size (32, 64, 128), else reference.
  BackendOptions resolve(const std::string& device, int head_dim) const;
  // " --matmul X --attention-kernel Y" for the flags not at their defaults (resume commands).
  std::string non_default_arguments() const;
};

}  // namespace speedrun::cli
