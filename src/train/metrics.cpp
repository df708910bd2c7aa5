#include "train/metrics.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "util/atomic_file.h"
#include "util/error.h"

namespace speedrun {

MetricsWriter::MetricsWriter(const std::string& path) : path_(path) {
  if (path_.empty()) return;
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error("cannot open metrics file '" + path_ + "': " + std::strerror(errno));
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
