// Runs the built `speedrun` binary: prepare and inspect on temporary folders, checking
// exit codes (0 success, 1 bad data, 2 usage) and what the messages say.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "support/cli.h"
#include "support/files.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "support/temp_dir.h"

namespace fs = std::filesystem;

namespace {

using speedrun::testing::fresh_dir;
using speedrun::testing::quote;
using speedrun::testing::RunResult;
using speedrun::testing::run_speedrun;

std::string read_all(const fs::path& p) { return speedrun::testing::read_file_bytes(p); }

std::string write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
  return path.string();
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

class DataCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fresh_dir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    text_ = write_text(dir_ / "story.txt", "Once upon a time there was a tokenizer.\nIt split words.");
    jsonl_ = write_text(dir_ / "records.jsonl",
                        "{\"text\": \"The first record.\"}\n{\"text\": \"The second record, a little longer.\"}\n");
  }
  std::string prepare_args(const std::string& out, const std::string& extra = "") const {
    return "prepare --input " + quote(text_) + " " + quote(jsonl_) + " --out " + quote(out) +
           " --val-tokens 8 --shard-tokens 10 " + extra;
  }
  fs::path dir_;
  std::string text_, jsonl_;
};

TEST_F(DataCli, PrepareThenInspect) {
  fs::path out = dir_ / "shards";
  RunResult prepared = run_speedrun(prepare_args(out.string(), "--threads 2"), dir_);
  ASSERT_EQ(prepared.exit_code, 0) << prepared.err;
  speedrun::Tokenizer tokenizer = speedrun::Tokenizer::load_default();
  size_t total = 3 + tokenizer.encode("Once upon a time there was a tokenizer.\nIt split words.").size() +
                 tokenizer.encode("The first record.").size() +
                 tokenizer.encode("The second record, a little longer.").size();
  EXPECT_TRUE(contains(prepared.out, "prepared 3 documents, " + std::to_string(total) + " tokens")) << prepared.out;
  EXPECT_TRUE(contains(prepared.out, "val_000000.bin  8 tokens")) << prepared.out;
  EXPECT_TRUE(contains(prepared.out, "train_000000.bin  10 tokens")) << prepared.out;
  EXPECT_EQ(speedrun::ShardReader((out / "val_000000.bin").string()).num_tokens(), 8u);

  RunResult inspected = run_speedrun("inspect " + quote((out / "val_000000.bin").string()) + " " +
                                         quote((out / "train_000000.bin").string()),
                                     dir_);
  ASSERT_EQ(inspected.exit_code, 0) << inspected.err;
  EXPECT_TRUE(contains(inspected.out, (out / "val_000000.bin").string() + ": 8 tokens, 1 document"))
      << inspected.out;
  EXPECT_TRUE(contains(inspected.out, "first document: \"Once upon a time")) << inspected.out;

  RunResult whole_dir = run_speedrun("inspect " + quote(out.string()), dir_);
  ASSERT_EQ(whole_dir.exit_code, 0) << whole_dir.err;
  EXPECT_TRUE(contains(whole_dir.out, "train_000001.bin")) << whole_dir.out;
}

// The preview shows the first document as it is: "..." only where text was left out, bytes
// that are not UTF-8 escaped like control characters, counts in the singular where one.
TEST_F(DataCli, InspectPreviewsTheFirstDocumentAsItIs) {
  const speedrun::Tokenizer tokenizer = speedrun::Tokenizer::load_default();
  const auto shard_of = [&](const std::string& name, const std::string& document) {
    std::vector<uint16_t> tokens = {speedrun::Tokenizer::kEndOfText};
    for (uint32_t id : tokenizer.encode(document)) tokens.push_back(static_cast<uint16_t>(id));
    const std::string path = (dir_ / name).string();
    speedrun::write_shard(path, tokens);
    return path;
  };
  const std::string exact = std::string(199, 'a') + "b", longer = exact + "c";
  const RunResult r = run_speedrun("inspect " + quote(shard_of("exact.bin", exact)) + " " +
                                       quote(shard_of("longer.bin", longer)) + " " +
                                       quote(shard_of("bytes.bin", "caf\xC3\xA9 \xFF\x01 end")) + " " +
                                       quote(shard_of("one.bin", "")),
                                   dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "first document: \"" + exact + "\"\n")) << r.out;
  EXPECT_TRUE(contains(r.out, "first document: \"" + exact + "...\"\n")) << r.out;
  EXPECT_TRUE(contains(r.out, "first document: \"caf\xC3\xA9 \\xff\\x01 end\"\n")) << r.out;
  EXPECT_TRUE(contains(r.out, "one.bin: 1 token, 1 document\n")) << r.out;
  fs::create_directories(dir_ / "empty");  // a directory named on the command line is data
  const RunResult none = run_speedrun("inspect " + quote((dir_ / "empty").string()), dir_);
  EXPECT_EQ(none.exit_code, 1);
  EXPECT_TRUE(contains(none.err, "holds no .bin shards")) << none.err;
}

