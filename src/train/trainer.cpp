// The training loop: one TrainingRun object owns the model, optimiser, data, metrics,
// progress and checkpoints of a run; train() builds it and runs it.
#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>

#include <nlohmann/json.hpp>

#include "comm/failure_agreement.h"
#include "data/host_buffer.h"
#include "data/prefetcher.h"
#include "data/token_stream.h"
#include "optim/optimizer.h"
#include "plot/loss_plot.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "util/atomic_file.h"
#include "util/error.h"

namespace speedrun {
namespace {

namespace fs = std::filesystem;
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

void prepare_out_dir(const std::string& out_dir) {
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec || !fs::is_directory(out_dir)) {
    throw Error("cannot create output directory '" + out_dir + "'" + (ec ? ": " + ec.message() : ""));
  }
}

// A run's checkpoints in dir (model files, step_NNNNNN.safetensors) by step.
std::map<int, std::string> checkpoints_in(const std::string& dir) {
  std::map<int, std::string> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    int step = -1, length = 0;
    const std::string name = entry.path().filename().string();
    if (std::sscanf(name.c_str(), "step_%d.safetensors%n", &step, &length) == 1 &&
        length == static_cast<int>(name.size()) && step >= 0) {
      found[step] = entry.path().string();
    }
  }
  return found;
}

// A directory or metrics file that already holds a run is refused: the runs' configs,
// metrics and checkpoints would be mixed. `what` says who asks.
void refuse_a_run_in(const std::string& out_dir, const std::string& metrics_path, const std::string& what) {
  std::vector<std::string> found;
  for (const char* name : {"config.json", "metrics.jsonl"}) {
    if (fs::exists(fs::path(out_dir) / name)) found.push_back(name);
  }
  const std::map<int, std::string> checkpoints = checkpoints_in(out_dir);
  for (const auto& [step, path] : checkpoints) found.push_back(fs::path(path).filename().string());
  if (!found.empty()) {
    std::string names;
    for (size_t i = 0; i < found.size() && i < 4; ++i) names += (i ? ", " : "") + found[i];
    if (found.size() > 4) names += ", ...";
    // A run that stopped before saving (killed, or failed before its first checkpoint with
    // several processes) leaves nothing to resume: say so rather than leave the user guessing.
    const std::string resume = checkpoints.empty()
                                   ? ", or remove it (that run saved no checkpoint to resume)"
                                   : ", or continue that run with --resume " + checkpoints.rbegin()->second;
    throw UsageError(what + ": --out-dir '" + out_dir + "' already holds a run (" + names +
                     "); choose another directory" + resume);
  }
  std::error_code ec;
  if (fs::file_size(metrics_path, ec) > 0 && !ec) {
    throw UsageError(what + ": --metrics '" + metrics_path +
                     "' is not empty (another run's metrics, or another file); choose another file");
  }
}

// A resumed run continues its own directory, or starts an empty one. In its own, a later
// checkpoint means the run went on past this one: resuming would overwrite that timeline.
void refuse_forking_a_run(const TrainOptions& options, const std::string& metrics_path, int resume_step) {
  const fs::path own = fs::path(options.resume_path).parent_path();
  std::error_code ec;
  if (!fs::equivalent(options.out_dir, own.empty() ? fs::path(".") : own, ec)) {
    refuse_a_run_in(options.out_dir, metrics_path, "a run resumed into another directory");
    return;
  }
  const std::map<int, std::string> checkpoints = checkpoints_in(options.out_dir);
  const auto later = checkpoints.upper_bound(resume_step);
  if (later != checkpoints.end()) {
    throw UsageError("'" + options.out_dir + "' holds a later checkpoint of this run (" +
                     fs::path(later->second).filename().string() + "): resuming from step " +
                     std::to_string(resume_step) + " would overwrite it and fork the run's metrics; resume from " +
                     checkpoints.rbegin()->second + ", or give another --out-dir");
  }
}

