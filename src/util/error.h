// Errors the user can act on. Every failure that reaches main() is one of these:
// a message naming the file, field or value and what was expected, and an exit code.
#pragma once

#include <stdexcept>
#include <string>

namespace speedrun {

enum class ExitCode : int {
  kRuntime = 1,  // bad data, I/O failure, numerical fault
  kUsage = 2,    // bad command-line arguments or configuration values
};

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, ExitCode code = ExitCode::kRuntime)
      : std::runtime_error(message), code_(code) {}
  ExitCode code() const { return code_; }

 private:
  ExitCode code_;
};

// A usage error: the user asked for something that cannot be done as asked.
class UsageError : public Error {
 public:
  explicit UsageError(const std::string& message) : Error(message, ExitCode::kUsage) {}
};

// A failure every process of a run raises at the same point with the same message, after
// whatever had to finish (rank 0's checkpoint) has finished: rank 0 alone reports it, and
// no process aborts the others (which could cut rank 0's save short).
class AgreedError : public Error {
 public:
  explicit AgreedError(const std::string& message, ExitCode code = ExitCode::kRuntime) : Error(message, code) {}
};

// A backend could not allocate memory (host or device): callers that know what the memory
// was for (a training run's model) add how to see and shrink the plan.
class OutOfMemoryError : public Error {
 public:
  explicit OutOfMemoryError(const std::string& message) : Error(message) {}
};

}  // namespace speedrun
