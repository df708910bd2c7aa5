// Numerical faults of a training run: non-finite losses or gradients (policy skip|stop)
// and loss spikes found by a z-score over the recent losses (policy warn|skip), in the
// spirit of llm.c's outlier detector. The trainer asks for a verdict before each update.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

namespace speedrun {

class Backend;

enum class NonFinitePolicy { kSkip, kStop };
enum class SpikePolicy { kWarn, kSkip };

// "skip"/"stop" and "warn"/"skip"; anything else is a UsageError naming the value.
NonFinitePolicy parse_non_finite_policy(const std::string& name);
SpikePolicy parse_spike_policy(const std::string& name);

struct FaultMonitorOptions {
  NonFinitePolicy non_finite = NonFinitePolicy::kStop;
  SpikePolicy spike = SpikePolicy::kWarn;
  // Gradients are checked on steps s with s % grad_check_every == 0. The loss is checked
  // every step: it reaches the host anyway. Default 1 (one cheap pass over the gradient).
  int grad_check_every = 1;
  int spike_window = 128;       // losses the running mean and std are taken over
  double spike_zscore = 5.0;    // a step whose loss has z > this is a spike
  // Consecutive skipped steps (for any reason) after which the run stops instead: a run
  // that skips every step trains nothing, and should say so.
  int max_consecutive_skips = 16;
};

// Throws UsageError naming the field when an option is out of range.
void validate(const FaultMonitorOptions& options);

// Rolling z-score of a series over the last `window` values (exact mean and population
// std recomputed from the ring buffer, so no drift from running sums).
class SpikeDetector {
 public:
  explicit SpikeDetector(int window);
  // The z-score of `value` against the window of values before it, or nullopt while the
  // window is not yet full. A window of identical values gives 0 for an equal value and
  // +-infinity otherwise. Non-finite values are not scored and not added.
  std::optional<double> score(double value) const;
  void add(double value);
  size_t size() const { return filled_; }
  double mean() const;
  double stddev() const;

 private:
  std::vector<double> ring_;
  size_t next_ = 0;
  size_t filled_ = 0;
};

enum class StepAction {
  kApply,  // apply the step's update
  kSkip,   // do not apply the update: the step counts, the parameters stay
  kStop,   // stop the run at this step (the trainer saves the state before the step)
};

struct StepVerdict {
  StepAction action = StepAction::kApply;
  std::string message;  // empty for a clean step; otherwise names the step and the fault
  std::optional<double> zscore;  // the loss's z-score, once the window is full
};

// The device half of fault detection. A backend int32 that Backend::flag_nonfinite sets
// when the step's token losses or gradients hold a NaN or an infinity; the optimiser's
// update operations read it and change nothing when it is set. So a faulty step is
// skipped on the device before the host knows of it, and the host learns the flag with
// the step's loss, in the same end-of-step copy: no synchronisation between the backward
// pass and the update, and none added for the check.
class DeviceFaultFlag {
 public:
  explicit DeviceFaultFlag(Backend& backend);
  ~DeviceFaultFlag();
  DeviceFaultFlag(const DeviceFaultFlag&) = delete;
  DeviceFaultFlag& operator=(const DeviceFaultFlag&) = delete;

  // Each queued on the backend, in order with the step's work.
  void clear();
  void raise();                               // the host decided to skip this step
  void check(const float* values, size_t count);  // raise if any value is not finite
  void copy_to_host();
  // The host copy: valid after the backend's synchronize() following copy_to_host().
  bool raised() const { return *host_ != 0; }
  int32_t* device() { return device_; }

 private:
  Backend& backend_;
  int32_t* device_ = nullptr;
  int32_t* host_ = nullptr;
};

// Decides, step by step, whether an update may be applied.
//
// The verdict on non-finite values comes from DeviceFaultFlag, which has already made the
// device skip the update; the monitor names the fault and applies the policy (skip, or
// stop with the state before the step). The gradient check is one read of the gradient
// on the device; grad_check_every = N does it on every N-th step only. Between checks a
// non-finite gradient is still caught one step late through the loss (NaN parameters give
// a NaN loss), but its update has then been applied: with policy skip, keep
// grad_check_every = 1 where faults are expected. A spike verdict needs the loss on the
// host before the update, so policy spike=skip waits for it (one synchronisation a step).
class FaultMonitor {
 public:
  explicit FaultMonitor(FaultMonitorOptions options = {});

  const FaultMonitorOptions& options() const { return options_; }
  bool should_check_gradients(int step) const { return step % options_.grad_check_every == 0; }
  // Whether the verdict must be known before the update is queued (see the class comment).
  bool needs_verdict_before_update() const { return options_.spike == SpikePolicy::kSkip; }

  // The verdict for step `step` whose loss (before the update) is `loss`.
  // gradients_finite: the device flag's verdict (DeviceFaultFlag) when this step was checked.
  StepVerdict check_step(int step, double loss, std::optional<bool> gradients_finite = std::nullopt);

  int skipped_steps() const { return skipped_; }
  int spikes() const { return spikes_; }
  const SpikeDetector& detector() const { return detector_; }

 private:
  StepVerdict skip_or_stop(StepVerdict verdict);

  FaultMonitorOptions options_;
  SpikeDetector detector_;
  int skipped_ = 0;
  int consecutive_skips_ = 0;
  int spikes_ = 0;
};

}  // namespace speedrun
