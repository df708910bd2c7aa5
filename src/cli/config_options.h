// The config options that init, train and bench share: --preset, --config, --set.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "model/config.h"

namespace speedrun::cli {

struct ConfigOptions {
  std::string preset;
  std::string config_file;
  std::vector<std::string> assignments;
  CLI::Option* preset_option = nullptr;
  CLI::Option* config_option = nullptr;

  void add_to(CLI::App* command, const std::string& default_preset);
  // Base (preset or file) with the --set assignments applied, validated.
  Config build() const;
  // The flag that names the base (--preset or --config) when one was given, else "".
  std::string given_base_flag() const;
  // Applies only the --set assignments to a given base (e.g. a checkpoint's config).
  Config apply_assignments(Config base) const;
};

}  // namespace speedrun::cli
