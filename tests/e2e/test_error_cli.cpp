// Runs the built `speedrun` binary into every error path of `train` (issue #7): bad data,
// bad configs, malformed checkpoints, an unwritable output and a full disk. Each must exit
// 2 (usage) or 1 (anything else) with a message naming the problem, without a signal or
// an "internal error", leaving no temporary file and earlier checkpoints byte-identical.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <sstream>

#include <nlohmann/json.hpp>

#include "support/cli.h"
#include "support/files.h"
#include "data/shard.h"
#include "train/checkpoint.h"
#include "train/safetensors.h"

namespace fs = std::filesystem;

namespace {

using speedrun::testing::contains;
using speedrun::testing::quote;
using speedrun::testing::RunResult;

std::string read_all(const fs::path& p) { return speedrun::testing::read_file_bytes(p); }

void write_all(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::vector<uint16_t> ramp(size_t n) {
  std::vector<uint16_t> tokens(n);
  for (size_t i = 0; i < n; ++i) tokens[i] = static_cast<uint16_t>((i * 7) % 300);
  return tokens;
}

// Every *.tmp.* file under dir (an interrupted atomic write would leave one).
std::vector<std::string> temporaries(const fs::path& dir) {
  std::vector<std::string> found;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (contains(entry.path().filename().string(), ".tmp.")) found.push_back(entry.path().string());
  }
  return found;
}

class ErrorCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("speedrun_err_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "_" +
            std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "data");
    speedrun::write_shard((dir_ / "data" / "train_000000.bin").string(), ramp(3000));
    speedrun::write_shard((dir_ / "data" / "val_000000.bin").string(), ramp(600));
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string data(const std::string& name) const { return (dir_ / "data" / name).string(); }

  // `speedrun train` on micro with the test's data; extra arguments appended. A resumed
  // run keeps its checkpoint's config (naming a preset beside --resume is refused).
  RunResult train(const std::string& extra, const std::string& env = "") {
    const std::string base = contains(extra, "--resume") ? "" : " --preset micro";
    return run(env + " " + quote(SPEEDRUN_BINARY) + " train" + base + " --quiet --train " +
               quote(data("train_*.bin")) + " --val " + quote(data("val_*.bin")) + " " + extra);
  }

  // A crash shows as the shell's 128 + signal, never as the 1 or 2 a clean failure expects.
  RunResult run(const std::string& command_line) { return speedrun::testing::run_shell(command_line, dir_); }

  // The run failed cleanly with `code` and a message holding every part.
  void expect_failure(const RunResult& r, int code, std::initializer_list<std::string> parts) {
    EXPECT_EQ(r.exit_code, code) << "stderr: " << r.err;
    EXPECT_TRUE(contains(r.err, "speedrun: error: ") || code == 2) << r.err;
    EXPECT_FALSE(contains(r.err, "internal error")) << r.err;
    for (const std::string& part : parts) EXPECT_TRUE(contains(r.err, part)) << "'" << part << "' not in: " << r.err;
    EXPECT_EQ(temporaries(dir_), std::vector<std::string>{});
  }

  // A one-step run's checkpoint: dir/good/step_000001.safetensors (+ .optim).
  std::string make_checkpoint() {
    const RunResult r = train("--steps 1 --out-dir " + quote((dir_ / "good").string()));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return (dir_ / "good" / "step_000001.safetensors").string();
  }

  std::string out_dir(const std::string& name = "out") const { return quote((dir_ / name).string()); }

  fs::path dir_;
};

TEST_F(ErrorCli, MissingShardsNameThePattern) {
  const std::string pattern = data("nothing_*.bin");
  expect_failure(run(quote(SPEEDRUN_BINARY) + " train --preset micro --train " + quote(pattern) + " --val " +
                     quote(data("val_*.bin")) + " --out-dir " + out_dir()),
                 1, {"no file matches the shard pattern", pattern});
}

// A config file whose values break a rule between keys: the message names the file.
TEST_F(ErrorCli, AConfigFilesBrokenRuleNamesTheFile) {
  const std::string config = (dir_ / "negative.json").string();
  write_all(config, "{\"preset\": \"micro\", \"seq_len\": -64}");
  expect_failure(run(quote(SPEEDRUN_BINARY) + " memory --config " + quote(config)), 2,
                 {"seq_len must be a positive multiple", "got -64", "(config file '" + config + "')"});
  expect_failure(run(quote(SPEEDRUN_BINARY) + " memory --config " + quote(config) + " --set seq_len=60"), 2,
                 {"got 60", "(config file '" + config + "' with --set)"});
}

