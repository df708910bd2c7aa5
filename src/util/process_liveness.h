// Whether the process that named a file after its id still exists: what a killed process
// (SIGKILL, a node's crash) left half-made can then be removed without racing a live one.
#pragma once

#include <string>

namespace speedrun {

// True when `pid_text` is a whole positive process id and no such process exists on this
// machine; false for text that is not a process id and for a process that still runs.
bool names_a_dead_process(const std::string& pid_text);

}  // namespace speedrun
