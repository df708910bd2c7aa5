// Library-level error paths (issue #7): corrupt data, bad configs, malformed checkpoints
// and a full disk each end in a speedrun::Error that names the problem, leave the model
// untouched and nothing half-written; plus the inputs the fuzzers found (fuzz/regressions/).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "support/files.h"
#include "backends/backend.h"
#include "data/document_reader.h"
#include "data/shard.h"
#include "data/token_stream.h"
#include "model/config.h"
#include "model/gpt.h"
#include "optim/optimizer.h"
#include "support/temp_dir.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/safetensors.h"
#include "util/atomic_file.h"
#include "util/error.h"

namespace speedrun {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

std::string read_bytes(const std::string& path) { return speedrun::testing::read_file_bytes(path); }

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Runs `action`, which must throw a speedrun::Error with `code` whose message holds every part.
void expect_error(const std::function<void()>& action, ExitCode code, std::initializer_list<std::string> parts) {
  try {
    action();
    ADD_FAILURE() << "no error (expected one naming " << *parts.begin() << ")";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(e.code(), code) << message;
    for (const std::string& part : parts) EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
  }
}

std::vector<std::string> files_in(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

bool has_temporary(const std::string& dir) {
  for (const std::string& name : files_in(dir)) {
    if (name.find(".tmp.") != std::string::npos) return true;
  }
  return false;
}

std::vector<uint16_t> ramp(size_t n, uint16_t modulo = 300) {
  std::vector<uint16_t> tokens(n);
  for (size_t i = 0; i < n; ++i) tokens[i] = static_cast<uint16_t>(i % modulo);
  return tokens;
}

// --- data --------------------------------------------------------------------------------

TEST(DataErrors, TruncatedShardInTheStreamNamesTheFile) {
  TempDir dir("err_truncated");
  const std::string path = dir / "train_000000.bin";
  write_shard(path, ramp(500));
  fs::resize_file(path, fs::file_size(path) - 3);
  TokenStream stream({path}, 2, 64, 300);
  expect_error([&] { stream.next(0, 2); }, ExitCode::kRuntime, {path, "truncated or corrupt", "N=500"});
}

TEST(DataErrors, TokenIdAtVocabSizeNamesTheIdOffsetAndFile) {
  TempDir dir("err_vocab");
  const std::string path = dir / "train_000000.bin";
  std::vector<uint16_t> tokens = ramp(400, 200);
  tokens[37] = 300;
  write_shard(path, tokens);
  TokenStream stream({path}, 2, 64, 300);
  expect_error([&] { stream.next(0, 2); }, ExitCode::kRuntime,
               {path, "token id 300 at offset 37", "vocab_size 300"});
}

TEST(DataErrors, EmptyGlobNamesThePattern) {
  TempDir dir("err_glob");
  const std::string pattern = dir / "train_*.bin";
  expect_error([&] { expand_glob(pattern); }, ExitCode::kRuntime, {"no file matches", pattern});
}

TEST(DataErrors, TooLittleDataForTheStepsIsAnErrorNotAWrap) {
  TempDir dir("err_short");
  write_shard(dir / "train_000000.bin", ramp(300));
  TokenStream stream({dir / "train_000000.bin"}, 2, 64, 300);
  // Windows of 128 (+1): pos 0 and 128 fit in 300 tokens, pos 256 does not.
  stream.next(0, 2);
  stream.next(0, 2);
  expect_error([&] { stream.next(0, 2); }, ExitCode::kRuntime, {"out of training data", "300 tokens", "2 windows"});
}

// What the run checks before its first step: windows_left() counts exactly the windows
// next() still serves, from the start and from any position reached.
TEST(DataErrors, WindowsLeftCountsWhatTheStreamStillServes) {
  TempDir dir("err_windows_left");
  write_shard(dir / "train_000000.bin", ramp(300));  // pos 0 and 128 fit (+1); 256 does not
  write_shard(dir / "train_000001.bin", ramp(129));  // 129 tokens: not even one window (needs 130)
  write_shard(dir / "train_000002.bin", ramp(400));  // pos 0, 128, 256
  TokenStream stream({dir / "train_000000.bin", dir / "train_000001.bin", dir / "train_000002.bin"}, 2, 64, 300);
  for (size_t left = 5; left > 0; --left) {
    EXPECT_EQ(stream.windows_left(), left);
    stream.next(0, 2);
  }
  EXPECT_EQ(stream.windows_left(), 0u);
  EXPECT_THROW(stream.next(0, 2), Error);
}

TEST(DataErrors, OutOfValidationDataSaysValidationAndItsFix) {
  TempDir dir("err_out_of_val");
  write_shard(dir / "val_000000.bin", ramp(200));
  TokenStream stream({dir / "val_000000.bin"}, 2, 64, 300, TokenStream::Purpose::kValidation);
  stream.next(0, 2);
  expect_error([&] { stream.next(0, 2); }, ExitCode::kRuntime, {"out of validation data", "lower val_tokens"});
}

// A metrics line that does not fit (a full disk) is cut back off: the file keeps whole
// lines only, which resume and plot read.
TEST(WriteErrors, AMetricsLineThatDoesNotFitIsCutBackOff) {
  TempDir dir("err_metrics_full");
  const std::string path = dir / "metrics.jsonl";
  {
    MetricsWriter metrics(path);
    metrics.write({{"step", 0}, {"train_loss", 5.5}});
    set_write_budget_for_testing(10);
    expect_error([&] { metrics.write({{"step", 1}, {"train_loss", 5.25}}); }, ExitCode::kRuntime,
                 {path, std::strerror(ENOSPC)});
    set_write_budget_for_testing(-1);
    metrics.write({{"step", 1}, {"train_loss", 5.25}});
  }
  EXPECT_EQ(read_bytes(path), "{\"step\":0,\"train_loss\":5.5}\n{\"step\":1,\"train_loss\":5.25}\n");
}

// A file cut off mid-line (the machine went down mid-write) is mended before anything is
// appended: the incomplete line goes, and the next record starts a line of its own.
TEST(WriteErrors, AMetricsFileCutOffMidLineLosesTheIncompleteLineBeforeAppending) {
  TempDir dir("err_metrics_cut");
  const std::string path = dir / "metrics.jsonl";
  write_bytes(path, "{\"step\":0,\"train_loss\":5.5}\n{\"step\":1,\"tra");
  {
    MetricsWriter metrics(path);
    EXPECT_EQ(metrics.removed_incomplete_bytes(), 14u);
    metrics.write({{"step", 1}, {"train_loss", 5.25}});
  }
  EXPECT_EQ(read_bytes(path), "{\"step\":0,\"train_loss\":5.5}\n{\"step\":1,\"train_loss\":5.25}\n");
  EXPECT_EQ(MetricsWriter(path).removed_incomplete_bytes(), 0u);
  EXPECT_EQ(read_bytes(path), "{\"step\":0,\"train_loss\":5.5}\n{\"step\":1,\"train_loss\":5.25}\n");
  // Longer than the blocks the end is searched in, and a file of nothing but the cut line.
  write_bytes(path, "{}\n" + std::string(9000, 'x'));
  EXPECT_EQ(MetricsWriter(path).removed_incomplete_bytes(), 9000u);
  EXPECT_EQ(read_bytes(path), "{}\n");
  write_bytes(path, std::string(5000, 'x'));
  EXPECT_EQ(MetricsWriter(path).removed_incomplete_bytes(), 5000u);
  EXPECT_EQ(read_bytes(path), "");
}

TEST(DataErrors, ValTokensNotDivisibleNamesTheThreeValues) {
  expect_error([] { validation_windows(1000, 2, 64); }, ExitCode::kUsage, {"val_tokens 1000", "128"});
  Config config = Config::preset("micro");
  config.val_tokens = 1000;
  expect_error([&] { config.validate(); }, ExitCode::kUsage, {"val_tokens (1000)", "2 * 64 = 128"});
}

// --- configs -------------------------------------------------------------------------------

struct BadValue {
  std::string key;
  std::string value;       // JSON text
  std::string named;       // what the message must hold besides the key
};

const std::vector<BadValue>& bad_values() {
  static const std::vector<BadValue> cases = {
      {"seq_len", "60", "multiple of attn_block_size (8), got 60"},
      {"num_layers", "3", "even and >= 2, got 3"},
      {"num_layers", "0", "even and >= 2, got 0"},
      {"num_iterations", "-5", "got -5"},
      {"val_every", "0", "got 0"},
      {"seq_len", "\"long\"", "must be an integer, got \"long\""},
      {"seq_len", "4294967296", "out of range"},
      {"lr_muon", "[1]", "must be a number"},
      {"no_such_key", "1", "unknown config key 'no_such_key'"},
      {"rotary_base", "0", "must be > 1"},
      {"rotary_base", "1", "must be > 1"},
      {"rotary_base", "1e300", "got 1e+300"},  // infinite in float32
      {"logit_softcap", "1e-50", "normal float32"},  // 0 in float32: every loss NaN
      {"logit_softcap", "0", "must be > 0"},
      {"attn_scale", "-0.12", "must be > 0"},
      {"attn_scale", "1e39", "got 1e+39"},
      {"attn_scale", "1e38", "the largest attention logit"},  // times micro's head_dim 8: infinite
      {"lr_muon", "-1", "must be >= 0"},
      {"adam_eps", "-1e-10", "must be > 0"},
      {"muon_momentum_end", "1", "must be in [0, 1)"},
      {"seed", "18446744073709551615", "out of range: 18446744073709551615"},  // not wrapped to -1
  };
  return cases;
}

TEST(ConfigErrors, BadValuesViaSetNameKeyAndValue) {
  for (const BadValue& bad : bad_values()) {
    SCOPED_TRACE(bad.key + "=" + bad.value);
    expect_error(
        [&] {
          Config config = Config::preset("micro");
          config.set_from_string(bad.key + "=" + bad.value);
          config.validate();
        },
        ExitCode::kUsage, {bad.key, bad.named});
  }
}

// rmsnorm's eps may be 0 unless a zero-initialised table or matrix gives it rows of zeros
// (0 / 0: every loss NaN from step 0).
TEST(ConfigErrors, RmsnormEpsZeroOnlyWithoutZeroInitialisation) {
  for (const char* zeroed : {"embed_init_std", "matrix_init_scale"}) {
    Config config = Config::preset("micro");
    config.set_from_string("rmsnorm_eps=0");
    EXPECT_NO_THROW(config.validate());
    config.set_from_string(std::string(zeroed) + "=0");
    expect_error([&] { config.validate(); }, ExitCode::kUsage, {"rmsnorm_eps must be > 0 when", zeroed});
    config.set_from_string("rmsnorm_eps=1e-7");
    EXPECT_NO_THROW(config.validate());
  }
}

TEST(ConfigErrors, BadValuesViaConfigFileNameKeyAndValue) {
  TempDir dir("err_config_file");
  for (const BadValue& bad : bad_values()) {
    SCOPED_TRACE(bad.key + "=" + bad.value);
    const std::string path = dir / "config.json";
    write_bytes(path, "{\"preset\": \"micro\", \"" + bad.key + "\": " + bad.value + "}");
    expect_error([&] { Config::from_file(path).validate(); }, ExitCode::kUsage, {bad.key, bad.named});
  }
}

TEST(ConfigErrors, MalformedOrMissingConfigFileNamesTheFile) {
  TempDir dir("err_config_malformed");
  const std::string path = dir / "config.json";
  write_bytes(path, "{\"preset\": \"micro\", \"seq_len\": ");
  expect_error([&] { Config::from_file(path); }, ExitCode::kUsage, {path, "not valid JSON"});
  write_bytes(path, "{\"preset\": \"micro\",\n \"seq_len\": 6x}");  // where: line 2, column 14
  expect_error([&] { Config::from_file(path); }, ExitCode::kUsage,
               {path, "not valid JSON: parse error at line 2, column 14"});
  write_bytes(path, "{\"preset\": \"micro\", \"seq_len\": 64, \"seq_len\": 128}");
  expect_error([&] { Config::from_file(path); }, ExitCode::kUsage, {path, "gives key 'seq_len' twice"});
  write_bytes(path, "[1, 2]");
  expect_error([&] { Config::from_file(path); }, ExitCode::kUsage, {path, "JSON object"});
  write_bytes(path, "{\"preset\": \"huge\"}");
  expect_error([&] { Config::from_file(path); }, ExitCode::kUsage, {"unknown preset 'huge'"});
  expect_error([&] { Config::from_file(dir / "missing.json"); }, ExitCode::kUsage, {dir / "missing.json"});
}

// --- checkpoints ---------------------------------------------------------------------------

// A micro model saved as dir/good.safetensors (+ its optimiser state), and helpers that
// write altered copies of it.
class CheckpointErrors : public ::testing::Test {
 protected:
  CheckpointErrors()
      : dir_("err_checkpoint"),
        config_(Config::preset("micro")),
        backend_(make_cpu_backend()),
        model_(config_, *backend_, config_.seq_len, config_.val_seq_len),
        optimizer_(config_, model_.layout(), *backend_) {}

  void SetUp() override {
    good_ = dir_ / "good.safetensors";
    save_checkpoint(good_, model_, optimizer_, TrainingState{3, {0, 128}});
    // A second model with other parameters: failed loads must leave it exactly as is.
    Config other = config_;
    other.seed = 99;
    target_ = std::make_unique<GPT>(other, *backend_, other.seq_len, other.val_seq_len);
    target_params_ = target_->parameters_to_host();
  }

  // Rewrites the good checkpoint's tensors through `edit` into a new file.
  std::string rewritten(const std::string& name,
                        const std::function<void(std::vector<TensorView>&, std::map<std::string, std::string>&)>& edit) {
    const SafetensorsFile file = SafetensorsFile::open(good_);
    std::vector<TensorView> tensors;
    for (const std::string& tensor : file.names()) {
      tensors.push_back({tensor, file.info(tensor).dtype, file.info(tensor).shape, file.bytes(tensor)});
    }
    std::map<std::string, std::string> metadata = file.metadata();
    edit(tensors, metadata);
    const std::string path = dir_ / name;
    write_safetensors(path, tensors, metadata);
    return path;
  }

  std::string with_bytes(const std::string& name, const std::string& bytes) {
    const std::string path = dir_ / name;
    write_bytes(path, bytes);
    return path;
  }

  void expect_load_fails(const std::string& path, std::initializer_list<std::string> parts,
                         ExitCode code = ExitCode::kRuntime) {
    expect_error([&] { load_model(path, *target_); }, code, parts);
    EXPECT_EQ(target_->parameters_to_host(), target_params_) << "a failed load changed the model";
  }

  TempDir dir_;
  Config config_;
  std::unique_ptr<Backend> backend_;
  GPT model_;
  Optimizer optimizer_;
  std::string good_;
  std::unique_ptr<GPT> target_;
  std::vector<float> target_params_;
};

TEST_F(CheckpointErrors, GoodCheckpointLoads) {
  EXPECT_EQ(load_model(good_, *target_), 3);
  EXPECT_EQ(target_->parameters_to_host(), model_.parameters_to_host());
}

TEST_F(CheckpointErrors, TruncatedFileNamesTheFile) {
  const std::string bytes = read_bytes(good_);
  expect_load_fails(with_bytes("cut.safetensors", bytes.substr(0, bytes.size() - 100)), {"cut.safetensors", "data"});
  expect_load_fails(with_bytes("cut_header.safetensors", bytes.substr(0, 40)), {"cut_header.safetensors", "header length"});
  expect_load_fails(with_bytes("tiny.safetensors", bytes.substr(0, 5)), {"tiny.safetensors", "too short"});
  expect_load_fails(with_bytes("empty.safetensors", ""), {"empty.safetensors", "too short"});
}

TEST_F(CheckpointErrors, BadHeaderJsonNamesTheFile) {
  std::string bytes = read_bytes(good_);
  bytes[8] = 'x';  // the header's opening brace
  expect_load_fails(with_bytes("bad_json.safetensors", bytes), {"bad_json.safetensors", "header is not valid JSON"});
}

TEST_F(CheckpointErrors, AbsurdHeaderLengthIsRejectedBeforeReading) {
  std::string bytes = read_bytes(good_);
  const uint64_t absurd = 1ull << 60;
  std::memcpy(bytes.data(), &absurd, 8);
  expect_load_fails(with_bytes("absurd.safetensors", bytes), {"absurd.safetensors", "header length 1152921504606846976"});
}

TEST_F(CheckpointErrors, WrongShapeNamesTheTensorAndBothShapes) {
  const std::string path = rewritten("shape.safetensors", [](auto& tensors, auto&) {
    for (TensorView& t : tensors) {
      if (t.name == "embed.weight") t.shape = {16, 300};
    }
  });
  expect_load_fails(path, {"shape.safetensors", "'embed.weight'", "F32 [16, 300], expected F32 [300, 16]"});
}

TEST_F(CheckpointErrors, MissingTensorIsNamed) {
  const std::string path = rewritten("missing.safetensors", [](auto& tensors, auto&) {
    std::erase_if(tensors, [](const TensorView& t) { return t.name == "skip_weights"; });
  });
  expect_load_fails(path, {"missing.safetensors", "missing tensor 'skip_weights'"});
}

TEST_F(CheckpointErrors, WrongDtypeNamesTheTensor) {
  const std::string path = rewritten("dtype.safetensors", [](auto& tensors, auto&) {
    for (TensorView& t : tensors) {
      if (t.name == "skip_weights") t.dtype = "I32";
    }
  });
  expect_load_fails(path, {"dtype.safetensors", "'skip_weights' is I32 [2], expected F32 [2]"});
}

TEST_F(CheckpointErrors, NonFiniteParameterIsNamed) {
  std::vector<float> poisoned(2, std::numeric_limits<float>::quiet_NaN());
  const std::string path = rewritten("nan.safetensors", [&](auto& tensors, auto&) {
    for (TensorView& t : tensors) {
      if (t.name == "skip_weights") t.bytes = std::as_bytes(std::span<const float>(poisoned));
    }
  });
  expect_load_fails(path, {"nan.safetensors", "'skip_weights' holds a non-finite value at index 0"});
}

TEST_F(CheckpointErrors, MissingOrBadConfigMetadataIsNamed) {
  const std::string none = rewritten("no_meta.safetensors", [](auto&, auto& metadata) { metadata.clear(); });
  expect_load_fails(none, {"no_meta.safetensors", "not a speedrun checkpoint"});
  const std::string bad = rewritten("bad_meta.safetensors", [](auto&, auto& metadata) { metadata["config"] = "{"; });
  expect_load_fails(bad, {"bad_meta.safetensors", "'config' metadata is not valid JSON"});
  const std::string step = rewritten("bad_step.safetensors", [](auto&, auto& metadata) { metadata["step"] = "-4"; });
  expect_load_fails(step, {"bad_step.safetensors", "'step' is not a non-negative integer: '-4'"});
  const std::string other =
      rewritten("other.safetensors", [](auto&, auto& metadata) { metadata["format"] = "other-9"; });
  expect_load_fails(other, {"other.safetensors", "'format' metadata is 'other-9', expected 'speedrun-checkpoint-1'"});
  const std::string no_format =
      rewritten("no_format.safetensors", [](auto&, auto& metadata) { metadata.erase("format"); });
  expect_load_fails(no_format, {"no_format.safetensors", "'format' metadata is missing"});
  const std::string past = rewritten("past.safetensors", [&](auto&, auto& metadata) {
    metadata["step"] = std::to_string(config_.num_iterations + 1);
  });
  expect_load_fails(past, {"past.safetensors", "step " + std::to_string(config_.num_iterations + 1) +
                                                   " is past its config's num_iterations"});
}

// The record of the run's numerics round-trips, is absent from a checkpoint without it, and
// a malformed one is refused naming the file and the field (resume would pass it to a flag).
TEST_F(CheckpointErrors, RunNumericsRoundTripAndAMalformedRecordIsNamed) {
  EXPECT_FALSE(read_checkpoint_numerics(good_).recorded());
  const RunNumerics recorded{"cpu", "bf16", "reference", "bf16", "overlap", 7};
  const std::string with = dir_ / "with.safetensors";
  save_checkpoint(with, model_, optimizer_, TrainingState{3, {}}, recorded);
  EXPECT_EQ(read_checkpoint_numerics(with), recorded);
  EXPECT_EQ(read_checkpoint_numerics(optimizer_state_path(with)), recorded);
  struct Case {
    std::string record, what;
  };
  for (const Case& c : {Case{"[1]", "is not a JSON object"}, Case{R"({"device": "cpu"})", "has no text 'matmul'"},
                        Case{R"({"device": "tpu", "matmul": "bf16"})", "has an unknown device 'tpu'"},
                        Case{R"({"device": "cpu", "matmul": "fp16", "attention": "reference"})",
                             "has an unknown matmul 'fp16'"},
                        Case{R"({"device": "cpu", "matmul": "bf16", "attention": "reference", "activations": "bf16",
                                 "grad_reduce": "exact", "head_chunk_rows": 0})",
                             "has no positive whole 'head_chunk_rows'"}}) {
    const std::string bad = rewritten("bad_numerics.safetensors", [&](auto&, auto& metadata) {
      metadata["numerics"] = c.record;
    });
    expect_error([&] { read_checkpoint_numerics(bad); }, ExitCode::kRuntime,
                 {"bad_numerics.safetensors", "the 'numerics' metadata " + c.what});
  }
}