// A config whose model cannot be allocated (1.2 TiB of activations at this seq_len) fails
// before anything is written, pointing at the plan rather than at an anonymous allocation.
TEST_F(ErrorCli, AModelTooLargeForMemorySaysWhereThePlanIs) {
  expect_failure(train("--set seq_len=268435456 --steps 1 --out-dir " + out_dir()), 1,
                 {"out of host memory allocating", "speedrun memory", "seq_len"});
  EXPECT_FALSE(fs::exists(dir_ / "out"));
}

TEST_F(ErrorCli, TruncatedShardNamesTheFile) {
  fs::resize_file(data("train_000000.bin"), fs::file_size(data("train_000000.bin")) - 1);
  expect_failure(train("--steps 1 --out-dir " + out_dir()), 1, {data("train_000000.bin"), "truncated or corrupt"});
}

TEST_F(ErrorCli, CorruptShardMagicNamesTheFile) {
  std::string bytes = read_all(data("val_000000.bin"));
  bytes[0] = 'X';
  write_all(data("val_000000.bin"), bytes);
  expect_failure(train("--steps 1 --out-dir " + out_dir()), 1, {data("val_000000.bin"), "bad magic"});
}

TEST_F(ErrorCli, TokenIdAtVocabSizeNamesIdAndFile) {
  std::vector<uint16_t> tokens = ramp(3000);
  tokens[100] = 300;
  speedrun::write_shard(data("train_000000.bin"), tokens);
  expect_failure(train("--steps 2 --out-dir " + out_dir()), 1,
                 {data("train_000000.bin"), "token id 300 at offset 100", "vocab_size 300"});
}

// Known before the first step, from the shards' headers: nothing is written, rather than a
// run that dies when the data runs out with no checkpoint.
TEST_F(ErrorCli, TooLittleDataForTheStepsIsAnErrorBeforeTraining) {
  speedrun::write_shard(data("train_000000.bin"), ramp(1000));  // 7 windows of 128 (+1)
  expect_failure(train("--steps 10 --out-dir " + out_dir()), 1,
                 {"not enough training data", "serve 7 more windows", "steps 0 to 9 need 10", "--steps 7"});
  EXPECT_FALSE(fs::exists(dir_ / "out" / "config.json"));
  EXPECT_FALSE(fs::exists(dir_ / "out" / "metrics.jsonl"));
  const RunResult seven = train("--steps 7 --out-dir " + out_dir());
  EXPECT_EQ(seven.exit_code, 0) << seven.err;
}

TEST_F(ErrorCli, TooLittleValidationDataIsAnErrorBeforeTraining) {
  speedrun::write_shard(data("val_000000.bin"), ramp(100));  // micro validates 2 x 128 tokens
  expect_failure(train("--steps 2 --out-dir " + out_dir()), 1,
                 {"not enough validation data", "val_tokens = 256", "serve 0", "lower val_tokens"});
  EXPECT_FALSE(fs::exists(dir_ / "out" / "config.json"));
}

// A new run into a directory that holds one would mix their configs, metrics and checkpoints.
TEST_F(ErrorCli, ANewRunRefusesADirectoryHoldingAnotherRun) {
  const RunResult first = train("--steps 1 --out-dir " + out_dir());
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const std::string config = read_all((dir_ / "out" / "config.json").string());
  const std::string metrics = read_all((dir_ / "out" / "metrics.jsonl").string());
  const std::string checkpoint = (dir_ / "out" / "step_000001.safetensors").string();
  expect_failure(train("--steps 2 --set seed=3 --out-dir " + out_dir()), 2,
                 {"already holds a run", "config.json", "--resume " + checkpoint});
  EXPECT_EQ(read_all((dir_ / "out" / "config.json").string()), config);
  EXPECT_EQ(read_all((dir_ / "out" / "metrics.jsonl").string()), metrics);
  // A run killed before its first save left nothing to resume: the message says so.
  fs::create_directory(dir_ / "killed");
  write_all(dir_ / "killed" / "config.json", config);
  expect_failure(train("--steps 1 --out-dir " + out_dir("killed")), 2,
                 {"already holds a run (config.json)", "remove it (that run saved no checkpoint to resume)"});
  // Another run's metrics file, named on its own.
  expect_failure(train("--steps 1 --metrics " + quote((dir_ / "out" / "metrics.jsonl").string()) + " --out-dir " +
                       quote((dir_ / "other").string())),
                 2, {"is not empty (another run's metrics, or another file)"});
}

