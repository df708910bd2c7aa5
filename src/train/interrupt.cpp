// SIGINT/SIGTERM handling for training: a lock-free flag set by the handler.
#include "train/interrupt.h"

#include <signal.h>

#include <atomic>

namespace speedrun {
namespace {

// sig_atomic_t is the type the C standard allows a handler to write; lock-free atomics
// are async-signal-safe too and also order the write for the polling thread.
std::atomic<int> g_pending{0};
static_assert(std::atomic<int>::is_always_lock_free);

struct sigaction g_previous_int;
struct sigaction g_previous_term;

extern "C" void record_signal(int signal_number) {
  int expected = 0;
  // Keep the first signal: its number decides the exit status.
  g_pending.compare_exchange_strong(expected, signal_number);
}

void install(int signal_number, struct sigaction* previous) {
  struct sigaction action {};
  action.sa_handler = record_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // blocking reads and writes carry on; the loop polls
  sigaction(signal_number, &action, previous);
}

}  // namespace

InterruptGuard::InterruptGuard() {
  install(SIGINT, &g_previous_int);
  install(SIGTERM, &g_previous_term);
}

InterruptGuard::~InterruptGuard() {
  sigaction(SIGINT, &g_previous_int, nullptr);
  sigaction(SIGTERM, &g_previous_term, nullptr);
}

int pending_interrupt() { return g_pending.load(); }
void clear_interrupt() { g_pending.store(0); }
void request_interrupt(int signal_number) { record_signal(signal_number); }

const char* signal_name(int signal_number) {
  switch (signal_number) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    default: return "a signal";
  }
}

}  // namespace speedrun
