// Shared helpers of the fuzz targets: a per-process scratch file that the readers
// under test open by path, and the rule that only speedrun::Error may escape them.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace speedrun::fuzz {

// Writes the input to a scratch file (one per process and suffix) and returns its path.
inline const std::string& write_scratch(const uint8_t* data, size_t size, const std::string& suffix) {
  static const std::string path =
      (std::filesystem::temp_directory_path() / ("speedrun_fuzz_" + std::to_string(::getpid()) + suffix)).string();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || (size > 0 && std::fwrite(data, 1, size, f) != size) || std::fclose(f) != 0) {
    std::perror(path.c_str());
    std::abort();  // the harness, not the code under test, failed: stop loudly
  }
  return path;
}

// A broken invariant of the code under test: print why and abort (libFuzzer saves the input).
[[noreturn]] inline void invariant_broken(const std::string& what) {
  std::fprintf(stderr, "fuzz invariant broken: %s\n", what.c_str());
  std::abort();
}

}  // namespace speedrun::fuzz