// A resumed run continues its own directory, or an empty one: never another run's, and never
// from an older checkpoint of its own when a later one exists (that would fork the run).
TEST_F(ErrorCli, ResumeRefusesAnotherRunsDirectoryAndALaterTimeline) {
  ASSERT_EQ(train("--steps 4 --save-every 2 --keep 3 --out-dir " + out_dir("a")).exit_code, 0);
  ASSERT_EQ(train("--steps 1 --out-dir " + out_dir("b")).exit_code, 0);
  const std::string older = quote((dir_ / "a" / "step_000002.safetensors").string());
  const std::string b_config = read_all((dir_ / "b" / "config.json").string());
  expect_failure(train("--resume " + older + " --steps 3 --out-dir " + out_dir("b")), 2,
                 {"a run resumed into another directory", "already holds a run"});
  EXPECT_EQ(read_all((dir_ / "b" / "config.json").string()), b_config);
  expect_failure(train("--resume " + older + " --steps 3"), 2,
                 {"holds a later checkpoint of this run (step_000004.safetensors)", "resuming from step 2"});
  const RunResult elsewhere = train("--resume " + older + " --steps 3 --out-dir " + out_dir("c"));
  EXPECT_EQ(elsewhere.exit_code, 0) << elsewhere.err;
}

// Resuming where the stopped run validated (its last step, a val_every multiple) does not
// validate that step again.
TEST_F(ErrorCli, ResumeDoesNotValidateAStepTwice) {
  ASSERT_EQ(train("--steps 10 --out-dir " + out_dir()).exit_code, 0);  // micro validates every 10
  const RunResult resumed = train("--resume " + quote((dir_ / "out" / "step_000010.safetensors").string()) + " --steps 12");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  std::istringstream metrics(read_all((dir_ / "out" / "metrics.jsonl").string()));
  int step_10_validations = 0;
  for (std::string line; std::getline(metrics, line);) {
    step_10_validations += contains(line, "\"step\":10,") && contains(line, "val_loss");
  }
  EXPECT_EQ(step_10_validations, 1);
}

// A process killed while saving (SIGKILL; mpirun's own Ctrl-C) leaves its temporaries:
// the next run in that directory removes those of dead processes.
TEST_F(ErrorCli, ResumeRemovesTheTemporariesOfAKilledSave) {
  ASSERT_EQ(train("--steps 2 --out-dir " + out_dir()).exit_code, 0);
  const fs::path model_temp = dir_ / "out" / "step_000003.safetensors.tmp.2147483647";  // no such process
  const fs::path state_temp = dir_ / "out" / "step_000003.optim.safetensors.tmp.2147483647";
  write_all(model_temp, "half a checkpoint");
  write_all(state_temp, "half a state");
  const std::string checkpoint = quote((dir_ / "out" / "step_000002.safetensors").string());
  const RunResult resumed = train("--resume " + checkpoint + " --steps 3");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_FALSE(fs::exists(model_temp));
  EXPECT_FALSE(fs::exists(state_temp));
  EXPECT_TRUE(fs::exists(dir_ / "out" / "step_000003.safetensors"));
}

TEST_F(ErrorCli, AMalformedMetricsRecordOnResumeIsNamed) {
  ASSERT_EQ(train("--steps 2 --out-dir " + out_dir()).exit_code, 0);
  const fs::path metrics = dir_ / "out" / "metrics.jsonl";
  write_all(metrics, "{\"step\":0,\"elapsed_s\":\"soon\"}\n" + read_all(metrics.string()));
  expect_failure(train("--resume " + quote((dir_ / "out" / "step_000002.safetensors").string()) + " --steps 3"), 1,
                 {metrics.string() + ":1: expected a number in field 'elapsed_s'"});
}

// A metrics file whose last line a write left incomplete (the machine went down): the
// resumed run removes that line, says so even with --quiet, appends whole records, and
// plots them.
TEST_F(ErrorCli, ResumeMendsAMetricsFileCutOffMidLine) {
  ASSERT_EQ(train("--steps 2 --out-dir " + out_dir()).exit_code, 0);
  const fs::path metrics = dir_ / "out" / "metrics.jsonl";
  const std::string whole = read_all(metrics.string());
  write_all(metrics, whole.substr(0, whole.size() - 10));
  const RunResult r = train("--resume " + quote((dir_ / "out" / "step_000002.safetensors").string()) + " --steps 3");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "warning: metrics file '" + metrics.string() + "' ended in an incomplete line ("))
      << r.err;
  EXPECT_FALSE(contains(r.err, "no plot")) << r.err;
  std::istringstream lines(read_all(metrics.string()));
  int last_step = -1;
  for (std::string line; std::getline(lines, line);) {
    const nlohmann::json record = nlohmann::json::parse(line, nullptr, false);
    ASSERT_TRUE(record.is_object()) << line;
    last_step = record["step"].get<int>();
  }
  EXPECT_EQ(last_step, 3);
  EXPECT_TRUE(contains(read_all((dir_ / "out" / "loss.svg").string()), "<polyline")) << "no plot of the run";
}

