// Small file and data helpers shared by the tests.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

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

}  // namespace speedrun::testing
