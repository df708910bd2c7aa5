// A Backend decorator that times every compute and transfer op (synchronising the wrapped
// backend around each call; fills, operand holds and allocations pass through untimed) and
// counts matmul FLOPs and the memory-traffic floor of memory-bound ops: what `speedrun
// bench` reports per op.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "backends/backend.h"
#include "backends/product_shape.h"

namespace speedrun {

// The profiled name of the FP8 lm_head's ops (its products, casts and fused loss, timed as one).
inline constexpr const char* kFp8HeadOp = "matmul (FP8 head)";

struct OpStats {
  long long calls = 0;
  double seconds = 0;
  double flops = 0;  // counted for the products (gemm, gemm_to_bf16, gemm_batched, the FP8 head)
  double bytes = 0;  // the floor of memory traffic, counted for memory-bound ops
};

// While *enabled is false (when given) calls pass straight through, untimed and without
// the synchronisations: how `bench` measures the real step before profiling one. `products`
// (when given) also gets every gemm, gemm_to_bf16 and gemm_batched call by shape
// (product_shape_name): which products of a step take the matmuls' time.
std::unique_ptr<Backend> make_profiling_backend(Backend& inner, std::map<std::string, OpStats>& stats,
                                                const bool* enabled = nullptr,
                                                std::map<std::string, OpStats>* products = nullptr);

}  // namespace speedrun
