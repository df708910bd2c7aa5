#include <gtest/gtest.h>

#include <unistd.h>

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

// A writer killed mid-write leaves `target.tmp.<pid>`; only those of dead processes go.
TEST(AtomicFile, RemovesTemporariesOfDeadProcessesOnly) {
  fs::path dir = fresh_dir("atomic_abandoned");
  const std::string dead = "step_000010.safetensors.tmp.2147483647";  // above any pid_max
  const std::string alive = "step_000020.safetensors.tmp." + std::to_string(::getppid());
  const std::vector<std::string> kept = {alive, "notes.tmp.abc", "step_000010.safetensors", ".tmp.2147483647",
                                         "a.tmp.", "b.tmp.0", "c.tmp.-5", "d.tmp.99999999999999999999"};
  for (const std::string& name : kept) std::ofstream(dir / name) << "x";
  std::ofstream(dir / dead) << "half a checkpoint";
  fs::create_directories(dir / "folder.tmp.2147483647");  // not a writer's temporary: a folder

  speedrun::remove_abandoned_temporaries(dir.string());

  EXPECT_FALSE(fs::exists(dir / dead));
  for (const std::string& name : kept) EXPECT_TRUE(fs::exists(dir / name)) << name;
  EXPECT_TRUE(fs::exists(dir / "folder.tmp.2147483647"));
  speedrun::remove_abandoned_temporaries((dir / "missing").string());  // nothing to list: no error
}

}  // namespace
