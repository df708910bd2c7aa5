// Small file and data helpers shared by the tests.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include <unistd.h>

namespace speedrun::testing {

// The whole file as bytes ("" when it cannot be read).
inline std::string read_file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Tokens over a 300-token vocabulary (the micro preset's) with a rule to learn:
// mostly t -> t + 1, one token in ten random.
inline std::vector<uint16_t> rule_tokens(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint16_t> tokens(n);
  uint16_t t = 1;
  for (auto& x : tokens) {
    t = (rng() % 10 == 0) ? static_cast<uint16_t>(rng() % 300) : static_cast<uint16_t>((t + 1) % 300);
    x = t;
  }
  return tokens;
}

// A size no machine running the tests can hold in memory: twice its memory, at least 1 TiB.
inline uint64_t more_than_memory_bytes() {
  const uint64_t memory = static_cast<uint64_t>(::sysconf(_SC_PHYS_PAGES)) * ::sysconf(_SC_PAGE_SIZE);
  return std::max<uint64_t>(uint64_t{1} << 40, 2 * memory);
}

// Writes a safetensors file whose only tensor, U8 'huge', has `data_bytes` bytes that are
// never written (a sparse file: a hole, not disk space), with `metadata_json` as its
// __metadata__ object. False where the file system cannot hold a file that large.
inline bool write_sparse_safetensors(const std::filesystem::path& path, uint64_t data_bytes,
                                     const std::string& metadata_json) {
  std::string header = R"({"huge":{"dtype":"U8","shape":[)" + std::to_string(data_bytes) +
                       R"(],"data_offsets":[0,)" + std::to_string(data_bytes) + R"(]},"__metadata__":)" +
                       metadata_json + "}";
  std::string length(8, '\0');
  for (int i = 0; i < 8; ++i) length[i] = static_cast<char>((uint64_t{header.size()} >> (8 * i)) & 0xff);
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << length << header;
  }
  std::error_code error;
  std::filesystem::resize_file(path, 8 + header.size() + data_bytes, error);
  return !error;
}

}  // namespace speedrun::testing
