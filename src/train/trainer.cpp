#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "data/prefetcher.h"
#include "data/token_stream.h"
#include "optim/optimizer.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "util/atomic_file.h"
#include "util/error.h"

namespace speedrun {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::span<const int32_t> sequence(const TokenBuffer& tokens, int index, int seq_len) {
  return {tokens.data() + static_cast<size_t>(index) * seq_len, static_cast<size_t>(seq_len)};
}

void require_finite(double loss, const char* what, int step) {
  if (!std::isfinite(loss)) {
    throw Error(std::string(what) + " is not finite at step " + std::to_string(step) + " (" + std::to_string(loss) +
                ")");
  }
}

std::string checkpoint_name(const std::string& out_dir, int step) {
  char name[64];
  std::snprintf(name, sizeof name, "step_%06d.safetensors", step);
  return (std::filesystem::path(out_dir) / name).string();
}

void prepare_out_dir(const std::string& out_dir) {
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec || !std::filesystem::is_directory(out_dir)) {
    throw Error("cannot create output directory '" + out_dir + "'" + (ec ? ": " + ec.message() : ""));
  }
}

}  // namespace

double run_training_step(GPT& model, Optimizer& optimizer, std::span<const int32_t> inputs,
                         std::span<const int32_t> targets, int step) {
  const Config& config = model.config();
  const int window = long_window_blocks(config, step);
  const size_t seq = static_cast<size_t>(config.seq_len);
  model.zero_grad();
  double loss = 0;
  const float grad_scale = 1.f / static_cast<float>(config.world_size);
  for (int r = 0; r < config.world_size; ++r) {
    loss += model.forward_backward(inputs.subspan(r * seq, seq), targets.subspan(r * seq, seq), window, grad_scale);
  }
  loss /= config.world_size;
  require_finite(loss, "training loss", step);
  optimizer.step(model.params(), model.grads(), step);
  return loss;
}

double evaluate(GPT& model, const std::vector<std::string>& val_files, const Config& config, int step) {
  const size_t windows = validation_windows(static_cast<size_t>(config.val_tokens), config.world_size,
                                            config.val_seq_len);
  TokenStream stream(val_files, config.world_size, config.val_seq_len, static_cast<uint32_t>(config.vocab_size));
  const int window = long_window_blocks(config, step);
  double total = 0;
  for (size_t w = 0; w < windows; ++w) {
    TokenBatch batch = stream.next(0, config.world_size);
    for (int r = 0; r < config.world_size; ++r) {
      total += model.forward(sequence(batch.inputs, r, config.val_seq_len), sequence(batch.targets, r, config.val_seq_len),
                             window);
    }
  }
  return total / (static_cast<double>(windows) * config.world_size);
}

TrainResult train(const TrainOptions& options, Backend& backend) {
  const auto launch = Clock::now();
  const Config& config = options.config;
  config.validate();
  const int end_step = options.steps < 0 ? config.num_iterations : std::min(options.steps, config.num_iterations);
  if (options.steps < -1) throw UsageError("--steps must be >= 0, got " + std::to_string(options.steps));

  const std::vector<std::string> train_files = expand_glob(options.train_glob);
  const std::vector<std::string> val_files = expand_glob(options.val_glob);
  // Fail on indivisible val_tokens before spending any time training.
  validation_windows(static_cast<size_t>(config.val_tokens), config.world_size, config.val_seq_len);

  prepare_out_dir(options.out_dir);
  GPT model(config, backend, config.seq_len, config.val_seq_len);
  Optimizer optimizer(config, model.layout(), backend);
  TrainingState state;
  if (!options.resume_path.empty()) {
    state = load_checkpoint(options.resume_path, model, optimizer);
  } else if (!options.init_path.empty()) {
    load_model(options.init_path, model);
  }
  write_file_atomically((std::filesystem::path(options.out_dir) / "config.json").string(), config.to_json().dump(2) + "\n");
  MetricsWriter metrics(options.metrics_path.empty() ? (std::filesystem::path(options.out_dir) / "metrics.jsonl").string()
                                                     : options.metrics_path);

  TokenStream train_stream(train_files, config.world_size, config.seq_len, static_cast<uint32_t>(config.vocab_size));
  train_stream.seek(state.data_position);
  Prefetcher prefetcher(std::move(train_stream), 0, config.world_size);

  TrainResult result;
  result.first_step = state.step;
  const double tokens_per_step = static_cast<double>(config.world_size) * config.seq_len;
  auto validate = [&](int step) {
    const auto start = Clock::now();
    const double loss = evaluate(model, val_files, config, step);
    require_finite(loss, "validation loss", step);
    result.val_losses.emplace_back(step, loss);
    metrics.write({{"step", step}, {"val_loss", loss}, {"window_blocks", long_window_blocks(config, step)},
                   {"elapsed_s", seconds_since(launch)}, {"val_seconds", seconds_since(start)}});
    if (!options.quiet) std::printf("step %d/%d | val loss %.4f\n", step, config.num_iterations, loss), std::fflush(stdout);
  };

  double training_seconds = 0;
  for (int step = state.step; step < end_step; ++step) {
    if (step % config.val_every == 0) validate(step);
    const auto start = Clock::now();
    TokenBatch batch = prefetcher.next();
    const double loss = run_training_step(model, optimizer, batch.inputs, batch.targets, step);
    state.step = step + 1;
    state.data_position = batch.position_after;
    const double step_seconds = seconds_since(start);
    training_seconds += step_seconds;
    result.train_losses.push_back(loss);
    metrics.write({{"step", step}, {"train_loss", loss}, {"lr_mult", lr_multiplier(config, step)},
                   {"window_blocks", long_window_blocks(config, step)}, {"step_seconds", step_seconds},
                   {"tokens_per_second", tokens_per_step / step_seconds}, {"elapsed_s", seconds_since(launch)}});
    if (!options.quiet && (step % options.log_every == 0 || step + 1 == end_step)) {
      std::printf("step %d/%d | train loss %.4f | %.0f tok/s | %.0f ms/step\n", step + 1, config.num_iterations, loss,
                  tokens_per_step / step_seconds, 1000 * step_seconds);
      std::fflush(stdout);
    }
  }
  // SPEC §4: after the last step, validate once more with window(num_iterations). A run
  // stopped early by --steps validates too, with the window of the step it stopped at.
  if (result.val_losses.empty() || result.val_losses.back().first != state.step) validate(state.step);
  result.checkpoint_path = checkpoint_name(options.out_dir, state.step);
  save_checkpoint(result.checkpoint_path, model, optimizer, state);
  result.last_step = state.step;
  result.seconds = training_seconds;
  if (!options.quiet) {
    std::printf("saved %s\n", result.checkpoint_path.c_str());
    std::fflush(stdout);
  }
  return result;
}

}  // namespace speedrun