// resume, eval and sample read a checkpoint's config and numerics before loading it: from its
// header alone, here of a file whose data section (a hole in a sparse file) exceeds memory.
TEST_F(CheckpointErrors, ConfigAndNumericsAreReadFromTheHeaderAlone) {
  const RunNumerics recorded{"cpu", "bf16", "reference", "bf16", "overlap", 7};
  const std::string with = dir_ / "with.safetensors";
  save_checkpoint(with, model_, optimizer_, TrainingState{3, {}}, recorded);
  const nlohmann::json metadata = SafetensorsHeader::read(with).metadata();
  const std::string huge = dir_ / "huge.safetensors";
  const uint64_t size = testing::more_than_memory_bytes();
  if (!testing::write_sparse_safetensors(huge, size, metadata.dump())) {
    GTEST_SKIP() << "this file system cannot hold a sparse file of " << size << " bytes";
  }
  EXPECT_EQ(read_checkpoint_config(huge).to_json(), config_.to_json());
  EXPECT_EQ(read_checkpoint_numerics(huge), recorded);
  expect_load_fails(huge, {"huge.safetensors", "larger than this machine's memory"});
  fs::remove(huge);
}

TEST_F(CheckpointErrors, ConfigThatDoesNotMatchIsAUsageErrorNamingTheKey) {
  Config bigger = config_;
  bigger.vocab_size = 400;
  GPT other(bigger, *backend_, bigger.seq_len, bigger.val_seq_len);
  const std::vector<float> before = other.parameters_to_host();
  expect_error([&] { load_model(good_, other); }, ExitCode::kUsage,
               {"good.safetensors", "vocab_size = 300 but the config asks for 400"});
  EXPECT_EQ(other.parameters_to_host(), before);
}

