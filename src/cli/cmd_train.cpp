// speedrun train: the training loop (SPEC §4). With no arguments it trains the `tiny`
// preset on the default corpus prepared by scripts/setup.sh. Ctrl-C or SIGTERM stops
// at the next step with a checkpoint and prints the command that resumes it.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>

#include "backends/backend.h"
#include "cli/activation_flags.h"
#include "cli/backend_flags.h"
#include "cli/commands.h"
#include "cli/config_options.h"
#include "cli/number_checks.h"
#include "backends/cuda_devices.h"
#include "comm/communicator.h"
#include "comm/failure_agreement.h"
#include "comm/nccl_communicator.h"
#include "train/checkpoint.h"
#include "train/data_parallel.h"
#include "train/interrupt.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/paths.h"

namespace speedrun::cli {
namespace {

struct Options {
  ConfigOptions config;
  std::string device = "cpu";
  BackendFlags backend;
  ActivationFlags activations;
  TrainOptions train;
  // Given on the command line (not defaulted), so the resume command repeats them.
  bool explicit_train = false, explicit_val = false, explicit_metrics = false, explicit_steps = false;
  std::string on_nonfinite = "stop";
  std::string on_spike = "warn";
  std::string grad_reduce = "auto";
  double grad_bucket_mb = 25;
};

// runs/DATE-TIME, with -2, -3, ... when a run started in the same second already has it.
std::string timestamped_run_dir() {
  const std::time_t now = std::time(nullptr);
  char name[64];
  std::strftime(name, sizeof name, "runs/%Y%m%d-%H%M%S", std::localtime(&now));
  std::string dir = name;
  for (int n = 2; std::filesystem::exists(dir); ++n) dir = std::string(name) + "-" + std::to_string(n);
  return dir;
}

// Every process must write into rank 0's directory (a timestamp could differ).
void share_out_dir(Communicator& comm, std::string& out_dir) {
  if (comm.size() == 1) return;
  uint64_t length = out_dir.size();
  comm.broadcast(&length, sizeof length, 0);
  out_dir.resize(length);
  comm.broadcast(out_dir.data(), length, 0);
}

// Quotes a word for a POSIX shell only when it needs it, so the common case reads plainly.
std::string shell_word(const std::string& word) {
  const bool plain = !word.empty() && word.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                             "0123456789_-./=:,+@%") == std::string::npos;
  if (plain) return word;
  std::string quoted = "'";
  for (char c : word) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

std::string resume_command(const Options& opts, const TrainOptions& train, const std::string& checkpoint) {
  std::string command = "speedrun train --resume " + shell_word(checkpoint);
  if (opts.explicit_train) command += " --train " + shell_word(train.train_glob);
  if (opts.explicit_val) command += " --val " + shell_word(train.val_glob);
  if (opts.explicit_metrics) command += " --metrics " + shell_word(train.metrics_path);
  if (opts.explicit_steps) command += " --steps " + std::to_string(train.steps);
  if (opts.device != "cpu") command += " --device " + opts.device;
  command += opts.backend.non_default_arguments();
  command += opts.activations.non_default_arguments();
  if (opts.grad_reduce != "auto") command += " --grad-reduce " + opts.grad_reduce;
  // The run's other non-default choices, so that the resumed run behaves as this one did.
  const TrainOptions defaults;
  if (train.save_every != defaults.save_every) command += " --save-every " + std::to_string(train.save_every);
  if (train.keep != defaults.keep) command += " --keep " + std::to_string(train.keep);
  if (train.log_every != defaults.log_every) command += " --log-every " + std::to_string(train.log_every);
  if (opts.on_nonfinite != "stop") command += " --on-nonfinite " + opts.on_nonfinite;
  if (opts.on_spike != "warn") command += " --on-loss-spike " + opts.on_spike;
  if (train.faults.spike_zscore != defaults.faults.spike_zscore) {
    command += " --loss-spike-z " + shell_word(std::to_string(train.faults.spike_zscore));
  }
  if (train.faults.grad_check_every != defaults.faults.grad_check_every) {
    command += " --grad-check-every " + std::to_string(train.faults.grad_check_every);
  }
  return command;
}

// --resume continues with the flags that decided the run's bits, recorded in its checkpoint,
// where they are not given (auto). Given otherwise, or on another device (whose defaults
// then apply), the run continues as asked, with a warning that it no longer reproduces the
// uninterrupted run's bits.
Options with_recorded_numerics(const Options& given, bool speaks) {
  if (given.train.resume_path.empty()) return given;
  const RunNumerics run = read_checkpoint_numerics(given.train.resume_path);
  if (!run.recorded()) return given;
  auto warn = [&](const std::string& what) {
    if (speaks) {
      std::fflush(stdout);
      std::fprintf(stderr, "speedrun: warning: %s: the resumed steps will not be bit-identical to the run's\n",
                   what.c_str());
    }
  };
  if (given.device != run.device) {
    warn("the run trained on " + run.device + " and continues on " + given.device + " with its defaults");
    return given;
  }
  Options opts = given;
  auto adopt = [&](std::string& value, const std::string& recorded, const char* flag) {
    if (value == "auto") {
      value = recorded;
    } else if (value != recorded) {
      warn(std::string(flag) + " " + value + " differs from the run's " + recorded);
    }
  };
  adopt(opts.backend.matmul, run.matmul, "--matmul");
  adopt(opts.backend.attention, run.attention, "--attention-kernel");
  adopt(opts.activations.precision, run.activations, "--activations");
  adopt(opts.grad_reduce, run.grad_reduce, "--grad-reduce");
  if (opts.backend.head_chunk_rows == 0) {
    opts.backend.head_chunk_rows = run.head_chunk_rows;
  } else if (opts.backend.head_chunk_rows != run.head_chunk_rows) {
    warn("--head-chunk-rows " + std::to_string(opts.backend.head_chunk_rows) + " differs from the run's " +
         std::to_string(run.head_chunk_rows));
  }
  return opts;
}

// What the run records of its resolved flags (RunNumerics).
RunNumerics numerics_of(const Options& opts, const TrainOptions& train, const BackendOptions& resolved,
                        const Backend& backend) {
  return {opts.device,
          matmul_precision_name(resolved.matmul),
          attention_kernel_name(resolved.attention),
          ActivationFlags::precision_name(train.activations.precision),
          grad_reduce_name(resolve_grad_reduce(train.grad_reduce.mode, opts.device == "cuda")),
          backend.head_chunk_rows()};
}

TrainOptions resolve(const Options& opts) {
  TrainOptions train = opts.train;
  if (!train.resume_path.empty() && !train.init_path.empty()) throw UsageError("--init and --resume exclude each other");
  if (!train.resume_path.empty() && !opts.config.given_base_flag().empty()) {
    throw UsageError("--resume continues with the checkpoint's own config; " + opts.config.given_base_flag() +
                     " cannot replace it (--set key=value can still change single keys)");
  }
  if (!train.resume_path.empty()) {
    // A resumed run continues with its own config; --set may still change e.g. val_every.
    train.config = opts.config.apply_assignments(read_checkpoint_config(train.resume_path));
    // ...and, unless told otherwise, in its own directory, appending to its metrics.
    if (train.out_dir.empty()) train.out_dir = std::filesystem::path(train.resume_path).parent_path().string();
    if (train.out_dir.empty()) train.out_dir = ".";
  } else {
    train.config = opts.config.build();
  }
  if (train.train_glob.empty()) train.train_glob = default_data_dir() + "/train_*.bin";
  if (train.val_glob.empty()) train.val_glob = default_data_dir() + "/val_*.bin";
  if (train.out_dir.empty()) train.out_dir = timestamped_run_dir();
  // Under mpirun the ranks' stdout is a pseudo-terminal even when mpirun's own output is a
  // file: plain lines there.
  const bool under_mpirun = std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr;
  train.live_progress = ::isatty(::fileno(stdout)) == 1 && !under_mpirun;
  train.faults.non_finite = parse_non_finite_policy(opts.on_nonfinite);
  train.faults.spike = parse_spike_policy(opts.on_spike);
  validate(train.faults);
  train.grad_reduce.mode = parse_grad_reduce(opts.grad_reduce);
  train.grad_reduce.bucket_bytes = static_cast<size_t>(opts.grad_bucket_mb * (1 << 20));
  train.activations = opts.activations.resolve(opts.device);
  return train;
}

// With no GPU visible, make_backend says why (no driver, or a build without CUDA).
int gpu_of_process(const Communicator& comm) {
  const auto visible = static_cast<int>(query_cuda_devices().devices.size());
  return visible == 0 ? comm.local_rank() : gpu_for_local_rank(comm.local_rank(), visible);
}

// --autotune-matmuls: how many product plans were timed, and how many of them run another
// algorithm than cuBLASLt's heuristic first (`speedrun bench` lists them).
void report_matmul_tunings(const Backend& backend, const Communicator& comm, bool quiet) {
  const std::vector<MatmulTuning> tunings = backend.matmul_tunings();
  if (quiet || comm.rank() != 0 || tunings.empty()) return;
  std::printf("%s\n", summarize_tunings(tunings).c_str());
}

void run(const Options& given, Communicator& comm) {
  // Flags and config are the same on every process, and so are their errors: agreed on, rank
  // 0 alone reports one (with the process count's, the commonest mistake under mpirun).
  Options opts;
  TrainOptions train = agreeing_on_failure(comm, [&] {
    opts = with_recorded_numerics(given, comm.rank() == 0 && !given.train.quiet);
    TrainOptions resolved = resolve(opts);
    DataParallel::check_process_count(resolved.config.world_size, comm.size());
    return resolved;
  });
  share_out_dir(comm, train.out_dir);
  // One GPU per process; the GPU buffers of a multi-process run are reduced by NCCL,
  // bootstrapped over `comm` (MPI), which keeps the host-side collectives.
  const bool on_gpu = opts.device == "cuda";
  const BackendOptions backend_options = opts.backend.resolve(opts.device, train.config.head_dim);
  auto backend = make_backend(opts.device, on_gpu ? gpu_of_process(comm) : 0, backend_options);
  std::unique_ptr<Communicator> nccl;
  if (on_gpu && comm.size() > 1) nccl = make_nccl_communicator(comm, *backend);
  train.comm = nccl ? nccl.get() : &comm;
  train.numerics = numerics_of(opts, train, backend_options, *backend);
  InterruptGuard guard;
  clear_interrupt();
  train.stop_requested = pending_interrupt;
  const TrainResult result = speedrun::train(train, *backend);
  report_matmul_tunings(*backend, comm, train.quiet);
  if (!result.stopped_by_signal) return;
  char message[128];
  std::snprintf(message, sizeof message, "stopped by %s after %d of %d steps; checkpoint saved.",
                signal_name(result.stopped_by_signal), result.last_step, result.end_step);
  leave_together(comm, message + ("\nresume with: " + resume_command(given, train, result.checkpoint_path)),
                 exit_status_for_signal(result.stopped_by_signal));
}

}  // namespace

void register_train_command(CLI::App& app) {
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("train", "train a model (default: the tiny preset on the default corpus)");
  opts->config.add_to(cmd, "tiny");
  TrainOptions& t = opts->train;
  cmd->add_option("--device", opts->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  opts->backend.add_to(cmd);
  opts->activations.add_to(cmd);
  cmd->add_option("--init", t.init_path, "start from this model checkpoint (fresh optimiser)");
  cmd->add_option("--resume", t.resume_path,
                  "resume a run exactly from a checkpoint written by train (default out-dir: the checkpoint's)");
  auto* train_glob = cmd->add_option("--train", t.train_glob, "glob of training shards (default: the default corpus)")
                         ->check(shard_glob());
  auto* val_glob = cmd->add_option("--val", t.val_glob, "glob of validation shards (default: the default corpus)")
                       ->check(shard_glob());
  auto* steps = cmd->add_option("--steps", t.steps, "stop after this many steps (the schedules still follow num_iterations)")
                    ->check(whole_number(0));
  auto* metrics = cmd->add_option("--metrics", t.metrics_path, "metrics JSONL file (default: OUT_DIR/metrics.jsonl)");
  cmd->add_option("--out-dir", t.out_dir, "run directory for config, metrics, checkpoints and plots (default: runs/DATE-TIME)");
  cmd->add_option("--log-every", t.log_every, "without a terminal, print a line every N steps")
      ->check(whole_number(1))
      ->capture_default_str();
  cmd->add_option("--save-every", t.save_every, "also save a checkpoint every N steps (0: only at the end)")
      ->check(whole_number(0))
      ->capture_default_str();
  cmd->add_option("--keep", t.keep, "checkpoints of this run kept on disk, newest first (the final one always)")
      ->check(whole_number(1))
      ->capture_default_str();
  cmd->add_flag("--quiet", t.quiet, "print nothing but errors");
  cmd->add_option("--on-nonfinite", opts->on_nonfinite,
                  "a non-finite loss or gradient: skip the step's update, or stop with a checkpoint")
      ->check(CLI::IsMember({"skip", "stop"}))
      ->capture_default_str();
  cmd->add_option("--on-loss-spike", opts->on_spike, "a loss spike (z-score over the last 128 losses): warn or skip")
      ->check(CLI::IsMember({"warn", "skip"}))
      ->capture_default_str();
  cmd->add_option("--loss-spike-z", t.faults.spike_zscore, "z-score that flags a loss spike")
      ->check(finite_number(0, true))
      ->capture_default_str();
  cmd->add_option("--grad-reduce", opts->grad_reduce,
                  "gradient reduction over the logical ranks and processes: exact (bit-identical for any process "
                  "count), overlap "
                  "(each process's sequences accumulated in place, bucketed all-reduce during the backward), auto "
                  "(overlap on cuda, else exact)")
      ->check(CLI::IsMember({"auto", "exact", "overlap"}))
      ->capture_default_str();
  cmd->add_option("--grad-bucket-mb", opts->grad_bucket_mb, "smallest all-reduce of --grad-reduce overlap, in MiB")
      ->check(finite_number(0, true, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--grad-check-every", t.faults.grad_check_every, "check the gradients for non-finite values every N steps")
      ->check(whole_number(1))
      ->capture_default_str();
  cmd->callback([opts, train_glob, val_glob, steps, metrics] {
    opts->explicit_train = train_glob->count() > 0;
    opts->explicit_val = val_glob->count() > 0;
    opts->explicit_steps = steps->count() > 0;
    opts->explicit_metrics = metrics->count() > 0;
    // Under mpirun each process trains world_size / P of the logical ranks; when one
    // fails, all stop with its message.
    std::unique_ptr<Communicator> comm = make_process_communicator();
    if (comm->size() == 1) return run(*opts, *comm);
    try {
      run(*opts, *comm);
    } catch (const AgreedError& e) {  // every process failed here alike, rank 0's checkpoint saved
      leave_together(*comm, std::string("error: ") + e.what(), static_cast<int>(e.code()));
    } catch (const Error& e) {
      comm->abort(e.what(), static_cast<int>(e.code()));
    } catch (const std::exception& e) {
      comm->abort(std::string("internal error: ") + e.what(), 1);
    }
  });
}

}  // namespace speedrun::cli
