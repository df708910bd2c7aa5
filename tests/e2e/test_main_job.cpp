// The README's main job: `speedrun train` with no arguments trains `tiny` on the
// default corpus and brings the validation loss at least 4 nats below ln(50304) within
// four minutes on a 2-core machine (issue #3). Runs alone (RUN_SERIAL): it is timed.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "support/temp_dir.h"
#include "util/paths.h"

namespace speedrun {
namespace {

TEST(MainJob, TinyOnDefaultCorpusFallsFourNatsWithinFourMinutes) {
  ASSERT_TRUE(std::filesystem::exists(default_data_dir() + "/val_000000.bin"))
      << "no default corpus in " << default_data_dir() << ": run scripts/setup.sh";
  testing::TempDir dir("main_job");
  const std::string command = std::string(SPEEDRUN_BINARY) + " train --out-dir " + dir.str() + " --quiet";
  const auto start = std::chrono::steady_clock::now();
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::ifstream metrics(dir / "metrics.jsonl");
  ASSERT_TRUE(metrics) << "no metrics.jsonl";
  double last_val = NAN;
  int last_val_step = -1, train_steps = 0;
  for (std::string line; std::getline(metrics, line);) {
    const auto record = nlohmann::json::parse(line);
    if (record.contains("val_loss")) {
      last_val = record["val_loss"].get<double>();
      last_val_step = record["step"].get<int>();
    }
    if (record.contains("train_loss")) ++train_steps;
  }
  EXPECT_EQ(train_steps, 300);
  EXPECT_EQ(last_val_step, 300);
  EXPECT_LE(last_val, std::log(50304.0) - 4.0) << "final validation loss " << last_val;
  EXPECT_LE(seconds, 240.0) << "the main job took " << seconds << " s";
  std::printf("main job: final val loss %.4f in %.1f s\n", last_val, seconds);
}

}  // namespace
}  // namespace speedrun
