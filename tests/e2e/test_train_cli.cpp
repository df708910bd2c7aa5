// Runs the built `speedrun` binary through a training run's user side: output with and
// without a terminal, --quiet, SIGTERM and exact resume, checkpoint rotation, eval,
// sample and plot, on the micro preset (GPT-2 vocabulary) over a small prepared corpus.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "support/cli.h"
#include "support/files.h"
#include "backends/backend.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace {

using speedrun::testing::contains;
using speedrun::testing::quote;
using speedrun::testing::RunResult;
using speedrun::testing::run_shell;

std::string read_all(const fs::path& p) { return speedrun::testing::read_file_bytes(p); }

RunResult speedrun(const std::string& arguments, const fs::path& scratch) {
  return speedrun::testing::run_speedrun(arguments, scratch);
}

struct Metrics {
  std::vector<double> train_losses;
  std::vector<std::pair<int, double>> val_losses;
};

Metrics read_metrics(const fs::path& path) {
  Metrics m;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json record = nlohmann::json::parse(line);
    if (record.contains("train_loss")) m.train_losses.push_back(record["train_loss"].get<double>());
    if (record.contains("val_loss")) m.val_losses.emplace_back(record["step"].get<int>(), record["val_loss"].get<double>());
  }
  return m;
}

std::vector<std::string> checkpoint_files(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.find(".safetensors") != std::string::npos) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

class TrainCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // The micro model gains nothing from threads, and spinning OpenMP workers make a
    // run crawl when other processes hold the cores.
    setenv("OMP_NUM_THREADS", "1", 1);
    root_ = new fs::path(fs::temp_directory_path() / ("speedrun_e2e_train_" + std::to_string(::getpid())));
    fs::remove_all(*root_);
    fs::create_directories(*root_);
    const fs::path corpus = fs::path(SPEEDRUN_SOURCE_DIR) / ".cache/corpus/brown";
    std::string inputs;
    for (const char* name : {"ca01.txt", "ca02.txt", "ca03.txt", "ca04.txt"}) inputs += " " + quote((corpus / name).string());
    const RunResult prepared =
        speedrun("prepare --input" + inputs + " --out " + quote((*root_ / "data").string()) + " --val-tokens 600", *root_);
    ASSERT_EQ(prepared.exit_code, 0) << prepared.err;
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
  }
  void SetUp() override {
    dir_ = *root_ / ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::create_directories(dir_);
  }
  // micro's model with GPT-2's vocabulary (and its <|endoftext|>) on the prepared shards.
  static std::string data_args() {
    return "--train " + quote((*root_ / "data/train_*.bin").string()) + " --val " +
           quote((*root_ / "data/val_*.bin").string());
  }
  std::string train_args(const std::string& run, const std::string& extra = "") const {
    return "train --preset micro --set vocab_size=50257 --set document_separator=50256 " + data_args() +
           " --out-dir " + quote((dir_ / run).string()) + " " + extra;
  }

  static fs::path* root_;
  fs::path dir_;
};

fs::path* TrainCli::root_ = nullptr;