// Weights so large (finite) that the forward pass is NaN: eval says so and fails, rather
// than printing "val loss -nan" with exit 0.
TEST_F(ErrorCli, EvalOfOverflowedWeightsIsAnError) {
  const RunResult blown = train("--set lr_scalar=1e30 --set lr_embed=1e30 --set lr_lm_head=1e30 --out-dir " + out_dir());
  ASSERT_EQ(blown.exit_code, 1) << blown.err;
  ASSERT_TRUE(contains(blown.err, "not finite")) << blown.err;
  // Its saved (finite) parameters gave the non-finite loss: the stop message says that
  // resuming them repeats it, rather than offering them as a state to go on from.
  EXPECT_TRUE(contains(blown.err, "its parameters gave this loss themselves, so resuming repeats it")) << blown.err;
  const std::string checkpoint = (dir_ / "out" / "step_000002.safetensors").string();
  ASSERT_TRUE(fs::exists(checkpoint)) << blown.err;
  expect_failure(run(quote(SPEEDRUN_BINARY) + " eval --ckpt " + quote(checkpoint) + " --val " + quote(data("val_*.bin"))),
                 1, {"the validation loss of '" + checkpoint + "' is not finite", "overflowed"});
}

// Failed before writing anything: no empty directory of its own is left behind.
TEST_F(ErrorCli, ARefusedRunLeavesNoEmptyOutDir) {
  expect_failure(run(quote(SPEEDRUN_BINARY) + " train --preset micro --quiet --train " + quote(data("nope_*.bin")) +
                     " --val " + quote(data("val_*.bin")) + " --out-dir " + out_dir()),
                 1, {"no file matches"});
  EXPECT_FALSE(fs::exists(dir_ / "out"));
  expect_failure(train("--steps 30 --out-dir " + out_dir()), 2, {"--steps 30 is past num_iterations (20)"});
  EXPECT_FALSE(fs::exists(dir_ / "out"));
}

TEST_F(ErrorCli, ResumeRefusesAPresetOrConfigAndAnEndAlreadyReached) {
  ASSERT_EQ(train("--steps 2 --out-dir " + out_dir()).exit_code, 0);
  const std::string checkpoint = quote((dir_ / "out" / "step_000002.safetensors").string());
  expect_failure(run(quote(SPEEDRUN_BINARY) + " train --resume " + checkpoint + " --preset tiny"), 2,
                 {"--preset cannot replace it"});
  expect_failure(run(quote(SPEEDRUN_BINARY) + " train --resume " + checkpoint + " --config x.json"), 2,
                 {"--config cannot replace it"});
  expect_failure(train("--resume " + checkpoint + " --steps 1"), 2,
                 {"is at step 2 and this run would end at step 1", "nothing left to train"});
}

TEST_F(ErrorCli, ValTokensNotDivisibleIsAUsageError) {
  expect_failure(train("--steps 1 --set val_tokens=100 --out-dir " + out_dir()), 2,
                 {"val_tokens (100)", "world_size * val_seq_len"});
  EXPECT_FALSE(fs::exists(dir_ / "out")) << "a usage error must fail before creating the run directory";
}

struct BadValue {
  std::string assignment;
  std::string named;
};

const std::vector<BadValue>& bad_values() {
  static const std::vector<BadValue> cases = {
      {"seq_len=60", "seq_len must be a positive multiple of attn_block_size (8), got 60"},
      {"num_layers=3", "num_layers must be even and >= 2, got 3"},
      {"num_layers=0", "num_layers must be even and >= 2, got 0"},
      {"num_iterations=-5", "num_iterations must be >= 1, got -5"},
      {"no_such_key=1", "unknown config key 'no_such_key'"},
      {"seq_len=abc", "'seq_len' must be an integer, got \"abc\""},
  };
  return cases;
}

TEST_F(ErrorCli, BadConfigValuesViaSetAreUsageErrors) {
  for (const BadValue& bad : bad_values()) {
    SCOPED_TRACE(bad.assignment);
    expect_failure(train("--steps 1 --set " + quote(bad.assignment) + " --out-dir " + out_dir()), 2, {bad.named});
  }
  expect_failure(train("--steps -1 --out-dir " + out_dir()), 2, {"--steps"});
}

