// Fresh temporary directories for tests: TempDir is removed at the end of its scope;
// fresh_dir's stays for the test to inspect (and is emptied by the next run).
#pragma once

#include <unistd.h>

#include <filesystem>
#include <string>

namespace speedrun::testing {

class TempDir {
 public:
  explicit TempDir(const std::string& name) {
    path_ = std::filesystem::temp_directory_path() / ("speedrun_" + name + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string str() const { return path_.string(); }
  std::string operator/(const std::string& child) const { return (path_ / child).string(); }

 private:
  std::filesystem::path path_;
};

// temp/speedrun_test_<name>_<pid>, empty.
inline std::filesystem::path fresh_dir(const std::string& name) {
  std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("speedrun_test_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace speedrun::testing
