// FaultMonitor and SpikeDetector: exact z-scores, the skip|stop and warn|skip policies,
// the gradient check on the CPU backend and its every-N schedule, and the skip limit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "backends/backend.h"
#include "train/fault_monitor.h"
#include "util/error.h"

using speedrun::FaultMonitor;
using speedrun::FaultMonitorOptions;
using speedrun::NonFinitePolicy;
using speedrun::SpikeDetector;
using speedrun::SpikePolicy;
using speedrun::StepAction;
using speedrun::StepVerdict;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Losses 3.0, 3.5, 3.0, 3.5, ...: mean 3.25 and std 0.25 over any even window, exactly
// (every intermediate is a binary fraction).
void feed_alternating(FaultMonitor& monitor, int count, int first_step = 0) {
  for (int i = 0; i < count; ++i) {
    auto verdict = monitor.check_step(first_step + i, i % 2 ? 3.5 : 3.0);
    ASSERT_EQ(verdict.action, StepAction::kApply) << verdict.message;
    ASSERT_TRUE(verdict.message.empty()) << verdict.message;
  }
}

FaultMonitorOptions options_with(NonFinitePolicy non_finite, SpikePolicy spike, int window = 128) {
  FaultMonitorOptions options;
  options.non_finite = non_finite;
  options.spike = spike;
  options.spike_window = window;
  return options;
}

}  // namespace

TEST(SpikeDetector, NoScoreUntilTheWindowIsFull) {
  SpikeDetector detector(4);
  for (double v : {1.0, 2.0, 3.0}) {
    EXPECT_FALSE(detector.score(100.0).has_value());
    detector.add(v);
  }
  EXPECT_FALSE(detector.score(100.0).has_value());
  detector.add(4.0);
  ASSERT_TRUE(detector.score(100.0).has_value());
}

TEST(SpikeDetector, ExactMeanStdAndZScoreOverTheLastValues) {
  SpikeDetector detector(4);
  for (double v : {1.0, 2.0, 3.0, 4.0}) detector.add(v);
  EXPECT_DOUBLE_EQ(detector.mean(), 2.5);
  EXPECT_DOUBLE_EQ(detector.stddev(), std::sqrt(1.25));  // population std
  EXPECT_DOUBLE_EQ(*detector.score(10.0), 7.5 / std::sqrt(1.25));
  EXPECT_DOUBLE_EQ(*detector.score(2.5), 0.0);
  EXPECT_DOUBLE_EQ(*detector.score(0.0), -2.5 / std::sqrt(1.25));
  // The oldest value (1) leaves: the window is now 2, 3, 4, 5.
  detector.add(5.0);
  EXPECT_EQ(detector.size(), 4u);
  EXPECT_DOUBLE_EQ(detector.mean(), 3.5);
  EXPECT_DOUBLE_EQ(*detector.score(10.0), 6.5 / std::sqrt(1.25));
}

TEST(SpikeDetector, ConstantWindowGivesZeroForEqualAndInfinityOtherwise) {
  SpikeDetector detector(3);
  for (int i = 0; i < 3; ++i) detector.add(2.0);
  EXPECT_EQ(*detector.score(2.0), 0.0);
  EXPECT_EQ(*detector.score(2.0000001), kInf);
  EXPECT_EQ(*detector.score(1.9), -kInf);
}

TEST(SpikeDetector, NonFiniteValuesAreNeitherScoredNorAdded) {
  SpikeDetector detector(2);
  detector.add(1.0);
  detector.add(kNaN);
  detector.add(kInf);
  EXPECT_EQ(detector.size(), 1u);
  detector.add(3.0);
  EXPECT_FALSE(detector.score(kNaN).has_value());
  EXPECT_DOUBLE_EQ(*detector.score(5.0), 3.0);  // mean 2, std 1
}

TEST(SpikeDetector, LargeOffsetsDoNotLoseTheStd) {
  // Running sums of squares would cancel here (1e8^2 = 1e16 ~ 1/eps); two passes do not.
  SpikeDetector detector(2);
  detector.add(1e8);
  detector.add(1e8 + 2);
  EXPECT_DOUBLE_EQ(detector.stddev(), 1.0);
}