TEST_F(TrainCli, PlainLinesWithoutATerminalAndAFullRunDirectory) {
  const RunResult r = speedrun(train_args("run", "--log-every 5"), dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(contains(r.out, "\r")) << r.out;
  EXPECT_FALSE(contains(r.out, "\033")) << r.out;
  // Steps 0, 5, 10, 15 (printed as completed counts) and the last one.
  for (const char* line : {"step 1/20 | loss ", "step 6/20 | loss ", "step 11/20 | loss ", "step 16/20 | loss ",
                           "step 20/20 | loss "}) {
    EXPECT_TRUE(contains(r.out, line)) << line << "\n" << r.out;
  }
  EXPECT_FALSE(contains(r.out, "step 2/20 | loss ")) << r.out;
  EXPECT_TRUE(contains(r.out, "step 0/20 | val loss 10.8258")) << r.out;
  EXPECT_TRUE(contains(r.out, "step 10/20 | val loss ")) << r.out;
  EXPECT_TRUE(contains(r.out, "step 20/20 | val loss ")) << r.out;
  EXPECT_TRUE(contains(r.out, "run finished: 20 steps")) << r.out;
  EXPECT_TRUE(contains(r.out, "target 3.28       not reached")) << r.out;
  EXPECT_TRUE(contains(r.out, "tokens seen       2.6k in this run")) << r.out;  // 20 steps x 2 x 64
  EXPECT_TRUE(contains(r.out, "peak memory ")) << r.out;
  EXPECT_EQ(r.err, "");
  for (const char* file : {"config.json", "metrics.jsonl", "step_000020.safetensors", "step_000020.optim.safetensors",
                           "loss.svg", "loss.png"}) {
    EXPECT_TRUE(fs::exists(dir_ / "run" / file)) << file;
  }
  EXPECT_EQ(read_metrics(dir_ / "run/metrics.jsonl").train_losses.size(), 20u);
}

// Recomputing activations changes memory, never the numbers: the same losses to the bit,
// and the same checkpoint bytes, with activations kept in float32 or as bf16 codes; bf16
// changes the numbers a little (it rounds h and the normalised q and k).
TEST_F(TrainCli, RecomputedActivationsTrainTheSameRun) {
  const std::pair<const char*, const char*> runs[] = {
      {"kept", ""},
      {"recomputed", " --recompute-activations"},
      {"kept_bf16", " --activations bf16"},
      {"recomputed_bf16", " --recompute-activations --activations bf16"},
      {"relu2_bf16", " --recompute-relu2 --activations bf16"}};
  for (const auto& [run, flags] : runs) {
    const RunResult r = speedrun(train_args(run, std::string("--quiet --steps 4") + flags), dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  auto losses = [&](const char* run) { return read_metrics(dir_ / run / "metrics.jsonl").train_losses; };
  auto checkpoint = [&](const char* run) { return read_all(dir_ / run / "step_000004.safetensors"); };
  ASSERT_EQ(losses("kept").size(), 4u);
  EXPECT_EQ(losses("kept"), losses("recomputed"));
  EXPECT_EQ(checkpoint("kept"), checkpoint("recomputed"));
  EXPECT_EQ(losses("kept_bf16"), losses("recomputed_bf16"));
  EXPECT_EQ(checkpoint("kept_bf16"), checkpoint("recomputed_bf16"));
  EXPECT_EQ(losses("kept_bf16"), losses("relu2_bf16"));
  EXPECT_EQ(checkpoint("kept_bf16"), checkpoint("relu2_bf16"));
  EXPECT_NE(losses("kept"), losses("kept_bf16"));
  for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(losses("kept")[i], losses("kept_bf16")[i], 1e-2) << i;
}

TEST_F(TrainCli, QuietPrintsNothing) {
  const RunResult r = speedrun(train_args("run", "--quiet --steps 3"), dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.err, "");
  EXPECT_TRUE(fs::exists(dir_ / "run/step_000003.safetensors"));
}

// Starts the binary with stdout on a pipe, sends SIGTERM once it has reported
// `after_line`, and returns its exit status with everything it printed.
RunResult run_and_terminate(const std::string& arguments, const std::string& after_line, const fs::path& scratch) {
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) return {};
  const fs::path err = scratch / "stderr.txt";
  const std::string command = "exec " + quote(SPEEDRUN_BINARY) + " " + arguments + " 2>" + quote(err.string());
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(pipe_fds[1], STDOUT_FILENO);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  close(pipe_fds[1]);
  RunResult result;
  bool sent = false;
  char buffer[4096];
  for (ssize_t n; (n = read(pipe_fds[0], buffer, sizeof buffer)) > 0;) {
    result.out.append(buffer, static_cast<size_t>(n));
    if (!sent && contains(result.out, after_line)) {
      kill(pid, SIGTERM);
      sent = true;
    }
  }
  close(pipe_fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.err = read_all(err);
  return result;
}

TEST_F(TrainCli, SigtermSavesAResumableCheckpointAndTheResumeIsExact) {
  // 40 steps leave the signal ample time to land mid-run after step 3 is reported.
  const std::string schedule = "--set num_iterations=40 --set val_every=8 --log-every 1";
  const RunResult whole = speedrun(train_args("whole", schedule + " --quiet"), dir_);
  ASSERT_EQ(whole.exit_code, 0) << whole.err;

  const RunResult stopped = run_and_terminate(train_args("stopped", schedule + " --keep 3"), "step 3/40 |", dir_);
  ASSERT_EQ(stopped.exit_code, 143) << stopped.out << stopped.err;
  const std::string marker = "resume with: ";
  ASSERT_TRUE(contains(stopped.err, marker)) << stopped.err;
  std::string resume = stopped.err.substr(stopped.err.find(marker) + marker.size());
  resume = resume.substr(0, resume.find('\n'));
  ASSERT_EQ(resume.rfind("speedrun train --resume " + (dir_ / "stopped/step_0000").string(), 0), 0u) << resume;
  EXPECT_TRUE(contains(resume, " --keep 3")) << "the run's non-default flags are repeated: " << resume;
  const Metrics partial = read_metrics(dir_ / "stopped/metrics.jsonl");
  ASSERT_GE(partial.train_losses.size(), 3u);
  ASSERT_LT(partial.train_losses.size(), 40u) << "the signal came after the run had finished";
  // Steps done, not a step index: "after 5 of 40 steps" when steps 0 to 4 trained.
  const std::string steps_done = std::to_string(partial.train_losses.size());
  EXPECT_TRUE(contains(stopped.err, "speedrun: stopped by SIGTERM after " + steps_done + " of 40 steps; checkpoint saved."))
      << stopped.err;
  char expected_checkpoint[64];
  std::snprintf(expected_checkpoint, sizeof expected_checkpoint, "step_%06zu.safetensors", partial.train_losses.size());
  EXPECT_TRUE(fs::exists(dir_ / "stopped" / expected_checkpoint)) << expected_checkpoint;
  EXPECT_TRUE(contains(stopped.out, std::string("saved ") + (dir_ / "stopped" / expected_checkpoint).string()))
      << stopped.out;

  // The printed command, run as printed (with this build's binary), finishes the run.
  const RunResult resumed = run_shell(quote(SPEEDRUN_BINARY) + resume.substr(std::string("speedrun").size()) + " --quiet", dir_);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  const Metrics joined = read_metrics(dir_ / "stopped/metrics.jsonl");
  const Metrics reference = read_metrics(dir_ / "whole/metrics.jsonl");
  ASSERT_EQ(reference.train_losses.size(), 40u);
  EXPECT_EQ(joined.train_losses, reference.train_losses);
  EXPECT_EQ(joined.val_losses, reference.val_losses);
  EXPECT_EQ(read_all(dir_ / "stopped/step_000040.safetensors"), read_all(dir_ / "whole/step_000040.safetensors"));
}

TEST_F(TrainCli, SaveEveryKeepsTheNewestCheckpoints) {
  ASSERT_EQ(speedrun(train_args("keep2", "--quiet --save-every 3"), dir_).exit_code, 0);
  EXPECT_EQ(checkpoint_files(dir_ / "keep2"),
            (std::vector<std::string>{"step_000018.optim.safetensors", "step_000018.safetensors",
                                      "step_000020.optim.safetensors", "step_000020.safetensors"}));
  ASSERT_EQ(speedrun(train_args("keep3", "--quiet --save-every 5 --keep 3"), dir_).exit_code, 0);
  EXPECT_EQ(checkpoint_files(dir_ / "keep3"),
            (std::vector<std::string>{"step_000010.optim.safetensors", "step_000010.safetensors",
                                      "step_000015.optim.safetensors", "step_000015.safetensors",
                                      "step_000020.optim.safetensors", "step_000020.safetensors"}));
  const RunResult bad = speedrun(train_args("bad", "--keep 0"), dir_);
  EXPECT_EQ(bad.exit_code, 2);
}

// The library under the CLI: a stop request right after a periodic save keeps that
// checkpoint (it is the run's last) even with --keep 1.
TEST_F(TrainCli, StopRightAfterAPeriodicSaveKeepsThatCheckpoint) {
  speedrun::TrainOptions options;
  options.config = speedrun::Config::preset("micro");
  options.config.vocab_size = 50257;
  options.train_glob = (*root_ / "data/train_*.bin").string();
  options.val_glob = (*root_ / "data/val_*.bin").string();
  options.out_dir = (dir_ / "run").string();
  options.quiet = true;
  options.save_every = 3;
  options.keep = 1;
  int polls = 0;
  // Polled before steps 0, 1, 2, 3, and once after step 0's validation.
  options.stop_requested = [&polls] { return ++polls == 5 ? SIGTERM : 0; };
  auto backend = speedrun::make_cpu_backend();
  const speedrun::TrainResult result = speedrun::train(options, *backend);
  EXPECT_EQ(result.stopped_by_signal, SIGTERM);
  EXPECT_EQ(result.last_step, 3);
  EXPECT_EQ(result.checkpoint_path, (dir_ / "run/step_000003.safetensors").string());
  EXPECT_EQ(checkpoint_files(dir_ / "run"),
            (std::vector<std::string>{"step_000003.optim.safetensors", "step_000003.safetensors"}));
}

TEST_F(TrainCli, EvalReproducesTheRunsLastValidationLossAndSampleIsSeeded) {
  ASSERT_EQ(speedrun(train_args("run", "--quiet --steps 12"), dir_).exit_code, 0);
  const std::string checkpoint = (dir_ / "run/step_000012.safetensors").string();
  const RunResult eval = speedrun("eval --json --ckpt " + quote(checkpoint) + " --val " +
                                      quote((*root_ / "data/val_*.bin").string()),
                                  dir_);
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const nlohmann::json result = nlohmann::json::parse(eval.out);
  const Metrics metrics = read_metrics(dir_ / "run/metrics.jsonl");
  ASSERT_EQ(metrics.val_losses.back().first, 12);
  EXPECT_EQ(result["step"], 12);
  EXPECT_EQ(result["val_loss"].get<double>(), metrics.val_losses.back().second);  // bit-identical
  const RunResult plain = speedrun("eval --ckpt " + quote(checkpoint) + " --val " +
                                       quote((*root_ / "data/val_*.bin").string()) + " --val-tokens 128",
                                   dir_);
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_TRUE(contains(plain.out, "| step 12 | window ")) << plain.out;
  EXPECT_TRUE(contains(plain.out, "| 128 tokens in sequences of 64")) << plain.out;

  const std::string sample = "sample --ckpt " + quote(checkpoint) + " --prompt 'The jury said' --max-new-tokens 12 ";
  const RunResult a = speedrun(sample + "--seed 7", dir_);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  const RunResult b = speedrun(sample + "--seed 7", dir_);
  const RunResult c = speedrun(sample + "--seed 8", dir_);
  EXPECT_EQ(a.out.rfind("The jury said", 0), 0u) << a.out;
  EXPECT_GT(a.out.size(), std::string("The jury said\n").size());
  for (const RunResult* r : {&b, &c}) ASSERT_EQ(r->exit_code, 0) << r->err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.out, c.out);
  const RunResult g1 = speedrun(sample + "--temperature 0 --seed 1", dir_);
  const RunResult g2 = speedrun(sample + "--temperature 0 --seed 2", dir_);
  for (const RunResult* r : {&g1, &g2}) {
    ASSERT_EQ(r->exit_code, 0) << r->err;
    EXPECT_EQ(r->out.rfind("The jury said", 0), 0u) << r->out;
    EXPECT_GT(r->out.size(), std::string("The jury said\n").size());
  }
  EXPECT_EQ(g1.out, g2.out);
}

// The CPU's bits do not depend on the thread count (every product is cut into tiles fixed
// by its shape): a run on two threads writes the one-thread run's checkpoints byte for
// byte, and eval on three threads reproduces its validation loss. The head's 64 x 50304
// products are large enough that OpenBLAS would otherwise share each among the threads.
TEST_F(TrainCli, TheThreadCountChangesNoBit) {
  ASSERT_EQ(speedrun(train_args("one", "--quiet --steps 6"), dir_).exit_code, 0);
  const auto on_threads = [&](int threads, const std::string& arguments) {
    return run_shell("OMP_NUM_THREADS=" + std::to_string(threads) + " " + quote(SPEEDRUN_BINARY) + " " + arguments,
                     dir_);
  };
  const RunResult two = on_threads(2, train_args("two", "--quiet --steps 6"));
  ASSERT_EQ(two.exit_code, 0) << two.err;
  for (const char* file : {"step_000006.safetensors", "step_000006.optim.safetensors"}) {
    EXPECT_TRUE(read_all(dir_ / "one" / file) == read_all(dir_ / "two" / file)) << file;
  }
  const RunResult eval = on_threads(3, "eval --json --ckpt " + quote((dir_ / "one/step_000006.safetensors").string()) +
                                           " --val " + quote((*root_ / "data/val_*.bin").string()));
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  EXPECT_EQ(nlohmann::json::parse(eval.out)["val_loss"].get<double>(),
            read_metrics(dir_ / "one/metrics.jsonl").val_losses.back().second);
}

// A run's checkpoints record the resolved flags that decide its bits (bf16 matmuls and
// activations, the overlapped reduction, the head's chunk of rows): --resume without them
// continues the run bit for bit, eval of a CPU run reproduces its validation with them, and
// resuming with a flag that differs says the steps will differ.
TEST_F(TrainCli, ResumeAndEvalFollowTheNumericsTheRunRecorded) {
  const std::string numerics = "--matmul bf16 --activations bf16 --grad-reduce overlap --head-chunk-rows 7 --quiet";
  ASSERT_EQ(speedrun(train_args("whole", numerics + " --steps 4"), dir_).exit_code, 0);
  ASSERT_EQ(speedrun(train_args("part", numerics + " --steps 2"), dir_).exit_code, 0);
  const RunResult resumed =
      speedrun("train --quiet --steps 4 " + data_args() + " --resume " + quote((dir_ / "part/step_000002.safetensors").string()),
               dir_);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_EQ(resumed.err, "");
  for (const char* file : {"step_000004.safetensors", "step_000004.optim.safetensors"}) {
    EXPECT_TRUE(read_all(dir_ / "part" / file) == read_all(dir_ / "whole" / file)) << file;
  }
  const std::string checkpoint = (dir_ / "whole/step_000004.safetensors").string();
  const RunResult eval =
      speedrun("eval --json --ckpt " + quote(checkpoint) + " --val " + quote((*root_ / "data/val_*.bin").string()), dir_);
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const nlohmann::json result = nlohmann::json::parse(eval.out);
  EXPECT_EQ(result["val_loss"].get<double>(), read_metrics(dir_ / "whole/metrics.jsonl").val_losses.back().second);
  EXPECT_EQ(result["matmul"], "bf16");
  EXPECT_EQ(result["activations"], "bf16");
  EXPECT_EQ(result["head_chunk_rows"], 7);

  const RunResult changed = speedrun("train --steps 5 " + data_args() + " --matmul fp32 --resume " + quote(checkpoint), dir_);
  ASSERT_EQ(changed.exit_code, 0) << changed.err;
  EXPECT_TRUE(contains(changed.err, "warning: --matmul fp32 differs from the run's bf16: the resumed steps will not be "
                                    "bit-identical to the run's"))
      << changed.err;
}

TEST_F(TrainCli, PlotWritesSvgAndPngOfSeveralRuns) {
  ASSERT_EQ(speedrun(train_args("first", "--quiet --steps 4"), dir_).exit_code, 0);
  ASSERT_EQ(speedrun(train_args("second", "--quiet --steps 6"), dir_).exit_code, 0);
  const std::string runs = quote((dir_ / "first/metrics.jsonl").string()) + " " +
                           quote((dir_ / "second/metrics.jsonl").string());
  const RunResult svg = speedrun("plot " + runs + " --out " + quote((dir_ / "cmp.svg").string()), dir_);
  ASSERT_EQ(svg.exit_code, 0) << svg.err;
  const std::string text = read_all(dir_ / "cmp.svg");
  EXPECT_TRUE(contains(text, "data-run=\"first\" data-series=\"train\" data-panel=\"step\""));
  EXPECT_TRUE(contains(text, "data-run=\"second\" data-series=\"val\" data-panel=\"time\""));
  const RunResult png = speedrun("plot " + runs + " --x step --out " + quote((dir_ / "cmp.png").string()), dir_);
  ASSERT_EQ(png.exit_code, 0) << png.err;
  EXPECT_EQ(read_all(dir_ / "cmp.png").substr(1, 3), "PNG");
  const RunResult bad = speedrun("plot " + runs + " --out " + quote((dir_ / "cmp.gif").string()), dir_);
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_TRUE(contains(bad.err, "must end in .svg or .png")) << bad.err;
}

TEST_F(TrainCli, BenchReportsTheStepAndWritesItsJson) {
  const fs::path json = dir_ / "bench.json";
  setenv("SPEEDRUN_COMMIT", "abc1234", 1);
  const RunResult r = speedrun("bench --preset micro --steps 2 --warmup 1 --json " + quote(json.string()), dir_);
  unsetenv("SPEEDRUN_COMMIT");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "step: ")) << r.out;
  EXPECT_TRUE(contains(r.out, "peak memory: ")) << r.out;
  EXPECT_TRUE(contains(r.out, "attention ")) << r.out;
  const nlohmann::json j = nlohmann::json::parse(read_all(json));
  EXPECT_EQ(j["commit"], "abc1234");
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["tokens_per_step"], 2 * 64);
  EXPECT_EQ(j["steps_timed"], 2);
  EXPECT_GT(j["ms_per_step"].get<double>(), 0);
  EXPECT_NEAR(j["tokens_per_second"].get<double>(), 128 / (j["ms_per_step"].get<double>() / 1000), 1e-6 * 128e3);
  EXPECT_TRUE(j["mfu"].is_null());  // an H100 figure: only on the GPU
  EXPECT_GT(j["peak_memory_bytes"].get<double>(), 1e6);
  EXPECT_GT(j["attention_tflops"].get<double>(), 0);
  // Forward and backward apart (4 D and 10 D per visible pair): the total's time is theirs.
  const double forward = j["attention_forward_tflops"].get<double>();
  const double backward = j["attention_backward_tflops"].get<double>();
  ASSERT_GT(forward, 0);
  ASSERT_GT(backward, 0);
  EXPECT_NEAR(3.5 / j["attention_tflops"].get<double>(), 1 / forward + 2.5 / backward,
              1e-9 * (1 / forward + 2.5 / backward));
  EXPECT_TRUE(j["ops"].contains("attention forward") && j["ops"].contains("attention backward")) << j["ops"].dump();
  EXPECT_EQ(j["date"].get<std::string>().size(), 20u);  // 2026-11-23T16:38:14Z
  // micro (d 16, MLP 64, 4 layers, layer 2 without attention): 3 x (qkv 3 x 256 + c_proj
  // 256) + 4 x (c_fc + c_proj = 2 x 1024) + the head, 300 rows padded to 384, x 16.
  EXPECT_EQ(j["matmul_parameters"].get<double>(), 3 * (4 * 256) + 4 * 2048 + 384 * 16);
  EXPECT_TRUE(j["ops"].contains("matmul"));
  // The same products by shape: together, the calls and time of the two matmul rows.
  EXPECT_TRUE(contains(r.out, "matmuls by shape")) << r.out;
  double shape_calls = 0, shape_ms = 0;
  for (const auto& [name, shape] : j["matmul_shapes"].items()) {
    shape_calls += shape["calls_per_step"].get<double>();
    shape_ms += shape["ms_per_step"].get<double>();
  }
  const nlohmann::json& ops = j["ops"];
  EXPECT_EQ(shape_calls, ops["matmul"]["calls_per_step"].get<double>() +
                             ops["matmul (batched)"]["calls_per_step"].get<double>());
  EXPECT_NEAR(shape_ms,
              ops["matmul"]["ms_per_step"].get<double>() + ops["matmul (batched)"]["ms_per_step"].get<double>(),
              1e-9 * shape_ms + 1e-12);
  // micro's c_fc forward over its 64 tokens: x [64, 16] times W^T, W [64, 16].
  EXPECT_TRUE(j["matmul_shapes"].contains("NT 64x64x16 f32")) << j["matmul_shapes"].dump();
  EXPECT_EQ(j["matmul"], "fp32");  // --matmul auto on the CPU: the float32 reference
  EXPECT_EQ(j["attention_kernel"], "reference");
  EXPECT_EQ(j["autotune_matmuls"], 0);  // nothing chosen by timing
  EXPECT_EQ(j["head_chunk_rows"], 256);  // the CPU's default
  EXPECT_TRUE(j["matmul_tunings"].is_null()) << j["matmul_tunings"].dump();
  EXPECT_TRUE(j["fp8_head_gflops"].is_null());  // a plain head
  // Launch counts from exec: at least the time of the steps it contains, and not absurd.
  EXPECT_GE(j["first_step_seconds"].get<double>(), j["ms_per_step"].get<double>() / 1000 / 4);
  EXPECT_LT(j["first_step_seconds"].get<double>(), 60);
}

