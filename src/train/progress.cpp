// Training progress text: live line, plain lines, validation lines, run summary.
#include "train/progress.h"

#include <iostream>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

namespace speedrun {
namespace {

std::string printf_string(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

std::string loss_text(double loss) { return printf_string("%.4f", loss); }

}  // namespace

double ProgressReporter::steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string format_duration(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return "?";
  if (seconds < 1) return printf_string("%.0fms", seconds * 1000);
  if (seconds < 60) return printf_string("%.1fs", seconds);
  const long total = std::lround(seconds);
  char buffer[64];
  if (total < 3600) {
    std::snprintf(buffer, sizeof buffer, "%ldm%02lds", total / 60, total % 60);
  } else {
    std::snprintf(buffer, sizeof buffer, "%ldh%02ldm", total / 3600, (total % 3600) / 60);
  }
  return buffer;
}

std::string format_count(double count) {
  if (count < 1e3) return printf_string("%.0f", count);
  if (count < 1e6) return printf_string("%.1fk", count / 1e3);
  if (count < 1e9) return printf_string("%.2fM", count / 1e6);
  return printf_string("%.2fG", count / 1e9);
}

ProgressReporter::ProgressReporter(std::ostream& out, ProgressOptions options, Clock clock)
    : out_(out), options_(std::move(options)), clock_(std::move(clock)) {
  if (options_.log_every < 1) options_.log_every = 1;
}

void ProgressReporter::begin(int first_step) {
  first_step_ = first_step;
  begin_time_ = clock_();
}

std::string ProgressReporter::status_text(int steps_completed, double train_loss, double tokens_per_second) const {
  std::string text = "step " + std::to_string(steps_completed) + "/" + std::to_string(options_.total_steps) +
                     " | loss " + loss_text(train_loss) + " | " + format_count(tokens_per_second) + " tok/s";
  if (options_.mfu) text += " | MFU " + printf_string("%.1f%%", 100 * options_.mfu(tokens_per_second));
  const double elapsed = clock_() - begin_time_;
  text += " | " + format_duration(elapsed);
  if (steps_completed < options_.end_step && steps_completed > first_step_) {
    text += " | ETA " + format_duration(seconds_remaining(steps_completed, elapsed));
  }
  return text;
}

// A validation (step 0's among them) is not spread over the steps: at 124M it takes as long
// as dozens of steps, and the first line's ETA would be that many times too long.
double ProgressReporter::seconds_remaining(int steps_completed, double elapsed) const {
  const int done = steps_completed - first_step_;
  const int remaining = options_.end_step - steps_completed;
  const double per_step = std::max(0.0, elapsed - validation_seconds_) / done;
  double validations_due = 0;
  if (options_.val_every > 0) {
    const int v = options_.val_every;
    // Multiples of v in [steps_completed, end_step), each validated before its step, and the
    // final validation after the last step.
    validations_due = (options_.end_step + v - 1) / v - (steps_completed + v - 1) / v + 1;
  }
  const double per_validation = validations_ > 0 ? validation_seconds_ / validations_ : 0;
  return per_step * remaining + per_validation * validations_due;
}

void ProgressReporter::clear_live_line() {
  if (live_line_shown_) out_ << "\r\033[K";
  live_line_shown_ = false;
}

void ProgressReporter::step_done(int step, double train_loss, double step_seconds) {
  if (options_.mode == ProgressMode::kQuiet) return;
  window_seconds_ += step_seconds;
  ++window_steps_;
  const int completed = step + 1;
  const bool last = completed == options_.end_step;
  const double now = clock_();
  bool due;
  if (options_.mode == ProgressMode::kLive) {
    due = last || now - last_draw_time_ >= options_.live_refresh_seconds;
  } else {
    due = last || step % options_.log_every == 0;
  }
  if (!due) return;
  const double rate = window_seconds_ > 0 ? options_.tokens_per_step * window_steps_ / window_seconds_ : 0;
  const std::string text = status_text(completed, train_loss, rate);
  if (options_.mode == ProgressMode::kLive) {
    out_ << "\r" << text << "\033[K";
    live_line_shown_ = true;
  } else {
    out_ << text << "\n";
  }
  out_.flush();
  last_draw_time_ = now;
  window_seconds_ = 0;
  window_steps_ = 0;
}

void ProgressReporter::validation(int step, double val_loss, double seconds) {
  validation_seconds_ += seconds;
  ++validations_;
  note("step " + std::to_string(step) + "/" + std::to_string(options_.total_steps) + " | val loss " +
       loss_text(val_loss) + " | " + format_duration(seconds));
}

void ProgressReporter::note(const std::string& line) {
  if (options_.mode == ProgressMode::kQuiet) return;
  clear_live_line();
  out_ << line << "\n";
  out_.flush();
  // The live line comes back at the next step, whatever the refresh interval.
  last_draw_time_ = -1e300;
}

void ProgressReporter::warn(const std::string& line) {
  if (options_.mode != ProgressMode::kQuiet) {
    clear_live_line();
    out_.flush();
    last_draw_time_ = -1e300;
  }
  std::cerr << line << "\n";
  std::cerr.flush();
}

void ProgressReporter::end() {
  if (live_line_shown_) out_ << "\n";
  live_line_shown_ = false;
  out_.flush();
}

std::string format_summary(const RunSummary& s) {
  std::string text;
  auto row = [&](const std::string& name, const std::string& value) {
    text += "  " + name + std::string(name.size() < 18 ? 18 - name.size() : 1, ' ') + value + "\n";
  };
  text += "run finished: " + std::to_string(s.steps_completed) + " steps (" + std::to_string(s.steps_this_run) +
          " in this run, " + format_duration(s.wall_seconds) + ")\n";
  row("final val loss", s.final_val_loss ? loss_text(*s.final_val_loss) : "none");
  const std::string target = printf_string("%.4g", s.target_val_loss);
  if (s.target_step) {
    row("target " + target, "reached at step " + std::to_string(*s.target_step) + " after " +
                                format_duration(s.target_train_seconds.value_or(0)) + " of training");
  } else {
    row("target " + target, "not reached");
  }
  if (!s.skipped_steps.empty()) {
    std::string steps;
    for (size_t i = 0; i < s.skipped_steps.size() && i < 8; ++i) {
      steps += (i ? ", " : "") + std::to_string(s.skipped_steps[i]);
    }
    if (s.skipped_steps.size() > 8) steps += ", ...";
    row("skipped updates", std::to_string(s.skipped_steps.size()) + " (steps " + steps + "; see the metrics' faults)");
  }
  row("tokens seen", format_count(s.tokens_seen) + " in this run");
  const double rate = s.training_seconds > 0 ? s.tokens_seen / s.training_seconds : 0;
  row("throughput", format_count(rate) + " tok/s (" + format_duration(s.training_seconds) + " of training)");
  row("peak memory", printf_string("%.1f MiB", s.peak_rss_bytes / (1024.0 * 1024.0)) + " (host RSS)");
  std::string files;
  for (const std::string& f : s.files) files += (files.empty() ? "" : ", ") + f;
  row("out dir", s.out_dir + (files.empty() ? "" : ": " + files));
  return text;
}

double peak_rss_bytes() {
  struct rusage usage {};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0;
  return static_cast<double>(usage.ru_maxrss) * 1024.0;  // Linux reports KiB
}

}  // namespace speedrun
