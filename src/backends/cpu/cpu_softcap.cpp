// The lm_head's softcap and cross-entropy, forward and backward fused, one row at a time:
// two exps per logit (the sigmoid's and the softmax's) over the padded vocabulary.
#include <algorithm>
#include <cmath>

#include "backends/cpu/cpu_kernels.h"
#include "backends/cpu/vector_math.h"

namespace speedrun::cpu {

SPEEDRUN_AVX512_CLONES
float softcap_cross_entropy_row(float* z, float* e, int target, int V, float softcap, float grad_scale) {
  const float two_c = 2.f * softcap;
  const float inv_two_c = 1.f / two_c;
  const float neg_inv_half_c = -2.f / softcap;
  constexpr int kChunk = 256;  // exp sums in float per chunk, chunks summed in double
  float max_y = -INFINITY;
#pragma omp simd reduction(max : max_y)
  for (int j = 0; j < V; ++j) {
    const float y = two_c / (1.f + exp_approx(z[j] * neg_inv_half_c));  // y = 2c sigmoid(z / (c/2))
    z[j] = y;
    max_y = max_y > y ? max_y : y;  // not std::max: its reference result blocks vectorisation
  }
  double total = 0.0;
  for (int j0 = 0; j0 < V; j0 += kChunk) {
    const int j1 = std::min(V, j0 + kChunk);
    float chunk = 0.f;
#pragma omp simd reduction(+ : chunk)
    for (int j = j0; j < j1; ++j) {
      e[j] = exp_approx(z[j] - max_y);
      chunk += e[j];
    }
    total += chunk;
  }
  const float lse = max_y + static_cast<float>(std::log(total));
  const float loss = lse - z[target];
  if (grad_scale == 0.f) return loss;
  const float target_y = z[target];
  const float softmax_scale = static_cast<float>(grad_scale / total);
#pragma omp simd
  for (int j = 0; j < V; ++j) {
    const float sig = z[j] * inv_two_c;
    // dloss/dz = (softmax - onehot) * dy/dz, dy/dz = 2c s(1-s) / (c/2) = 4 s (1-s)
    z[j] = softmax_scale * e[j] * 4.f * sig * (1.f - sig);
  }
  const float target_sig = target_y * inv_two_c;
  z[target] -= grad_scale * 4.f * target_sig * (1.f - target_sig);
  return loss;
}

}  // namespace speedrun::cpu
