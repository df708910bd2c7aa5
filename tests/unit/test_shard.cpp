// Token shards: exact bytes of write_shard, and every corruption ShardReader must reject.
#include <gtest/gtest.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "support/files.h"
#include "data/shard.h"
#include "util/error.h"
#include "support/temp_dir.h"

namespace fs = std::filesystem;
using speedrun::Error;
using speedrun::ShardReader;

namespace {

using speedrun::testing::fresh_dir;

std::string read_all(const fs::path& p) { return speedrun::testing::read_file_bytes(p); }

void write_raw(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A header with the given fields followed by `payload_tokens` zero tokens.
std::string shard_bytes(int32_t magic, int32_t version, int32_t n, size_t payload_tokens) {
  std::array<int32_t, 256> header{};
  header[0] = magic;
  header[1] = version;
  header[2] = n;
  std::string bytes(reinterpret_cast<const char*>(header.data()), sizeof(header));
  bytes.append(payload_tokens * 2, '\0');
  return bytes;
}

// Expects ShardReader(path) to throw an Error whose message names the file and holds `what`.
void expect_rejected(const fs::path& path, const std::string& what) {
  try {
    ShardReader reader(path.string());
    FAIL() << "no error for " << path << " (expected: " << what << ")";
  } catch (const Error& e) {
    std::string message = e.what();
    EXPECT_NE(message.find(path.string()), std::string::npos) << message;
    EXPECT_NE(message.find(what), std::string::npos) << message;
    EXPECT_EQ(e.code(), speedrun::ExitCode::kRuntime);
  }
}

TEST(Shard, WriteProducesExactBytes) {
  fs::path dir = fresh_dir("shard_bytes");
  fs::path path = dir / "a.bin";
  std::vector<uint16_t> tokens = {50256, 0, 1, 258, 65535};
  speedrun::write_shard(path.string(), tokens);

  std::string bytes = read_all(path);
  ASSERT_EQ(bytes.size(), 1024u + 10u);
  const unsigned char* b = reinterpret_cast<const unsigned char*>(bytes.data());
  // magic 20240520 = 0x0134D888, little-endian
  EXPECT_EQ(b[0], 0x88);
  EXPECT_EQ(b[1], 0xD8);
  EXPECT_EQ(b[2], 0x34);
  EXPECT_EQ(b[3], 0x01);
  EXPECT_EQ(b[4], 1);  // version
  for (int i = 5; i < 8; ++i) EXPECT_EQ(b[i], 0);
  EXPECT_EQ(b[8], 5);  // N
  for (int i = 9; i < 1024; ++i) ASSERT_EQ(b[i], 0) << "header byte " << i;
  const unsigned char expected_payload[] = {0x50, 0xC4, 0x00, 0x00, 0x01, 0x00, 0x02, 0x01, 0xFF, 0xFF};
  EXPECT_EQ(std::memcmp(b + 1024, expected_payload, 10), 0);
  // Only the shard: the temporary file was renamed away.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

TEST(Shard, ReaderReturnsWrittenTokens) {
  fs::path dir = fresh_dir("shard_roundtrip");
  std::vector<uint16_t> tokens;
  for (int i = 0; i < 3000; ++i) tokens.push_back(static_cast<uint16_t>((i * 7919) % 50257));
  speedrun::write_shard((dir / "s.bin").string(), tokens);
  ShardReader reader((dir / "s.bin").string());
  EXPECT_EQ(reader.path(), (dir / "s.bin").string());
  ASSERT_EQ(reader.num_tokens(), tokens.size());
  EXPECT_TRUE(std::equal(tokens.begin(), tokens.end(), reader.tokens().begin()));

  ShardReader moved(std::move(reader));
  EXPECT_EQ(moved.num_tokens(), tokens.size());
  EXPECT_EQ(moved.tokens()[2999], tokens[2999]);
}

TEST(Shard, EmptyShardRoundTrips) {
  fs::path dir = fresh_dir("shard_empty");
  speedrun::write_shard((dir / "e.bin").string(), {});
  EXPECT_EQ(fs::file_size(dir / "e.bin"), 1024u);
  ShardReader reader((dir / "e.bin").string());
  EXPECT_EQ(reader.num_tokens(), 0u);
  EXPECT_TRUE(reader.tokens().empty());
}

TEST(Shard, OverwriteReplacesOldContents) {
  fs::path dir = fresh_dir("shard_overwrite");
  std::string path = (dir / "s.bin").string();
  speedrun::write_shard(path, std::vector<uint16_t>(100, 7));
  speedrun::write_shard(path, std::vector<uint16_t>{1, 2});
  ShardReader reader(path);
  ASSERT_EQ(reader.num_tokens(), 2u);
  EXPECT_EQ(reader.tokens()[1], 2);
}

TEST(Shard, RejectsBadMagic) {
  fs::path dir = fresh_dir("shard_magic");
  write_raw(dir / "m.bin", shard_bytes(123, 1, 4, 4));
  expect_rejected(dir / "m.bin", "bad magic 123 (expected 20240520)");
}

TEST(Shard, RejectsBadVersion) {
  fs::path dir = fresh_dir("shard_version");
  write_raw(dir / "v.bin", shard_bytes(20240520, 2, 4, 4));
  expect_rejected(dir / "v.bin", "version 2 (expected 1)");
}

TEST(Shard, RejectsTruncatedHeader) {
  fs::path dir = fresh_dir("shard_short");
  write_raw(dir / "t.bin", shard_bytes(20240520, 1, 4, 4).substr(0, 500));
  expect_rejected(dir / "t.bin", "500 bytes is too short for the 1024-byte header");
  write_raw(dir / "z.bin", "");
  expect_rejected(dir / "z.bin", "0 bytes is too short for the 1024-byte header");
}

TEST(Shard, RejectsSizeMismatch) {
  fs::path dir = fresh_dir("shard_size");
  write_raw(dir / "short.bin", shard_bytes(20240520, 1, 10, 8));
  expect_rejected(dir / "short.bin", "size 1040 bytes but header says N=10 tokens (expected 1044 bytes)");
  write_raw(dir / "long.bin", shard_bytes(20240520, 1, 10, 11));
  expect_rejected(dir / "long.bin", "size 1046 bytes but header says N=10 tokens (expected 1044 bytes)");
  std::string odd = shard_bytes(20240520, 1, 2, 2) + "x";
  write_raw(dir / "odd.bin", odd);
  expect_rejected(dir / "odd.bin", "size 1029 bytes but header says N=2");
}

TEST(Shard, RejectsNegativeCount) {
  fs::path dir = fresh_dir("shard_negative");
  write_raw(dir / "n.bin", shard_bytes(20240520, 1, -5, 0));
  expect_rejected(dir / "n.bin", "N=-5 tokens (negative)");
}

TEST(Shard, RejectsMissingFileAndDirectory) {
  fs::path dir = fresh_dir("shard_missing");
  expect_rejected(dir / "nope.bin", "cannot open");
  fs::create_directories(dir / "d.bin");
  expect_rejected(dir / "d.bin", "not a regular file");
}

}  // namespace