// What the metrics file already records of a run being resumed: its clocks continue
// from there, and a target reached before the interruption stays reached.
struct PriorRun {
  double elapsed_s = 0;
  double train_time_s = 0;
  std::optional<int> target_step;
  std::optional<double> target_train_seconds;
  std::optional<int> last_val_step;  // the latest step validated, up to the resumed one
};

// Where a resumed run's history is: its own metrics file, or, for a run resumed into a new
// directory (its file still empty), the metrics beside the checkpoint it resumes from, so
// that its clocks and a target already reached carry over.
std::string prior_metrics_path(const TrainOptions& options, const std::string& metrics_path) {
  std::error_code ec;
  if (fs::file_size(metrics_path, ec) > 0 && !ec) return metrics_path;
  const fs::path beside = fs::path(options.resume_path).parent_path() / "metrics.jsonl";
  return fs::exists(beside, ec) ? beside.string() : metrics_path;
}

PriorRun read_prior_run(const std::string& metrics_path, int resume_step, double target) {
  PriorRun prior;
  std::ifstream in(metrics_path);
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    const nlohmann::json record = nlohmann::json::parse(line, nullptr, false);
    if (record.is_discarded() || !record.is_object() || !record.contains("step")) continue;
    const double step = metrics_number(record, "step", metrics_path, number, -1);
    // Step resume_step's own training (after its checkpoint, in a run that then died) is
    // trained again: only its validation, which came before, counts.
    const bool validation = record.contains("val_loss");
    if (step < 0 || step > resume_step || (step == resume_step && !validation)) continue;
    prior.elapsed_s = std::max(prior.elapsed_s, metrics_number(record, "elapsed_s", metrics_path, number, 0));
    prior.train_time_s = std::max(prior.train_time_s, metrics_number(record, "train_time_s", metrics_path, number, 0));
    const double val_loss = metrics_number(record, "val_loss", metrics_path, number, NAN);
    if (validation) prior.last_val_step = static_cast<int>(step);
    if (!prior.target_step && val_loss <= target) {
      prior.target_step = static_cast<int>(step);
      prior.target_train_seconds = metrics_number(record, "train_time_s", metrics_path, number, 0);
    }
  }
  return prior;
}

// This run's checkpoints on disk: only the `keep` newest stay (model and state files).
class CheckpointRotation {
 public:
  explicit CheckpointRotation(int keep) : keep_(std::max(keep, 1)) {}
  void saved(const std::string& path) {
    kept_.push_back(path);
    while (static_cast<int>(kept_.size()) > keep_) {
      std::error_code ec;  // a file the user already removed is no reason to stop training
      fs::remove(optimizer_state_path(kept_.front()), ec);
      fs::remove(kept_.front(), ec);
      kept_.pop_front();
    }
  }
  std::vector<std::string> kept() const { return {kept_.begin(), kept_.end()}; }

 private:
  int keep_;
  std::deque<std::string> kept_;
};

std::string metrics_path_of(const TrainOptions& options) {
  return options.metrics_path.empty() ? (fs::path(options.out_dir) / "metrics.jsonl").string() : options.metrics_path;
}

int end_step_of(const TrainOptions& options) {
  const int n = options.config.num_iterations;
  return options.steps < 0 ? n : std::min(options.steps, n);
}

double tokens_per_step(const Config& config) { return static_cast<double>(config.world_size) * config.seq_len; }

ProgressOptions progress_options(const TrainOptions& options, bool leader) {
  ProgressOptions progress;
  progress.mode = options.quiet || !leader ? ProgressMode::kQuiet
                  : options.live_progress ? ProgressMode::kLive
                                          : ProgressMode::kLines;
  progress.log_every = options.log_every;
  progress.total_steps = options.config.num_iterations;
  progress.end_step = end_step_of(options);
  progress.val_every = options.config.val_every;
  progress.tokens_per_step = tokens_per_step(options.config);
  return progress;
}

