// Whole-file writes that never leave a half-written file behind: the bytes go to
// a temporary file beside the target, are flushed to disk, then renamed over it.
#pragma once

#include <cstddef>
#include <cstdio>
#include <functional>
#include <string>

namespace speedrun {

// Streams bytes into a temporary file; commit() makes it the target, otherwise
// the destructor removes it. Throws speedrun::Error naming the path on failure.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string target_path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, size_t bytes);
  void commit();
  const std::string& target_path() const { return target_; }

 private:
  std::string target_;
  std::string temp_;
  std::FILE* file_ = nullptr;
  bool committed_ = false;
};

// Convenience: writes a whole buffer atomically.
void write_file_atomically(const std::string& path, const void* data, size_t bytes);
void write_file_atomically(const std::string& path, const std::string& text);

// Removes the temporaries in `dir` of writers whose process no longer exists (killed
// mid-write, so that no destructor ran); those of running processes stay.
void remove_abandoned_temporaries(const std::string& dir);

// Test hook: when set, write() fails with ENOSPC once this many bytes have been
// written through AtomicFileWriter and the metrics file in the process (simulates a full disk).
void set_write_budget_for_testing(long long bytes);  // negative: unlimited
// How many of `bytes` the test budget lets a writer of its own (the metrics file) write:
// all of them unless a budget is set, else what is left of it (then nothing is left).
size_t bytes_the_write_budget_allows(size_t bytes);

}  // namespace speedrun
