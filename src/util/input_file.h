// Whether a path names a file a command can read, asked before opening it: a directory
// opens as a stream on Linux and fails later with a message that names neither.
#pragma once

#include <string>

namespace speedrun {

// "" when `path` names something that reads as a file (a regular file, a pipe, a link to
// either); otherwise what it is instead: "is a directory, not a file", "does not exist".
std::string input_file_problem(const std::string& path);

}  // namespace speedrun