TEST_F(DataCli, PrepareRefusesExistingShardsUnlessForced) {
  fs::path out = dir_ / "shards";
  ASSERT_EQ(run_speedrun(prepare_args(out.string()), dir_).exit_code, 0);
  RunResult again = run_speedrun(prepare_args(out.string()), dir_);
  EXPECT_EQ(again.exit_code, 2);
  EXPECT_TRUE(contains(again.err, "speedrun: error: '" + out.string() + "' already holds token shards")) << again.err;
  EXPECT_TRUE(contains(again.err, "--force")) << again.err;
  RunResult forced = run_speedrun(prepare_args(out.string(), "--force"), dir_);
  EXPECT_EQ(forced.exit_code, 0) << forced.err;
}

TEST_F(DataCli, PrepareErrorsExitWithTheRightCode) {
  fs::path out = dir_ / "shards";
  std::string missing = (dir_ / "nope.txt").string();
  RunResult r = run_speedrun("prepare --input " + quote(missing) + " --out " + quote(out.string()), dir_);
  EXPECT_EQ(r.exit_code, 1);  // a file named on the command line is data, missing or not
  EXPECT_TRUE(contains(r.err, missing)) << r.err;

  std::string bad = write_text(dir_ / "bad.jsonl", "{\"text\": \"fine\"}\nnot json\n");
  r = run_speedrun("prepare --input " + quote(bad) + " --out " + quote(out.string()) + " --val-tokens 0", dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, bad + "' line 2: not valid JSON")) << r.err;

  r = run_speedrun(prepare_args(out.string(), "--val-tokens 100000"), dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "not more than --val-tokens 100000")) << r.err;

  r = run_speedrun(prepare_args(out.string(), "--shard-tokens 0"), dir_);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(contains(r.err, "--shard-tokens must be at least 1")) << r.err;

  r = run_speedrun(prepare_args(out.string(), "--format csv"), dir_);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(contains(r.err, "unknown input format 'csv'")) << r.err;

  r = run_speedrun("prepare --input " + quote(text_), dir_);  // no --out
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(contains(r.out + r.err, "--out")) << r.out << r.err;
  EXPECT_FALSE(fs::exists(out));
}

TEST_F(DataCli, PrepareHelpDocumentsTheValShardRule) {
  RunResult r = run_speedrun("prepare --help", dir_);
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_TRUE(contains(r.out, "val_tokens + 2")) << r.out;
  EXPECT_TRUE(contains(r.out, "65538")) << r.out;
}

TEST_F(DataCli, InspectReportsCorruptShardAfterTheGoodOnes) {
  fs::path out = dir_ / "shards";
  ASSERT_EQ(run_speedrun(prepare_args(out.string()), dir_).exit_code, 0);
  fs::path corrupt = dir_ / "corrupt.bin";
  fs::copy_file(out / "train_000000.bin", corrupt);
  fs::resize_file(corrupt, fs::file_size(corrupt) - 2);
  std::string good = (out / "val_000000.bin").string();
  RunResult r = run_speedrun("inspect " + quote(corrupt.string()) + " " + quote(good), dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.out, good + ": 8 tokens")) << r.out;
  EXPECT_TRUE(contains(r.err, "speedrun: error: token shard '" + corrupt.string() + "'")) << r.err;
  EXPECT_TRUE(contains(r.err, "header says N=10")) << r.err;

  std::string missing = (dir_ / "missing.bin").string();
  r = run_speedrun("inspect " + quote(missing), dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, missing)) << r.err;

  r = run_speedrun("inspect", dir_);
  EXPECT_EQ(r.exit_code, 2);
}

// A shard whose header and size are right but which holds an id train would stop at.
TEST_F(DataCli, InspectRefusesATokenIdOutsideTheVocabulary) {
  std::vector<uint16_t> tokens(2000, 464);
  tokens[0] = 50256;
  tokens[1500] = 60000;
  const std::string shard = (dir_ / "outside.bin").string();
  speedrun::write_shard(shard, tokens);
  RunResult r = run_speedrun("inspect " + quote(shard), dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.out, shard + ": 2000 tokens, 1 document")) << r.out;
  EXPECT_TRUE(contains(r.err, "token id 60000 at offset 1500 is not below the GPT-2 vocabulary's 50257")) << r.err;
}

}  // namespace
