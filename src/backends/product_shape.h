// The shape of one matrix product of the training step, as `speedrun bench` names it: the
// key of its per-shape profile and of its cuBLASLt algorithm sweep (matmul_sweep.h).
#pragma once

#include <string>

namespace speedrun {

// Backend::gemm's row-major C = op(A) op(B) (+ C), op(A) [M, K] and op(B) [K, N], dense.
struct ProductShape {
  bool transpose_a = false;
  bool transpose_b = false;
  int M = 0, N = 0, K = 0;
  bool bf16_output = false;  // gemm_to_bf16's codes, else float32
  bool adds_to_c = false;    // beta != 0, or gemm_to_bf16's addend
  int batch = 1;             // gemm_batched's matrices
  // Spelt out, not defaulted: the CUDA sources that include this compile as C++17.
  bool operator==(const ProductShape& o) const {
    return transpose_a == o.transpose_a && transpose_b == o.transpose_b && M == o.M && N == o.N && K == o.K &&
           bf16_output == o.bf16_output && adds_to_c == o.adds_to_c && batch == o.batch;
  }
};

// BLAS-style transposes of A and B, M x N x K, the output's type, "+C" when it adds to C and
// "x batch" for batched products: "NT 49152x2304x768 bf16", "TN 768x3072x49152 f32 +C",
// "NN 768x768x768 f32 +C x3".
std::string product_shape_name(const ProductShape& shape);
// The inverse; throws speedrun::Error naming the text when it is no such name.
ProductShape parse_product_shape(const std::string& name);

}  // namespace speedrun
