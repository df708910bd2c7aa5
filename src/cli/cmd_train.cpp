// speedrun train: the training loop (SPEC §4). With no arguments it trains the `tiny`
// preset on the default corpus prepared by scripts/setup.sh.
#include <chrono>
#include <ctime>

#include "backends/backend.h"
#include "cli/commands.h"
#include "cli/config_options.h"
#include "train/checkpoint.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/paths.h"

namespace speedrun::cli {
namespace {

std::string timestamped_run_dir() {
  const std::time_t now = std::time(nullptr);
  char name[64];
  std::strftime(name, sizeof name, "runs/%Y%m%d-%H%M%S", std::localtime(&now));
  return name;
}

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  throw UsageError("--device " + device + ": the CUDA training path is not available yet; use --device cpu");
}

}  // namespace

void register_train_command(CLI::App& app) {
  struct Options {
    ConfigOptions config;
    std::string device = "cpu";
    TrainOptions train;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("train", "train a model (default: the tiny preset on the default corpus)");
  opts->config.add_to(cmd, "tiny");
  cmd->add_option("--device", opts->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  cmd->add_option("--init", opts->train.init_path, "start from this model checkpoint (fresh optimiser)");
  cmd->add_option("--resume", opts->train.resume_path, "resume a run exactly from a checkpoint written by train");
  cmd->add_option("--train", opts->train.train_glob, "glob of training shards (default: the default corpus)");
  cmd->add_option("--val", opts->train.val_glob, "glob of validation shards (default: the default corpus)");
  cmd->add_option("--steps", opts->train.steps, "stop after this many steps (the schedules still follow num_iterations)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--metrics", opts->train.metrics_path, "metrics JSONL file (default: OUT_DIR/metrics.jsonl)");
  cmd->add_option("--out-dir", opts->train.out_dir, "run directory for config, metrics and checkpoints (default: runs/DATE-TIME)");
  cmd->add_option("--log-every", opts->train.log_every, "print a line every N steps")->check(CLI::PositiveNumber);
  cmd->add_flag("--quiet", opts->train.quiet, "print nothing but errors");
  cmd->callback([opts] {
    TrainOptions train = opts->train;
    if (!train.resume_path.empty() && !train.init_path.empty()) throw UsageError("--init and --resume exclude each other");
    if (!train.resume_path.empty()) {
      // A resumed run continues with its own config; --set may still change e.g. val_every.
      train.config = opts->config.apply_assignments(read_checkpoint_config(train.resume_path));
    } else {
      train.config = opts->config.build();
    }
    if (train.train_glob.empty()) train.train_glob = default_data_dir() + "/train_*.bin";
    if (train.val_glob.empty()) train.val_glob = default_data_dir() + "/val_*.bin";
    if (train.out_dir.empty()) train.out_dir = timestamped_run_dir();
    auto backend = make_backend(opts->device);
    const TrainResult result = speedrun::train(train, *backend);
    if (!train.quiet && !result.val_losses.empty()) {
      std::printf("final val loss %.4f after %d steps (%.1f s training)\n", result.val_losses.back().second,
                  result.last_step, result.seconds);
    }
  });
}

}  // namespace speedrun::cli