TokenStream validation_stream(const std::vector<std::string>& val_files, const Config& config) {
  return TokenStream(val_files, config.world_size, config.val_seq_len, static_cast<uint32_t>(config.vocab_size),
                     TokenStream::Purpose::kValidation);
}

std::string shard_range(const TokenStream& stream) {
  const std::vector<std::string>& paths = stream.shard_paths();
  return std::to_string(paths.size()) + " shard(s) from '" + paths.front() + "' to '" + paths.back() + "'";
}

std::string window_shape(const TokenStream& stream) {
  return "world_size * seq_len = " + std::to_string(stream.world_size()) + " * " + std::to_string(stream.seq_len()) +
         " tokens";
}

// What to do about too little data: a --steps that fits, when one does.
std::string fewer_steps_hint(int first_step, size_t windows_left) {
  if (windows_left == 0) return " (add shards: these are used up)";
  return " (add shards, or train fewer steps: --steps " + std::to_string(first_step + static_cast<int>(windows_left)) +
         ")";
}

// Refuses, before anything is written, a run whose shards cannot feed the steps it is
// asked for (one window a step), rather than failing when they run out with no checkpoint.
void require_training_data(const TokenStream& stream, int first_step, int end_step) {
  const size_t needed = static_cast<size_t>(std::max(end_step - first_step, 0));
  const size_t left = stream.windows_left();
  if (left >= needed) return;
  const std::string after = first_step > 0 ? " after step " + std::to_string(first_step) : "";
  throw Error("not enough training data: the " + shard_range(stream) + " serve " + std::to_string(left) +
              " more windows of " + window_shape(stream) + after + ", but steps " + std::to_string(first_step) + " to " + std::to_string(end_step - 1) + " need " +
              std::to_string(needed) + fewer_steps_hint(first_step, left));
}

