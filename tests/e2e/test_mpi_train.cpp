// Issue #5: `mpirun -np P speedrun train` with P = 2 and 4 trains the same mathematics
// as one process with the same world_size: identical losses and final checkpoint, bit
// for bit (gradients are folded in logical-rank order). Compared from a briefly trained
// checkpoint, as SPEC §5b advises.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "support/files.h"
#include "data/shard.h"
#include "support/temp_dir.h"

namespace speedrun {
namespace {

using testing::rule_tokens;

std::string read_bytes(const std::string& path) { return speedrun::testing::read_file_bytes(path); }

struct RunOutput {
  std::vector<double> train_losses;
  std::vector<double> val_losses;
  std::string checkpoint;
};

RunOutput read_run(const std::string& dir, int last_step) {
  RunOutput out;
  std::ifstream metrics(dir + "/metrics.jsonl");
  for (std::string line; std::getline(metrics, line);) {
    const auto record = nlohmann::json::parse(line);
    if (record.contains("train_loss")) out.train_losses.push_back(record["train_loss"].get<double>());
    if (record.contains("val_loss")) out.val_losses.push_back(record["val_loss"].get<double>());
  }
  char name[64];
  std::snprintf(name, sizeof name, "/step_%06d.safetensors", last_step);
  out.checkpoint = read_bytes(dir + name);
  return out;
}

class MpiTrain : public ::testing::Test {
 protected:
  testing::TempDir dir{"mpi_train"};
  const std::string common = " train --preset micro --set world_size=4 --set val_every=4 --quiet";

  void SetUp() override {
    write_shard(dir / "train_000000.bin", rule_tokens(20000, 1));
    write_shard(dir / "val_000000.bin", rule_tokens(600, 3));
    // A briefly trained starting point (lambdas, head and projections no longer zero).
    run("", common + " --steps 3 --out-dir " + (dir / "warm") + data_args());
  }
  std::string data_args() const { return " --train '" + (dir / "train_*.bin") + "' --val '" + (dir / "val_*.bin") + "'"; }
  static void run(const std::string& launcher, const std::string& args) {
    const std::string command = "OMP_NUM_THREADS=1 " + launcher + SPEEDRUN_BINARY + args;
    ASSERT_EQ(std::system(command.c_str()), 0) << command;
  }
  static std::string mpirun(int processes) {
    const std::string root = ::geteuid() == 0 ? "--allow-run-as-root " : "";
    return "mpirun " + root + "--oversubscribe --bind-to none -np " + std::to_string(processes) + " ";
  }
  RunOutput train_from_warm(const std::string& launcher, const std::string& name) {
    run(launcher, common + " --steps 10 --init " + (dir / "warm/step_000003.safetensors") + " --out-dir " +
                      (dir / name) + data_args());
    return read_run(dir / name, 10);
  }
};

TEST_F(MpiTrain, TwoAndFourProcessesMatchOneProcessBitForBit) {
  const RunOutput one = train_from_warm("", "p1");
  ASSERT_EQ(one.train_losses.size(), 10u);
  for (int processes : {2, 4}) {
    const RunOutput many = train_from_warm(mpirun(processes), "p" + std::to_string(processes));
    EXPECT_EQ(many.train_losses, one.train_losses) << processes << " processes";
    EXPECT_EQ(many.val_losses, one.val_losses) << processes << " processes";
    EXPECT_TRUE(many.checkpoint == one.checkpoint) << processes << " processes: final checkpoints differ";
  }
}

TEST_F(MpiTrain, ProcessCountMustDivideWorldSize) {
  const std::string command = "OMP_NUM_THREADS=1 " + mpirun(3) + SPEEDRUN_BINARY + common + " --steps 1 --out-dir " +
                              (dir / "bad") + data_args() + " 2> " + (dir / "err.txt");
  EXPECT_NE(std::system(command.c_str()), 0);
  EXPECT_NE(read_bytes(dir / "err.txt").find("not divisible"), std::string::npos) << read_bytes(dir / "err.txt");
}

}  // namespace
}  // namespace speedrun