TEST_F(CheckpointErrors, ResumeNeedsTheMatchingOptimizerState) {
  Optimizer optimizer(config_, target_->layout(), *backend_);
  const std::string copy = dir_ / "copy.safetensors";
  fs::copy_file(good_, copy);
  expect_error([&] { load_checkpoint(copy, *target_, optimizer); }, ExitCode::kRuntime,
               {"copy.safetensors", "optimiser state", "copy.optim.safetensors' is missing"});
  // A state file from another step (the step is checked before any tensor is read).
  fs::copy_file(rewritten("step7.safetensors", [](auto&, auto& metadata) { metadata["step"] = "7"; }),
                dir_ / "copy.optim.safetensors", fs::copy_options::overwrite_existing);
  expect_error([&] { load_checkpoint(copy, *target_, optimizer); }, ExitCode::kRuntime, {"different steps"});
}

TEST_F(CheckpointErrors, FullDiskLeavesEarlierCheckpointsAndNoTemporaries) {
  struct BudgetReset {
    ~BudgetReset() { set_write_budget_for_testing(-1); }
  } reset;
  const std::string good_bytes = read_bytes(good_);
  const std::string good_state = read_bytes(optimizer_state_path(good_));
  const std::vector<std::string> before = files_in(dir_.str());
  const std::string next = dir_ / "step_000004.safetensors";

  // The disk fills while the optimiser state (written first) is written.
  set_write_budget_for_testing(1000);
  expect_error([&] { save_checkpoint(next, model_, optimizer_, TrainingState{4, {0, 256}}); }, ExitCode::kRuntime,
               {"step_000004.optim.safetensors", "No space left on device"});
  EXPECT_FALSE(has_temporary(dir_.str()));
  EXPECT_EQ(files_in(dir_.str()), before);

  // The disk fills while the model is written: the state file is complete, the model absent.
  set_write_budget_for_testing(static_cast<long long>(good_state.size()) + 1000);
  expect_error([&] { save_checkpoint(next, model_, optimizer_, TrainingState{4, {0, 256}}); }, ExitCode::kRuntime,
               {"step_000004.safetensors", "No space left on device"});
  EXPECT_FALSE(has_temporary(dir_.str()));
  EXPECT_FALSE(fs::exists(next)) << "a model file without its finished write";
  EXPECT_NO_THROW(SafetensorsFile::open(optimizer_state_path(next)));

  EXPECT_EQ(read_bytes(good_), good_bytes);
  EXPECT_EQ(read_bytes(optimizer_state_path(good_)), good_state);
}