std::vector<std::string> directory_listing(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

class TrainingRun {
 public:
  TrainingRun(const TrainOptions& options, Backend& backend);
  TrainResult run();
  // Whether this run trained a step or saved a checkpoint: a failed run that did neither
  // leaves nothing worth keeping.
  bool made_progress() const { return !result_.checkpoint_path.empty() || state_.step > result_.first_step; }

 private:
  int end_step() const;
  bool stop_requested();
  void validate(int step);
  void train_one_step(int step);
  void report_fault(int step, double loss, const StepVerdict& verdict);
  bool parameters_finite();  // one read of the parameters, on the device
  // The stop message's end: why the saved state may not train on when resumed.
  std::string what_resuming_the_saved_state_gives(double loss);
  void save_checkpoint_at_step();
  // Saves the state before this step and fails the run, on every process alike (the leader's
  // save finished before any process leaves: see AgreedError). message: after the save.
  [[noreturn]] void fail_after_saving(const std::function<std::string()>& message);
  TokenBatch next_batch(int step);
  void write_plots();
  void finish_summary();

  const TrainOptions& options_;
  const Config& config_;
  const Clock::time_point launch_ = Clock::now();
  std::vector<std::string> val_files_;
  std::string metrics_path_;
  // Batches come from the backend's host memory (pinned on CUDA), pooled: declared before
  // the prefetcher so that every batch is gone before the pool.
  PooledHostMemoryResource batch_memory_;
  ScopedHostMemoryResource batch_memory_scope_{&batch_memory_};
  GPT model_;
  Optimizer optimizer_;
  std::unique_ptr<Communicator> own_comm_;  // when options.comm is null
  Communicator& comm_;
  DataParallel dp_;
  bool leader_;  // rank 0: prints, writes metrics, plots and checkpoints
  TrainingState state_;
  PriorRun prior_;
  std::optional<MetricsWriter> metrics_;
  std::optional<Prefetcher> prefetcher_;
  ProgressReporter progress_;
  CheckpointRotation rotation_;
  FaultMonitor monitor_;
  DeviceFaultFlag fault_flag_;
  TrainResult result_;
  double tokens_per_step_ = 0;
};

TrainingRun::TrainingRun(const TrainOptions& options, Backend& backend)
    : options_(options),
      config_(options.config),
      val_files_(expand_glob(options.val_glob)),
      metrics_path_(metrics_path_of(options)),
      batch_memory_([&backend](size_t bytes) { return backend.alloc_host(bytes); },
                    [&backend](void* pointer) { backend.release_host(pointer); }),
      model_(config_, backend, config_.seq_len, config_.val_seq_len, options.activations),
      optimizer_(config_, model_.layout(), backend),
      own_comm_(options.comm ? nullptr : make_single_process_communicator()),
      comm_(options.comm ? *options.comm : *own_comm_),
      dp_(comm_, model_, options.grad_reduce),
      leader_(comm_.rank() == 0),
      progress_(options.progress_stream ? *options.progress_stream : std::cout, progress_options(options, leader_)),
      rotation_(options.keep),
      monitor_(options.faults),
      fault_flag_(backend) {
  const std::vector<std::string> train_files = expand_glob(options.train_glob);
  if (!options.resume_path.empty()) {
    state_ = load_checkpoint(options.resume_path, model_, optimizer_);
    if (leader_) refuse_forking_a_run(options, metrics_path_, state_.step);
    if (end_step() <= state_.step) {
      throw UsageError("'" + options.resume_path + "' is at step " + std::to_string(state_.step) +
                       " and this run would end at step " + std::to_string(end_step()) +
                       ": nothing left to train (raise --steps, or num_iterations with --set)");
    }
    prior_ = read_prior_run(prior_metrics_path(options, metrics_path_), state_.step, config_.target_val_loss);
  } else if (!options.init_path.empty()) {
    load_model(options.init_path, model_);
  }
  TokenStream train_stream(train_files, config_.world_size, config_.seq_len,
                           static_cast<uint32_t>(config_.vocab_size));
  train_stream.seek(state_.data_position);
  require_training_data(train_stream, state_.step, end_step());
  require_validation_data(val_files_, config_);
  // The metrics file first: a --metrics path that cannot be opened leaves no config behind.
  metrics_.emplace(leader_ ? metrics_path_ : std::string());
  if (const size_t removed = metrics_->removed_incomplete_bytes(); removed > 0) {
    progress_.warn("warning: metrics file '" + metrics_path_ + "' ended in an incomplete line (" +
                   std::to_string(removed) + " bytes of a write that was cut off): removed");
  }
  if (leader_) {
    write_file_atomically((fs::path(options.out_dir) / "config.json").string(), config_.to_json().dump(2) + "\n");
  }
  prefetcher_.emplace(std::move(train_stream), dp_.first_rank(), dp_.local_ranks());

  tokens_per_step_ = tokens_per_step(config_);
  result_.first_step = state_.step;
  result_.end_step = end_step();
  if (prior_.target_step) {
    result_.summary.target_step = prior_.target_step;
    result_.summary.target_train_seconds = prior_.target_train_seconds;
  }
}

int TrainingRun::end_step() const { return end_step_of(options_); }

bool TrainingRun::stop_requested() {
  if (result_.stopped_by_signal) return true;
  const int local = options_.stop_requested ? options_.stop_requested() : 0;
  if (comm_.size() == 1) {
    result_.stopped_by_signal = local;
  } else {
    // All processes stop at the same step, whichever of them was signalled.
    const double mine = local;
    std::vector<double> all(comm_.size());
    comm_.all_gather(&mine, all.data(), 1);
    for (double signal : all) result_.stopped_by_signal = std::max(result_.stopped_by_signal, static_cast<int>(signal));
  }
  return result_.stopped_by_signal != 0;
}

void TrainingRun::validate(int step) {
  const auto start = Clock::now();
  const double loss = evaluate(model_, val_files_, config_, step, &dp_);
  require_finite(loss, "validation loss", step);
  const double seconds = seconds_since(start);
  result_.val_losses.emplace_back(step, loss);
  const double train_time = prior_.train_time_s + result_.seconds;
  if (!result_.summary.target_step && loss <= config_.target_val_loss) {
    result_.summary.target_step = step;
    result_.summary.target_train_seconds = train_time;
  }
  metrics_->write({{"step", step}, {"val_loss", loss}, {"window_blocks", long_window_blocks(config_, step)},
                   {"elapsed_s", prior_.elapsed_s + seconds_since(launch_)}, {"train_time_s", train_time},
                   {"val_seconds", seconds}});
  progress_.validation(step, loss, seconds);
}

void TrainingRun::train_one_step(int step) {
  const auto start = Clock::now();
  TokenBatch batch = next_batch(step);
  StepVerdict verdict;
  const double loss = run_training_step(dp_, optimizer_, batch.inputs, batch.targets, step, &monitor_, &verdict,
                                        &fault_flag_);
  report_fault(step, loss, verdict);
  state_.step = step + 1;
  state_.data_position = batch.position_after;
  const double step_seconds = seconds_since(start);
  result_.seconds += step_seconds;
  result_.train_losses.push_back(loss);
  metrics_->write({{"step", step},
                   {"train_loss", loss},
                   {"lr_mult", lr_multiplier(config_, step)},
                   {"window_blocks", long_window_blocks(config_, step)},
                   {"step_seconds", step_seconds},
                   {"tokens_per_second", tokens_per_step_ / step_seconds},
                   {"elapsed_s", prior_.elapsed_s + seconds_since(launch_)},
                   {"train_time_s", prior_.train_time_s + result_.seconds}});
  progress_.step_done(step, loss, step_seconds);
}

void TrainingRun::fail_after_saving(const std::function<std::string()>& message) {
  save_checkpoint_at_step();
  comm_.barrier();
  throw AgreedError(message());
}

// A shard's bad token (an id past the vocabulary) is found when the stream reaches it: the
// state before this step is whole then, so it is saved for a resume once the shard is
// mended. With several processes they first agree whether any batch failed (one more tiny
// collective a step), and take the first failing process's message.
TokenBatch TrainingRun::next_batch(int step) {
  std::optional<TokenBatch> batch;
  std::optional<Error> mine;
  try {
    batch.emplace(prefetcher_->next());
  } catch (const Error& e) {
    mine = e;
  }
  const std::optional<Error> failure = first_failure(comm_, mine);
  if (!failure) return std::move(*batch);
  fail_after_saving([&] {
    return std::string(failure->what()) + "; the state before step " + std::to_string(step) + " was saved as " +
           result_.checkpoint_path + ": mend or replace the shard, then continue with --resume " + result_.checkpoint_path;
  });
}

void TrainingRun::report_fault(int step, double loss, const StepVerdict& verdict) {
  if (!verdict.message.empty()) {
    metrics_->write({{"step", step}, {"fault", verdict.message}});
    progress_.note("warning: " + verdict.message);
  }
  if (verdict.action == StepAction::kStop) {  // state_ is still the state before this step
    fail_after_saving([&] {
      return verdict.message + "; the state before the step was saved as " + result_.checkpoint_path +
             what_resuming_the_saved_state_gives(loss);
    });
  }
  if (verdict.action != StepAction::kSkip) return;
  // Skipping passes over a bad batch; it cannot mend parameters an earlier update already
  // overflowed, which would skip every step left and fail only at the next validation.
  if (!parameters_finite()) {
    fail_after_saving([&] {
      return verdict.message + "; skipping its update cannot help: the state before the step (saved as " +
             result_.checkpoint_path + ") has non-finite parameters already (an earlier step's update " +
             "overflowed them: lower the learning rates), so it cannot be resumed or evaluated";
    });
  }
  result_.skipped_steps.push_back(step);
}

std::string TrainingRun::what_resuming_the_saved_state_gives(double loss) {
  // An earlier update may have overflowed the parameters themselves (its own loss and
  // gradients finite): the state is saved for inspection, but no command can load it.
  if (!parameters_finite()) {
    return ", but its parameters are already non-finite (an earlier step's update overflowed them: lower the "
           "learning rates), so it cannot be resumed or evaluated";
  }
  // Finite parameters that gave a non-finite loss give it again from the same batch.
  if (!std::isfinite(loss)) {
    return "; its parameters gave this loss themselves, so resuming repeats it (finite but too large: an earlier "
           "update overflowed them; or a batch they cannot handle, which --on-nonfinite skip passes over)";
  }
  return "";
}

bool TrainingRun::parameters_finite() {
  fault_flag_.clear();
  fault_flag_.check(model_.params(), model_.layout().total());
  fault_flag_.copy_to_host();
  model_.backend().synchronize();
  return !fault_flag_.raised();
}

void TrainingRun::save_checkpoint_at_step() {
  const std::string path = checkpoint_name(options_.out_dir, state_.step);
  if (path == result_.checkpoint_path) return;  // e.g. interrupted right after a periodic save
  result_.checkpoint_path = path;
  if (!leader_) return;
  save_checkpoint(result_.checkpoint_path, model_, optimizer_, state_, options_.numerics);
  rotation_.saved(result_.checkpoint_path);
  progress_.note("saved " + result_.checkpoint_path);
}

void TrainingRun::write_plots() {
  if (!options_.write_plots || !leader_) return;
  for (const char* name : {"loss.svg", "loss.png"}) {
    const std::string path = (fs::path(options_.out_dir) / name).string();
    try {
      plot::write_loss_plot({metrics_path_}, path);
    } catch (const Error& e) {
      // The run's real products (checkpoint, metrics) are safe; a plot is a convenience. An
      // earlier plot would show the run as it was then, as if it were now: it goes.
      std::error_code ec;
      const bool removed = fs::remove(path, ec);
      const std::string earlier = removed ? " (the earlier " + path + " removed)" : "";
      progress_.warn(std::string("warning: no plot: ") + e.what() + earlier);
    }
  }
}

void TrainingRun::finish_summary() {
  RunSummary& s = result_.summary;
  s.steps_completed = state_.step;
  s.steps_this_run = state_.step - result_.first_step;
  s.skipped_steps = result_.skipped_steps;
  if (!result_.val_losses.empty()) s.final_val_loss = result_.val_losses.back().second;
  s.target_val_loss = config_.target_val_loss;
  s.tokens_seen = tokens_per_step_ * s.steps_this_run;
  s.training_seconds = result_.seconds;
  s.wall_seconds = seconds_since(launch_);
  s.peak_rss_bytes = peak_rss_bytes();
  s.out_dir = options_.out_dir;
  s.files = directory_listing(options_.out_dir);
}

TrainResult TrainingRun::run() {
  progress_.begin(state_.step);
  const int last = end_step();
  for (int step = state_.step; step < last && !stop_requested(); ++step) {
    // A resumed run's first step may have been validated already (where its run stopped).
    const bool validated_before = step == result_.first_step && prior_.last_val_step == step;
    if (step % config_.val_every == 0 && !validated_before) {
      validate(step);
      if (stop_requested()) break;  // a signal during a long validation stops before the next step
    }
    train_one_step(step);
    const bool periodic = options_.save_every > 0 && state_.step % options_.save_every == 0;
    if (periodic && state_.step != last) save_checkpoint_at_step();
  }
  // SPEC §4: after the last step, validate once more with window(num_iterations). A run
  // stopped early by --steps validates too, with the window of the step it stopped at.
  // An interrupted run does not: its resumption validates exactly where this one would have.
  const bool interrupted = stop_requested();
  const bool validated_here = !result_.val_losses.empty() && result_.val_losses.back().first == state_.step;
  if (!interrupted && !validated_here) validate(state_.step);
  save_checkpoint_at_step();
  progress_.end();
  result_.last_step = state_.step;
  result_.checkpoints_kept = rotation_.kept();
  write_plots();
  finish_summary();
  if (!interrupted && !options_.quiet && leader_) {
    std::ostream& out = options_.progress_stream ? *options_.progress_stream : std::cout;
    out << format_summary(result_.summary);
    out.flush();
  }
  return result_;
}

}  // namespace

