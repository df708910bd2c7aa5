// The metrics file: one JSON object per line, each written by one system call so a
// crashed or interrupted run keeps everything it measured, and a write that fails (a full
// disk) is cut back off rather than left as half a line.
#pragma once

#include <cstddef>
#include <optional>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace speedrun {

class MetricsWriter {
 public:
  MetricsWriter() = default;
  // Opens path for appending (a resumed run continues its file). Empty path: no file. A
  // file whose last line has no newline was cut off mid-write (the machine went down, or a
  // full disk whose cut-back failed): that incomplete line is removed first, or the next
  // record would be fused onto it.
  explicit MetricsWriter(const std::string& path);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }
  // The bytes of an incomplete last line the constructor removed (0: the file was whole).
  size_t removed_incomplete_bytes() const { return removed_incomplete_bytes_; }

 private:
  std::string path_;
  int fd_ = -1;
  size_t removed_incomplete_bytes_ = 0;
};

// A metrics record's number field. `when_absent`, if given, stands for a field that is
// absent or null (a skipped step's loss); any other field that is not a number is an
// error naming the file, line and field, as is an absent one without `when_absent`.
double metrics_number(const nlohmann::json& record, const char* key, const std::string& path, int line,
                      std::optional<double> when_absent = std::nullopt);

}  // namespace speedrun
