// cuBLASLt's candidate algorithms for one product of the training step, each timed alone on
// the GPU: whether the heuristic's first choice, the one the CUDA backend runs (cuda_gemm.cu),
// is also the fastest, and by how much not. What `speedrun bench --sweep-matmuls` prints.
#pragma once

#include <string>
#include <vector>

#include "backends/product_shape.h"

namespace speedrun {

struct AlgorithmTiming {
  int rank = 0;        // in the heuristic's order; 0 is the backend's choice
  double ms = -1;      // median of the timed runs; -1 when cuBLASLt turned it down at run time
  std::string config;  // cuBLASLt's algorithm id, tile and stages ids, split-K, reduction, swizzle, cluster
};

// Up to `candidates` of cuBLASLt's heuristic choices for `shape` with bf16 inputs (the
// backend's --matmul bf16 products) on CUDA device `device`, in the heuristic's order, each
// run `repeats` times on dense random operands aligned as the backend's are. Empty when the
// heuristic offers none. Throws speedrun::Error in a build without CUDA.
std::vector<AlgorithmTiming> sweep_product_algorithms(int device, const ProductShape& shape, int candidates,
                                                      int repeats);

}  // namespace speedrun