std::string checkpoint_name(const std::string& out_dir, int step) {
  char name[64];
  std::snprintf(name, sizeof name, "step_%06d.safetensors", step);
  return (fs::path(out_dir) / name).string();
}

double run_training_step(DataParallel& dp, Optimizer& optimizer, std::span<const int32_t> inputs,
                         std::span<const int32_t> targets, int step, FaultMonitor* monitor, StepVerdict* verdict,
                         DeviceFaultFlag* flag) {
  GPT& model = dp.model();
  Communicator* comm = dp.comm().size() > 1 ? &dp.comm() : nullptr;
  if (!monitor || !flag) {
    const double loss = dp.compute_gradients(inputs, targets, long_window_blocks(model.config(), step));
    require_finite(loss, "training loss", step);
    optimizer.step(model.params(), model.grads(), step, comm);
    return loss;
  }
  // The device raises the flag on a non-finite token loss or gradient, and the queued
  // update then changes nothing. Nothing waits on the device until the update is queued;
  // the host then reads the losses and the flag together (one synchronisation a step).
  // Every process must skip alike, so with several processes only the reduced gradient
  // (the same everywhere) is checked, and on every step: a non-finite loss always makes
  // it non-finite too (softcapped logits are finite unless NaN, and NaN propagates).
  const bool one_process = comm == nullptr;
  flag->clear();
  if (one_process) model.set_fault_flag(flag->device());
  dp.enqueue_gradients(inputs, targets, long_window_blocks(model.config(), step));
  model.set_fault_flag(nullptr);
  if (!one_process || monitor->should_check_gradients(step)) flag->check(model.grads(), model.layout().total());
  flag->copy_to_host();
  if (monitor->needs_verdict_before_update()) {
    const double loss = dp.finish_losses();
    *verdict = monitor->check_step(step, loss, !flag->raised());
    if (verdict->action != StepAction::kApply) flag->raise();
    optimizer.step(model.params(), model.grads(), step, comm, flag->device());
    return loss;
  }
  optimizer.step(model.params(), model.grads(), step, comm, flag->device());
  const double loss = dp.finish_losses();
  *verdict = monitor->check_step(step, loss, !flag->raised());
  if (flag->raised() == (verdict->action == StepAction::kApply)) {
    throw Error("internal error at step " + std::to_string(step) +
                ": the device and the fault monitor disagree on skipping the update");
  }
  return loss;
}

