// speedrun eval: the validation loss of a checkpoint (SPEC §1), with the window of the
// checkpoint's step (SPEC §3) — so it reproduces the run's own validation exactly.
#include <cmath>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/activation_flags.h"
#include "cli/commands.h"
#include "cli/number_checks.h"
#include "model/gpt.h"
#include "train/checkpoint.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/paths.h"

namespace speedrun::cli {

void register_eval_command(CLI::App& app) {
  struct Options {
    std::string checkpoint;
    std::string val_glob;
    int val_seq_len = 0;
    int64_t val_tokens = 0;
    int step = -1;
    bool json = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("eval", "validation loss of a checkpoint");
  cmd->add_option("--ckpt", opts->checkpoint, "model checkpoint (FILE.safetensors)")->required();
  cmd->add_option("--val", opts->val_glob, "glob of validation shards (default: the default corpus)")
      ->check(shard_glob());
  cmd->add_option("--val-seq-len", opts->val_seq_len, "tokens per validation sequence (default: the checkpoint's)")
      ->check(whole_number(1));
  cmd->add_option("--val-tokens", opts->val_tokens, "validation tokens (default: the checkpoint's)")
      ->check(whole_number(1, std::numeric_limits<int64_t>::max()));
  cmd->add_option("--step", opts->step, "use the attention window of this step (default: the checkpoint's step)")
      ->check(whole_number(0));
  cmd->add_flag("--json", opts->json, "print {\"val_loss\", \"step\", ...} as one JSON line");
  cmd->callback([opts] {
    Config config = read_checkpoint_config(opts->checkpoint);
    if (opts->val_seq_len > 0) config.val_seq_len = opts->val_seq_len;
    if (opts->val_tokens > 0) config.val_tokens = opts->val_tokens;
    config.validate();
    if (opts->step > config.num_iterations) {
      throw UsageError("--step " + std::to_string(opts->step) + " is past the checkpoint's num_iterations (" +
                       std::to_string(config.num_iterations) + "), whose window schedule it would extrapolate");
    }
    const std::string val_glob = opts->val_glob.empty() ? default_data_dir() + "/val_*.bin" : opts->val_glob;
    const std::vector<std::string> val_files = expand_glob(val_glob);
    require_validation_data(val_files, config);
    // A CPU run's numerics as it recorded them (its validation then reproduced bit for bit),
    // else the float32 reference.
    const RunNumerics run = read_checkpoint_numerics(opts->checkpoint);
    BackendOptions backend_options;
    ActivationFlags activation_flags;
    if (run.device == "cpu") {
      backend_options.matmul = parse_matmul_precision(run.matmul);
      backend_options.head_chunk_rows = run.head_chunk_rows;
      activation_flags.precision = run.activations;
    }
    const ActivationOptions activations = activation_flags.resolve("cpu");
    auto backend = make_cpu_backend(backend_options);
    // Forward passes only: no training activations beyond one block.
    GPT model(config, *backend, config.attn_block_size, config.val_seq_len, activations);
    const int checkpoint_step = load_model(opts->checkpoint, model);
    const int step = opts->step >= 0 ? opts->step : checkpoint_step;
    const double loss = evaluate(model, val_files, config, step);
    if (!std::isfinite(loss)) {
      throw Error("the validation loss of '" + opts->checkpoint + "' is not finite (" + std::to_string(loss) +
                  "): its weights have overflowed");
    }
    const int window = long_window_blocks(config, step);
    if (opts->json) {
      const nlohmann::json record = {{"val_loss", loss},         {"step", step},
                                     {"window_blocks", window},  {"val_tokens", config.val_tokens},
                                     {"val_seq_len", config.val_seq_len}, {"checkpoint", opts->checkpoint},
                                     {"matmul", matmul_precision_name(backend_options.matmul)},
                                     {"activations", ActivationFlags::precision_name(activations.precision)},
                                     {"head_chunk_rows", backend->head_chunk_rows()}};
      std::printf("%s\n", record.dump().c_str());
    } else {
      std::printf("val loss %.6f | step %d | window %d blocks | %lld tokens in sequences of %d\n", loss, step, window,
                  static_cast<long long>(config.val_tokens), config.val_seq_len);
    }
  });
}

}  // namespace speedrun::cli
