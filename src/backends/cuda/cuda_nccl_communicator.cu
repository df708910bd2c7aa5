// The NCCL communicator (comm/nccl_communicator.h): float collectives on device memory on
// a non-blocking stream of their own, ordered after the backend's stream by events.
// No kernels of its own: NCCL's collectives move 2(P-1)/P x the bytes of an all-reduce.
#if defined(SPEEDRUN_HAVE_NCCL)
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "backends/cuda/cuda_check.cuh"
#include "comm/nccl_communicator.h"

namespace speedrun {
namespace {

void check_nccl(ncclResult_t status, const char* call) {
  if (status == ncclSuccess) return;
  const char* detail = ncclGetLastError(nullptr);
  throw Error(std::string("NCCL call ") + call + " failed: " + ncclGetErrorString(status) +
              (detail && *detail ? std::string(" (") + detail + ")" : std::string()));
}
#define SPEEDRUN_NCCL_CHECK(call) check_nccl((call), #call)

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(Communicator& host, Backend& backend) : host_(host) {
    compute_ = static_cast<cudaStream_t>(backend.native_stream());
    if (!compute_) {
      throw Error("the NCCL communicator needs the CUDA backend's memory, but the backend is '" + backend.name() +
                  "' (use --device cuda)");
    }
    try {
      join(host);
    } catch (...) {
      release(/*unwinding=*/true);
      throw;
    }
  }

  ~NcclCommunicator() override { release(std::uncaught_exceptions() > 0); }

  std::string name() const override { return "nccl"; }
  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  int local_rank() const override { return host_.local_rank(); }
  bool device_buffers() const override { return true; }

  // --- device buffers (the CUDA backend's memory) ------------------------------------
  void all_gather(const float* local, float* out, size_t count) override {
    require_device(local, "all_gather");
    require_device(out, "all_gather");
    after_compute();
    SPEEDRUN_NCCL_CHECK(ncclAllGather(local, out, count, ncclFloat, comm_, stream_));
    pending_ = true;
    wait_all();
  }
  void broadcast_async(float* data, size_t count, int root) override {
    require_device(data, "broadcast_async");
    after_compute();
    SPEEDRUN_NCCL_CHECK(ncclBroadcast(data, data, count, ncclFloat, root, comm_, stream_));
    pending_ = true;
  }
  void all_reduce_sum_async(float* data, size_t count) override {
    require_device(data, "all_reduce_sum_async");
    after_compute();
    SPEEDRUN_NCCL_CHECK(ncclAllReduce(data, data, count, ncclFloat, ncclSum, comm_, stream_));
    pending_ = true;
  }
  // Orders the backend's later work after every collective queued so far; the host does
  // not wait (it learns of the results at the backend's next synchronisation).
  void wait_all() override {
    if (!pending_) return;
    ncclResult_t async_error = ncclSuccess;
    SPEEDRUN_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async_error));
    SPEEDRUN_NCCL_CHECK(async_error);
    SPEEDRUN_CUDA_CHECK(cudaEventRecord(collectives_done_, stream_));
    SPEEDRUN_CUDA_CHECK(cudaStreamWaitEvent(compute_, collectives_done_, 0));
    pending_ = false;
  }

  // --- host buffers: the bootstrap communicator's -------------------------------------
  void all_gather(const double* local, double* out, size_t count) override { host_.all_gather(local, out, count); }
  void broadcast(void* data, size_t bytes, int root) override { host_.broadcast(data, bytes, root); }
  void barrier() override { host_.barrier(); }
  [[noreturn]] void abort(const std::string& message, int exit_code) override {
    host_.abort(message, exit_code);
    std::exit(exit_code);  // not reached: the attribute does not pass through a virtual call
  }

 private:
  void join(Communicator& host) {
    int gpus = 0;
    SPEEDRUN_CUDA_CHECK(cudaGetDeviceCount(&gpus));
    const int device = gpu_for_local_rank(host.local_rank(), gpus);
    int backend_device = -1;
    SPEEDRUN_CUDA_CHECK(cudaStreamGetDevice(compute_, &backend_device));
    if (backend_device != device) {
      throw Error("rank " + std::to_string(host.rank()) + " (local rank " + std::to_string(host.local_rank()) +
                  ") belongs on GPU " + std::to_string(device) + " but its CUDA backend runs on GPU " +
                  std::to_string(backend_device));
    }
    SPEEDRUN_CUDA_CHECK(cudaSetDevice(device));
    ncclUniqueId id{};
    if (host.rank() == 0) SPEEDRUN_NCCL_CHECK(ncclGetUniqueId(&id));
    host.broadcast(&id, sizeof id, 0);
    SPEEDRUN_NCCL_CHECK(ncclCommInitRank(&comm_, host.size(), id, host.rank()));
    // Non-blocking: a blocking stream would be serialised with the legacy default stream.
    SPEEDRUN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    SPEEDRUN_CUDA_CHECK(cudaEventCreateWithFlags(&compute_done_, cudaEventDisableTiming));
    SPEEDRUN_CUDA_CHECK(cudaEventCreateWithFlags(&collectives_done_, cudaEventDisableTiming));
  }

  // The next collective starts only when the backend's work queued so far is done (it
  // may have written the buffer). One event serves all: a wait binds to the last record.
  void after_compute() {
    SPEEDRUN_CUDA_CHECK(cudaEventRecord(compute_done_, compute_));
    SPEEDRUN_CUDA_CHECK(cudaStreamWaitEvent(stream_, compute_done_, 0));
  }

  static void require_device(const void* pointer, const char* operation) {
    cudaPointerAttributes attributes{};
    SPEEDRUN_CUDA_CHECK(cudaPointerGetAttributes(&attributes, pointer));
    if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
      throw Error(std::string("NCCL ") + operation +
                  " was given host memory: the NCCL communicator's float collectives take the CUDA backend's "
                  "device memory");
    }
  }

  // Called from the destructor, so it reports instead of throwing. While an exception
  // unwinds (one rank failed), the others may never join another collective: abort the
  // communicator instead of waiting for queued work, or this rank would hang before
  // reaching the abort that ends the run.
  void release(bool unwinding) {
    if (comm_) {
      ncclResult_t status = ncclSuccess;
      if (unwinding) {
        status = ncclCommAbort(comm_);
      } else {
        if (stream_) cudaStreamSynchronize(stream_);
        status = ncclCommFinalize(comm_);
        if (status == ncclSuccess) status = ncclCommDestroy(comm_);
      }
      if (status != ncclSuccess) {
        std::fprintf(stderr, "speedrun: warning: NCCL teardown failed: %s\n", ncclGetErrorString(status));
      }
      comm_ = nullptr;
    }
    if (collectives_done_) cudaEventDestroy(collectives_done_);
    if (compute_done_) cudaEventDestroy(compute_done_);
    if (stream_) cudaStreamDestroy(stream_);
    collectives_done_ = compute_done_ = nullptr;
    stream_ = nullptr;
  }

  Communicator& host_;
  cudaStream_t compute_ = nullptr;  // the backend's stream (not owned)
  cudaStream_t stream_ = nullptr;   // the collectives' stream
  cudaEvent_t compute_done_ = nullptr;
  cudaEvent_t collectives_done_ = nullptr;
  ncclComm_t comm_ = nullptr;
  bool pending_ = false;  // collectives queued since the last wait_all
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& host, Backend& backend) {
  return std::make_unique<NcclCommunicator>(host, backend);
}

bool nccl_compiled_in() { return true; }

}  // namespace speedrun
#endif  // SPEEDRUN_HAVE_NCCL
