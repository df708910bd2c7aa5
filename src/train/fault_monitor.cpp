// Numerical-fault verdicts for the training loop: non-finite loss/gradient checks and
// the rolling z-score loss-spike detector (see fault_monitor.h for the GPU design).
#include "train/fault_monitor.h"

#include <cmath>
#include <cstdio>
#include <limits>

#include "backends/backend.h"
#include "util/error.h"

namespace speedrun {
namespace {

std::string number_text(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.6g", value);
  return text;
}

}  // namespace

NonFinitePolicy parse_non_finite_policy(const std::string& name) {
  if (name == "skip") return NonFinitePolicy::kSkip;
  if (name == "stop") return NonFinitePolicy::kStop;
  throw UsageError("unknown non-finite policy '" + name + "' (expected skip or stop)");
}

SpikePolicy parse_spike_policy(const std::string& name) {
  if (name == "warn") return SpikePolicy::kWarn;
  if (name == "skip") return SpikePolicy::kSkip;
  throw UsageError("unknown loss-spike policy '" + name + "' (expected warn or skip)");
}

void validate(const FaultMonitorOptions& options) {
  if (options.grad_check_every < 1) {
    throw UsageError("grad_check_every must be >= 1, got " + std::to_string(options.grad_check_every));
  }
  if (options.spike_window < 2) {
    throw UsageError("spike_window must be >= 2 (a std needs two losses), got " + std::to_string(options.spike_window));
  }
  if (!(options.spike_zscore > 0) || !std::isfinite(options.spike_zscore)) {
    throw UsageError("spike_zscore must be a finite number > 0, got " + number_text(options.spike_zscore));
  }
  if (options.max_consecutive_skips < 0) {
    throw UsageError("max_consecutive_skips must be >= 0 (0: no limit), got " +
                     std::to_string(options.max_consecutive_skips));
  }
}

// --- SpikeDetector ----------------------------------------------------------------------

SpikeDetector::SpikeDetector(int window) : ring_(static_cast<size_t>(window > 0 ? window : 1), 0.0) {}

double SpikeDetector::mean() const {
  if (filled_ == 0) return 0.0;
  double sum = 0;
  for (size_t i = 0; i < filled_; ++i) sum += ring_[i];
  return sum / static_cast<double>(filled_);
}

double SpikeDetector::stddev() const {
  if (filled_ == 0) return 0.0;
  const double m = mean();
  double squares = 0;  // two passes: no cancellation between E[x^2] and mean^2
  for (size_t i = 0; i < filled_; ++i) squares += (ring_[i] - m) * (ring_[i] - m);
  return std::sqrt(squares / static_cast<double>(filled_));
}

std::optional<double> SpikeDetector::score(double value) const {
  if (filled_ < ring_.size() || !std::isfinite(value)) return std::nullopt;
  const double m = mean(), s = stddev();
  if (s == 0) {
    if (value == m) return 0.0;
    return value > m ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
  }
  return (value - m) / s;
}

void SpikeDetector::add(double value) {
  if (!std::isfinite(value)) return;
  ring_[next_] = value;
  next_ = (next_ + 1) % ring_.size();
  if (filled_ < ring_.size()) ++filled_;
}

// --- DeviceFaultFlag --------------------------------------------------------------------

DeviceFaultFlag::DeviceFaultFlag(Backend& backend)
    : backend_(backend),
      device_(backend.alloc_i32(1)),
      host_(static_cast<int32_t*>(backend.alloc_host(sizeof(int32_t)))) {}

DeviceFaultFlag::~DeviceFaultFlag() {
  backend_.release_host(host_);
  backend_.release(device_);
}

void DeviceFaultFlag::clear() { backend_.fill_i32(device_, 0, 1); }
void DeviceFaultFlag::raise() { backend_.fill_i32(device_, 1, 1); }
void DeviceFaultFlag::check(const float* values, size_t count) { backend_.flag_nonfinite(device_, values, count); }
void DeviceFaultFlag::copy_to_host() { backend_.download_i32_async(host_, device_, 1); }

// --- FaultMonitor -----------------------------------------------------------------------

FaultMonitor::FaultMonitor(FaultMonitorOptions options) : options_(options), detector_(options.spike_window) {
  speedrun::validate(options_);
}

StepVerdict FaultMonitor::skip_or_stop(StepVerdict verdict) {
  ++consecutive_skips_;
  if (options_.max_consecutive_skips > 0 && consecutive_skips_ > options_.max_consecutive_skips) {
    verdict.action = StepAction::kStop;
    verdict.message += "; stopping: " + std::to_string(consecutive_skips_) +
                       " consecutive steps skipped (max_consecutive_skips " +
                       std::to_string(options_.max_consecutive_skips) + ")";
    return verdict;
  }
  ++skipped_;
  verdict.action = StepAction::kSkip;
  verdict.message += "; update skipped";
  return verdict;
}

StepVerdict FaultMonitor::check_step(int step, double loss, std::optional<bool> gradients_finite) {
  StepVerdict verdict;
  const std::string where = "step " + std::to_string(step) + ": ";
  const bool loss_bad = !std::isfinite(loss);
  if (loss_bad || gradients_finite == false) {
    verdict.message = where + (loss_bad ? "training loss is " + number_text(loss) + " (not finite)"
                                        : std::string("gradient holds a non-finite value"));
    if (options_.non_finite == NonFinitePolicy::kStop) {
      verdict.action = StepAction::kStop;
      verdict.message += "; stopping (non-finite policy stop)";
      return verdict;
    }
    return skip_or_stop(std::move(verdict));
  }

  verdict.zscore = detector_.score(loss);
  // Every finite loss joins the window, spikes included (as in llm.c): a lasting change
  // of level is absorbed after a while instead of being skipped for ever.
  detector_.add(loss);
  if (verdict.zscore && *verdict.zscore > options_.spike_zscore) {
    ++spikes_;
    verdict.message = where + "loss spike: loss " + number_text(loss) + " has z-score " + number_text(*verdict.zscore) +
                      " > " + number_text(options_.spike_zscore) + " over the last " +
                      std::to_string(detector_.size()) + " losses";
    if (options_.spike == SpikePolicy::kSkip) return skip_or_stop(std::move(verdict));
    consecutive_skips_ = 0;
    return verdict;  // warn: applied, with a message
  }
  consecutive_skips_ = 0;
  return verdict;
}

}  // namespace speedrun