TEST(FaultMonitorOptions, DefaultsAreStopWarnWindow128Z5) {
  FaultMonitorOptions options;
  EXPECT_EQ(options.non_finite, NonFinitePolicy::kStop);
  EXPECT_EQ(options.spike, SpikePolicy::kWarn);
  EXPECT_EQ(options.spike_window, 128);
  EXPECT_EQ(options.spike_zscore, 5.0);
  EXPECT_EQ(options.grad_check_every, 1);
}

TEST(FaultMonitorOptions, PoliciesParseAndBadNamesAreUsageErrors) {
  EXPECT_EQ(speedrun::parse_non_finite_policy("skip"), NonFinitePolicy::kSkip);
  EXPECT_EQ(speedrun::parse_non_finite_policy("stop"), NonFinitePolicy::kStop);
  EXPECT_EQ(speedrun::parse_spike_policy("warn"), SpikePolicy::kWarn);
  EXPECT_EQ(speedrun::parse_spike_policy("skip"), SpikePolicy::kSkip);
  try {
    speedrun::parse_non_finite_policy("ignore");
    FAIL() << "no error";
  } catch (const speedrun::UsageError& e) {
    EXPECT_TRUE(contains(e.what(), "'ignore'")) << e.what();
  }
  EXPECT_THROW(speedrun::parse_spike_policy("stop"), speedrun::UsageError);
}

TEST(FaultMonitorOptions, OutOfRangeValuesAreUsageErrorsNamingTheField) {
  auto expect_rejected = [](FaultMonitorOptions options, const std::string& field) {
    try {
      FaultMonitor monitor(options);
      FAIL() << "no error for " << field;
    } catch (const speedrun::UsageError& e) {
      EXPECT_TRUE(contains(e.what(), field)) << e.what();
    }
  };
  FaultMonitorOptions o;
  o.grad_check_every = 0;
  expect_rejected(o, "grad_check_every");
  o = {};
  o.spike_window = 1;
  expect_rejected(o, "spike_window");
  o = {};
  o.spike_zscore = 0;
  expect_rejected(o, "spike_zscore");
  o.spike_zscore = kNaN;
  expect_rejected(o, "spike_zscore");
  o = {};
  o.max_consecutive_skips = -1;
  expect_rejected(o, "max_consecutive_skips");
}

TEST(FaultMonitor, CleanStepsAreAppliedSilently) {
  FaultMonitor monitor;
  feed_alternating(monitor, 300);
  EXPECT_EQ(monitor.skipped_steps(), 0);
  EXPECT_EQ(monitor.spikes(), 0);
}

TEST(FaultMonitor, NonFiniteLossStopsUnderPolicyStop) {
  FaultMonitor monitor(options_with(NonFinitePolicy::kStop, SpikePolicy::kWarn));
  feed_alternating(monitor, 5);
  auto verdict = monitor.check_step(5, kNaN);
  EXPECT_EQ(verdict.action, StepAction::kStop);
  EXPECT_TRUE(contains(verdict.message, "step 5:")) << verdict.message;
  EXPECT_TRUE(contains(verdict.message, "nan")) << verdict.message;
  EXPECT_TRUE(contains(verdict.message, "stopping")) << verdict.message;
  EXPECT_EQ(monitor.check_step(6, -kInf).action, StepAction::kStop);
}

TEST(FaultMonitor, NonFiniteLossIsSkippedUnderPolicySkipAndKeptOutOfTheWindow) {
  FaultMonitor monitor(options_with(NonFinitePolicy::kSkip, SpikePolicy::kWarn, 4));
  feed_alternating(monitor, 4);
  auto verdict = monitor.check_step(4, kInf);
  EXPECT_EQ(verdict.action, StepAction::kSkip);
  EXPECT_TRUE(contains(verdict.message, "step 4: training loss is inf")) << verdict.message;
  EXPECT_TRUE(contains(verdict.message, "update skipped")) << verdict.message;
  EXPECT_EQ(monitor.skipped_steps(), 1);
  EXPECT_EQ(monitor.detector().mean(), 3.25);
  EXPECT_EQ(monitor.detector().stddev(), 0.25);
  EXPECT_EQ(monitor.check_step(5, 3.0).action, StepAction::kApply);
}

