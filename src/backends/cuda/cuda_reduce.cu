// Deterministic float64 reductions (dot products, sums, Frobenius norms) and the fused
// softcap + cross-entropy head of the CUDA backend. Every sum uses a fixed partition and
// a fixed tree, so results are bit-identical run to run.
#include <algorithm>
#include <cmath>
#include <string>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/cuda_lanes.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kReduceThreads = 256;
// Partial sums per batch entry: enough blocks to fill an H100/H200 once (132 SMs x 8
// blocks of 256 threads) so that the loads in flight cover the memory latency; the order
// of the sums depends only on n and the vector width.
constexpr int kMaxReduceBlocks = 1024;
constexpr int kHeadThreads = 1024;     // softcap cross-entropy: one block per row

// Blocks for a reduction over n elements read W at a time.
int reduce_blocks(size_t n, int W) {
  const size_t wanted = (n / W + kReduceThreads - 1) / kReduceThreads;
  return static_cast<int>(std::clamp<size_t>(wanted, 1, kMaxReduceBlocks));
}

// acc += sum over the lanes of a (times b when b is not null), in float64.
template <int W>
__device__ __forceinline__ void accumulate_dot(double& acc, const Lanes<W>& a, const float* b, size_t g) {
  if (b) {
    const Lanes<W> y = load_lanes<W>(b, g);
#pragma unroll
    for (int k = 0; k < W; ++k) acc += static_cast<double>(a[k]) * static_cast<double>(y[k]);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) acc += static_cast<double>(a[k]);
  }
}

// partials[b, block] = sum over this block's grid-stride share of a[b] * bb[b] (or a[b]), in
// float64, W elements per access (grid.y = batch). Traffic: 4 (8 with b) batch n bytes.
template <int W>
__global__ void dot_partials_kernel(double* partials, const float* a, const float* b, size_t n, size_t stride) {
  __shared__ double shared[kBlockReduceSlots];
  const size_t offset = blockIdx.y * stride;
  a += offset;
  if (b) b += offset;
  double acc = 0.0;
  const size_t groups = n / W;
  SPEEDRUN_GRID_STRIDE(g, groups) accumulate_dot<W>(acc, load_lanes<W>(a, g), b, g);
  if constexpr (W > 1) {
    const size_t i = groups * W + static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) accumulate_dot<1>(acc, load_lanes<1>(a, i), b, i);
  }
  acc = block_reduce(acc, SumOp{}, 0.0, shared);
  if (threadIdx.x == 0) partials[static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
}

// mix_backward in one pass: dcoef's two dot products (dout.a, and dout.b when b) into
// partials [2, blocks], and db += coef[1] dout (when db), da (+)= coef[0] dout with its bf16
// codes (when da_codes). da may alias dout (each element is read before it is written).
// Traffic: 12 n bytes, +4 accumulating, +12 with b and db, +2 with codes.
struct MixBackward {
  float* da;
  uint16_t* da_codes;
  bool accumulate_da;
  float* db;
  const float* dout;
  const float* a;
  const float* b;
  const float* coef;

  template <int W>
  __device__ void at(size_t g, float c0, float c1, double& dot_a, double& dot_b) const {
    const Lanes<W> d = load_lanes<W>(dout, g);
    accumulate_dot<W>(dot_a, d, a, g);
    if (b) accumulate_dot<W>(dot_b, d, b, g);
    if (db) {
      Lanes<W> old = load_lanes<W>(db, g);
#pragma unroll
      for (int k = 0; k < W; ++k) old[k] += c1 * d[k];
      store_lanes<W>(db, g, old);
    }
    Lanes<W> result;
#pragma unroll
    for (int k = 0; k < W; ++k) result[k] = c0 * d[k];
    if (accumulate_da) {
      const Lanes<W> old = load_lanes<W>(da, g);
#pragma unroll
      for (int k = 0; k < W; ++k) result[k] = old[k] + result[k];
    }
    store_lanes<W>(da, g, result);
    store_code_lanes<W>(da_codes, g, result);
  }
  bool vectorisable() const { return aligned_16({da, da_codes, db, dout, a, b}); }
};