// The FP8 head's op (products, casts and fused loss timed as one) has a rate of its own,
// kept out of the products' aggregate rate.
TEST_F(TrainCli, BenchReportsTheFp8HeadApartFromTheProducts) {
  const fs::path json = dir_ / "bench_fp8.json";
  const RunResult r =
      speedrun("bench --preset micro --steps 1 --set lm_head_fp8=1 --json " + quote(json.string()), dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "lm_head FP8 ")) << r.out;
  const nlohmann::json j = nlohmann::json::parse(read_all(json));
  const nlohmann::json& ops = j["ops"];
  ASSERT_TRUE(ops.contains("matmul (FP8 head)")) << ops.dump();
  const double head_gflops = ops["matmul (FP8 head)"]["gflops"].get<double>();
  ASSERT_GT(head_gflops, 0);
  EXPECT_NEAR(j["fp8_head_gflops"].get<double>(), head_gflops, 1e-9 * head_gflops);
  double gflop = 0, ms = 0;  // the other products: GFLOP/s x ms / 1000 each
  for (const auto& [name, op] : ops.items()) {
    if (name.rfind("matmul", 0) != 0 || name == "matmul (FP8 head)") continue;
    gflop += op["gflops"].get<double>() * op["ms_per_step"].get<double>() / 1000;
    ms += op["ms_per_step"].get<double>();
  }
  ASSERT_GT(ms, 0);
  EXPECT_NEAR(j["matmul_gflops"].get<double>(), gflop / ms * 1000, 1e-9 * gflop / ms * 1000);
}