void require_validation_data(const std::vector<std::string>& val_files, const Config& config) {
  const size_t windows = validation_windows(static_cast<size_t>(config.val_tokens), config.world_size,
                                            config.val_seq_len);
  TokenStream stream = validation_stream(val_files, config);
  const size_t left = stream.windows_left();
  if (left >= windows) {
    // Every token the validations read is checked against the vocabulary now, before a run
    // writes anything: the stream checks what it serves, and validation reads all of it
    // (val_tokens: a few MB) every time anyway.
    for (size_t w = 0; w < windows; ++w) stream.next(0, config.world_size);
    return;
  }
  throw Error("not enough validation data: val_tokens = " + std::to_string(config.val_tokens) + " needs " +
              std::to_string(windows) + " windows of world_size * val_seq_len = " +
              std::to_string(config.world_size) + " * " + std::to_string(config.val_seq_len) + " tokens, but the " +
              shard_range(stream) + " serve " + std::to_string(left) + " (add shards or lower val_tokens)");
}

double evaluate(GPT& model, const std::vector<std::string>& val_files, const Config& config, int step,
                DataParallel* dp) {
  const size_t windows = validation_windows(static_cast<size_t>(config.val_tokens), config.world_size,
                                            config.val_seq_len);
  TokenStream stream = validation_stream(val_files, config);
  const int window = long_window_blocks(config, step);
  const int first_rank = dp ? dp->first_rank() : 0;
  const int ranks = dp ? dp->local_ranks() : config.world_size;
  std::vector<double> losses;
  for (size_t w = 0; w < windows; ++w) {
    TokenBatch batch = stream.next(first_rank, ranks);
    for (int r = 0; r < ranks; ++r) {
      losses.push_back(model.forward(sequence(batch.inputs, r, config.val_seq_len),
                                     sequence(batch.targets, r, config.val_seq_len), window));
    }
  }
  if (dp) return dp->mean_over_ranks(losses, static_cast<int>(windows));
  double total = 0;
  for (double loss : losses) total += loss;
  return total / static_cast<double>(losses.size());
}

