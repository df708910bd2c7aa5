#include "util/process_clock.h"

#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>

namespace speedrun {
namespace {

const auto static_initialisation = std::chrono::steady_clock::now();

// Field 22 of /proc/self/stat (start time in clock ticks after boot) against /proc/uptime;
// negative when either cannot be read. Fields after the command name (field 2, which may
// hold spaces and parentheses) are counted from its closing parenthesis.
double seconds_from_proc() {
  std::ifstream stat("/proc/self/stat"), uptime_file("/proc/uptime");
  std::string line;
  double uptime = 0;
  if (!std::getline(stat, line) || !(uptime_file >> uptime)) return -1;
  const size_t name_end = line.rfind(')');
  if (name_end == std::string::npos) return -1;
  std::istringstream fields(line.substr(name_end + 1));
  std::string field;
  for (int index = 3; index <= 22; ++index) {
    if (!(fields >> field)) return -1;
  }
  const long ticks_per_second = ::sysconf(_SC_CLK_TCK);
  if (ticks_per_second <= 0) return -1;
  const double started = std::stod(field) / static_cast<double>(ticks_per_second);
  return uptime >= started ? uptime - started : -1;
}

}  // namespace

double seconds_since_process_start() {
  const double from_proc = seconds_from_proc();
  if (from_proc >= 0) return from_proc;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - static_initialisation).count();
}

}  // namespace speedrun
