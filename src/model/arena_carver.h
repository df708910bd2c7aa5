// Hands out consecutive pieces of one float allocation. Without an allocation it only
// counts, so the same code first sizes an arena and then carves it: the model's training
// buffers and its forward-only buffers are carved from one arena, since no pass needs both.
#pragma once

#include <cstddef>
#include <cstdint>

namespace speedrun {

class ArenaCarver {
 public:
  // 64 floats: 256-byte alignment for every piece, which vectorised and tensor-core
  // kernels expect of their operands.
  static constexpr size_t kAlignFloats = 64;

  explicit ArenaCarver(float* base = nullptr) : base_(base) {}

  // n floats; nullptr while counting.
  float* take(size_t n) {
    float* piece = base_ ? base_ + used_ : nullptr;
    used_ += (n + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
    return piece;
  }
  // n 16-bit codes (bf16 activations) in the space of n/2 floats; nullptr while counting.
  uint16_t* take_codes(size_t n) { return reinterpret_cast<uint16_t*>(take((n + 1) / 2)); }
  size_t used() const { return used_; }  // floats, padding included

 private:
  float* base_;
  size_t used_ = 0;
};

}  // namespace speedrun
