// make_nccl_communicator of a build without CUDA (or without NCCL): always an error.
#if !defined(SPEEDRUN_HAVE_CUDA) || !defined(SPEEDRUN_HAVE_NCCL)
#include "comm/nccl_communicator.h"

namespace speedrun {

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& host, Backend& backend) {
  throw Error(std::string("this build has no NCCL (") +
#ifdef SPEEDRUN_HAVE_CUDA
              "CUDA was found but libnccl/nccl.h were not: install NCCL and reconfigure"
#else
              "no CUDA backend: configure with nvcc and NCCL available"
#endif
              "), so the " + std::to_string(host.size()) + " processes of this run cannot share GPU gradients");
}

bool nccl_compiled_in() { return false; }

}  // namespace speedrun
#endif
