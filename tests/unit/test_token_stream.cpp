// The SPEC §1 training stream against a brute-force enumeration of its windows, plus
// its errors, seek/position, expand_glob and validation_windows.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "data/shard.h"
#include "data/token_stream.h"
#include "util/error.h"
#include "support/temp_dir.h"

namespace fs = std::filesystem;
using speedrun::StreamPosition;
using speedrun::TokenBatch;
using speedrun::TokenStream;

namespace {

constexpr uint32_t kVocab = 50257;

using speedrun::testing::fresh_dir;

// Writes shards train_000000.bin ... with the given sizes; token i of shard s is
// s * 1000 + i, so every token says where it came from.
struct Shards {
  std::vector<std::string> paths;
  std::vector<std::vector<uint16_t>> tokens;
};

Shards make_shards(const fs::path& dir, const std::vector<size_t>& sizes) {
  Shards shards;
  for (size_t s = 0; s < sizes.size(); ++s) {
    std::vector<uint16_t> tokens(sizes[s]);
    for (size_t i = 0; i < sizes[s]; ++i) tokens[i] = static_cast<uint16_t>(s * 1000 + i);
    char name[32];
    std::snprintf(name, sizeof(name), "train_%06zu.bin", s);
    std::string path = (dir / name).string();
    speedrun::write_shard(path, tokens);
    shards.paths.push_back(path);
    shards.tokens.push_back(std::move(tokens));
  }
  return shards;
}

// One window of the reference: each rank's inputs and targets.
struct RefWindow {
  std::vector<std::vector<int32_t>> inputs, targets;
};

// Brute force, written from SPEC §1's consequence rather than its procedure: a shard
// of N tokens serves the windows at pos = 0, B, 2B, ... for which pos + B + 1 < N,
// and the stream is those windows, shard after shard.
std::vector<RefWindow> reference_windows(const Shards& shards, int world_size, int seq_len) {
  std::vector<RefWindow> windows;
  size_t B = static_cast<size_t>(world_size) * seq_len;
  for (const auto& tokens : shards.tokens) {
    for (size_t pos = 0; pos + B + 1 < tokens.size(); pos += B) {
      RefWindow w;
      for (int r = 0; r < world_size; ++r) {
        std::vector<int32_t> seq(tokens.begin() + pos + r * seq_len, tokens.begin() + pos + (r + 1) * seq_len + 1);
        w.inputs.emplace_back(seq.begin(), seq.end() - 1);
        w.targets.emplace_back(seq.begin() + 1, seq.end());
      }
      windows.push_back(std::move(w));
    }
  }
  return windows;
}

std::vector<int32_t> rank_slice(const speedrun::TokenBuffer& buffer, int index, int seq_len) {
  return std::vector<int32_t>(buffer.begin() + index * seq_len, buffer.begin() + (index + 1) * seq_len);
}

std::vector<int32_t> as_vector(const speedrun::TokenBuffer& buffer) {
  return std::vector<int32_t>(buffer.begin(), buffer.end());
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const speedrun::Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST(TokenStream, HandWorkedBoundaries) {
  fs::path dir = fresh_dir("stream_hand");
  // world_size 1, seq_len 4: B = 4, each read needs 5 tokens.
  Shards shards = make_shards(dir, {10, 9});
  TokenStream stream(shards.paths, 1, 4, kVocab);
  TokenBatch a = stream.next(0, 1);  // shard 0, pos 0: 0 + 5 < 10
  EXPECT_EQ(as_vector(a.inputs), (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(as_vector(a.targets), (std::vector<int32_t>{1, 2, 3, 4}));
  EXPECT_EQ(a.position_after, (StreamPosition{0, 4}));
  TokenBatch b = stream.next(0, 1);  // pos 4: 4 + 5 = 9 < 10
  EXPECT_EQ(as_vector(b.inputs), (std::vector<int32_t>{4, 5, 6, 7}));
  EXPECT_EQ(as_vector(b.targets), (std::vector<int32_t>{5, 6, 7, 8}));
  // pos 8: 8 + 5 >= 10, on to shard 1 at pos 0: 5 < 9.
  TokenBatch c = stream.next(0, 1);
  EXPECT_EQ(as_vector(c.inputs), (std::vector<int32_t>{1000, 1001, 1002, 1003}));
  EXPECT_EQ(as_vector(c.targets), (std::vector<int32_t>{1001, 1002, 1003, 1004}));
  EXPECT_EQ(c.position_after, (StreamPosition{1, 4}));
  // pos 4: 4 + 4 + 1 == 9 == N, the exact boundary: the shard is done although
  // tokens 4..8 would have fit, and there is no next shard.
  std::string message = error_of([&] { stream.next(0, 1); });
  EXPECT_NE(message.find("out of training data"), std::string::npos) << message;
  EXPECT_NE(message.find("2 shard(s)"), std::string::npos) << message;
  EXPECT_NE(message.find("19 tokens"), std::string::npos) << message;
  EXPECT_NE(message.find("serve 3 windows"), std::string::npos) << message;
  EXPECT_NE(message.find("world_size * seq_len = 1 * 4 = 4"), std::string::npos) << message;
  EXPECT_NE(message.find(shards.paths[0]), std::string::npos) << message;
}

TEST(TokenStream, MatchesBruteForceReference) {
  fs::path dir = fresh_dir("stream_reference");
  // Sizes around the boundaries of each combination below, tiny and empty shards
  // (skipped), and one exactly B + 1 (never serves a window) for B = 6 and B = 8.
  Shards shards = make_shards(dir, {17, 18, 3, 0, 7, 9, 40, 25, 1, 33, 16, 61});
  const std::vector<std::pair<int, int>> combos = {{1, 1}, {1, 4}, {2, 3}, {4, 2}, {3, 5}, {2, 8}, {1, 16}};
  for (auto [world_size, seq_len] : combos) {
    SCOPED_TRACE("world_size " + std::to_string(world_size) + ", seq_len " + std::to_string(seq_len));
    std::vector<RefWindow> expected = reference_windows(shards, world_size, seq_len);
    ASSERT_FALSE(expected.empty());
    TokenStream stream(shards.paths, world_size, seq_len, kVocab);
    for (size_t w = 0; w < expected.size(); ++w) {
      ASSERT_EQ(stream.windows_left(), expected.size() - w);
      TokenBatch batch = stream.next(0, world_size);
      ASSERT_EQ(batch.inputs.size(), static_cast<size_t>(world_size * seq_len));
      ASSERT_EQ(batch.targets.size(), batch.inputs.size());
      for (int r = 0; r < world_size; ++r) {
        ASSERT_EQ(rank_slice(batch.inputs, r, seq_len), expected[w].inputs[r]) << "window " << w << " rank " << r;
        ASSERT_EQ(rank_slice(batch.targets, r, seq_len), expected[w].targets[r]) << "window " << w << " rank " << r;
      }
    }
    EXPECT_EQ(stream.windows_left(), 0u);
    std::string message = error_of([&] { stream.next(0, world_size); });
    EXPECT_NE(message.find("serve " + std::to_string(expected.size()) + " windows"), std::string::npos) << message;
  }
}

TEST(TokenStream, RankSubsetsAreSlicesOfTheWindow) {
  fs::path dir = fresh_dir("stream_subset");
  Shards shards = make_shards(dir, {50, 50});
  const int world_size = 4, seq_len = 3;
  std::vector<RefWindow> expected = reference_windows(shards, world_size, seq_len);
  // Each rank reading its own stream sees the same windows (as on a real cluster).
  for (int rank = 0; rank < world_size; ++rank) {
    TokenStream stream(shards.paths, world_size, seq_len, kVocab);
    for (size_t w = 0; w < expected.size(); ++w) {
      TokenBatch batch = stream.next(rank, 1);
      EXPECT_EQ(batch.first_rank, rank);
      EXPECT_EQ(batch.num_ranks, 1);
      ASSERT_EQ(as_vector(batch.inputs), expected[w].inputs[rank]);
      ASSERT_EQ(as_vector(batch.targets), expected[w].targets[rank]);
    }
  }
  TokenStream stream(shards.paths, world_size, seq_len, kVocab);
  TokenBatch middle = stream.next(1, 2);
  EXPECT_EQ(rank_slice(middle.inputs, 0, seq_len), expected[0].inputs[1]);
  EXPECT_EQ(rank_slice(middle.targets, 1, seq_len), expected[0].targets[2]);
  EXPECT_THROW(stream.next(3, 2), speedrun::UsageError);
  EXPECT_THROW(stream.next(-1, 1), speedrun::UsageError);
  EXPECT_THROW(stream.next(0, 0), speedrun::UsageError);
}

TEST(TokenStream, ShardsAreReadInSortedOrder) {
  fs::path dir = fresh_dir("stream_sorted");
  Shards shards = make_shards(dir, {6, 6, 6});
  std::vector<std::string> shuffled = {shards.paths[2], shards.paths[0], shards.paths[1]};
  TokenStream stream(shuffled, 1, 2, kVocab);
  EXPECT_EQ(stream.shard_paths(), shards.paths);
  std::vector<int32_t> firsts;
  for (int i = 0; i < 3 * 2; ++i) firsts.push_back(stream.next(0, 1).inputs[0]);
  EXPECT_EQ(firsts, (std::vector<int32_t>{0, 2, 1000, 1002, 2000, 2002}));
}

TEST(TokenStream, OnlyTooSmallShardsIsOutOfData) {
  fs::path dir = fresh_dir("stream_small");
  Shards shards = make_shards(dir, {5, 4});
  TokenStream stream(shards.paths, 2, 2, kVocab);  // B + 1 = 5: neither shard serves a window
  std::string message = error_of([&] { stream.next(0, 2); });
  EXPECT_NE(message.find("hold 9 tokens, which serve 0 windows"), std::string::npos) << message;
}

TEST(TokenStream, TokenAtOrAboveVocabIsAnError) {
  fs::path dir = fresh_dir("stream_vocab");
  std::vector<uint16_t> tokens(20, 7);
  tokens[9] = 50300;
  std::string path = (dir / "bad.bin").string();
  speedrun::write_shard(path, tokens);
  TokenStream stream({path}, 1, 4, kVocab);
  stream.next(0, 1);  // [0, 5)
  // [4, 9) is clean; the window after it reads [8, 13) whose token 9 is bad.
  stream.next(0, 1);
  std::string message = error_of([&] { stream.next(0, 1); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("token id 50300 at offset 9"), std::string::npos) << message;
  EXPECT_NE(message.find("vocab_size 50257"), std::string::npos) << message;

  // The very last target of a window is checked too: [0, 10) with world_size 1, seq_len 9.
  TokenStream last_target({path}, 1, 9, kVocab);
  EXPECT_NE(error_of([&] { last_target.next(0, 1); }).find("offset 9"), std::string::npos);
  // vocab_size itself is out of range.
  tokens[9] = 50257;
  speedrun::write_shard(path, tokens);
  TokenStream exact({path}, 1, 9, kVocab);
  EXPECT_NE(error_of([&] { exact.next(0, 1); }).find("token id 50257 at offset 9"), std::string::npos);
}

TEST(TokenStream, CorruptShardIsReportedWhenReached) {
  fs::path dir = fresh_dir("stream_corrupt");
  Shards shards = make_shards(dir, {10, 10});
  fs::resize_file(shards.paths[1], 1024 + 7);
  TokenStream stream(shards.paths, 1, 4, kVocab);  // lazily opened: no error yet
  stream.next(0, 1);
  stream.next(0, 1);
  std::string message = error_of([&] { stream.next(0, 1); });
  EXPECT_NE(message.find(shards.paths[1]), std::string::npos) << message;
  EXPECT_NE(message.find("size 1031 bytes but header says N=10"), std::string::npos) << message;
}

TEST(TokenStream, SeekResumesExactly) {
  fs::path dir = fresh_dir("stream_seek");
  Shards shards = make_shards(dir, {30, 23, 41});
  TokenStream original(shards.paths, 2, 3, kVocab);
  EXPECT_EQ(original.position(), (StreamPosition{0, 0}));
  for (int i = 0; i < 5; ++i) original.next(0, 2);
  StreamPosition saved = original.position();
  EXPECT_EQ(saved, (StreamPosition{1, 6}));  // shard 0 served 4 windows (pos 0..18), shard 1 one
  std::vector<TokenBatch> rest;
  for (int i = 0; i < 6; ++i) rest.push_back(original.next(0, 2));

  TokenStream resumed(shards.paths, 2, 3, kVocab);
  resumed.seek(saved);
  EXPECT_EQ(resumed.position(), saved);
  for (const TokenBatch& expected : rest) {
    TokenBatch batch = resumed.next(0, 2);
    EXPECT_EQ(as_vector(batch.inputs), as_vector(expected.inputs));
    EXPECT_EQ(as_vector(batch.targets), as_vector(expected.targets));
    EXPECT_EQ(batch.position_after, expected.position_after);
    EXPECT_EQ(batch.position_after, resumed.position());
  }

  // A position at the very end of a shard just moves on at the next read.
  resumed.seek(StreamPosition{0, 30});
  EXPECT_EQ(resumed.next(0, 1).inputs[0], 1000);
}

TEST(TokenStream, SeekIsValidated) {
  fs::path dir = fresh_dir("stream_seek_bad");
  Shards shards = make_shards(dir, {30, 23});
  TokenStream stream(shards.paths, 1, 4, kVocab);
  std::string message = error_of([&] { stream.seek(StreamPosition{2, 0}); });
  EXPECT_NE(message.find("shard 2"), std::string::npos) << message;
  EXPECT_NE(message.find("only 2 shard(s)"), std::string::npos) << message;
  message = error_of([&] { stream.seek(StreamPosition{1, 24}); });
  EXPECT_NE(message.find("position 24"), std::string::npos) << message;
  EXPECT_NE(message.find(shards.paths[1]), std::string::npos) << message;
  EXPECT_NE(message.find("only 23 tokens"), std::string::npos) << message;
  EXPECT_EQ(stream.position(), (StreamPosition{0, 0}));  // a failed seek changes nothing
}

TEST(TokenStream, ConstructorValidatesArguments) {
  EXPECT_THROW(TokenStream({}, 1, 4, kVocab), speedrun::UsageError);
  EXPECT_THROW(TokenStream({"x.bin"}, 0, 4, kVocab), speedrun::UsageError);
  EXPECT_THROW(TokenStream({"x.bin"}, 1, 0, kVocab), speedrun::UsageError);
}

TEST(ExpandGlob, ReturnsSortedMatches) {
  fs::path dir = fresh_dir("glob");
  Shards shards = make_shards(dir, {3, 3, 3});
  speedrun::write_shard((dir / "val_000000.bin").string(), std::vector<uint16_t>{1});
  EXPECT_EQ(speedrun::expand_glob((dir / "train_*.bin").string()), shards.paths);
  EXPECT_EQ(speedrun::expand_glob((dir / "val_*.bin").string()),
            std::vector<std::string>{(dir / "val_000000.bin").string()});
}

TEST(ExpandGlob, NoMatchNamesThePattern) {
  fs::path dir = fresh_dir("glob_none");
  std::string pattern = (dir / "train_*.bin").string();
  std::string message = error_of([&] { speedrun::expand_glob(pattern); });
  EXPECT_NE(message.find("no file matches"), std::string::npos) << message;
  EXPECT_NE(message.find(pattern), std::string::npos) << message;
}

TEST(ValidationWindows, CountsWindowsAndRejectsRemainders) {
  EXPECT_EQ(speedrun::validation_windows(10485760, 8, 262144), 5u);
  EXPECT_EQ(speedrun::validation_windows(65536, 1, 1024), 64u);
  EXPECT_EQ(speedrun::validation_windows(0, 2, 64), 0u);
  try {
    speedrun::validation_windows(1000, 2, 64);
    FAIL() << "no error";
  } catch (const speedrun::UsageError& e) {
    std::string message = e.what();
    EXPECT_NE(message.find("val_tokens 1000"), std::string::npos) << message;
    EXPECT_NE(message.find("world_size * val_seq_len = 2 * 64 = 128"), std::string::npos) << message;
  }
  EXPECT_THROW(speedrun::validation_windows(128, 0, 64), speedrun::UsageError);
}

}  // namespace
