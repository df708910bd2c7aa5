// The flash attention API of a build without the CUDA backend: every call is an Error.
#ifndef SPEEDRUN_HAVE_CUDA
#include "backends/flash_attention.h"

namespace speedrun {
namespace {

[[noreturn]] void no_cuda(const char* call) {
  throw Error(std::string(call) +
              ": this build has no CUDA backend (configure with nvcc available, or -DSPEEDRUN_CUDA=ON)");
}

}  // namespace

size_t flash_attention_workspace_bytes(const FlashAttentionShape&) { no_cuda("flash_attention_workspace_bytes"); }

void flash_attention_forward(void*, void*, uint16_t*, float*, const uint16_t*, const uint16_t*, const uint16_t*,
                             const int32_t*, const FlashAttentionShape&) {
  no_cuda("flash_attention_forward");
}

void flash_attention_backward(void*, void*, float*, float*, float*, const uint16_t*, const uint16_t*, const float*,
                              const uint16_t*, const uint16_t*, const uint16_t*, const int32_t*,
                              const FlashAttentionShape&) {
  no_cuda("flash_attention_backward");
}

void flash_attention_document_bounds(void*, void*, int32_t*, int32_t*, const int32_t*, int) {
  no_cuda("flash_attention_document_bounds");
}

void run_flash_attention_benchmark(FlashAttentionBenchmark&) { no_cuda("run_flash_attention_benchmark"); }

}  // namespace speedrun
#endif
