// Agreeing on a failure that may have happened on some processes of a run and not others,
// so that every process leaves together with one message (rank 0 prints it) instead of
// each failing one aborting the run with its own.
#pragma once

#include <optional>
#include <string>
#include <utility>

#include "comm/communicator.h"
#include "util/error.h"

namespace speedrun {

// Every process calls this at the same point, with its own failure or none. Returns the
// failure of the lowest-ranked process that failed (its message, up to 2047 bytes, and
// exit code), the same on every process, or none when no process failed: one tiny
// all-gather, and a broadcast only after a failure.
std::optional<Error> first_failure(Communicator& comm, const std::optional<Error>& mine);

// Runs `work` (which must make no collective call: a process failing before one would
// leave the others waiting there) and returns its result, agreeing on its failure: any
// process's Error is thrown on every process as the first failure's AgreedError, with its
// exit code.
template <typename Work>
auto agreeing_on_failure(Communicator& comm, Work&& work) {
  std::optional<decltype(work())> result;
  std::optional<Error> mine;
  try {
    result.emplace(work());
  } catch (const Error& e) {
    mine = e;
  }
  if (const std::optional<Error> failure = first_failure(comm, mine)) {
    throw AgreedError(failure->what(), failure->code());
  }
  return std::move(*result);
}

// Every process of the run exits with `status` once rank 0 has said `message` (after
// "speedrun: "): none leaves before, since mpirun ends the whole job at the first non-zero
// exit and could cut rank 0's save or output short.
[[noreturn]] void leave_together(Communicator& comm, const std::string& message, int status);

}  // namespace speedrun
