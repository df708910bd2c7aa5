// The training loop of SPEC §4: validation every val_every steps and at the end,
// world_size sequences accumulated per step, both optimisers, checkpoints (final,
// periodic with rotation, and on interrupt), metrics, progress, plots and summary.
#pragma once

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "model/config.h"
#include "model/gpt.h"
#include "optim/optimizer.h"
#include "train/checkpoint.h"
#include "train/data_parallel.h"
#include "train/fault_monitor.h"
#include "train/progress.h"

namespace speedrun {

struct TrainOptions {
  Config config;
  std::string train_glob;    // shards of the training stream
  std::string val_glob;      // shards of the validation stream
  int steps = -1;            // stop after this step count (schedules follow num_iterations); -1: all
  std::string init_path;     // start from these parameters (fresh optimiser, step 0)
  std::string resume_path;   // continue a run exactly (parameters, optimiser, step, data)
  std::string out_dir;       // config.json, metrics.jsonl, checkpoints and plots
  std::string metrics_path;  // default: out_dir/metrics.jsonl
  int log_every = 1;
  bool quiet = false;
  bool live_progress = false;      // rewrite one status line ('\r'): for terminals
  std::ostream* progress_stream = nullptr;  // default std::cout
  int save_every = 0;              // also save every N steps (0: only at the end)
  int keep = 2;                    // checkpoints of this run kept on disk, newest first
  bool write_plots = true;         // loss.svg and loss.png in out_dir at the end
  // Polled before every step and after every validation: a signal number stops the run
  // there with a checkpoint.
  std::function<int()> stop_requested;
  // The run's processes (mpirun): null means this process alone. Only rank 0 prints,
  // writes metrics, plots and checkpoints.
  Communicator* comm = nullptr;
  // How gradients are reduced over processes (DataParallel): exact or overlapped.
  GradReduceOptions grad_reduce;
  FaultMonitorOptions faults;      // non-finite losses/gradients and loss spikes
  // Keep every activation for the backward or recompute the cheap ones (less memory), and
  // the precision the largest are kept in.
  ActivationOptions activations;
  // The resolved flags that decide the run's bits, recorded in its checkpoints (none: not
  // recorded).
  RunNumerics numerics;
};

struct TrainResult {
  int first_step = 0;
  int last_step = 0;                 // steps completed at the end
  int end_step = 0;                  // where this run was to end (--steps, else num_iterations)
  std::vector<double> train_losses;  // per step run
  std::vector<std::pair<int, double>> val_losses;
  std::string checkpoint_path;       // the last checkpoint saved
  std::vector<std::string> checkpoints_kept;  // this run's checkpoints still on disk, oldest first
  double seconds = 0;                // training time, validation excluded
  int stopped_by_signal = 0;         // the signal that stopped the run early, or 0
  std::vector<int> skipped_steps;    // steps whose update a fault policy skipped
  RunSummary summary;
};

TrainResult train(const TrainOptions& options, Backend& backend);

// One training step of SPEC §4: this process's sequences (dp.local_ranks() of them,
// one after another in inputs/targets), gradients averaged over all world_size
// sequences of every process, then both optimisers. Returns the step's train loss
// (mean over all sequences, before the update).
// With a monitor and a device flag, a fault verdict other than "apply" leaves the
// parameters and optimiser state unchanged, decided on the device (DeviceFaultFlag);
// without them a non-finite loss is an Error.
double run_training_step(DataParallel& dp, Optimizer& optimizer, std::span<const int32_t> inputs,
                         std::span<const int32_t> targets, int step, FaultMonitor* monitor = nullptr,
                         StepVerdict* verdict = nullptr, DeviceFaultFlag* flag = nullptr);

// Throws, naming val_tokens and the shards, unless the validation shards hold the
// val_tokens that evaluate() reads, or naming the shard and offset of a token they read
// that is not below vocab_size. Callers check once, before the first evaluation.
void require_validation_data(const std::vector<std::string>& val_files, const Config& config);

// Mean validation loss over val_tokens (SPEC §1) with the window of `step`.
// With dp, each process evaluates its own ranks' sequences of every window.
double evaluate(GPT& model, const std::vector<std::string>& val_files, const Config& config, int step,
                DataParallel* dp = nullptr);

// The checkpoint file name of a step inside a run directory: DIR/step_NNNNNN.safetensors.
std::string checkpoint_name(const std::string& out_dir, int step);

}  // namespace speedrun
