// cuBLASLt's candidate algorithms for one product of the training step, each timed alone on
// the GPU: whether the heuristic's first choice, the one the CUDA backend runs (cuda_gemm.cu),
// is also the fastest, and by how much not. What `speedrun bench --sweep-matmuls` prints, and
// what the backend chose where --autotune-matmuls let it choose by timing.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "backends/product_shape.h"

namespace speedrun {

struct AlgorithmTiming {
  int rank = 0;        // in the heuristic's order; 0 is the backend's choice
  double ms = -1;      // median of the timed runs; -1 when cuBLASLt turned it down at run time
  std::string config;  // cuBLASLt's algorithm id, tile and stages ids, split-K, reduction, swizzle, cluster
};

// One product plan of the CUDA backend whose algorithm was chosen by timing its candidates
// (BackendOptions::autotune_matmuls), on random operands laid out as the plan's.
struct MatmulTuning {
  std::string shape;         // product_shape_name of the plan's product
  int timed = 0;             // candidates timed, in the heuristic's order (0: none could be: see config)
  int chosen_rank = 0;       // the one the plan runs: the fastest that ran
  double heuristic_ms = -1;  // rank 0's median; -1 when cuBLASLt turned it down at run time
  double chosen_ms = -1;
  std::string config;        // the chosen algorithm's configuration (AlgorithmTiming::config), or why none was timed
};

// "matmul plans tuned by timing: N, of which M run another algorithm than the heuristic's
// first": what train and bench say of a run's tunings.
inline std::string summarize_tunings(const std::vector<MatmulTuning>& tunings) {
  const auto changed =
      std::count_if(tunings.begin(), tunings.end(), [](const MatmulTuning& t) { return t.chosen_rank != 0; });
  return "matmul plans tuned by timing: " + std::to_string(tunings.size()) + ", of which " + std::to_string(changed) +
         " run another algorithm than the heuristic's first";
}

// Up to `candidates` of cuBLASLt's heuristic choices for `shape` with bf16 inputs (the
// backend's --matmul bf16 products) on CUDA device `device`, in the heuristic's order, each
// run `repeats` times on dense random operands aligned as the backend's are. Empty when the
// heuristic offers none. Throws speedrun::Error in a build without CUDA.
std::vector<AlgorithmTiming> sweep_product_algorithms(int device, const ProductShape& shape, int candidates,
                                                      int repeats);

}  // namespace speedrun
