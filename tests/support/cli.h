// Running shell commands and the built `speedrun` binary from end-to-end tests, with
// stdout and stderr captured through files in a scratch directory.
#pragma once

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "support/files.h"

namespace speedrun::testing {

struct RunResult {
  int exit_code = -1;  // the command's exit status; -1 when the shell could not report one
  std::string out;
  std::string err;
};

// s as one single-quoted shell word.
inline std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

inline bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Runs `command_line` through /bin/sh; its output lands in scratch/stdout.txt and stderr.txt.
inline RunResult run_shell(const std::string& command_line, const std::filesystem::path& scratch) {
  const std::filesystem::path out = scratch / "stdout.txt", err = scratch / "stderr.txt";
  const std::string command = command_line + " >" + quote(out.string()) + " 2>" + quote(err.string());
  const int status = std::system(command.c_str());
  RunResult result;
  if (WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  result.out = read_file_bytes(out.string());
  result.err = read_file_bytes(err.string());
  return result;
}

#ifdef SPEEDRUN_BINARY
inline RunResult run_speedrun(const std::string& arguments, const std::filesystem::path& scratch) {
  return run_shell(quote(SPEEDRUN_BINARY) + " " + arguments, scratch);
}
#endif

}  // namespace speedrun::testing
