// Token shards in the FineWeb .bin format (SPEC §1): a header of 256 little-endian
// int32 (magic 20240520, version 1, token count N) followed by N uint16 tokens.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace speedrun {

inline constexpr int32_t kShardMagic = 20240520;
inline constexpr int32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderInts = 256;
inline constexpr size_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);

// A validated, memory-mapped shard. Opening checks magic, version and that the file
// size is exactly 1024 + 2N; failures throw speedrun::Error naming the file.
class ShardReader {
 public:
  explicit ShardReader(const std::string& path);
  ~ShardReader();
  ShardReader(ShardReader&&) noexcept;
  ShardReader& operator=(ShardReader&&) noexcept;
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;

  const std::string& path() const { return path_; }
  size_t num_tokens() const { return num_tokens_; }
  std::span<const uint16_t> tokens() const { return {tokens_, num_tokens_}; }

 private:
  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  const uint16_t* tokens_ = nullptr;
  size_t num_tokens_ = 0;
};

// Writes a shard atomically (temporary file + rename).
void write_shard(const std::string& path, std::span<const uint16_t> tokens);

}  // namespace speedrun
