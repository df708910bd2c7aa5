// Communication between the processes of a run. Three implementations share this
// interface: a single process, MPI over host buffers (CPU runs; also how any run is
// launched and bootstrapped under mpirun or srun), and NCCL over GPU buffers.
// Collectives must be called in the same order on every process.
//
// Where the buffers live: the float collectives (all_gather of floats, broadcast_async,
// all_reduce_sum_async) take the BACKEND's memory — host memory for the single-process
// and MPI communicators (the CPU backend's), device memory for NCCL (the CUDA backend's).
// Everything else (all_gather of doubles, broadcast of bytes, barrier, abort) takes host
// memory on every implementation: NCCL passes those to its inner MPI communicator.
// On NCCL, "complete" means ordered before all later work on the backend's stream.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace speedrun {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual std::string name() const = 0;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Rank among the processes on this node (chooses the GPU).
  virtual int local_rank() const = 0;

  // True when the float collectives take device memory (NCCL), false for host memory.
  virtual bool device_buffers() const { return false; }

  // out[r * count .. (r+1) * count) = process r's `local` (count floats, backend memory),
  // on every process.
  virtual void all_gather(const float* local, float* out, size_t count) = 0;
  // The same for host doubles (losses).
  virtual void all_gather(const double* local, double* out, size_t count) = 0;
  // Host bytes.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // Non-blocking broadcast of floats (backend memory); completed by wait_all().
  virtual void broadcast_async(float* data, size_t count, int root) = 0;
  // Non-blocking in-place sum over processes of count floats (backend memory); completed
  // by wait_all(). The buffer must not be touched until then. The order of the additions
  // is the library's: deterministic for a fixed process count, not across counts.
  virtual void all_reduce_sum_async(float* data, size_t count) = 0;
  virtual void wait_all() = 0;
  virtual void barrier() = 0;
  // Ends every process of the run after this one reported `message` (never returns).
  [[noreturn]] virtual void abort(const std::string& message, int exit_code) = 0;
};

std::unique_ptr<Communicator> make_single_process_communicator();

// The communicator of this process: MPI when launched by mpirun/srun with more than one
// process (and built with MPI), else the single process. Initialises MPI when used.
std::unique_ptr<Communicator> make_process_communicator();

// True when the environment says this process was started by mpirun/srun.
bool launched_by_mpi();

}  // namespace speedrun
