// The metrics file: one JSON object per line, each written by one system call so a
// crashed or interrupted run keeps everything it measured, and a write that fails (a full
// disk) is cut back off rather than left as half a line.
#pragma once

#include <optional>
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

// A metrics record's number field. `when_absent`, if given, stands for a field that is
// absent or null (a skipped step's loss); any other field that is not a number is an
// error naming the file, line and field, as is an absent one without `when_absent`.
double metrics_number(const nlohmann::json& record, const char* key, const std::string& path, int line,
                      std::optional<double> when_absent = std::nullopt);

}  // namespace speedrun
