// Training progress text with an injected clock and stream: exact lines, the live
// line's carriage returns (and their absence off a terminal), and the run summary.
#include <gtest/gtest.h>

#include <sstream>

#include "train/progress.h"

namespace speedrun {
namespace {

struct FakeClock {
  double now = 100.0;
  ProgressReporter::Clock clock() {
    return [this] { return now; };
  }
};

ProgressOptions options(ProgressMode mode, int log_every = 1) {
  ProgressOptions o;
  o.mode = mode;
  o.log_every = log_every;
  o.total_steps = 10;
  o.end_step = 5;
  o.tokens_per_step = 1000;
  return o;
}

TEST(Progress, PlainLinesEveryLogEveryStepsAndAtTheEnd) {
  std::ostringstream out;
  FakeClock t;
  ProgressReporter p(out, options(ProgressMode::kLines, 2), t.clock());
  p.begin(0);
  for (int step = 0; step < 5; ++step) {
    t.now += 0.5;
    p.step_done(step, 5.0 - step, 0.25);
  }
  p.end();
  // Steps 0, 2 and 4 (the last) print; tokens/s covers the steps since the last line.
  EXPECT_EQ(out.str(),
            "step 1/10 | loss 5.0000 | 4.0k tok/s | 500ms | ETA 2.0s\n"
            "step 3/10 | loss 3.0000 | 4.0k tok/s | 1.5s | ETA 1.0s\n"
            "step 5/10 | loss 1.0000 | 4.0k tok/s | 2.5s\n");
}

TEST(Progress, ValidationAndNotesGetTheirOwnLines) {
  std::ostringstream out;
  FakeClock t;
  ProgressReporter p(out, options(ProgressMode::kLines, 100), t.clock());
  p.begin(0);
  p.validation(0, 10.825838, 1.5);
  p.note("saved x.safetensors");
  EXPECT_EQ(out.str(), "step 0/10 | val loss 10.8258 | 1.5s\nsaved x.safetensors\n");
}

TEST(Progress, LiveLineIsRewrittenInPlaceAndThrottled) {
  std::ostringstream out;
  FakeClock t;
  ProgressReporter p(out, options(ProgressMode::kLive), t.clock());
  p.begin(0);
  t.now += 1;
  p.step_done(0, 4.0, 0.5);   // drawn
  t.now += 0.05;
  p.step_done(1, 3.5, 0.5);   // within the refresh interval: not drawn
  t.now += 0.05;
  p.validation(2, 3.25, 0.2);  // clears the live line, prints its own line
  t.now += 0.01;
  p.step_done(2, 3.0, 0.5);   // redrawn at once after a note
  p.end();
  EXPECT_EQ(out.str(),
            "\rstep 1/10 | loss 4.0000 | 2.0k tok/s | 1.0s | ETA 4.0s\033[K"
            "\r\033[Kstep 2/10 | val loss 3.2500 | 200ms\n"
            "\rstep 3/10 | loss 3.0000 | 2.0k tok/s | 1.1s | ETA 607ms\033[K"
            "\n");
}

// The ETA: the steps' wall time without validations, per step, for the steps left, and
// the mean validation for each validation still due (steps 2 and 4 here, and the final
// one). Spreading step 0's 3 s validation over one step instead would say 14 s.
TEST(Progress, EtaCountsValidationsApartFromSteps) {
  std::ostringstream out;
  FakeClock t;
  ProgressOptions o = options(ProgressMode::kLines);
  o.val_every = 2;
  ProgressReporter p(out, o, t.clock());
  p.begin(0);
  t.now += 3;
  p.validation(0, 10.8, 3.0);
  t.now += 0.5;
  p.step_done(0, 5.0, 0.5);
  EXPECT_NE(out.str().find("step 1/10 | loss 5.0000 | 2.0k tok/s | 3.5s | ETA 11.0s\n"), std::string::npos)
      << out.str();
}

TEST(Progress, LastStepIsAlwaysDrawnLive) {
  std::ostringstream out;
  FakeClock t;
  ProgressReporter p(out, options(ProgressMode::kLive), t.clock());
  p.begin(3);
  t.now += 1;
  p.step_done(3, 2.0, 1.0);
  p.step_done(4, 1.5, 1.0);  // no time passed, but it is the last step
  EXPECT_NE(out.str().find("step 5/10 | loss 1.5000"), std::string::npos) << out.str();
}

TEST(Progress, QuietPrintsNothing) {
  std::ostringstream out;
  FakeClock t;
  ProgressReporter p(out, options(ProgressMode::kQuiet), t.clock());
  p.begin(0);
  p.step_done(0, 1.0, 0.1);
  p.validation(1, 1.0, 0.1);
  p.note("saved");
  p.end();
  EXPECT_EQ(out.str(), "");
}

TEST(Progress, MfuHookAddsAColumn) {
  std::ostringstream out;
  FakeClock t;
  ProgressOptions o = options(ProgressMode::kLines);
  o.mfu = [](double tokens_per_second) { return tokens_per_second / 10000.0; };
  ProgressReporter p(out, o, t.clock());
  p.begin(0);
  t.now += 1;
  p.step_done(0, 2.0, 0.5);
  EXPECT_EQ(out.str(), "step 1/10 | loss 2.0000 | 2.0k tok/s | MFU 20.0% | 1.0s | ETA 4.0s\n");
}

TEST(Progress, DurationsAndCountsReadNaturally) {
  EXPECT_EQ(format_duration(0.0123), "12ms");
  EXPECT_EQ(format_duration(42.04), "42.0s");
  EXPECT_EQ(format_duration(185), "3m05s");
  EXPECT_EQ(format_duration(3720), "1h02m");
  EXPECT_EQ(format_count(950), "950");
  EXPECT_EQ(format_count(12345), "12.3k");
  EXPECT_EQ(format_count(4.56e6), "4.56M");
  EXPECT_EQ(format_count(1.234e9), "1.23G");
}

TEST(Progress, SummaryNamesTargetTokensThroughputMemoryAndFiles) {
  RunSummary s;
  s.steps_completed = 300;
  s.steps_this_run = 100;
  s.final_val_loss = 3.2712;
  s.target_val_loss = 3.28;
  s.target_step = 250;
  s.target_train_seconds = 45.0;
  s.tokens_seen = 204800;
  s.training_seconds = 20;
  s.wall_seconds = 25;
  s.peak_rss_bytes = 512.0 * 1024 * 1024;
  s.out_dir = "runs/x";
  s.files = {"config.json", "metrics.jsonl"};
  const std::string text = format_summary(s);
  EXPECT_NE(text.find("run finished: 300 steps (100 in this run, 25.0s)"), std::string::npos) << text;
  EXPECT_NE(text.find("final val loss    3.2712"), std::string::npos) << text;
  EXPECT_NE(text.find("target 3.28       reached at step 250 after 45.0s of training"), std::string::npos) << text;
  EXPECT_NE(text.find("tokens seen       204.8k in this run"), std::string::npos) << text;
  EXPECT_NE(text.find("throughput        10.2k tok/s (20.0s of training)"), std::string::npos) << text;
  EXPECT_NE(text.find("peak memory       512.0 MiB"), std::string::npos) << text;
  EXPECT_NE(text.find("out dir           runs/x: config.json, metrics.jsonl"), std::string::npos) << text;
  EXPECT_EQ(text.find("skipped updates"), std::string::npos) << text;  // only when there were some
  s.target_step.reset();
  EXPECT_NE(format_summary(s).find("target 3.28       not reached"), std::string::npos);
  s.skipped_steps = {3, 4, 5, 6, 7, 8, 9, 10, 11};
  EXPECT_NE(format_summary(s).find("skipped updates   9 (steps 3, 4, 5, 6, 7, 8, 9, 10, ...; see the metrics' faults)"),
            std::string::npos)
      << format_summary(s);
}

TEST(Progress, PeakMemoryIsMeasured) { EXPECT_GT(peak_rss_bytes(), 1024.0 * 1024.0); }

}  // namespace
}  // namespace speedrun
