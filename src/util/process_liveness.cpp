#include "util/process_liveness.h"

#include <signal.h>

#include <cerrno>
#include <cstdlib>

namespace speedrun {

bool names_a_dead_process(const std::string& pid_text) {
  if (pid_text.empty() || pid_text.find_first_not_of("0123456789") != std::string::npos) return false;
  char* end = nullptr;
  errno = 0;
  const long pid = std::strtol(pid_text.c_str(), &end, 10);
  if (errno == ERANGE || pid <= 0 || static_cast<long>(static_cast<pid_t>(pid)) != pid) return false;
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

}  // namespace speedrun
