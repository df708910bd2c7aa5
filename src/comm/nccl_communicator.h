// The NCCL communicator: float collectives on the CUDA backend's device memory, run on a
// stream of their own and ordered after the backend's work by events; host collectives
// (losses, bytes, barrier, abort) through the MPI communicator it was bootstrapped from.
#pragma once

#include <memory>

#include "backends/backend.h"
#include "comm/communicator.h"
#include "util/error.h"

namespace speedrun {

// The GPU a process uses: its rank on the node modulo the GPUs it sees, so that both
// "every process sees all 8 GPUs" and "Slurm gives each process one GPU" work.
inline int gpu_for_local_rank(int local_rank, int visible_gpus) {
  if (visible_gpus <= 0) throw Error("no CUDA device is visible to this process (local rank " +
                                     std::to_string(local_rank) + ")");
  if (local_rank < 0) throw Error("negative local rank " + std::to_string(local_rank));
  return local_rank % visible_gpus;
}

// An NCCL communicator over the processes of `host` (usually MPI; one process is fine):
// rank 0 creates the unique id, `host` broadcasts it, every rank joins on the GPU of
// `backend` (a CUDA backend, created on gpu_for_local_rank(host.local_rank(), ...)).
// `host` and `backend` must outlive the result. Throws speedrun::Error when the build
// has no NCCL, the backend is not CUDA, or NCCL fails (naming the call and its reason).
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& host, Backend& backend);

// Whether this build can create NCCL communicators.
bool nccl_compiled_in();

}  // namespace speedrun