TEST_F(TrainCli, BenchAndTrainTakeTheBackendAndMemoryOptionsAndRefuseFlashOnTheCpu) {
  const fs::path json = dir_ / "bench_bf16.json";
  const RunResult bench = speedrun("bench --preset micro --steps 1 --matmul bf16 --json " + quote(json.string()), dir_);
  ASSERT_EQ(bench.exit_code, 0) << bench.err;
  EXPECT_TRUE(contains(bench.out, "matmul inputs bf16")) << bench.out;
  const nlohmann::json bf16 = nlohmann::json::parse(read_all(json));
  EXPECT_EQ(bf16["matmul"], "bf16");
  EXPECT_GT(bf16["operand_copy_gb_per_step"].get<double>(), 0);
  EXPECT_TRUE(contains(bench.out, "bf16 operand copies:")) << bench.out;

  const fs::path recomputed = dir_ / "bench_recompute.json";
  const RunResult lean =
      speedrun("bench --preset micro --steps 1 --recompute-activations --json " + quote(recomputed.string()), dir_);
  ASSERT_EQ(lean.exit_code, 0) << lean.err;
  const nlohmann::json j = nlohmann::json::parse(read_all(recomputed));
  EXPECT_TRUE(j["recompute_activations"].get<bool>());
  EXPECT_LT(j["activation_bytes"].get<double>(), bf16["activation_bytes"].get<double>());  // exact sizes: test_gpt

  EXPECT_EQ(j["activation_precision"], "fp32");  // --activations auto on the CPU
  EXPECT_EQ(j["operand_copy_gb_per_step"].get<double>(), 0);  // float32 products copy nothing

  const fs::path codes = dir_ / "bench_bf16_activations.json";
  const std::string bf16_activations = " --recompute-activations --activations bf16";
  const RunResult halved =
      speedrun("bench --preset micro --steps 1" + bf16_activations + " --json " + quote(codes.string()), dir_);
  ASSERT_EQ(halved.exit_code, 0) << halved.err;
  EXPECT_TRUE(contains(halved.out, "activations recomputed, bf16")) << halved.out;
  const nlohmann::json k = nlohmann::json::parse(read_all(codes));
  EXPECT_EQ(k["activation_precision"], "bf16");
  EXPECT_LT(k["activation_bytes"].get<double>(), j["activation_bytes"].get<double>());

  // bench's own memory plan is what its backend allocated (on the CPU no scratch comes on top).
  for (const nlohmann::json& record : {bf16, j, k}) {
    EXPECT_EQ(record["planned_memory_bytes"].get<size_t>(), record["backend_peak_memory_bytes"].get<size_t>());
    EXPECT_TRUE(record["device_memory_in_use_bytes"].is_null());
  }
  // `memory` plans what bench's model really allocated, in every activation mode.
  for (const auto& [flag, record] : {std::pair{std::string(), bf16}, std::pair{std::string(" --recompute-activations"), j},
                                     std::pair{bf16_activations, k}}) {
    const RunResult plan = speedrun("memory --preset micro --json" + flag, dir_);
    ASSERT_EQ(plan.exit_code, 0) << plan.err;
    const nlohmann::json p = nlohmann::json::parse(plan.out);
    // The logits chunk is inside the arena, not beside it.
    EXPECT_EQ(p["arena_bytes"].get<size_t>() + p["sequence_bytes"].get<size_t>(),
              record["activation_bytes"].get<size_t>())
        << flag;
    EXPECT_GT(p["logits_bytes"].get<size_t>(), 0u);
    EXPECT_EQ(p["total_bytes"].get<size_t>(),
              p["parameter_bytes"].get<size_t>() + p["gradient_bytes"].get<size_t>() +
                  p["optimizer_bytes"].get<size_t>() + p["gradient_reduction_bytes"].get<size_t>() +
                  p["arena_bytes"].get<size_t>() + p["sequence_bytes"].get<size_t>());
  }
  // --grad-reduce: planned as train and bench run it (the overlapped reduction sums in the
  // model's own gradients; auto on the CPU is exact, with its sum buffers).
  const fs::path overlapped = dir_ / "bench_overlap.json";
  const RunResult overlap_bench =
      speedrun("bench --preset micro --steps 1 --grad-reduce overlap --json " + quote(overlapped.string()), dir_);
  ASSERT_EQ(overlap_bench.exit_code, 0) << overlap_bench.err;
  const RunResult overlap_plan = speedrun("memory --preset micro --grad-reduce overlap --json", dir_);
  const RunResult auto_plan = speedrun("memory --preset micro --json", dir_);
  ASSERT_EQ(overlap_plan.exit_code, 0) << overlap_plan.err;
  ASSERT_EQ(auto_plan.exit_code, 0) << auto_plan.err;
  const nlohmann::json o = nlohmann::json::parse(overlap_plan.out), a = nlohmann::json::parse(auto_plan.out);
  EXPECT_EQ(o["total_bytes"].get<size_t>(),
            nlohmann::json::parse(read_all(overlapped))["backend_peak_memory_bytes"].get<size_t>());
  EXPECT_EQ(o["grad_reduce"], "overlap");
  EXPECT_EQ(a["grad_reduce"], "exact");
  EXPECT_GT(a["gradient_reduction_bytes"].get<size_t>(), o["gradient_reduction_bytes"].get<size_t>());
  EXPECT_EQ(speedrun("memory --preset micro --grad-reduce sum", dir_).exit_code, 2);

  const RunResult table = speedrun("memory --preset speedrun-124m --device cuda --recompute-activations", dir_);
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_TRUE(contains(table.out, "validation sequences of 262144")) << table.out;
  EXPECT_TRUE(contains(table.out, "cuda logits chunks of 2048 rows")) << table.out;
  EXPECT_TRUE(contains(table.out, "activations recomputed, bf16")) << table.out;  // auto on cuda
  // #4's target: the speedrun's step planned within 24 GB on one GPU (before the scratch).
  const RunResult target = speedrun("memory --preset speedrun-124m --device cuda --recompute-activations --json", dir_);
  ASSERT_EQ(target.exit_code, 0) << target.err;
  EXPECT_LT(nlohmann::json::parse(target.out)["total_bytes"].get<double>(), 24e9);
  // Keeping all but relu(h)^2: between the two, and within 24 GB with room for the CUDA
  // context and scratch (measured on an H200: 1.25 GB).
  const RunResult relu2 = speedrun("memory --preset speedrun-124m --device cuda --recompute-relu2 --json", dir_);
  const RunResult kept = speedrun("memory --preset speedrun-124m --device cuda --json", dir_);
  ASSERT_EQ(relu2.exit_code, 0) << relu2.err;
  ASSERT_EQ(kept.exit_code, 0) << kept.err;
  const nlohmann::json lean_plan = nlohmann::json::parse(relu2.out), kept_plan = nlohmann::json::parse(kept.out);
  EXPECT_EQ(lean_plan["activation_memory"], "stored, relu^2 recomputed");
  EXPECT_LT(lean_plan["total_bytes"].get<double>(), 24e9 - 1.25e9);
  EXPECT_LT(lean_plan["total_bytes"].get<double>(), kept_plan["total_bytes"].get<double>());
  // Every activation kept, the fastest step: within 24 GB too, with that room (the logits
  // chunk in the block gradients' buffer, the skip and value-embedding gradients in dead h).
  EXPECT_LT(kept_plan["total_bytes"].get<double>(), 24e9 - 1.25e9);
  EXPECT_GT(lean_plan["total_bytes"].get<double>(), nlohmann::json::parse(target.out)["total_bytes"].get<double>());
  // --head-chunk-rows: the logits chunk is that many rows of the padded vocabulary.
  const RunResult tall = speedrun("memory --preset speedrun-124m --device cuda --head-chunk-rows 4096 --json", dir_);
  ASSERT_EQ(tall.exit_code, 0) << tall.err;
  const nlohmann::json tall_plan = nlohmann::json::parse(tall.out);
  EXPECT_EQ(tall_plan["head_chunk_rows"], 4096);
  EXPECT_EQ(tall_plan["logits_bytes"].get<double>(), 4096.0 * 50304 * 4);
  EXPECT_EQ(kept_plan["head_chunk_rows"], 2048);
  // The taller chunk outgrows the block gradients' buffer (49152 x 3072 floats) by the rest.
  EXPECT_EQ(tall_plan["total_bytes"].get<double>() - kept_plan["total_bytes"].get<double>(),
            (4096.0 * 50304 - 49152.0 * 3072) * 4);
  const RunResult both = speedrun("memory --preset micro --recompute-activations --recompute-relu2", dir_);
  EXPECT_EQ(both.exit_code, 2);
  EXPECT_TRUE(contains(both.err, "--recompute-relu2")) << both.err;
  const RunResult wrong = speedrun("memory --preset micro --activations fp16", dir_);
  EXPECT_EQ(wrong.exit_code, 2);
  EXPECT_TRUE(contains(wrong.err, "--activations")) << wrong.err;
  EXPECT_EQ(speedrun("memory --preset micro --device tpu", dir_).exit_code, 2);
  const RunResult odd = speedrun("memory --preset speedrun-124m --processes 3", dir_);
  EXPECT_EQ(odd.exit_code, 2);
  EXPECT_TRUE(contains(odd.err, "--processes 3 does not divide world_size 8")) << odd.err;

  const RunResult flash = speedrun("train --preset micro --steps 1 --attention-kernel flash --out-dir " +
                                       quote((dir_ / "flash").string()),
                                   dir_);
  EXPECT_EQ(flash.exit_code, 2) << flash.err;
  EXPECT_TRUE(contains(flash.err, "--attention-kernel flash")) << flash.err;
  EXPECT_FALSE(fs::exists(dir_ / "flash" / "metrics.jsonl"));

  const RunResult unknown = speedrun("train --preset micro --matmul tf32", dir_);
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_TRUE(contains(unknown.err, "--matmul")) << unknown.err;

  // The matmul sweep times cuBLASLt's algorithms: refused on the CPU before any step runs.
  const RunResult sweep = speedrun("bench --preset micro --steps 1 --sweep-matmuls 4", dir_);
  EXPECT_EQ(sweep.exit_code, 2);
  EXPECT_TRUE(contains(sweep.err, "--sweep-matmuls")) << sweep.err;
  EXPECT_TRUE(contains(sweep.err, "--device cuda")) << sweep.err;
  EXPECT_FALSE(contains(sweep.out, "step: ")) << sweep.out;
  const RunResult too_many = speedrun("bench --preset micro --device cuda --sweep-matmuls 65", dir_);
  EXPECT_EQ(too_many.exit_code, 2);
  EXPECT_TRUE(contains(too_many.err, "--sweep-matmuls")) << too_many.err;
  // The sweep's savings are against the heuristic's first, which tuning replaces: refused
  // together, on any device, before a step.
  for (const std::string device : {"cpu", "cuda"}) {
    const RunResult both =
        speedrun("bench --preset micro --steps 1 --device " + device + " --sweep-matmuls 4 --autotune-matmuls 4", dir_);
    EXPECT_EQ(both.exit_code, 2) << device;
    EXPECT_TRUE(contains(both.err, "use one or the other")) << both.err;
    EXPECT_FALSE(contains(both.out, "step: ")) << both.out;
  }
  // So does choosing them by timing, in train and bench alike.
  const std::string tuned_dir = quote((dir_ / "tuned").string());
  for (const std::string& command : {std::string("bench --preset micro --steps 1"),
                                     "train --preset micro --steps 1 --out-dir " + tuned_dir}) {
    const RunResult tuned = speedrun(command + " --autotune-matmuls 4", dir_);
    EXPECT_EQ(tuned.exit_code, 2) << command;
    EXPECT_TRUE(contains(tuned.err, "--autotune-matmuls")) << tuned.err;
    EXPECT_TRUE(contains(tuned.err, "--device cuda")) << tuned.err;
    EXPECT_FALSE(contains(tuned.out, "step")) << tuned.out;
    EXPECT_FALSE(fs::exists(dir_ / "tuned")) << command;
  }
  const RunResult too_many_tuned = speedrun("train --preset micro --device cuda --autotune-matmuls 65", dir_);
  EXPECT_EQ(too_many_tuned.exit_code, 2);
  EXPECT_TRUE(contains(too_many_tuned.err, "--autotune-matmuls")) << too_many_tuned.err;
}

// Where the CUDA backend is compiled in but no device can be used (this project's CI), a
// run on it fails at once, saying so, and writes nothing. Skipped where a GPU answers.
TEST_F(TrainCli, CudaWithoutAUsableDeviceSaysSoAndWritesNothing) {
  const RunResult device = speedrun("device", dir_);
  ASSERT_EQ(device.exit_code, 0) << device.err;
  if (!contains(device.out, "no usable CUDA device")) GTEST_SKIP() << "a CUDA device answers, or CUDA is not compiled in";
  const RunResult run = speedrun("train --preset micro --device cuda --steps 1 --out-dir " +
                                 quote((dir_ / "cuda").string()), dir_);
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_TRUE(contains(run.err, "no usable CUDA device")) << run.err;
  EXPECT_TRUE(contains(run.err, "speedrun device")) << run.err;
  EXPECT_FALSE(fs::exists(dir_ / "cuda"));
}

}  // namespace
