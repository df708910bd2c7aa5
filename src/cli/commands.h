// Each subcommand lives in its own cmd_<name>.cpp and registers itself here.
// Callbacks throw speedrun::Error (or UsageError) on failure; main() prints and exits.
#pragma once

#include <CLI/CLI.hpp>

namespace speedrun::cli {

void register_tokenize_command(CLI::App& app);
void register_prepare_command(CLI::App& app);
void register_inspect_command(CLI::App& app);
void register_device_command(CLI::App& app);
void register_init_command(CLI::App& app);
void register_train_command(CLI::App& app);
void register_bench_command(CLI::App& app);
void register_memory_command(CLI::App& app);
void register_eval_command(CLI::App& app);
void register_sample_command(CLI::App& app);
void register_plot_command(CLI::App& app);

}  // namespace speedrun::cli
