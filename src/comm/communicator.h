// Communication between the processes of a run. Three implementations share this
// interface: a single process, MPI over host buffers (CPU runs; also how any run is
// launched and bootstrapped under mpirun or srun), and NCCL over GPU buffers.
// Collectives must be called in the same order on every process.
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

  // out[r * count .. (r+1) * count) = process r's `local` (count floats), on every process.
  virtual void all_gather(const float* local, float* out, size_t count) = 0;
  virtual void all_gather(const double* local, double* out, size_t count) = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // Non-blocking broadcast of floats; completed by wait_all().
  virtual void broadcast_async(float* data, size_t count, int root) = 0;
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
