#include "util/input_file.h"

#include <filesystem>

namespace speedrun {

std::string input_file_problem(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (status.type() == fs::file_type::not_found) return "does not exist";
  if (ec) return "cannot be read: " + ec.message();
  if (status.type() == fs::file_type::directory) return "is a directory, not a file";
  return "";
}

}  // namespace speedrun