TEST(FaultMonitor, NonFiniteGradientWithFiniteLossFollowsThePolicy) {
  FaultMonitor stop(options_with(NonFinitePolicy::kStop, SpikePolicy::kWarn));
  auto verdict = stop.check_step(7, 3.2, false);
  EXPECT_EQ(verdict.action, StepAction::kStop);
  EXPECT_TRUE(contains(verdict.message, "step 7: gradient holds a non-finite value")) << verdict.message;
  FaultMonitor skip(options_with(NonFinitePolicy::kSkip, SpikePolicy::kWarn));
  EXPECT_EQ(skip.check_step(7, 3.2, false).action, StepAction::kSkip);
  EXPECT_EQ(skip.check_step(8, 3.2, true).action, StepAction::kApply);
  EXPECT_EQ(skip.check_step(9, 3.2, std::nullopt).action, StepAction::kApply);
}

TEST(FaultMonitor, SpikeWarnAppliesTheUpdateAndNamesTheZScore) {
  FaultMonitor monitor(options_with(NonFinitePolicy::kStop, SpikePolicy::kWarn));
  feed_alternating(monitor, 128);
  // z = (5.5 - 3.25) / 0.25 = 9.
  auto verdict = monitor.check_step(128, 5.5);
  EXPECT_EQ(verdict.action, StepAction::kApply);
  ASSERT_TRUE(verdict.zscore.has_value());
  EXPECT_EQ(*verdict.zscore, 9.0);
  EXPECT_TRUE(contains(verdict.message, "step 128: loss spike: loss 5.5 has z-score 9 > 5 over the last 128 losses"))
      << verdict.message;
  EXPECT_EQ(monitor.spikes(), 1);
  EXPECT_EQ(monitor.skipped_steps(), 0);
}

TEST(FaultMonitor, SpikeSkipSkipsOnlyAboveTheThreshold) {
  FaultMonitor monitor(options_with(NonFinitePolicy::kStop, SpikePolicy::kSkip));
  feed_alternating(monitor, 128);
  // z = (4.5 - 3.25) / 0.25 = 5 exactly: not above 5, applied.
  auto at_threshold = monitor.check_step(128, 4.5);
  EXPECT_EQ(*at_threshold.zscore, 5.0);
  EXPECT_EQ(at_threshold.action, StepAction::kApply) << at_threshold.message;
  EXPECT_TRUE(at_threshold.message.empty());
  auto spike = monitor.check_step(129, 6.0);
  EXPECT_EQ(spike.action, StepAction::kSkip);
  EXPECT_TRUE(contains(spike.message, "step 129: loss spike")) << spike.message;
  EXPECT_TRUE(contains(spike.message, "update skipped")) << spike.message;
  EXPECT_EQ(monitor.skipped_steps(), 1);
  // Downward outliers (a loss much lower than usual) are not spikes.
  EXPECT_EQ(monitor.check_step(130, 1.0).action, StepAction::kApply);
}

TEST(FaultMonitor, NoSpikeIsFlaggedBeforeTheWindowIsFull) {
  FaultMonitor monitor(options_with(NonFinitePolicy::kStop, SpikePolicy::kSkip));
  feed_alternating(monitor, 127);
  auto verdict = monitor.check_step(127, 100.0);
  EXPECT_EQ(verdict.action, StepAction::kApply);
  EXPECT_FALSE(verdict.zscore.has_value());
}

TEST(FaultMonitor, ALastingLevelShiftIsAbsorbedByTheWindow) {
  FaultMonitor monitor(options_with(NonFinitePolicy::kStop, SpikePolicy::kSkip, 8));
  feed_alternating(monitor, 8);
  int skipped = 0, step = 8;
  for (; step < 8 + 8; ++step) skipped += monitor.check_step(step, step % 2 ? 5.5 : 5.0).action == StepAction::kSkip;
  EXPECT_GE(skipped, 1);
  EXPECT_LT(skipped, 8);  // the new level joins the window and stops being flagged
  EXPECT_EQ(monitor.check_step(step, 5.0).action, StepAction::kApply);
}