template <int W>
__global__ void mix_backward_kernel(MixBackward op, size_t n, double* partials) {
  __shared__ double shared[kBlockReduceSlots];
  const float c0 = op.coef[0];
  const float c1 = op.b ? op.coef[1] : 0.f;
  double dot_a = 0.0, dot_b = 0.0;
  const size_t groups = n / W;
  SPEEDRUN_GRID_STRIDE(g, groups) op.at<W>(g, c0, c1, dot_a, dot_b);
  if constexpr (W > 1) {
    const size_t i = groups * W + static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) op.at<1>(i, c0, c1, dot_a, dot_b);
  }
  dot_a = block_reduce(dot_a, SumOp{}, 0.0, shared);
  dot_b = block_reduce(dot_b, SumOp{}, 0.0, shared);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = dot_a;
    partials[gridDim.x + blockIdx.x] = dot_b;
  }
}

// One block per batch entry: total = fixed-tree sum of its partials, then stored as asked.
__global__ void dot_finish_kernel(void* out, const double* partials, int blocks, DotResult result, float eps) {
  __shared__ double shared[kBlockReduceSlots];
  const double* p = partials + static_cast<size_t>(blockIdx.x) * blocks;
  double acc = 0.0;
  for (int i = threadIdx.x; i < blocks; i += blockDim.x) acc += p[i];
  const double total = block_reduce(acc, SumOp{}, 0.0, shared);
  if (threadIdx.x != 0) return;
  switch (result) {
    case DotResult::kAccumulateFloat: static_cast<float*>(out)[blockIdx.x] += static_cast<float>(total); break;
    case DotResult::kStoreDouble: static_cast<double*>(out)[blockIdx.x] = total; break;
    case DotResult::kInverseNorm:
      static_cast<float*>(out)[blockIdx.x] = static_cast<float>(1.0 / (sqrt(total) + static_cast<double>(eps)));
      break;
  }
}

// The softcap y = 2c / (1 + exp(-z / (c/2))) = 2c sigmoid(z / (c/2)), in (0, 2c).
struct Softcap {
  float two_c, inv_two_c, neg_inv_half_c;
  __device__ float operator()(float z) const { return two_c / (1.f + expf(z * neg_inv_half_c)); }
};

// sum += exp(y - 2c) over the lanes' softcapped values.
template <int W>
__device__ __forceinline__ void accumulate_exp(float& sum, const Lanes<W>& z, const Softcap& cap) {
#pragma unroll
  for (int k = 0; k < W; ++k) sum += expf(cap(z[k]) - cap.two_c);
}

// lanes <- grad_scale softmax(y) 4 s (1 - s), s = y / 2c (the target's one-hot term is
// subtracted afterwards), or y itself when grad_scale == 0.
template <int W>
__device__ __forceinline__ void softcap_gradient(Lanes<W>& z, const Softcap& cap, float lse, float grad_scale) {
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const float y = cap(z[k]);
    if (grad_scale == 0.f) {
      z[k] = y;
      continue;
    }
    const float sig = y * cap.inv_two_c;
    z[k] = grad_scale * expf(y - lse) * 4.f * sig * (1.f - sig);
  }
}

