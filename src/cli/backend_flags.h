// The backend flags that train and bench share: --matmul, --attention-kernel,
// --autotune-matmuls and --head-chunk-rows.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "backends/backend_options.h"

namespace speedrun::cli {

struct BackendFlags {
  std::string matmul = "auto";
  std::string attention = "auto";
  int autotune_matmuls = 0;
  int head_chunk_rows = 0;  // 0: the backend's default

  // --head-chunk-rows alone, for commands that plan rather than run (speedrun memory).
  static CLI::Option* add_head_chunk_rows(CLI::App* command, int& rows);

  void add_to(CLI::App* command);
  // The options for `device` ("cpu" or "cuda") and a model of head size `head_dim`: --matmul
  // auto is SPEC §6's bf16 on cuda and the float32 reference on cpu; --attention-kernel auto
  // is the flash kernel on cuda where it has the head size (32, 64, 128), else reference.
  // UsageError for --autotune-matmuls on any device but cuda.
  BackendOptions resolve(const std::string& device, int head_dim) const;
  // " --matmul X --attention-kernel Y --autotune-matmuls N --head-chunk-rows R" for the flags
  // not at their defaults (resume commands).
  std::string non_default_arguments() const;
};

}  // namespace speedrun::cli