TEST_F(ErrorCli, BadConfigValuesViaConfigFileAreUsageErrors) {
  const fs::path file = dir_ / "config.json";
  for (const BadValue& bad : bad_values()) {
    SCOPED_TRACE(bad.assignment);
    const size_t eq = bad.assignment.find('=');
    std::string value = bad.assignment.substr(eq + 1);
    if (value == "abc") value = "\"abc\"";
    write_all(file, "{\"preset\": \"micro\", \"" + bad.assignment.substr(0, eq) + "\": " + value + "}");
    expect_failure(run(quote(SPEEDRUN_BINARY) + " train --config " + quote(file.string()) + " --train " +
                       quote(data("train_*.bin")) + " --val " + quote(data("val_*.bin")) + " --out-dir " + out_dir()),
                   2, {bad.named});
  }
  write_all(file, "{\"preset\": \"micro\",");
  expect_failure(run(quote(SPEEDRUN_BINARY) + " train --config " + quote(file.string())), 2,
                 {file.string(), "not valid JSON"});
}

TEST_F(ErrorCli, AMetricsFileThatCannotBeOpenedLeavesNoConfigBehind) {
  const std::string metrics = (dir_ / "no_such_dir" / "m.jsonl").string();
  expect_failure(train("--steps 1 --metrics " + quote(metrics) + " --out-dir " + out_dir()), 1,
                 {"cannot open metrics file '" + metrics + "'"});
  EXPECT_FALSE(fs::exists(dir_ / "out" / "config.json"));
}

TEST_F(ErrorCli, UnwritableOutDirNamesTheDirectory) {
  write_all(dir_ / "a_file", "not a directory");
  const std::string out = (dir_ / "a_file" / "run").string();
  expect_failure(train("--steps 1 --out-dir " + quote(out)), 1, {"cannot create output directory", out});
}

// CLI11 would print "Value 0 not in range 0.000000 to 1.79...e+308", wrap -1 into an
// unsigned seed and saturate an integer too large: each flag's text is checked instead.
TEST_F(ErrorCli, NumericFlagsAreCheckedOnTheirText) {
  const std::string speedrun = quote(SPEEDRUN_BINARY);
  const std::string model = quote((dir_ / "model.safetensors").string());
  const struct {
    std::string command;
    std::string said;
  } cases[] = {
      {" train --log-every 0", "--log-every: expected a whole number in [1, 2147483647], got 0"},
      {" train --steps abc", "--steps: expected a whole number in [0, 2147483647], got 'abc'"},
      {" train --steps 99999999999", "--steps: expected a whole number in [0, 2147483647], got 99999999999"},
      {" train --grad-bucket-mb nan", "--grad-bucket-mb: expected a finite number > 0 and <= 1048576, got 'nan'"},
      {" sample --ckpt " + model + " --seed -1", "--seed: expected a whole number in [0, 18446744073709551615]"},
      {" sample --ckpt " + model + " --temperature -1", "--temperature: expected a finite number >= 0, got '-1'"},
      {" init --seed 99999999999999999999 --out " + model, "--seed: expected a whole number in [-2^63, 2^63 - 1]"},
      {" prepare --input x.txt --out shards --val-tokens -5", "--val-tokens: expected a whole number in [0, "},
      {" bench --preset micro --window 0", "--window: expected a whole number in [1, 2147483647], got 0"},
      // An empty glob is not "omitted": it would quietly mean the default corpus.
      {" train --train '' --steps 1", "--train: expected a glob of token shards, got an empty one"},
      {" train --val '' --steps 1", "--val: expected a glob of token shards, got an empty one"},
      {" eval --ckpt " + model + " --val ''", "--val: expected a glob of token shards, got an empty one"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.command);
    expect_failure(run(speedrun + c.command), 2, {c.said});
  }
  EXPECT_FALSE(fs::exists(dir_ / "model.safetensors"));
  expect_failure(run(speedrun + " bench --preset micro --window 99"), 2,
                 {"--window 99 is longer than this config's longest window"});
}

// A directory opens as a stream on Linux: without a check first, reading it fails later
// with a message that names neither the file nor the problem.
// Output the system refuses (a full disk here) fails the command with exit 1: a script
// reading `eval --json > result.json` must not get status 0 and no result.
TEST_F(ErrorCli, OutputThatCannotBeWrittenIsAFailure) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  const std::string checkpoint = make_checkpoint();
  for (const std::string& command :
       {" inspect " + quote(data("val_000000.bin")), std::string(" memory --preset micro"),
        std::string(" tokenize --text hello"),
        " eval --json --ckpt " + quote(checkpoint) + " --val " + quote(data("val_*.bin"))}) {
    SCOPED_TRACE(command);
    expect_failure(run("(" + quote(SPEEDRUN_BINARY) + command + " > /dev/full)"), 1,
                   {"cannot write to standard output: "});
  }
  const RunResult fine = run(quote(SPEEDRUN_BINARY) + " memory --preset micro");
  EXPECT_EQ(fine.exit_code, 0) << fine.err;
}

