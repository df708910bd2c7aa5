#include "train/metrics.h"

#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "util/error.h"

namespace speedrun {

MetricsWriter::MetricsWriter(const std::string& path) : path_(path) {
  if (path_.empty()) return;
  file_ = std::fopen(path_.c_str(), "a");
  if (!file_) throw Error("cannot open metrics file '" + path_ + "': " + std::strerror(errno));
}

MetricsWriter::~MetricsWriter() {
  if (file_) std::fclose(file_);
}

void MetricsWriter::write(const nlohmann::json& record) {
  if (!file_) return;
  const std::string line = record.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0) {
    throw Error("cannot write metrics file '" + path_ + "': " + std::strerror(errno));
  }
}

}  // namespace speedrun
