// speedrun init: writes a freshly initialised model checkpoint (SPEC §2's init).
#include <filesystem>

#include "cli/commands.h"
#include "cli/config_options.h"
#include "cli/number_checks.h"
#include "model/gpt.h"
#include "train/checkpoint.h"
#include "util/error.h"

namespace speedrun::cli {

void register_init_command(CLI::App& app) {
  struct Options {
    ConfigOptions config;
    int64_t seed = 0;
    std::string out;
    bool force = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("init", "write an initialised model as safetensors (PyTorch state-dict names)");
  opts->config.add_to(cmd, "tiny");
  cmd->add_option("--seed", opts->seed, "initialisation seed")
      ->check(whole_number(std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()))
      ->capture_default_str();
  cmd->add_option("--out", opts->out, "output FILE.safetensors")->required();
  cmd->add_flag("--force", opts->force, "replace --out if it exists (a trained checkpoint, say)");
  cmd->callback([opts] {
    if (opts->out.empty() || std::filesystem::is_directory(opts->out)) {
      throw UsageError("--out '" + opts->out + "' must name a file, not a directory");
    }
    if (!opts->force && std::filesystem::exists(opts->out)) {
      throw UsageError("--out '" + opts->out + "' exists; pass --force to replace it");
    }
    Config config = opts->config.build();
    config.seed = opts->seed;
    auto backend = make_cpu_backend();
    const int block = config.attn_block_size;
    GPT model(config, *backend, block, block);  // no activations needed beyond one block
    save_model(opts->out, model, 0);
    std::printf("wrote %s (%zu parameters, seed %lld)\n", opts->out.c_str(), model.layout().parameter_count(),
                static_cast<long long>(config.seed));
  });
}

}  // namespace speedrun::cli
