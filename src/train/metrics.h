// The metrics file: one JSON object per line, each written by one system call so a
// crashed or interrupted run keeps everything it measured, and a write that fails (a full
// disk) is cut back off rather than left as half a line.
#pragma once

#include <string>

#include <nlohmann/json_fwd.hpp>

namespace speedrun {

class MetricsWriter {
 public:
  MetricsWriter() = default;
  // Opens path for appending (a resumed run continues its file). Empty path: no file.
  explicit MetricsWriter(const std::string& path);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace speedrun
