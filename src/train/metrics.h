// The metrics file: one JSON object per line, flushed as each line is written so a
// crashed or interrupted run keeps everything it measured.
#pragma once

#include <cstdio>
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
  std::FILE* file_ = nullptr;
};

}  // namespace speedrun
