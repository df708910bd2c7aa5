// How long this process has run: "launch to end of the first step" counts from exec, so
// that library loading, CUDA initialisation and model set-up are all inside it.
#pragma once

namespace speedrun {

// Seconds since the kernel started this process (/proc/self/stat, 10 ms resolution);
// where /proc cannot be read, since this program's static initialisation.
double seconds_since_process_start();

}  // namespace speedrun