TEST(FaultMonitor, TooManyConsecutiveSkipsStopTheRun) {
  FaultMonitorOptions options = options_with(NonFinitePolicy::kSkip, SpikePolicy::kWarn);
  options.max_consecutive_skips = 3;
  FaultMonitor monitor(options);
  for (int step = 0; step < 3; ++step) EXPECT_EQ(monitor.check_step(step, kNaN).action, StepAction::kSkip);
  EXPECT_EQ(monitor.check_step(3, 3.0).action, StepAction::kApply);  // resets the count
  for (int step = 4; step < 7; ++step) EXPECT_EQ(monitor.check_step(step, kNaN).action, StepAction::kSkip);
  auto verdict = monitor.check_step(7, kNaN);
  EXPECT_EQ(verdict.action, StepAction::kStop);
  EXPECT_TRUE(contains(verdict.message, "step 7:")) << verdict.message;
  EXPECT_TRUE(contains(verdict.message, "4 consecutive steps skipped (max_consecutive_skips 3)")) << verdict.message;
  EXPECT_EQ(monitor.skipped_steps(), 6);
}

TEST(FaultMonitor, ZeroMaxConsecutiveSkipsMeansNoLimit) {
  FaultMonitorOptions options = options_with(NonFinitePolicy::kSkip, SpikePolicy::kWarn);
  options.max_consecutive_skips = 0;
  FaultMonitor monitor(options);
  for (int step = 0; step < 100; ++step) ASSERT_EQ(monitor.check_step(step, kNaN).action, StepAction::kSkip);
}

// Raises the flag over `values` on the CPU backend and reads it back as the trainer does.
bool flag_raised(speedrun::Backend& backend, speedrun::DeviceFaultFlag& flag, const std::vector<float>& values) {
  float* buffer = backend.alloc(std::max<size_t>(values.size(), 1));
  backend.upload(buffer, values.data(), values.size());
  flag.clear();
  flag.check(buffer, values.size());
  flag.copy_to_host();
  backend.synchronize();
  backend.release(buffer);
  return flag.raised();
}

TEST(FaultMonitor, DeviceFlagFindsEveryKindOfNonFiniteValue) {
  auto backend = speedrun::make_cpu_backend();
  speedrun::DeviceFaultFlag flag(*backend);
  const size_t n = 1000;
  const std::vector<float> host(n, 3.0e38f);  // huge but finite
  auto raised_with = [&](std::vector<std::pair<size_t, float>> changes) {
    std::vector<float> values = host;
    for (auto [index, value] : changes) values[index] = value;
    return flag_raised(*backend, flag, values);
  };
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(raised_with({}));
  EXPECT_TRUE(raised_with({{n - 1, std::numeric_limits<float>::quiet_NaN()}}));
  EXPECT_TRUE(raised_with({{0, inf}}));
  EXPECT_TRUE(raised_with({{517, -inf}}));
  EXPECT_TRUE(raised_with({{3, inf}, {4, -inf}}));
  EXPECT_FALSE(flag_raised(*backend, flag, {}));
  flag.raise();  // the host's own decision reaches the host copy too
  flag.copy_to_host();
  backend->synchronize();
  EXPECT_TRUE(flag.raised());
}

TEST(FaultMonitor, GradientsAreCheckedEveryNthStepOnly) {
  auto backend = speedrun::make_cpu_backend();
  speedrun::DeviceFaultFlag flag(*backend);
  const std::vector<float> bad = {0, 0, 0, std::numeric_limits<float>::quiet_NaN()};
  FaultMonitorOptions options = options_with(NonFinitePolicy::kSkip, SpikePolicy::kWarn);
  options.grad_check_every = 3;
  FaultMonitor monitor(options);
  EXPECT_TRUE(monitor.should_check_gradients(0));
  EXPECT_FALSE(monitor.should_check_gradients(1));
  EXPECT_TRUE(monitor.should_check_gradients(6));
  // As the trainer asks: the flag's verdict on checked steps, nothing on the others.
  auto verdict_at = [&](int step) {
    std::optional<bool> finite;
    if (monitor.should_check_gradients(step)) finite = !flag_raised(*backend, flag, bad);
    return monitor.check_step(step, 3.0, finite);
  };
  EXPECT_EQ(verdict_at(0).action, StepAction::kSkip);
  EXPECT_EQ(verdict_at(1).action, StepAction::kApply);  // not checked
  EXPECT_EQ(verdict_at(2).action, StepAction::kApply);
  const StepVerdict verdict = verdict_at(3);
  EXPECT_EQ(verdict.action, StepAction::kSkip);
  EXPECT_TRUE(contains(verdict.message, "step 3: gradient holds a non-finite value")) << verdict.message;
}