// --- regressions from the fuzzers (fuzz/regressions/<target>/) ---------------------------

std::string regression_input(const std::string& target, const std::string& name) {
  return read_bytes(std::string(SPEEDRUN_SOURCE_DIR) + "/fuzz/regressions/" + target + "/" + name);
}

// fuzz/regressions/config/set_invalid_utf8_value: `--set num_layers=\xe0` escaped as
// nlohmann's type_error 316 (the error message dumped the invalid UTF-8 value), which
// the CLI reports as "internal error".
TEST(FuzzRegressions, SetWithInvalidUtf8ValueIsAUsageError) {
  const std::string assignment = regression_input("config", "set_invalid_utf8_value");
  ASSERT_EQ(assignment, "num_layers=\xe0");
  expect_error([&] { Config::preset("micro").set_from_string(assignment); }, ExitCode::kUsage,
               {"num_layers", "must be an integer"});
}

// Sizes whose products overflow int in validate() or the derived sizes (UB; UBSan
// aborts under scripts/sanitize.sh): each must be a UsageError naming the key.
TEST(FuzzRegressions, HugeSizesAreUsageErrorsWithoutOverflow) {
  const std::pair<const char*, const char*> cases[] = {
      {"heads_times_head_dim_overflow.json", "num_heads"},
      {"num_value_embeds_overflow.json", "num_value_embeds"},
      {"vocab_pad_multiple_overflow.json", "vocab_pad_multiple"},
      {"mlp_ratio_overflow.json", "mlp_ratio"},
  };
  for (const auto& [file, key] : cases) {
    SCOPED_TRACE(file);
    const nlohmann::json object = nlohmann::json::parse(regression_input("config", file));
    expect_error(
        [&] {
          Config config = Config::preset("micro");
          config.update_from_json(object, file);
          config.validate();
          (void)config.padded_vocab();
          (void)config.mlp_dim();
        },
        ExitCode::kUsage, {key});
  }
}

}  // namespace
}  // namespace speedrun

namespace speedrun {
namespace {

// fuzz/regressions/jsonl/number_overflow: a JSONL line whose number overflows a double
// made nlohmann throw out_of_range (not parse_error), which escaped as "internal error".
TEST(FuzzRegressions, JsonlNumberOverflowIsAnErrorNamingTheLine) {
  const std::string path = (std::filesystem::temp_directory_path() / "speedrun_jsonl_overflow.jsonl").string();
  write_bytes(path, regression_input("jsonl", "number_overflow"));
  expect_error(
      [&] {
        DocumentReader reader({path}, InputFormat::kJsonl);
        std::string text;
        while (reader.next(text)) {
        }
      },
      ExitCode::kRuntime, {path, "line 1", "not valid JSON"});
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace speedrun
