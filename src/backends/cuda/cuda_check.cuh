// Error checking for the CUDA backend: every CUDA runtime and cuBLASLt call goes through
// these, and a failure becomes a speedrun::Error naming the call and the library's reason.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "util/error.h"

namespace speedrun::cuda {

inline void check_cuda(cudaError_t status, const char* call) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so that later launch checks do not report it again
  throw Error(std::string("CUDA call ") + call + " failed: " + cudaGetErrorName(status) + ": " +
              cudaGetErrorString(status));
}

inline void check_cublas(cublasStatus_t status, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw Error(std::string("cuBLASLt call ") + call + " failed: " + cublasLtGetStatusName(status) + ": " +
              cublasLtGetStatusString(status));
}

// After a kernel launch: a bad configuration (grid, shared memory) shows up here.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

}  // namespace speedrun::cuda

#define SPEEDRUN_CUDA_CHECK(call) ::speedrun::cuda::check_cuda((call), #call)
#define SPEEDRUN_CUBLAS_CHECK(call) ::speedrun::cuda::check_cublas((call), #call)
