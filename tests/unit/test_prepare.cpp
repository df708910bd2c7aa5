// `prepare` on small inputs: exact token files against Tokenizer::encode, JSONL and
// text, thread-count independence, --force, and every error case.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "support/files.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "support/temp_dir.h"

namespace fs = std::filesystem;
using speedrun::PrepareOptions;
using speedrun::PrepareResult;
using speedrun::Tokenizer;

namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer instance = Tokenizer::load_default();
  return instance;
}

using speedrun::testing::fresh_dir;

std::string write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  return path.string();
}

std::string read_all(const fs::path& p) { return speedrun::testing::read_file_bytes(p); }

// The stream SPEC §1 asks for: 50256 before each document's tokens.
std::vector<uint16_t> expected_stream(const std::vector<std::string>& documents) {
  std::vector<uint16_t> stream;
  for (const std::string& doc : documents) {
    stream.push_back(50256);
    for (uint32_t id : tokenizer().encode(doc)) stream.push_back(static_cast<uint16_t>(id));
  }
  return stream;
}

std::vector<uint16_t> shard_tokens(const fs::path& path) {
  speedrun::ShardReader reader(path.string());
  return std::vector<uint16_t>(reader.tokens().begin(), reader.tokens().end());
}

std::vector<std::string> bin_files(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

PrepareOptions options_for(std::vector<std::string> inputs, const fs::path& out, size_t val, size_t shard) {
  PrepareOptions options;
  options.inputs = std::move(inputs);
  options.out_dir = out.string();
  options.val_tokens = val;
  options.shard_tokens = shard;
  options.threads = 2;
  return options;
}

template <class E = speedrun::Error>
std::string error_of(const PrepareOptions& options) {
  try {
    speedrun::prepare_dataset(options, tokenizer());
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<wrong exception type> ") + e.what();
  }
  return "<no error>";
}

TEST(Prepare, TextFilesGiveExactShards) {
  fs::path dir = fresh_dir("prepare_text");
  std::vector<std::string> docs = {"Hello world, this is the first document.\n",
                                   "Second one:\n\n  indented   spaces, <|endoftext|> as text, and ünïcödé 🚀."};
  std::string a = write_text(dir / "a.txt", docs[0]);
  std::string b = write_text(dir / "b.md", docs[1]);
  PrepareResult result = speedrun::prepare_dataset(options_for({a, b}, dir / "out", 5, 8), tokenizer());

  std::vector<uint16_t> stream = expected_stream(docs);
  ASSERT_GT(stream.size(), 5u + 16u);  // at least three train shards
  EXPECT_EQ(result.documents, 2u);
  EXPECT_EQ(result.tokens, stream.size());
  EXPECT_EQ(shard_tokens(dir / "out/val_000000.bin"), std::vector<uint16_t>(stream.begin(), stream.begin() + 5));
  size_t train_shards = (stream.size() - 5 + 7) / 8;
  ASSERT_EQ(result.shards.size(), 1 + train_shards);
  EXPECT_EQ(result.shards[0], "val_000000.bin");
  EXPECT_EQ(result.shard_token_counts[0], 5u);
  std::vector<uint16_t> train;
  for (size_t i = 0; i < train_shards; ++i) {
    char name[32];
    std::snprintf(name, sizeof(name), "train_%06zu.bin", i);
    EXPECT_EQ(result.shards[1 + i], name);
    std::vector<uint16_t> tokens = shard_tokens(dir / "out" / name);
    EXPECT_EQ(tokens.size(), i + 1 < train_shards ? 8u : (stream.size() - 5) - 8 * (train_shards - 1));
    EXPECT_EQ(result.shard_token_counts[1 + i], tokens.size());
    train.insert(train.end(), tokens.begin(), tokens.end());
  }
  EXPECT_EQ(train, std::vector<uint16_t>(stream.begin() + 5, stream.end()));
  EXPECT_EQ(bin_files(dir / "out").size(), 1 + train_shards);  // no staging folder left
}

TEST(Prepare, JsonlRecordsAreDocumentsInOrder) {
  fs::path dir = fresh_dir("prepare_jsonl");
  std::string jsonl = write_text(dir / "c.jsonl",
                                 "{\"text\": \"First record.\", \"id\": 1}\n"
                                 "\n"
                                 "{\"id\": 2, \"text\": \"Second\\nwith \\\"quotes\\\" and \\u00e9.\"}\r\n"
                                 "{\"text\": \"\"}\n"
                                 "{\"text\": \"Third.\"}");
  std::string text = write_text(dir / "between.txt", "A text file between.");
  std::string lines = write_text(dir / "d.json-lines", "{\"text\":\"Last one\"}\n");
  PrepareResult result =
      speedrun::prepare_dataset(options_for({jsonl, text, lines}, dir / "out", 3, 1000), tokenizer());
  std::vector<std::string> docs = {"First record.", "Second\nwith \"quotes\" and \xC3\xA9.", "Third.",
                                   "A text file between.", "Last one"};
  std::vector<uint16_t> stream = expected_stream(docs);
  EXPECT_EQ(result.documents, 5u);
  EXPECT_EQ(result.empty_skipped, 1u);
  EXPECT_EQ(shard_tokens(dir / "out/val_000000.bin"), std::vector<uint16_t>(stream.begin(), stream.begin() + 3));
  EXPECT_EQ(shard_tokens(dir / "out/train_000000.bin"), std::vector<uint16_t>(stream.begin() + 3, stream.end()));
}

TEST(Prepare, FormatOverridesTheExtension) {
  fs::path dir = fresh_dir("prepare_format");
  std::string record = "{\"text\": \"inside\"}\n";
  std::string as_txt = write_text(dir / "records.txt", record);
  PrepareOptions options = options_for({as_txt}, dir / "jsonl", 0, 100);
  options.format = speedrun::InputFormat::kJsonl;
  speedrun::prepare_dataset(options, tokenizer());
  EXPECT_EQ(shard_tokens(dir / "jsonl/train_000000.bin"), expected_stream({"inside"}));
  EXPECT_FALSE(fs::exists(dir / "jsonl/val_000000.bin"));  // --val-tokens 0: no val shard

  std::string as_jsonl = write_text(dir / "raw.jsonl", record);
  options = options_for({as_jsonl}, dir / "text", 0, 100);
  options.format = speedrun::InputFormat::kText;
  speedrun::prepare_dataset(options, tokenizer());
  EXPECT_EQ(shard_tokens(dir / "text/train_000000.bin"), expected_stream({record}));

  EXPECT_EQ(speedrun::parse_input_format("auto"), speedrun::InputFormat::kAuto);
  EXPECT_THROW(speedrun::parse_input_format("csv"), speedrun::UsageError);
}

TEST(Prepare, OutputDoesNotDependOnThreadCount) {
  fs::path dir = fresh_dir("prepare_threads");
  // More documents than one encoding chunk holds, of varied lengths.
  std::ostringstream jsonl;
  std::vector<std::string> docs;
  for (int i = 0; i < 20000; ++i) {
    std::string doc = "Doc " + std::to_string(i) + std::string(static_cast<size_t>(i % 7), '!') +
                      (i % 3 ? " some more words here" : "") + " end.";
    docs.push_back(doc);
    jsonl << "{\"text\": \"" << doc << "\"}\n";
  }
  std::string input = write_text(dir / "many.jsonl", jsonl.str());
  std::vector<uint16_t> stream = expected_stream(docs);
  std::vector<std::string> reference;
  for (int threads : {1, 2, 3, 8}) {
    PrepareOptions options = options_for({input}, dir / ("out" + std::to_string(threads)), 1000, 50000);
    options.threads = threads;
    speedrun::prepare_dataset(options, tokenizer());
    std::vector<std::string> contents;
    for (const std::string& name : bin_files(dir / ("out" + std::to_string(threads)))) {
      contents.push_back(name + ":" + read_all(dir / ("out" + std::to_string(threads)) / name));
    }
    if (reference.empty()) {
      reference = contents;
      std::vector<uint16_t> all = shard_tokens(dir / "out1/val_000000.bin");
      for (size_t i = 0; fs::exists(dir / "out1" / ("train_00000" + std::to_string(i) + ".bin")); ++i) {
        std::vector<uint16_t> part = shard_tokens(dir / "out1" / ("train_00000" + std::to_string(i) + ".bin"));
        all.insert(all.end(), part.begin(), part.end());
      }
      EXPECT_EQ(all, stream);
    } else {
      EXPECT_EQ(contents, reference) << "threads " << threads;
    }
  }
}

TEST(Prepare, RefusesExistingShardsWithoutForce) {
  fs::path dir = fresh_dir("prepare_force");
  std::string big = write_text(dir / "big.txt", std::string(400, 'x') + " and more text to make several shards");
  std::string small = write_text(dir / "small.txt", "tiny document");
  fs::path out = dir / "out";
  speedrun::prepare_dataset(options_for({big}, out, 2, 10), tokenizer());
  write_text(out / "notes.txt", "kept");
  std::vector<std::string> before = bin_files(out);
  ASSERT_GT(before.size(), 4u);
  std::string old_train = read_all(out / "train_000000.bin");

  std::string message = error_of<speedrun::UsageError>(options_for({small}, out, 2, 10));
  EXPECT_NE(message.find(out.string()), std::string::npos) << message;
  EXPECT_NE(message.find("--force"), std::string::npos) << message;
  EXPECT_EQ(bin_files(out), before);
  EXPECT_EQ(read_all(out / "train_000000.bin"), old_train);

  PrepareOptions forced = options_for({small}, out, 2, 10);
  forced.force = true;
  speedrun::prepare_dataset(forced, tokenizer());
  // The old, longer run's extra shards are gone; other files are kept.
  EXPECT_EQ(bin_files(out), (std::vector<std::string>{"notes.txt", "train_000000.bin", "val_000000.bin"}));
  std::vector<uint16_t> stream = expected_stream({"tiny document"});
  EXPECT_EQ(shard_tokens(out / "train_000000.bin"), std::vector<uint16_t>(stream.begin() + 2, stream.end()));
}

TEST(Prepare, FailedForceLeavesOldShardsUntouched) {
  fs::path dir = fresh_dir("prepare_force_fail");
  std::string good = write_text(dir / "good.txt", "the old data, which must survive a failed replacement");
  fs::path out = dir / "out";
  speedrun::prepare_dataset(options_for({good}, out, 2, 5), tokenizer());
  std::vector<std::string> before = bin_files(out);
  std::string old_last = read_all(out / before.back());

  // A bad record late in the input: shards were already staged when it is found (prepare
  // tokenizes 8192 documents at a time; the first chunk's are cut into shards before the
  // second chunk, which holds the bad record, is read).
  std::string records;
  for (int i = 0; i < 8192 + 10; ++i) records += "{\"text\": \"record " + std::to_string(i) + " of the new data\"}\n";
  std::string bad = write_text(dir / "bad.jsonl", records + "{oops\n");
  PrepareOptions bad_run = options_for({bad}, out, 2, 4096);
  bad_run.force = true;
  EXPECT_NE(error_of(bad_run).find("line 8203"), std::string::npos);
  EXPECT_EQ(bin_files(out), before);
  EXPECT_EQ(read_all(out / before.back()), old_last);

  // A full disk part way through behaves the same.
  PrepareOptions forced = options_for({good}, out, 2, 5);
  forced.force = true;
  speedrun::set_write_budget_for_testing(3000);
  std::string message = error_of(forced);
  speedrun::set_write_budget_for_testing(-1);
  EXPECT_NE(message.find("No space left"), std::string::npos) << message;
  EXPECT_EQ(bin_files(out), before);
}

// Ctrl-C between chunks: an Interrupted error and out_dir as it was, no staging folder left.
// A staging folder whose process is gone (a run killed outright) is removed by the next run;
// one whose process is alive is another run's and stays.
TEST(Prepare, AnInterruptedRunLeavesNothingAndAKilledRunsStagingIsRemoved) {
  fs::path dir = fresh_dir("prepare_interrupted");
  std::string good = write_text(dir / "good.txt", "words to tokenize, twice over: words to tokenize");
  fs::path out = dir / "out";
  fs::create_directories(out / ".speedrun-prepare-2147483647");  // no such process
  const std::string alive = ".speedrun-prepare-" + std::to_string(::getppid());
  fs::create_directories(out / alive);
  PrepareOptions options = options_for({good}, out, 2, 5);
  options.stop_requested = [] { return 2; };
  EXPECT_EQ(error_of<speedrun::Interrupted>(options), "interrupted; nothing was written");
  EXPECT_EQ(bin_files(out), std::vector<std::string>{alive});
  options.stop_requested = nullptr;
  speedrun::prepare_dataset(options, tokenizer());
  EXPECT_TRUE(fs::exists(out / alive));
  EXPECT_TRUE(fs::exists(out / "val_000000.bin"));
}

TEST(Prepare, InputErrorsNameTheProblem) {
  fs::path dir = fresh_dir("prepare_errors");
  fs::path out = dir / "out";
  std::string missing = (dir / "missing.txt").string();
  std::string message = error_of(options_for({missing}, out, 0, 10));
  EXPECT_NE(message.find(missing), std::string::npos) << message;

  std::string bad_json = write_text(dir / "bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": broken}\n");
  message = error_of(options_for({bad_json}, out, 0, 10));
  EXPECT_NE(message.find(bad_json + "' line 3: not valid JSON"), std::string::npos) << message;

  std::string no_text = write_text(dir / "notext.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n");
  message = error_of(options_for({no_text}, out, 0, 10));
  EXPECT_NE(message.find(no_text + "' line 2: expected a JSON object with a string field \"text\""),
            std::string::npos)
      << message;
  std::string number = write_text(dir / "number.jsonl", "{\"text\": 5}\n");
  EXPECT_NE(error_of(options_for({number}, out, 0, 10)).find("line 1: expected a JSON object"), std::string::npos);
  std::string array = write_text(dir / "array.jsonl", "[\"text\"]\n");
  EXPECT_NE(error_of(options_for({array}, out, 0, 10)).find("line 1: expected a JSON object"), std::string::npos);

  std::string empty_text = write_text(dir / "empty.txt", "");
  std::string empty_jsonl = write_text(dir / "empty.jsonl", "\n{\"text\": \"\"}\n");
  message = error_of(options_for({empty_text, empty_jsonl}, out, 0, 10));
  EXPECT_NE(message.find("no text"), std::string::npos) << message;
  EXPECT_NE(message.find("2 empty document(s)"), std::string::npos) << message;

  std::string small = write_text(dir / "small.txt", "just a few tokens");
  size_t total = expected_stream({"just a few tokens"}).size();
  message = error_of(options_for({small}, out, 100, 10));
  EXPECT_NE(message.find("holds " + std::to_string(total) + " tokens, not more than --val-tokens 100"),
            std::string::npos)
      << message;
  EXPECT_NE(error_of(options_for({small}, out, total, 10)).find("nothing would be left for training"),
            std::string::npos);

  EXPECT_NE(error_of<speedrun::UsageError>(options_for({small}, out, 0, 0)).find("--shard-tokens must be at least 1"),
            std::string::npos);
  PrepareOptions threads = options_for({small}, out, 0, 10);
  threads.threads = -1;
  EXPECT_NE(error_of<speedrun::UsageError>(threads).find("--threads"), std::string::npos);
  std::string file_as_out = write_text(dir / "file", "x");
  EXPECT_NE(error_of<speedrun::UsageError>(options_for({small}, file_as_out, 0, 10)).find("not a directory"),
            std::string::npos);
  // None of the failures left shards or a staging folder behind.
  EXPECT_TRUE(!fs::exists(out) || fs::is_empty(out));
}

}  // namespace