TEST_F(ErrorCli, ADirectoryGivenAsAnInputFileIsNamedAsSuch) {
  const std::string speedrun = quote(SPEEDRUN_BINARY), data_dir = quote((dir_ / "data").string());
  const struct {
    std::string command;
    int code;
    std::string said;
  } cases[] = {
      {" eval --ckpt " + data_dir, 1, "safetensors file '" + (dir_ / "data").string() + "' is a directory, not a file"},
      {" sample --ckpt " + data_dir, 1, "is a directory, not a file"},
      {" train --resume " + data_dir, 1, "is a directory, not a file"},
      {" train --init " + data_dir + " --preset micro", 1, "is a directory, not a file"},
      {" train --config " + data_dir, 2, "config file '" + (dir_ / "data").string() + "' is a directory, not a file"},
      {" tokenize --file " + data_dir, 1, "input file '" + (dir_ / "data").string() + "' is a directory, not a file"},
      // Files named on the command line are data: a missing or unusable one exits 1, as a bad
      // one does (config files are usage: 2).
      {" plot " + data_dir + " --out p.svg", 1, "metrics file '" + (dir_ / "data").string() + "' is a directory"},
      {" plot " + quote((dir_ / "none.jsonl").string()) + " --out p.svg", 1, "none.jsonl' does not exist"},
      {" prepare --input " + data_dir + " --out " + quote((dir_ / "shards").string()), 1, "is not a regular file"},
      {" prepare --input " + quote((dir_ / "none.txt").string()) + " --out " + quote((dir_ / "shards").string()), 1,
       "none.txt': No such file or directory"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.command);
    expect_failure(run(speedrun + c.command), c.code, {c.said});
  }
}

// Every tensor of a safetensors file, as views into it (for writing altered copies).
std::vector<speedrun::TensorView> tensors_of(const speedrun::SafetensorsFile& file) {
  std::vector<speedrun::TensorView> tensors;
  for (const std::string& t : file.names()) tensors.push_back({t, file.info(t).dtype, file.info(t).shape, file.bytes(t)});
  return tensors;
}

// Malformed copies of a good checkpoint, each with the good optimiser state beside it
// (so that --resume gets as far as the model file).
class MalformedCheckpoints : public ErrorCli {
 protected:
  void SetUp() override {
    ErrorCli::SetUp();
    good_ = make_checkpoint();
    good_bytes_ = read_all(good_);
    good_state_bytes_ = read_all(speedrun::optimizer_state_path(good_));
  }

  std::string with_bytes(const std::string& name, const std::string& bytes) {
    const std::string path = (dir_ / name).string();
    write_all(path, bytes);
    write_all(speedrun::optimizer_state_path(path), good_state_bytes_);
    return path;
  }

  std::string rewritten(const std::string& name, const std::function<void(std::vector<speedrun::TensorView>&)>& edit) {
    const speedrun::SafetensorsFile file = speedrun::SafetensorsFile::open(good_);
    std::vector<speedrun::TensorView> tensors = tensors_of(file);
    edit(tensors);
    const std::string path = (dir_ / name).string();
    speedrun::write_safetensors(path, tensors, file.metadata());
    write_all(speedrun::optimizer_state_path(path), good_state_bytes_);
    return path;
  }

  // Both --init and --resume fail with exit 1 naming the file and `what`.
  void expect_rejected(const std::string& path, const std::string& what) {
    for (const char* flag : {"--init", "--resume"}) {
      SCOPED_TRACE(flag);
      expect_failure(train(std::string(flag) + " " + quote(path) + " --steps 2 --out-dir " + out_dir()), 1,
                     {fs::path(path).filename().string(), what});
      EXPECT_FALSE(fs::exists(dir_ / "out" / "step_000002.safetensors"));
    }
    EXPECT_EQ(read_all(good_), good_bytes_);
  }

  std::string good_, good_bytes_, good_state_bytes_;
};

TEST_F(MalformedCheckpoints, TheGoodOneResumes) {
  const RunResult r = train("--resume " + quote(good_) + " --steps 2 --out-dir " + out_dir());
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(dir_ / "out" / "step_000002.safetensors"));
}

