#include "train/metrics.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "util/atomic_file.h"
#include "util/error.h"

namespace speedrun {
namespace {

// The length of the file's whole lines: up to and including its last newline.
off_t whole_lines_length(int fd, off_t size, const std::string& path) {
  char block[4096];
  for (off_t end = size; end > 0;) {
    const off_t begin = std::max<off_t>(0, end - static_cast<off_t>(sizeof block));
    const ssize_t got = ::pread(fd, block, static_cast<size_t>(end - begin), begin);
    if (got != end - begin) throw Error("cannot read metrics file '" + path + "': " + std::strerror(errno));
    for (off_t i = end - begin; i > 0; --i) {
      if (block[i - 1] == '\n') return begin + i;
    }
    end = begin;
  }
  return 0;
}

// Cuts off a last line without its newline (fd: open for writing); returns the bytes removed.
size_t remove_incomplete_last_line(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error("cannot stat metrics file '" + path + "': " + std::strerror(errno));
  if (!S_ISREG(st.st_mode) || st.st_size == 0) return 0;
  const int reader = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (reader < 0) throw Error("cannot read metrics file '" + path + "': " + std::strerror(errno));
  off_t whole = 0;
  try {
    whole = whole_lines_length(reader, st.st_size, path);
  } catch (...) {
    ::close(reader);
    throw;
  }
  ::close(reader);
  if (whole == st.st_size) return 0;
  if (::ftruncate(fd, whole) != 0) {
    throw Error("cannot remove the incomplete last line of metrics file '" + path + "': " + std::strerror(errno));
  }
  return static_cast<size_t>(st.st_size - whole);
}

}  // namespace

MetricsWriter::MetricsWriter(const std::string& path) : path_(path) {
  if (path_.empty()) return;
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error("cannot open metrics file '" + path_ + "': " + std::strerror(errno));
  try {
    removed_incomplete_bytes_ = remove_incomplete_last_line(fd_, path_);
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

MetricsWriter::~MetricsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void MetricsWriter::write(const nlohmann::json& record) {
  if (fd_ < 0) return;
  const std::string line = record.dump() + "\n";
  struct stat before {};
  if (::fstat(fd_, &before) != 0) throw Error("cannot stat metrics file '" + path_ + "': " + std::strerror(errno));
  // A test budget (SPEEDRUN_TEST_WRITE_BUDGET) stands for a disk with only `allowed` bytes free.
  const size_t allowed = bytes_the_write_budget_allows(line.size());
  const ssize_t written = allowed > 0 ? ::write(fd_, line.data(), allowed) : 0;
  if (written == static_cast<ssize_t>(line.size())) return;
  const std::string reason = written < 0              ? std::strerror(errno)
                             : allowed < line.size() ? std::strerror(ENOSPC)
                                                     : "only part of the line was written (disk full?)";
  if (written > 0 && ::ftruncate(fd_, before.st_size) != 0) {
    throw Error("cannot write metrics file '" + path_ + "': " + reason + "; its last line is incomplete");
  }
  throw Error("cannot write metrics file '" + path_ + "': " + reason);
}

double metrics_number(const nlohmann::json& record, const char* key, const std::string& path, int line,
                      std::optional<double> when_absent) {
  const auto it = record.find(key);
  const bool absent = it == record.end() || it->is_null();
  if (absent && when_absent) return *when_absent;
  if (absent || !it->is_number()) {
    throw Error(path + ":" + std::to_string(line) + ": expected a number in field '" + key + "', got " +
                (it == record.end() ? std::string("none") : it->dump()));
  }
  return it->get<double>();
}

}  // namespace speedrun
