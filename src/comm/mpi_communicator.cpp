// The MPI communicator (OpenMPI): host-buffer collectives for CPU runs, and the
// bootstrap of every multi-process run (rank, world, local rank).
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "comm/communicator.h"
#include "util/error.h"

#ifdef SPEEDRUN_HAVE_MPI
#include <mpi.h>

namespace speedrun {
namespace {

void check(int status, const char* what) {
  if (status != MPI_SUCCESS) throw Error(std::string("MPI ") + what + " failed");
}

// MPI counts are ints: a larger message is an error here, not a silent truncation.
int mpi_count(size_t count, const char* what) {
  if (count > static_cast<size_t>(std::numeric_limits<int>::max())) {
    throw Error(std::string("MPI ") + what + " of " + std::to_string(count) +
                " elements exceeds MPI's int count limit");
  }
  return static_cast<int>(count);
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "init");
      owns_mpi_ = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local_rank_);
    MPI_Comm_free(&node);
  }
  ~MpiCommunicator() override {
    if (owns_mpi_) MPI_Finalize();
  }
  std::string name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }

  void all_gather(const float* local, float* out, size_t count) override {
    const int n = mpi_count(count, "allgather");
    check(MPI_Allgather(local, n, MPI_FLOAT, out, n, MPI_FLOAT, MPI_COMM_WORLD), "allgather");
  }
  void all_gather(const double* local, double* out, size_t count) override {
    const int n = mpi_count(count, "allgather");
    check(MPI_Allgather(local, n, MPI_DOUBLE, out, n, MPI_DOUBLE, MPI_COMM_WORLD), "allgather");
  }
  void broadcast(void* data, size_t bytes, int root) override {
    check(MPI_Bcast(data, mpi_count(bytes, "broadcast"), MPI_BYTE, root, MPI_COMM_WORLD), "broadcast");
  }
  void broadcast_async(float* data, size_t count, int root) override {
    requests_.emplace_back();
    check(MPI_Ibcast(data, mpi_count(count, "ibcast"), MPI_FLOAT, root, MPI_COMM_WORLD, &requests_.back()),
          "ibcast");
  }
  void all_reduce_sum_async(float* data, size_t count) override {
    const int n = mpi_count(count, "iallreduce");
    requests_.emplace_back();
    check(MPI_Iallreduce(MPI_IN_PLACE, data, n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &requests_.back()), "iallreduce");
    // OpenMPI has no progress thread: a non-blocking collective advances only inside MPI
    // calls, so each new one also pushes the earlier ones along while the backward runs.
    int done = 0;
    check(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE), "testall");
    if (done) requests_.clear();
  }
  void wait_all() override {
    if (requests_.empty()) return;
    check(MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE), "waitall");
    requests_.clear();
  }
  void barrier() override { check(MPI_Barrier(MPI_COMM_WORLD), "barrier"); }
  [[noreturn]] void abort(const std::string& message, int exit_code) override {
    std::fprintf(stderr, "speedrun: error (rank %d of %d): %s\n", rank_, size_, message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, exit_code);
    std::exit(exit_code);
  }

 private:
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  bool owns_mpi_ = false;
  std::vector<MPI_Request> requests_;
};

}  // namespace

std::unique_ptr<Communicator> make_process_communicator() {
  if (!launched_by_mpi()) return make_single_process_communicator();
  return std::make_unique<MpiCommunicator>();
}

}  // namespace speedrun

#else  // built without MPI

namespace speedrun {

std::unique_ptr<Communicator> make_process_communicator() {
  if (launched_by_mpi()) {
    throw Error("launched by mpirun, but this build has no MPI support (install libopenmpi-dev and rebuild)");
  }
  return make_single_process_communicator();
}

}  // namespace speedrun
#endif