TEST_F(MalformedCheckpoints, Truncated) {
  expect_rejected(with_bytes("cut.safetensors", good_bytes_.substr(0, good_bytes_.size() / 2)), "data");
  expect_rejected(with_bytes("stub.safetensors", good_bytes_.substr(0, 4)), "too short");
}

TEST_F(MalformedCheckpoints, BadHeaderJson) {
  std::string bytes = good_bytes_;
  bytes[9] = '}';  // closes the object right after its first character
  expect_rejected(with_bytes("bad_json.safetensors", bytes), "header is not valid JSON");
}

TEST_F(MalformedCheckpoints, AbsurdHeaderLength) {
  std::string bytes = good_bytes_;
  const uint64_t absurd = ~uint64_t{0};
  std::memcpy(bytes.data(), &absurd, 8);
  expect_rejected(with_bytes("absurd.safetensors", bytes), "header length 18446744073709551615 is impossible");
}

TEST_F(MalformedCheckpoints, WrongShape) {
  expect_rejected(rewritten("shape.safetensors",
                            [](auto& tensors) {
                              for (auto& t : tensors)
                                if (t.name == "lm_head.weight") t.shape = {16, 384};
                            }),
                  "'lm_head.weight' is F32 [16, 384], expected F32 [384, 16]");
}

TEST_F(MalformedCheckpoints, MissingTensor) {
  expect_rejected(rewritten("missing.safetensors",
                            [](auto& tensors) {
                              std::erase_if(tensors, [](const auto& t) { return t.name == "blocks.1.mlp.c_fc.weight"; });
                            }),
                  "missing tensor 'blocks.1.mlp.c_fc.weight'");
}

// A tensor the config's model has no place for (a layer the config has not, a stray name)
// is refused, in the model file and in the optimiser's: not silently left out.
TEST_F(MalformedCheckpoints, ExtraTensor) {
  const std::vector<float> value = {1.f, 2.f};
  expect_rejected(rewritten("extra.safetensors",
                            [&](auto& tensors) {
                              tensors.push_back({"extra.weight", "F32", {2}, std::as_bytes(std::span(value))});
                            }),
                  "tensor 'extra.weight' has no place");
  const std::string state = (dir_ / "extra_state.optim.safetensors").string();
  const speedrun::SafetensorsFile file = speedrun::SafetensorsFile::open(speedrun::optimizer_state_path(good_));
  std::vector<speedrun::TensorView> tensors = tensors_of(file);
  tensors.push_back({"adam_m.extra.weight", "F32", {2}, std::as_bytes(std::span(value))});
  speedrun::write_safetensors(state, tensors, file.metadata());
  const std::string model = (dir_ / "extra_state.safetensors").string();
  write_all(model, good_bytes_);
  expect_failure(train("--resume " + quote(model) + " --steps 2 --out-dir " + out_dir()), 1,
                 {"extra_state.optim.safetensors", "tensor 'adam_m.extra.weight' has no place"});
}

// A checkpoint whose config breaks a rule: the message names the file as well as the key.
TEST_F(MalformedCheckpoints, InvalidConfigNamesTheFile) {
  const speedrun::SafetensorsFile file = speedrun::SafetensorsFile::open(good_);
  std::vector<speedrun::TensorView> tensors = tensors_of(file);
  auto metadata = file.metadata();
  nlohmann::json config = nlohmann::json::parse(metadata.at("config"));
  config["num_layers"] = 3;
  metadata["config"] = config.dump();
  const std::string path = (dir_ / "odd_layers.safetensors").string();
  speedrun::write_safetensors(path, tensors, metadata);
  write_all(speedrun::optimizer_state_path(path), good_state_bytes_);
  expect_rejected(path, "checkpoint config: num_layers must be even and >= 2, got 3");
}

TEST_F(MalformedCheckpoints, WrongDtype) {
  expect_rejected(rewritten("dtype.safetensors",
                            [](auto& tensors) {
                              for (auto& t : tensors)
                                if (t.name == "skip_weights") t.dtype = "I32";
                            }),
                  "'skip_weights' is I32 [2], expected F32 [2]");
}

TEST_F(MalformedCheckpoints, ConfigThatDoesNotMatchIsAUsageError) {
  for (const char* flag : {"--init", "--resume"}) {
    SCOPED_TRACE(flag);
    expect_failure(train(std::string(flag) + " " + quote(good_) + " --set vocab_size=400 --steps 2 --out-dir " + out_dir()),
                   2, {"step_000001.safetensors", "vocab_size = 300 but the config asks for 400"});
  }
  EXPECT_EQ(read_all(good_), good_bytes_);
}

