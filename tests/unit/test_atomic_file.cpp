#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "support/files.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "support/temp_dir.h"

namespace fs = std::filesystem;

namespace {

std::string read_all(const fs::path& p) { return speedrun::testing::read_file_bytes(p); }

using speedrun::testing::fresh_dir;

TEST(AtomicFile, WritesWholeFile) {
  fs::path dir = fresh_dir("atomic_ok");
  speedrun::write_file_atomically((dir / "a.txt").string(), std::string("hello"));
  EXPECT_EQ(read_all(dir / "a.txt"), "hello");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

TEST(AtomicFile, FullDiskKeepsOldFileAndLeavesNoTemporary) {
  fs::path dir = fresh_dir("atomic_enospc");
  std::string path = (dir / "ckpt.bin").string();
  speedrun::write_file_atomically(path, std::string("old contents"));
  speedrun::set_write_budget_for_testing(4);
  try {
    speedrun::write_file_atomically(path, std::string("new contents that do not fit"));
    FAIL() << "expected an error";
  } catch (const speedrun::Error& e) {
    EXPECT_NE(std::string(e.what()).find("No space left"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("ckpt.bin"), std::string::npos) << e.what();
  }
  speedrun::set_write_budget_for_testing(-1);
  EXPECT_EQ(read_all(path), "old contents");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

TEST(AtomicFile, UnwritableDirectoryIsAnErrorNamingThePath) {
  try {
    speedrun::write_file_atomically("/nonexistent_dir_xyz/file.bin", std::string("x"));
    FAIL() << "expected an error";
  } catch (const speedrun::Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent_dir_xyz/file.bin"), std::string::npos);
  }
}

}  // namespace
