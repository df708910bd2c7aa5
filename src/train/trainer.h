// The training loop of SPEC §4: validation every val_every steps and at the end,
// world_size sequences accumulated per step, both optimisers, checkpoints, metrics.
#pragma once

#include <string>
#include <vector>

#include "backends/backend.h"
#include "model/config.h"
#include "model/gpt.h"
#include "optim/optimizer.h"

namespace speedrun {

struct TrainOptions {
  Config config;
  std::string train_glob;    // shards of the training stream
  std::string val_glob;      // shards of the validation stream
  int steps = -1;            // stop after this step count (schedules follow num_iterations); -1: all
  std::string init_path;     // start from these parameters (fresh optimiser, step 0)
  std::string resume_path;   // continue a run exactly (parameters, optimiser, step, data)
  std::string out_dir;       // config.json, metrics.jsonl and checkpoints
  std::string metrics_path;  // default: out_dir/metrics.jsonl
  int log_every = 1;
  bool quiet = false;
};

struct TrainResult {
  int first_step = 0;
  int last_step = 0;                 // steps completed at the end
  std::vector<double> train_losses;  // per step run
  std::vector<std::pair<int, double>> val_losses;
  std::string checkpoint_path;
  double seconds = 0;
};

TrainResult train(const TrainOptions& options, Backend& backend);

// One training step of SPEC §4 on world_size sequences laid out one after another in
// inputs/targets: gradients accumulated with weight 1/world_size, then both optimisers.
// Returns the step's train loss (mean over the sequences, before the update).
double run_training_step(GPT& model, Optimizer& optimizer, std::span<const int32_t> inputs,
                         std::span<const int32_t> targets, int step);

// Mean validation loss over val_tokens (SPEC §1) with the window of `step`.
double evaluate(GPT& model, const std::vector<std::string>& val_files, const Config& config, int step);

}  // namespace speedrun