// The state file beside a checkpoint belongs to another model: the files disagree with each
// other, not with the command line, so it is a data error (1), not a usage error (2).
TEST_F(MalformedCheckpoints, AStateFileOfAnotherModelIsADataError) {
  const RunResult other = train("--steps 1 --set vocab_size=400 --out-dir " + out_dir("other"));
  ASSERT_EQ(other.exit_code, 0) << other.err;
  const std::string path = with_bytes("mixed.safetensors", good_bytes_);
  write_all(speedrun::optimizer_state_path(path),
            read_all(speedrun::optimizer_state_path((dir_ / "other" / "step_000001.safetensors").string())));
  expect_failure(train("--resume " + quote(path) + " --steps 2 --out-dir " + out_dir()), 1,
                 {"mixed.optim.safetensors", "vocab_size = 400", "its model checkpoint"});
}

// init replaces a file (a trained checkpoint, say) only when told to.
TEST_F(MalformedCheckpoints, InitRefusesToReplaceAFileWithoutForce) {
  const std::string init = quote(SPEEDRUN_BINARY) + " init --preset micro --seed 1 --out " + quote(good_);
  expect_failure(run(init), 2, {"--out '" + good_ + "' exists; pass --force to replace it"});
  EXPECT_EQ(read_all(good_), good_bytes_);
  const RunResult forced = run(init + " --force");
  EXPECT_EQ(forced.exit_code, 0) << forced.err;
  EXPECT_NE(read_all(good_), good_bytes_);
}

// micro's 300-token vocabulary has no GPT-2 end-of-text token for the prompt to start with:
// refused before any text is printed.
TEST_F(MalformedCheckpoints, SampleRefusesAModelWithoutTheGpt2Vocabulary) {
  const RunResult r = run(quote(SPEEDRUN_BINARY) + " sample --ckpt " + quote(good_) + " --prompt hello");
  expect_failure(r, 2, {"GPT-2's tokenizer", "vocab_size 300"});
  EXPECT_EQ(r.out, "");
  // A vocabulary past GPT-2's would choose ids without text partway through: refused too.
  const std::string wide = (dir_ / "wide.safetensors").string();
  const std::string init = quote(SPEEDRUN_BINARY) + " init --preset micro --set vocab_size=";
  ASSERT_EQ(run(init + "50300 --out " + quote(wide)).exit_code, 0);
  const RunResult w = run(quote(SPEEDRUN_BINARY) + " sample --ckpt " + quote(wide) + " --prompt hello");
  expect_failure(w, 2, {"GPT-2's tokenizer (50257 ids)", "vocab_size 50300"});
  EXPECT_EQ(w.out, "");
  // Without a separator in its vocabulary the prompt alone starts the text: none, refused.
  const std::string plain = (dir_ / "plain.safetensors").string();
  ASSERT_EQ(run(init + "50257 --set document_separator=60000 --out " + quote(plain)).exit_code, 0);
  const RunResult p = run(quote(SPEEDRUN_BINARY) + " sample --ckpt " + quote(plain) + " --max-new-tokens 3");
  expect_failure(p, 2, {"no document separator", "document_separator 60000", "--prompt"});
  const RunResult ok =
      run(quote(SPEEDRUN_BINARY) + " sample --ckpt " + quote(plain) + " --prompt hi --max-new-tokens 3");
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(ok.out.rfind("hi", 0), 0u) << ok.out;
}

// The window schedule ends at num_iterations; a step past it would be extrapolated.
TEST_F(MalformedCheckpoints, EvalRefusesAStepPastTheSchedule) {
  expect_failure(run(quote(SPEEDRUN_BINARY) + " eval --ckpt " + quote(good_) + " --val " + quote(data("val_*.bin")) +
                     " --step 999999"),
                 2, {"--step 999999 is past the checkpoint's num_iterations"});
}

TEST_F(MalformedCheckpoints, FullDiskWhileCheckpointingKeepsEarlierCheckpoints) {
  const fs::path run_dir = dir_ / "good";
  // Enough for config.json, not for the next checkpoint.
  const RunResult r = train("--resume " + quote(good_) + " --steps 2 --out-dir " + quote(run_dir.string()),
                            "SPEEDRUN_TEST_WRITE_BUDGET=4000");
  expect_failure(r, 1, {"step_000002.optim.safetensors", "No space left on device"});
  EXPECT_FALSE(fs::exists(run_dir / "step_000002.safetensors"));
  EXPECT_FALSE(fs::exists(run_dir / "step_000002.optim.safetensors"));
  EXPECT_EQ(read_all(good_), good_bytes_);
  EXPECT_EQ(read_all(speedrun::optimizer_state_path(good_)), good_state_bytes_);
}

}  // namespace
