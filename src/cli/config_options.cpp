#include "cli/config_options.h"

#include "util/error.h"

namespace speedrun::cli {

void ConfigOptions::add_to(CLI::App* command, const std::string& default_preset) {
  std::string names;
  for (const std::string& n : Config::preset_names()) names += (names.empty() ? "" : ", ") + n;
  preset = default_preset;
  auto* p = command->add_option("--preset", preset, "model and recipe preset (" + names + ")")
                ->capture_default_str();
  command->add_option("--config", config_file, "JSON config file: {\"preset\": base, key: value, ...}")
      ->excludes(p);
  command->add_option("--set", assignments, "override a config key: --set key=value (repeatable)");
}

Config ConfigOptions::apply_assignments(Config base) const {
  for (const std::string& a : assignments) base.set_from_string(a);
  base.validate();
  return base;
}

Config ConfigOptions::build() const {
  return apply_assignments(config_file.empty() ? Config::preset(preset) : Config::from_file(config_file));
}

}  // namespace speedrun::cli
