// What training prints: a live status line rewritten in place on a terminal, plain
// lines every --log-every steps otherwise, validation results on their own lines, and
// the end-of-run summary. The stream and the clock are injected so tests see exact text.
#pragma once

#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace speedrun {

enum class ProgressMode {
  kQuiet,  // nothing
  kLines,  // one plain line per log_every steps, no carriage returns (logs, pipes)
  kLive,   // one line rewritten with '\r' (a terminal)
};

struct ProgressOptions {
  ProgressMode mode = ProgressMode::kLines;
  int log_every = 1;
  int total_steps = 0;   // the schedule's length (num_iterations), shown as step/total
  int end_step = 0;      // where this run stops; the ETA counts down to it
  int val_every = 0;     // validations still due count in the ETA (0: none expected)
  double tokens_per_step = 0;
  // Model FLOPs utilisation from the measured tokens/s, for backends that know their
  // peak; empty: no MFU column.
  std::function<double(double tokens_per_second)> mfu;
  double live_refresh_seconds = 0.1;  // a live line is redrawn at most this often
};

class ProgressReporter {
 public:
  using Clock = std::function<double()>;  // monotonic seconds
  static double steady_seconds();

  ProgressReporter(std::ostream& out, ProgressOptions options, Clock clock = steady_seconds);

  void begin(int first_step);
  // Step `step` (0-based) finished with this train loss after step_seconds of compute.
  void step_done(int step, double train_loss, double step_seconds);
  void validation(int step, double val_loss, double seconds);
  // A line of its own (a checkpoint saved, an interrupt noticed).
  void note(const std::string& line);
  // A line on stderr that --quiet does not silence ("warning: ..."), clear of the live line.
  void warn(const std::string& line);
  // Ends a live line so that what follows starts on a fresh line.
  void end();

 private:
  std::string status_text(int steps_completed, double train_loss, double tokens_per_second) const;
  void clear_live_line();

  std::ostream& out_;
  ProgressOptions options_;
  Clock clock_;
  double begin_time_ = 0;
  int first_step_ = 0;
  bool live_line_shown_ = false;
  double last_draw_time_ = -1e300;
  // Compute time and steps since the last printed status, for tokens/s.
  double window_seconds_ = 0;
  int window_steps_ = 0;
  // Validations reported since begin(): the ETA separates their time from the steps'.
  double validation_seconds_ = 0;
  int validations_ = 0;
  // Seconds still to wait from `steps_completed`: the steps' wall time per step (without
  // validations) and the validations still due at their mean duration.
  double seconds_remaining(int steps_completed, double elapsed) const;
};

// "850ms", "42.0s", "3m05s", "1h02m".
std::string format_duration(double seconds);
// "950", "12.3k", "4.56M", "1.23G".
std::string format_count(double count);

struct RunSummary {
  int steps_completed = 0;
  int steps_this_run = 0;
  std::optional<double> final_val_loss;
  double target_val_loss = 0;
  std::optional<int> target_step;            // first validation at or below the target
  std::optional<double> target_train_seconds;  // training time (validation excluded) then
  std::vector<int> skipped_steps;            // updates skipped by this run (non-finite, spikes)
  double tokens_seen = 0;                    // by this run
  double training_seconds = 0;               // this run, validation excluded
  double wall_seconds = 0;
  double peak_rss_bytes = 0;
  std::string out_dir;
  std::vector<std::string> files;            // what the out-dir holds, by name
};

std::string format_summary(const RunSummary& summary);

// Peak resident set size of this process in bytes (getrusage).
double peak_rss_bytes();

}  // namespace speedrun
