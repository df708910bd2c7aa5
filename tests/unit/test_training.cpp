// The training loop on the micro preset: bit-identical reruns, exact resume, and
// checkpoints with SPEC §2's state-dict names and shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "support/files.h"
#include "data/shard.h"
#include "data/token_stream.h"
#include "support/temp_dir.h"
#include "model/gpt.h"
#include "optim/optimizer.h"
#include "comm/communicator.h"
#include "train/checkpoint.h"
#include "train/data_parallel.h"
#include "train/safetensors.h"
#include "train/trainer.h"
#include "util/error.h"

namespace speedrun {
namespace {

using testing::rule_tokens;

void write_micro_shards(const testing::TempDir& dir) {
  write_shard(dir / "train_000000.bin", rule_tokens(6000, 1));
  write_shard(dir / "train_000001.bin", rule_tokens(6000, 2));
  write_shard(dir / "val_000000.bin", rule_tokens(600, 3));
}

TrainOptions micro_options(const testing::TempDir& data, const std::string& out_dir, int steps) {
  TrainOptions o;
  o.config = Config::preset("micro");
  o.train_glob = data / "train_*.bin";
  o.val_glob = data / "val_*.bin";
  o.steps = steps;
  o.out_dir = out_dir;
  o.quiet = true;
  return o;
}

std::string read_bytes(const std::string& path) { return speedrun::testing::read_file_bytes(path); }

TEST(Training, SameSeedGivesBitIdenticalLossesAndLossFalls) {
  testing::TempDir data("train_det");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  const TrainResult a = train(micro_options(data, data / "a", 20), *be);
  const TrainResult b = train(micro_options(data, data / "b", 20), *be);
  ASSERT_EQ(a.train_losses.size(), 20u);
  EXPECT_EQ(a.train_losses, b.train_losses);
  ASSERT_EQ(a.val_losses.size(), b.val_losses.size());
  for (size_t i = 0; i < a.val_losses.size(); ++i) EXPECT_EQ(a.val_losses[i], b.val_losses[i]);
  EXPECT_NEAR(a.train_losses[0], std::log(384.0), 1e-5);  // zero head: ln(padded vocab)
  EXPECT_LT(a.val_losses.back().second, a.val_losses.front().second - 0.5);  // 20 micro steps learn the bigram rule
  EXPECT_EQ(read_bytes(a.checkpoint_path), read_bytes(b.checkpoint_path));
}

// SPEC §4's order of a step s, replayed from the parts: validate with window(s) when
// s % val_every == 0, the step's gradients with window(s), the update with lr_mult(s) and
// momentum(s); after the last step, validate with window(num_iterations). micro's 20 steps
// cross every schedule's bend (the long window grows at steps 6, 11 and 16, the momentum
// warmup ends at 10, the cooldown starts after 12), so a step index off by one shows.
TEST(Training, StepsFollowTheSpecsOrderAndIndices) {
  testing::TempDir data("train_order");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  const TrainResult run = train(micro_options(data, data / "run", 20), *be);

  const Config c = Config::preset("micro");
  GPT model(c, *be, c.seq_len, c.val_seq_len);  // the seed's initialisation, as the run's
  Optimizer optimizer(c, model.layout(), *be);
  const auto comm = make_single_process_communicator();
  DataParallel dp(*comm, model);
  const std::vector<std::string> val_files = expand_glob(data / "val_*.bin");
  TokenStream stream(expand_glob(data / "train_*.bin"), c.world_size, c.seq_len, c.vocab_size);
  std::vector<double> train_losses;
  std::vector<std::pair<int, double>> val_losses;
  for (int s = 0; s < c.num_iterations; ++s) {
    if (s % c.val_every == 0) val_losses.emplace_back(s, evaluate(model, val_files, c, s));
    const TokenBatch batch = stream.next(0, c.world_size);
    train_losses.push_back(dp.compute_gradients(batch.inputs, batch.targets, long_window_blocks(c, s)));
    optimizer.step(model.params(), model.grads(), s);
  }
  val_losses.emplace_back(c.num_iterations, evaluate(model, val_files, c, c.num_iterations));

  EXPECT_EQ(run.train_losses, train_losses);
  EXPECT_EQ(run.val_losses, val_losses);
  // Validation at step s uses window(s): the forward passes of its windows, by hand.
  const int s = c.num_iterations;
  TokenStream val(val_files, c.world_size, c.val_seq_len, c.vocab_size);
  double sum = 0;
  const int windows = static_cast<int>(c.val_tokens / (c.world_size * c.val_seq_len));
  for (int w = 0; w < windows; ++w) {
    const TokenBatch batch = val.next(0, c.world_size);
    for (int r = 0; r < c.world_size; ++r) {
      const size_t at = static_cast<size_t>(r) * c.val_seq_len;
      sum += model.forward(std::span(batch.inputs).subspan(at, c.val_seq_len),
                           std::span(batch.targets).subspan(at, c.val_seq_len), long_window_blocks(c, s));
    }
  }
  EXPECT_NEAR(val_losses.back().second, sum / (windows * c.world_size), 1e-12);
  EXPECT_EQ(long_window_blocks(c, s), 4);  // 32 tokens of 8-token blocks at the last step
}

TEST(Training, ResumeIsBitIdenticalToAnUninterruptedRun) {
  testing::TempDir data("train_resume");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  const TrainResult whole = train(micro_options(data, data / "whole", 14), *be);
  const TrainResult first = train(micro_options(data, data / "half", 7), *be);
  TrainOptions resume = micro_options(data, data / "half", 14);
  resume.resume_path = first.checkpoint_path;
  const TrainResult second = train(resume, *be);
  ASSERT_EQ(second.first_step, 7);
  std::vector<double> joined = first.train_losses;
  joined.insert(joined.end(), second.train_losses.begin(), second.train_losses.end());
  EXPECT_EQ(joined, whole.train_losses);
  EXPECT_EQ(second.val_losses.back(), whole.val_losses.back());
  EXPECT_EQ(read_bytes(second.checkpoint_path), read_bytes(whole.checkpoint_path));
  EXPECT_EQ(read_bytes(optimizer_state_path(second.checkpoint_path)),
            read_bytes(optimizer_state_path(whole.checkpoint_path)));
}

// The train records of one step in a metrics file, in file order.
std::vector<nlohmann::json> train_records(const std::filesystem::path& metrics_path, int step) {
  std::vector<nlohmann::json> found;
  std::ifstream metrics(metrics_path);
  for (std::string line; std::getline(metrics, line);) {
    const nlohmann::json record = nlohmann::json::parse(line);
    if (record.contains("train_loss") && record["step"] == step) found.push_back(record);
  }
  return found;
}

// A run that died after training past its last checkpoint: resumed from it, its clocks
// continue from the last step before the checkpoint, not from the abandoned step the
// resumed run trains again (that step's time would count twice).
TEST(Training, ResumeAfterACrashDoesNotCountTheAbandonedStepsTime) {
  testing::TempDir data("train_resume_crash");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  TrainOptions first = micro_options(data, data / "run", 3);
  first.save_every = 2;
  first.keep = 5;
  train(first, *be);
  std::filesystem::remove(data / "run/step_000003.safetensors");  // died before saving step 3
  std::filesystem::remove(optimizer_state_path(data / "run/step_000003.safetensors"));
  TrainOptions resume = micro_options(data, data / "run", 3);
  resume.resume_path = data / "run/step_000002.safetensors";
  train(resume, *be);
  const std::vector<nlohmann::json> step_1 = train_records(data / "run/metrics.jsonl", 1);
  const std::vector<nlohmann::json> step_2 = train_records(data / "run/metrics.jsonl", 2);
  ASSERT_EQ(step_1.size(), 1u);
  ASSERT_EQ(step_2.size(), 2u);  // the abandoned timeline's and the resumed run's
  const nlohmann::json& resumed = step_2.back();
  EXPECT_NEAR(resumed["train_time_s"].get<double>() - resumed["step_seconds"].get<double>(),
              step_1[0]["train_time_s"].get<double>(), 1e-9);
}

// Resumed into a new directory: the clocks continue from the checkpoint's own run (its
// metrics beside the checkpoint), not from zero.
TEST(Training, ResumeIntoANewDirectoryContinuesTheClocks) {
  testing::TempDir data("train_resume_elsewhere");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  const TrainResult first = train(micro_options(data, data / "a", 2), *be);
  TrainOptions resume = micro_options(data, data / "b", 3);
  resume.resume_path = first.checkpoint_path;
  train(resume, *be);
  const std::vector<nlohmann::json> step_1 = train_records(data / "a/metrics.jsonl", 1);
  const std::vector<nlohmann::json> step_2 = train_records(data / "b/metrics.jsonl", 2);
  ASSERT_EQ(step_1.size(), 1u);
  ASSERT_EQ(step_2.size(), 1u);
  const nlohmann::json &before = step_1[0], &resumed = step_2[0];
  EXPECT_NEAR(resumed["train_time_s"].get<double>() - resumed["step_seconds"].get<double>(),
              before["train_time_s"].get<double>(), 1e-9);
  EXPECT_GT(resumed["elapsed_s"].get<double>(), before["elapsed_s"].get<double>());
}

TEST(Training, CheckpointHasStateDictNamesShapesAndConfig) {
  testing::TempDir data("train_ckpt");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  const TrainResult r = train(micro_options(data, data / "run", 2), *be);
  const SafetensorsFile file = SafetensorsFile::open(r.checkpoint_path);
  const ParamLayout layout(Config::preset("micro"));
  EXPECT_EQ(file.names().size(), layout.specs().size());
  for (const ParamSpec& spec : layout.specs()) {
    ASSERT_TRUE(file.contains(spec.name)) << spec.name;
    EXPECT_EQ(file.info(spec.name).dtype, "F32");
    EXPECT_EQ(file.info(spec.name).shape, spec.shape) << spec.name;
  }
  EXPECT_EQ(file.metadata().at("step"), "2");
  const nlohmann::json config = nlohmann::json::parse(file.metadata().at("config"));
  EXPECT_EQ(config, Config::preset("micro").to_json());
  EXPECT_TRUE(std::filesystem::exists(optimizer_state_path(r.checkpoint_path)));
}

TEST(Training, InitCheckpointStartsFromItsParameters) {
  testing::TempDir data("train_init");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  const TrainResult trained = train(micro_options(data, data / "a", 5), *be);
  TrainOptions from = micro_options(data, data / "b", 1);
  from.init_path = trained.checkpoint_path;
  const TrainResult r = train(from, *be);
  // Starting from trained parameters, step 0's validation is the trained run's last.
  EXPECT_EQ(r.val_losses.front().first, 0);
  EXPECT_NEAR(r.val_losses.front().second, trained.val_losses.back().second, 0.0);
}

TEST(Training, NonFiniteGradientStopsWithTheStepAndACheckpoint) {
  testing::TempDir data("train_nan");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  TrainOptions o = micro_options(data, data / "run", 6);
  o.config.lr_embed = 1e38;  // the first update overflows the embeddings
  o.config.lr_lm_head = 1e38;
  try {
    train(o, *be);
    FAIL() << "expected the run to stop";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("step 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("non-finite"), std::string::npos) << e.what();
    // The first update overflowed the parameters: the saved state is kept for inspection,
    // and the message says that it cannot be loaded (load_checkpoint refuses it).
    EXPECT_NE(std::string(e.what()).find("its parameters are already non-finite"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(std::filesystem::exists(data / "run/step_000001.safetensors"));
  GPT model(o.config, *be, o.config.seq_len, o.config.val_seq_len);
  EXPECT_THROW(load_model(data / "run/step_000001.safetensors", model), Error);
}

// A signal that arrives during a validation stops the run right after it, before another
// step trains (validation at 124M takes as long as many steps).
TEST(Training, ASignalDuringValidationStopsBeforeTheNextStep) {
  testing::TempDir data("train_signal_in_validation");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  TrainOptions o = micro_options(data, data / "run", 6);
  int polls = 0;
  o.stop_requested = [&polls] { return ++polls >= 2 ? 15 : 0; };  // the first poll after step 0's validation
  const TrainResult result = train(o, *be);
  EXPECT_EQ(result.stopped_by_signal, 15);
  EXPECT_EQ(result.last_step, 0);
  EXPECT_EQ(result.end_step, 6);  // --steps 6 of micro's 20: what "after 0 of 6 steps" says
  EXPECT_TRUE(result.train_losses.empty());
  EXPECT_EQ(result.val_losses.size(), 1u);
  EXPECT_TRUE(std::filesystem::exists(data / "run/step_000000.safetensors"));
}

// A token past the vocabulary in a train shard stops the run when the stream reaches it,
// with the state before that step saved; once the shard is mended, resuming that state
// gives the uninterrupted run's checkpoint, bit for bit.
TEST(Training, ABadTokenMidRunSavesTheStateBeforeItsStepAndResumesOnceMended) {
  testing::TempDir data("train_bad_token");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  const TrainResult whole = train(micro_options(data, data / "whole", 14), *be);
  std::vector<uint16_t> tokens = rule_tokens(6000, 1);
  const std::vector<uint16_t> good = tokens;
  tokens[650] = 350;  // micro's vocabulary has 300 tokens; about the sixth window of 129
  write_shard(data / "train_000000.bin", tokens);
  std::string message;
  try {
    train(micro_options(data, data / "run", 14), *be);
  } catch (const Error& e) {
    message = e.what();
  }
  EXPECT_NE(message.find("train_000000.bin': token id 350 at offset 650"), std::string::npos) << message;
  std::vector<std::string> saved;
  for (const auto& entry : std::filesystem::directory_iterator(data / "run")) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("step_", 0) == 0 && name.find(".optim.") == std::string::npos) saved.push_back(entry.path());
  }
  ASSERT_EQ(saved.size(), 1u) << message;
  EXPECT_NE(message.find("--resume " + saved[0]), std::string::npos) << message;
  int step = -1;
  ASSERT_EQ(std::sscanf(std::filesystem::path(saved[0]).filename().c_str(), "step_%d", &step), 1);
  EXPECT_GT(step, 2);  // the windows before the bad token trained
  EXPECT_LT(step, 8);
  write_shard(data / "train_000000.bin", good);
  TrainOptions resume = micro_options(data, data / "run", 14);
  resume.resume_path = saved[0];
  const TrainResult resumed = train(resume, *be);
  EXPECT_EQ(read_bytes(resumed.checkpoint_path), read_bytes(whole.checkpoint_path));
}

// The validation's tokens are checked against the vocabulary up front, every one that
// validation reads (micro: two windows of 128 tokens and a last target) and no further.
TEST(Training, ValidationTokensAreCheckedBeforeTheRunStarts) {
  testing::TempDir data("train_bad_val");
  const Config c = Config::preset("micro");
  for (const size_t at : {size_t{0}, size_t{256}, size_t{257}}) {
    std::vector<uint16_t> tokens = rule_tokens(600, 3);
    tokens[at] = 300;
    write_shard(data / "val_000000.bin", tokens);
    const std::vector<std::string> files = expand_glob(data / "val_*.bin");
    if (at <= 256) {
      EXPECT_THROW(
          {
            try {
              require_validation_data(files, c);
            } catch (const Error& e) {
              EXPECT_NE(std::string(e.what()).find("token id 300 at offset " + std::to_string(at)), std::string::npos)
                  << e.what();
              throw;
            }
          },
          Error);
    } else {
      EXPECT_NO_THROW(require_validation_data(files, c));  // past what validation reads
    }
  }
}

// A new run that fails before training a step or saving a checkpoint takes its config and
// metrics away again (they would make the directory refuse the corrected run); one that
// trained keeps them.
TEST(Training, ANewRunThatFailsBeforeItsFirstStepLeavesNothing) {
  testing::TempDir data("train_early_failure");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  for (const bool dir_existed : {false, true}) {
    const std::filesystem::path out = data / (dir_existed ? "existing" : "created");
    if (dir_existed) std::filesystem::create_directory(out);
    TrainOptions o = micro_options(data, out, 6);
    o.stop_requested = []() -> int { throw Error("injected failure"); };  // polled before step 0
    EXPECT_THROW(train(o, *be), Error);
    EXPECT_EQ(std::filesystem::exists(out), dir_existed);
    if (dir_existed) EXPECT_TRUE(std::filesystem::is_empty(out));
  }
  TrainOptions later = micro_options(data, data / "trained", 6);
  int polls = 0;
  later.stop_requested = [&polls]() -> int {
    if (++polls > 2) throw Error("injected failure");
    return 0;
  };
  EXPECT_THROW(train(later, *be), Error);
  EXPECT_TRUE(std::filesystem::exists(data / "trained/config.json"));
  EXPECT_EQ(train_records(data / "trained/metrics.jsonl", 0).size(), 1u);  // step 0 trained
}

// Step 0's update overflows the parameters (lr 1e38: inf in float32), so step 1's loss is
// NaN. Skipping passes over a bad batch but cannot mend the parameters: the skip policy
// stops there, with the state before step 1 saved (for inspection), instead of skipping
// every step left and failing at the final validation.
TEST(Training, NonFiniteSkipStopsWhereTheParametersAreAlreadyNonFinite) {
  testing::TempDir data("train_nan_skip");
  write_micro_shards(data);
  auto be = make_cpu_backend();
  TrainOptions o = micro_options(data, data / "run", 4);
  o.config.lr_embed = 1e38;
  o.config.lr_lm_head = 1e38;
  o.faults.non_finite = NonFinitePolicy::kSkip;
  o.faults.max_consecutive_skips = 0;
  try {
    train(o, *be);
    ADD_FAILURE() << "a model that gives NaN trained on";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("step 1: training loss"), std::string::npos) << message;
    EXPECT_NE(message.find("skipping its update cannot help"), std::string::npos) << message;
    EXPECT_NE(message.find(checkpoint_name(o.out_dir, 1)), std::string::npos) << message;
  }
  EXPECT_TRUE(std::filesystem::exists(checkpoint_name(o.out_dir, 1)));
  std::vector<int> faulted;
  std::istringstream metrics(read_bytes(o.out_dir + "/metrics.jsonl"));
  for (std::string line; std::getline(metrics, line);) {
    const nlohmann::json record = nlohmann::json::parse(line);
    if (record.contains("fault")) faulted.push_back(record["step"].get<int>());
  }
  EXPECT_EQ(faulted, (std::vector<int>{1}));
}

// micro on one rank with a sequence of its rule tokens, for steps run one at a time
// through run_training_step (the fault monitor and the device's flag included).
struct OneRankMicro {
  static Config one_rank() {
    Config c = Config::preset("micro");
    c.world_size = 1;
    return c;
  }
  Config config = one_rank();
  std::unique_ptr<Backend> be = make_cpu_backend();
  GPT model{config, *be, config.seq_len, config.val_seq_len};
  Optimizer optimizer{config, model.layout(), *be};
  std::unique_ptr<Communicator> comm = make_single_process_communicator();
  DataParallel dp{*comm, model};
  DeviceFaultFlag flag{*be};
  std::vector<int32_t> tokens = [this] {
    const std::vector<uint16_t> rule = rule_tokens(config.seq_len + 1, 7);
    return std::vector<int32_t>(rule.begin(), rule.end());
  }();

  StepVerdict step(int s, FaultMonitor& monitor) {
    const std::span<const int32_t> all(tokens);
    StepVerdict verdict;
    run_training_step(dp, optimizer, all.first(config.seq_len), all.subspan(1), s, &monitor, &verdict, &flag);
    return verdict;
  }
  void set_head_weight(float value) {
    std::vector<float> params = model.parameters_to_host();
    params[model.layout().at("lm_head.weight").offset] = value;
    model.load_parameters(params);
  }
  // The parameters' and the optimiser state's bytes (NaN compares as bytes).
  std::string state_bytes() {
    std::string bytes;
    for (const Optimizer::NamedState& s : optimizer.state()) {
      std::vector<float> host(s.spec->count);
      be->download(host.data(), s.data, host.size());
      bytes.append(reinterpret_cast<const char*>(host.data()), host.size() * sizeof(float));
    }
    const std::vector<float> now = model.parameters_to_host();
    return bytes.append(reinterpret_cast<const char*>(now.data()), now.size() * sizeof(float));
  }
};

// A step the device's fault flag skips (its gradient not finite) changes neither the
// parameters nor the optimiser's state: the update is queued, and drops itself.
TEST(Training, ASkippedNonFiniteStepChangesNeitherParametersNorOptimizerState) {
  OneRankMicro m;
  FaultMonitorOptions options;
  options.non_finite = NonFinitePolicy::kSkip;
  FaultMonitor monitor(options);
  // A first, applied step gives the optimiser a state that is not all zeros.
  const StepVerdict applied = m.step(0, monitor);
  ASSERT_EQ(applied.action, StepAction::kApply) << applied.message;
  m.set_head_weight(std::numeric_limits<float>::quiet_NaN());
  const std::string before = m.state_bytes();
  const StepVerdict verdict = m.step(1, monitor);
  EXPECT_EQ(verdict.action, StepAction::kSkip) << verdict.message;
  EXPECT_TRUE(m.state_bytes() == before) << "a skipped update changed the parameters or the optimiser's state";
}

// One run_training_step of the micro model after the monitor has seen two losses near 1:
// the real loss (~ln 300) is a huge spike.
struct SpikeStep {
  std::vector<float> before, after;
  StepVerdict verdict;
};
SpikeStep step_after_low_losses(SpikePolicy policy) {
  OneRankMicro m;
  FaultMonitorOptions options;
  options.spike = policy;
  options.spike_window = 2;
  FaultMonitor monitor(options);
  monitor.check_step(0, 1.0);
  monitor.check_step(1, 1.1);
  SpikeStep result;
  result.before = m.model.parameters_to_host();
  result.verdict = m.step(2, monitor);
  result.after = m.model.parameters_to_host();
  return result;
}

TEST(Training, SpikeSkipIsDecidedBeforeTheUpdateAndLeavesParametersUnchanged) {
  const SpikeStep skip = step_after_low_losses(SpikePolicy::kSkip);
  EXPECT_EQ(skip.verdict.action, StepAction::kSkip) << skip.verdict.message;
  EXPECT_EQ(skip.after, skip.before);
  const SpikeStep warn = step_after_low_losses(SpikePolicy::kWarn);
  EXPECT_EQ(warn.verdict.action, StepAction::kApply);
  EXPECT_NE(warn.verdict.message.find("loss spike"), std::string::npos) << warn.verdict.message;
  EXPECT_NE(warn.after, warn.before);
}

}  // namespace
}  // namespace speedrun
