#include "train/metrics.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

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
  const ssize_t written = ::write(fd_, line.data(), line.size());
  if (written == static_cast<ssize_t>(line.size())) return;
  const std::string reason = written < 0 ? std::strerror(errno) : "only part of a line fit (disk full?)";
  if (written > 0 && ::ftruncate(fd_, before.st_size) != 0) {
    throw Error("cannot write metrics file '" + path_ + "': " + reason + "; its last line is incomplete");
  }
  throw Error("cannot write metrics file '" + path_ + "': " + reason);
}

}  // namespace speedrun
