#include "cli/config_options.h"

#include "util/error.h"

namespace speedrun::cli {

void ConfigOptions::add_to(CLI::App* command, const std::string& default_preset) {
  std::string names;
  for (const std::string& n : Config::preset_names()) names += (names.empty() ? "" : ", ") + n;
  preset = default_preset;
  preset_option = command->add_option("--preset", preset, "model and recipe preset (" + names + ")")
                      ->capture_default_str();
  config_option = command
                      ->add_option("--config", config_file,
                                   "JSON config file: {\"preset\": base, key: value, ...}; without \"preset\" the "
                                   "base is speedrun-124m (src/model/config.h's defaults)")
                      ->excludes(preset_option);
  command->add_option("--set", assignments, "override a config key: --set key=value (repeatable)");
}

std::string ConfigOptions::given_base_flag() const {
  if (preset_option && preset_option->count() > 0) return "--preset";
  if (config_option && config_option->count() > 0) return "--config";
  return "";
}

Config ConfigOptions::apply_assignments(Config base) const {
  for (const std::string& a : assignments) base.set_from_string(a);
  base.validate();
  return base;
}

Config ConfigOptions::build() const {
  if (config_file.empty()) return apply_assignments(Config::preset(preset));
  Config base = Config::from_file(config_file);  // its errors name the file already
  try {
    return apply_assignments(std::move(base));
  } catch (const UsageError& e) {
    // A rule the file's values (with the --set ones) break names the file too.
    throw UsageError(std::string(e.what()) + " (config file '" + config_file + "'" +
                     (assignments.empty() ? "" : " with --set") + ")");
  }
}

}  // namespace speedrun::cli
