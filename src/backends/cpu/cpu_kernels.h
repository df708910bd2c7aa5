// Building blocks shared by the CPU backend's source files.
#pragma once

#include <cstddef>
#include <cstdint>

#include "backends/backend.h"

namespace speedrun::cpu {

// Dot product summed in fixed-size chunks (float64), then the chunks in order: the
// result does not depend on the number of threads.
double deterministic_dot(const float* a, const float* b, size_t n);
double deterministic_sum(const float* x, size_t n);

// One row of the lm_head's logits z [V], in place: y = 2c sigmoid(z / (c/2)); returns the
// row's loss logsumexp(y) - y[target]; when grad_scale != 0, z becomes grad_scale *
// dloss/dz. e: V floats of scratch.
float softcap_cross_entropy_row(float* z, float* e, int target, int V, float softcap, float grad_scale);

void attention_forward(float* y, float* lse, const float* q, const float* k, const float* v, const int32_t* doc,
                       const AttentionShape& shape);
void attention_backward(float* dq, float* dk, float* dv, const float* dy, const float* y, const float* lse,
                        const float* q, const float* k, const float* v, const int32_t* doc,
                        const AttentionShape& shape);

}  // namespace speedrun::cpu
