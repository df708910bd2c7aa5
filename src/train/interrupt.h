// Ctrl-C and SIGTERM as a request to stop training at the next step boundary: the
// handler only records the signal (async-signal-safe); the loop polls and saves.
#pragma once

namespace speedrun {

// Installs SIGINT and SIGTERM handlers (sigaction) for its lifetime and restores the
// previous ones on destruction. Further signals while a stop is pending are absorbed,
// so a second Ctrl-C during the checkpoint save cannot cut it short.
class InterruptGuard {
 public:
  InterruptGuard();
  ~InterruptGuard();
  InterruptGuard(const InterruptGuard&) = delete;
  InterruptGuard& operator=(const InterruptGuard&) = delete;
};

// The first signal received since the last clear (SIGINT or SIGTERM), or 0.
int pending_interrupt();
void clear_interrupt();
// What the handler does, for tests and for callers that stop for their own reasons.
void request_interrupt(int signal_number);

// Conventional exit status of a process stopped by a signal: 128 + its number.
inline int exit_status_for_signal(int signal_number) { return 128 + signal_number; }

const char* signal_name(int signal_number);  // "SIGINT", "SIGTERM", else "a signal"

}  // namespace speedrun
