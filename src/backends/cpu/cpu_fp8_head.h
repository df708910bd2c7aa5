// The CPU backend's FP8 lm_head (cpu_fp8_head.cpp): SPEC §6's casts emulated exactly, with
// the quantised weight kept between calls in an Fp8Head.
#pragma once

#include <memory>

namespace speedrun::cpu {

class Fp8Head;
struct Fp8HeadDeleter {
  void operator()(Fp8Head* head) const;
};
std::unique_ptr<Fp8Head, Fp8HeadDeleter> make_fp8_head();
void fp8_head_forward(Fp8Head& head, float* logits, const float* x, const float* W, int rows, int V, int d,
                      bool requantize_weight);
void fp8_head_backward(Fp8Head& head, float* dx, float* dW, const float* dlogits, const float* x, const float* W,
                       int rows, int V, int d, float output_scale);

}  // namespace speedrun::cpu
