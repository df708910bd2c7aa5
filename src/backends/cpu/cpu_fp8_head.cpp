// The FP8 lm_head of SPEC §6 on the CPU, by exact emulation: operands are rounded to
// e4m3/e5m2 with backends/low_precision.h and multiplied in float32 by OpenBLAS.
//
// Why this is exact up to summation order: FP8 values have at most 4 significant bits, so
// every product of two is exact in float32; OpenBLAS accumulates them in float32 (as the
// GPU's tensor cores do without fast accumulation) and the power-of-two inverse scales
// are applied to the float32 sum, as cuBLASLt's scale factors are. Outputs the reference
// produced in bf16 (logits, dx) are then rounded to bf16.

#include <memory>
#include <string>
#include <vector>

#include "backends/cpu/cpu_fp8_head.h"
#include "backends/cpu/cpu_gemm.h"
#include "backends/low_precision.h"
#include "util/error.h"

namespace speedrun::cpu {

// SPEC §6's scales: x by 2, W by 2^9 (both e4m3), the output gradient by 2^19 (e5m2).
constexpr float kFp8XScale = 2.f;
constexpr float kFp8WScale = 512.f;
constexpr float kFp8GradScale = 524288.f;

// e4m3(2^9 W), kept between calls so that a step's chunks quantise the weight once.
class Fp8Head {
 public:
  const float* weight(const float* W, int V, int d, bool requantize) {
    const size_t n = static_cast<size_t>(V) * d;
    if (requantize || W != source_ || V != V_ || d != d_) {
      weight_.resize(n);
      lowp::scaled_round_to_fp8(weight_.data(), W, n, kFp8WScale, lowp::Fp8Format::kE4M3);
      source_ = W;
      V_ = V;
      d_ = d;
    }
    return weight_.data();
  }

 private:
  std::vector<float> weight_;
  const float* source_ = nullptr;
  int V_ = 0, d_ = 0;
};

void Fp8HeadDeleter::operator()(Fp8Head* head) const { delete head; }

std::unique_ptr<Fp8Head, Fp8HeadDeleter> make_fp8_head() {
  return std::unique_ptr<Fp8Head, Fp8HeadDeleter>(new Fp8Head());
}

namespace {

void require_shape(int rows, int V, int d, const char* op) {
  if (rows < 0 || V <= 0 || d <= 0) {
    throw Error(std::string(op) + ": invalid shape rows=" + std::to_string(rows) + " V=" + std::to_string(V) +
                " d=" + std::to_string(d));
  }
}

std::vector<float> quantized_input(const float* x, int rows, int d) {
  std::vector<float> x8(static_cast<size_t>(rows) * d);
  lowp::scaled_round_to_fp8(x8.data(), x, x8.size(), kFp8XScale, lowp::Fp8Format::kE4M3);
  return x8;
}

}  // namespace

void fp8_head_forward(Fp8Head& head, float* logits, const float* x, const float* W, int rows, int V, int d,
                      bool requantize_weight) {
  require_shape(rows, V, d, "fp8_head_forward");
  const float* w8 = head.weight(W, V, d, requantize_weight);
  if (rows == 0) return;
  const std::vector<float> x8 = quantized_input(x, rows, d);
  sgemm(false, true, rows, V, d, 1.f / (kFp8XScale * kFp8WScale), x8.data(), d, w8, d, 0.f, logits, V);
  lowp::round_to_bf16_inplace(logits, static_cast<size_t>(rows) * V);
}

void fp8_head_backward(Fp8Head& head, float* dx, float* dW, const float* dlogits, const float* x, const float* W,
                       int rows, int V, int d, float output_scale) {
  require_shape(rows, V, d, "fp8_head_backward");
  if (rows == 0) return;
  const float* w8 = head.weight(W, V, d, false);
  std::vector<float> g8(static_cast<size_t>(rows) * V);
  lowp::scaled_round_to_fp8(g8.data(), dlogits, g8.size(), kFp8GradScale, lowp::Fp8Format::kE5M2);
  sgemm(false, false, rows, d, V, output_scale / (kFp8GradScale * kFp8WScale), g8.data(), V, w8, d, 0.f, dx, d);
  lowp::round_to_bf16_inplace(dx, static_cast<size_t>(rows) * d);
  const std::vector<float> x8 = quantized_input(x, rows, d);
  sgemm(true, false, V, d, rows, output_scale / (kFp8GradScale * kFp8XScale), g8.data(), V, x8.data(), d, 1.f, dW,
        d);
}

}  // namespace speedrun::cpu