TrainResult train(const TrainOptions& options, Backend& backend) {
  options.config.validate();
  if (options.steps < -1) throw UsageError("--steps must be >= 0, got " + std::to_string(options.steps));
  if (options.save_every < 0) throw UsageError("--save-every must be >= 0, got " + std::to_string(options.save_every));
  if (options.keep < 1) throw UsageError("--keep must be >= 1, got " + std::to_string(options.keep));
  if (options.steps > options.config.num_iterations) {
    throw UsageError("--steps " + std::to_string(options.steps) + " is past num_iterations (" +
                     std::to_string(options.config.num_iterations) +
                     "), where the schedules end (--set num_iterations=N trains longer)");
  }
  // Fail on indivisible val_tokens before spending any time training.
  validation_windows(static_cast<size_t>(options.config.val_tokens), options.config.world_size,
                     options.config.val_seq_len);
  const bool creates_out_dir = !fs::exists(options.out_dir);
  const std::string metrics_path = metrics_path_of(options);
  const bool creates_metrics = !fs::exists(metrics_path);
  prepare_out_dir(options.out_dir);
  // Rank 0 alone: it may already have written its config when another process looks.
  const bool leader = !options.comm || options.comm->rank() == 0;
  bool owns_new_run_files = false;  // the config and metrics this new run writes are its own
  std::optional<TrainingRun> run;
  try {
    if (leader && options.resume_path.empty()) {
      refuse_a_run_in(options.out_dir, metrics_path, "a new run");
      owns_new_run_files = true;
    }
    // A process killed while saving (SIGKILL, mpirun's own Ctrl-C) left its temporaries in
    // this run's directory (removed after the refusal above: never in another run's).
    if (leader) remove_abandoned_temporaries(options.out_dir);
    try {
      run.emplace(options, backend);
    } catch (const OutOfMemoryError& e) {
      throw OutOfMemoryError(std::string(e.what()) + " for this run's model, optimiser and activations: `speedrun "
                             "memory` with the same preset, --set and activation flags shows the plan (a shorter "
                             "seq_len or val_seq_len, or --recompute-activations, needs less)");
    }
    return run->run();
  } catch (...) {
    // A new run that failed before training a step or saving a checkpoint (a validation
    // loss that is not finite at step 0, say) removes its config and metrics: they would
    // only make the directory refuse the corrected run. No empty directory of its own stays.
    const bool nothing_to_keep = owns_new_run_files && (!run || !run->made_progress());
    run.reset();
    std::error_code ec;
    if (nothing_to_keep) {
      fs::remove(fs::path(options.out_dir) / "config.json", ec);
      if (creates_metrics) fs::remove(metrics_path, ec);
    }
    if (creates_out_dir && fs::is_empty(options.out_dir, ec) && !ec) fs::remove(options.out_dir, ec);
    throw;
  }
}

}  // namespace speedrun