// One block per row of V logits, in place, W per access (W divides V): y = softcap(z) is
// bounded by 2c, so lse = 2c + log(sum exp(y - 2c)) needs no max pass (per-thread float
// sums combined in float64); row_loss = lse - y[target]; then z <- grad_scale (softmax(y) -
// onehot) 4 s (1 - s), s = y / 2c, or z <- y when grad_scale == 0. The second pass
// recomputes y from z (exactly: the same expression) rather than storing it. Traffic: 8 V
// bytes, plus a second read of the row (200 KB at V = 50304), often from L2.
template <int W>
__global__ void __launch_bounds__(kHeadThreads)
    softcap_cross_entropy_kernel(float* logits, float* row_loss, const int32_t* targets, int V, float softcap,
                                 float grad_scale) {
  __shared__ double shared_sum[kBlockReduceSlots];
  float* z = logits + static_cast<size_t>(blockIdx.x) * V;
  const Softcap cap{2.f * softcap, 1.f / (2.f * softcap), -2.f / softcap};
  const int groups = V / W;
  const int target = targets[blockIdx.x];
  const float target_y = cap(z[target]);  // read before the barrier below: the second pass overwrites it
  float local_sum = 0.f;
  for (int j = threadIdx.x; j < groups; j += blockDim.x) accumulate_exp<W>(local_sum, load_lanes<W>(z, j), cap);
  const double total = block_reduce(static_cast<double>(local_sum), SumOp{}, 0.0, shared_sum);
  const float lse = cap.two_c + static_cast<float>(log(total));
  if (threadIdx.x == 0) row_loss[blockIdx.x] = lse - target_y;
  for (int j = threadIdx.x; j < groups; j += blockDim.x) {
    Lanes<W> lanes = load_lanes<W>(z, j);
    softcap_gradient<W>(lanes, cap, lse, grad_scale);
    if (grad_scale != 0.f && target / W == j) {
      const float target_sig = target_y * cap.inv_two_c;
      lanes[target % W] -= grad_scale * 4.f * target_sig * (1.f - target_sig);
    }
    store_lanes<W>(z, j, lanes);
  }
}

}  // namespace

void dot_reduce(cudaStream_t s, Scratch& scratch, const float* a, const float* b, size_t n, size_t stride, int batch,
                DotResult result, void* out, float eps) {
  if (batch <= 0) return;
  if (batch > 65535) throw Error("dot_reduce: " + std::to_string(batch) + " batches exceed the CUDA grid (65535)");
  const bool vectorised = stride % 4 == 0 && aligned_16({a, b});
  const int blocks = reduce_blocks(n, vectorised ? 4 : 1);
  double* partials = static_cast<double*>(scratch.get(sizeof(double) * blocks * batch));
  if (vectorised) {
    dot_partials_kernel<4><<<dim3(blocks, batch), kReduceThreads, 0, s>>>(partials, a, b, n, stride);
  } else {
    dot_partials_kernel<1><<<dim3(blocks, batch), kReduceThreads, 0, s>>>(partials, a, b, n, stride);
  }
  check_launch("dot_partials_kernel");
  dot_finish_kernel<<<batch, kReduceThreads, 0, s>>>(out, partials, blocks, result, eps);
  check_launch("dot_finish_kernel");
}

void mix_backward(cudaStream_t s, Scratch& scratch, float* da, uint16_t* da_codes, bool accumulate_da, float* db,
                  float* dcoef, const float* dout, const float* a, const float* b, const float* coef, size_t n) {
  if (n == 0) return;
  const MixBackward op{da, da_codes, accumulate_da, db, dout, a, b, coef};
  const bool vectorised = op.vectorisable();
  const int blocks = reduce_blocks(n, vectorised ? 4 : 1);
  double* partials = static_cast<double*>(scratch.get(sizeof(double) * blocks * 2));
  if (vectorised) {
    mix_backward_kernel<4><<<blocks, kReduceThreads, 0, s>>>(op, n, partials);
  } else {
    mix_backward_kernel<1><<<blocks, kReduceThreads, 0, s>>>(op, n, partials);
  }
  check_launch("mix_backward_kernel");
  dot_finish_kernel<<<b ? 2 : 1, kReduceThreads, 0, s>>>(dcoef, partials, blocks, DotResult::kAccumulateFloat, 0.f);
  check_launch("dot_finish_kernel");
}

void softcap_cross_entropy(cudaStream_t s, float* logits, float* row_loss, const int32_t* targets, int rows, int V,
                           float softcap, float grad_scale) {
  if (rows <= 0) return;
  if (V % 4 == 0 && aligned_16({logits})) {
    softcap_cross_entropy_kernel<4><<<rows, kHeadThreads, 0, s>>>(logits, row_loss, targets, V, softcap, grad_scale);
  } else {
    softcap_cross_entropy_kernel<1><<<rows, kHeadThreads, 0, s>>>(logits, row_loss, targets, V, softcap, grad_scale);
  }
  check_launch("softcap_cross_entropy_kernel");
}

}  // namespace speedrun::cuda
