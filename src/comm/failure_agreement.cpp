#include "comm/failure_agreement.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace speedrun {

std::optional<Error> first_failure(Communicator& comm, const std::optional<Error>& mine) {
  if (comm.size() == 1) return mine;
  // Each process's exit code, 0 for none: who failed, and how the run exits.
  const double code = mine ? static_cast<double>(static_cast<int>(mine->code())) : 0.0;
  std::vector<double> codes(comm.size());
  comm.all_gather(&code, codes.data(), 1);
  const auto first = std::find_if(codes.begin(), codes.end(), [](double c) { return c != 0.0; });
  if (first == codes.end()) return std::nullopt;
  const int failed = static_cast<int>(first - codes.begin());
  std::array<char, 2048> text{};
  if (mine) std::string(mine->what()).copy(text.data(), text.size() - 1);
  comm.broadcast(text.data(), text.size(), failed);
  return Error(text.data(), static_cast<ExitCode>(static_cast<int>(*first)));
}

void leave_together(Communicator& comm, const std::string& message, int status) {
  std::fflush(stdout);
  if (comm.rank() == 0) {
    std::fprintf(stderr, "speedrun: %s\n", message.c_str());
    std::fflush(stderr);
  }
  comm.barrier();
  std::exit(status);
}

}  // namespace speedrun
