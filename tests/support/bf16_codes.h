// Host vectors of bf16 codes and their float32 values, for tests of ops that read or write
// codes (low_precision.h's nearest-even rounding).
#pragma once

#include <cstdint>
#include <vector>

#include "backends/low_precision.h"

namespace speedrun::testing {

inline std::vector<uint16_t> encoded(const std::vector<float>& values) {
  std::vector<uint16_t> codes(values.size());
  for (size_t i = 0; i < values.size(); ++i) codes[i] = lowp::encode_bf16(values[i]);
  return codes;
}

inline std::vector<float> widened(const std::vector<uint16_t>& codes) {
  std::vector<float> values(codes.size());
  for (size_t i = 0; i < codes.size(); ++i) values[i] = lowp::decode_bf16(codes[i]);
  return values;
}

}  // namespace speedrun::testing
