// Deterministic float64 reductions (dot products, sums, Frobenius norms) and the fused
// softcap + cross-entropy head of the CUDA backend. Every sum uses a fixed partition and
// a fixed tree, so results are bit-identical run to run.
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/cuda_lanes.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kReduceThreads = 256;
// Partial sums per batch entry: enough blocks to fill an H100/H200 once (132 SMs x 8
// blocks of 256 threads) so that the loads in flight cover the memory latency. Sums run
// over groups of kGroup elements in an order set by n alone (16-byte loads where the
// operands' alignment allows them, one element at a time otherwise: the same sums).
constexpr int kMaxReduceBlocks = 1024;
constexpr int kGroup = 4;
constexpr int kHeadThreads = 1024;     // softcap cross-entropy: one block per row

// Blocks for a reduction over n elements in groups of kGroup.
int reduce_blocks(size_t n) {
  const size_t wanted = (n / kGroup + kReduceThreads - 1) / kReduceThreads;
  return static_cast<int>(std::clamp<size_t>(wanted, 1, kMaxReduceBlocks));
}

// acc += sum over the lanes of a (times b's lanes g when b is not null), in float64; b as
// float32 or bf16 codes (widened exactly: the same sums as over the widening).
template <int W, bool kWide, typename B>
__device__ __forceinline__ void accumulate_dot(double& acc, const Lanes<W>& a, const B* b, size_t g) {
  if (b) {
    const Lanes<W> y = load_lanes<W, kWide>(b, g);
#pragma unroll
    for (int k = 0; k < W; ++k) acc += static_cast<double>(a[k]) * static_cast<double>(y[k]);
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) acc += static_cast<double>(a[k]);
  }
}

// partials[b, block] = sum over this block's grid-stride share of a[b] * bb[b] (or a[b]), in
// float64, kGroup elements at a time (grid.y = batch); b as float32 or bf16 codes. Traffic:
// 4 (8 with b, 6 with b as codes) batch n bytes.
template <bool kWide, typename B>
__global__ void dot_partials_kernel(double* partials, const float* a, const B* b, size_t n, size_t stride) {
  __shared__ double shared[kBlockReduceSlots];
  const size_t offset = blockIdx.y * stride;
  a += offset;
  if (b) b += offset;
  double acc = 0.0;
  const size_t groups = n / kGroup;
  SPEEDRUN_GRID_STRIDE(g, groups) accumulate_dot<kGroup, kWide>(acc, load_lanes<kGroup, kWide>(a, g), b, g);
  const size_t i = groups * kGroup + static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) accumulate_dot<1, false>(acc, load_lanes<1>(a, i), b, i);
  acc = block_reduce(acc, SumOp{}, 0.0, shared);
  if (threadIdx.x == 0) partials[static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
}

// mix_backward in one pass: dcoef's two dot products (dout.a, and dout.b when b) into
// partials [2, blocks], and db (+)= coef[1] dout (when db), da (+)= coef[0] dout with its
// bf16 codes (when da_codes); a and b as float32 or bf16 codes (the bf16 stream's mix). da
// may alias dout (each element is read before it is written). Traffic: 12 n bytes, +4 per
// gradient accumulated, +8 with b and db, +2 with codes; -2 per operand a, b given as codes.
template <typename In>
struct MixBackward {
  float* da;
  uint16_t* da_codes;
  bool accumulate_da;
  float* db;
  bool accumulate_db;
  const float* dout;
  const In* a;
  const In* b;
  const float* coef;

  template <int W, bool kWide>
  __device__ void at(size_t g, float c0, float c1, double& dot_a, double& dot_b) const {
    const Lanes<W> d = load_lanes<W, kWide>(dout, g);
    accumulate_dot<W, kWide>(dot_a, d, a, g);
    if (b) accumulate_dot<W, kWide>(dot_b, d, b, g);
    if (db && accumulate_db) {
      Lanes<W> old = load_lanes<W, kWide>(db, g);
#pragma unroll
      for (int k = 0; k < W; ++k) old[k] += c1 * d[k];
      store_lanes<W, kWide>(db, g, old);
    } else if (db) {  // its first contribution: written, no zeroed buffer read
      Lanes<W> first;
#pragma unroll
      for (int k = 0; k < W; ++k) first[k] = c1 * d[k];
      store_lanes<W, kWide>(db, g, first);
    }
    Lanes<W> result;
#pragma unroll
    for (int k = 0; k < W; ++k) result[k] = c0 * d[k];
    if (accumulate_da) {
      const Lanes<W> old = load_lanes<W, kWide>(da, g);
#pragma unroll
      for (int k = 0; k < W; ++k) result[k] = old[k] + result[k];
    }
    if (da) store_lanes<W, kWide>(da, g, result);
    store_code_lanes<W, kWide>(da_codes, g, result);
  }
  bool vectorisable() const { return aligned_16({da, da_codes, db, dout, a, b}); }
};

template <bool kWide, typename In>
__global__ void mix_backward_kernel(MixBackward<In> op, size_t n, double* partials) {
  __shared__ double shared[kBlockReduceSlots];
  const float c0 = op.coef[0];
  const float c1 = op.b ? op.coef[1] : 0.f;
  double dot_a = 0.0, dot_b = 0.0;
  const size_t groups = n / kGroup;
  SPEEDRUN_GRID_STRIDE(g, groups) op.template at<kGroup, kWide>(g, c0, c1, dot_a, dot_b);
  const size_t i = groups * kGroup + static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) op.template at<1, false>(i, c0, c1, dot_a, dot_b);
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

// A running softmax denominator: sum = sum of exp(y - max) over the values seen, rescaled
// whenever the max grows (one exp per value, a second only then).
struct RunningExpSum {
  float max = -INFINITY, sum = 0.f;
  __device__ void add(float y) {
    if (y > max) {
      sum = sum * expf(max - y) + 1.f;
      max = y;
    } else {
      sum += expf(y - max);  // NaN (from a NaN logit) lands here and stays in the sum
    }
  }
};

// lanes <- grad_scale softmax(y) 4 s (1 - s), s = y / 2c, minus the one-hot term at the
// lane holding the target (target_lane, or -1), or y itself when grad_scale == 0.
template <int W>
__device__ __forceinline__ void softcap_gradient(Lanes<W>& z, const Softcap& cap, float lse, float grad_scale,
                                                 int target_lane, float target_term) {
#pragma unroll
  for (int k = 0; k < W; ++k) {
    const float y = cap(z[k]);
    if (grad_scale == 0.f) {
      z[k] = y;
      continue;
    }
    const float sig = y * cap.inv_two_c;
    const float g = grad_scale * expf(y - lse) * 4.f * sig * (1.f - sig);
    // Spelled out so that no instantiation fuses the product into the subtraction.
    z[k] = k == target_lane ? __fsub_rn(g, target_term) : g;
  }
}

// The e5m2 codes of scale times the lanes (nearest even, saturating: the FP8 head's cast of
// the loss gradient), at byte offset 4 g.. of `out`; one 4-byte store when kWide.
template <int W, bool kWide>
__device__ __forceinline__ void store_e5m2_lanes(uint8_t* out, size_t g, const Lanes<W>& x, float scale) {
  uint8_t q[W];
#pragma unroll
  for (int k = 0; k < W; ++k) q[k] = __nv_cvt_float_to_fp8(x[k] * scale, __NV_SATFINITE, __NV_E5M2);
  if constexpr (W == 4 && kWide) {
    reinterpret_cast<uint32_t*>(out)[g] = static_cast<uint32_t>(q[0]) | static_cast<uint32_t>(q[1]) << 8 |
                                          static_cast<uint32_t>(q[2]) << 16 | static_cast<uint32_t>(q[3]) << 24;
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) out[g * W + k] = q[k];
  }
}

// Where the second pass puts a row's results: the floats (in place over float logits), or
// the e5m2 codes of e5m2_scale times them (the FP8 head's cast, fused).
struct SoftcapOutput {
  float* values = nullptr;
  uint8_t* e5m2 = nullptr;
  float e5m2_scale = 0.f;
};

// One block per row of V logits (float32, or bf16 codes), in groups of W (W divides V;
// 16-byte float / 8-byte code accesses when kWide): y = softcap(z); lse = max + log(sum
// exp(y - max)) from per-thread running sums (float), rescaled to the row's max and
// combined in float64; row_loss = lse - y[target]; then the row's output <- grad_scale
// (softmax(y) - onehot) 4 s (1 - s), s = y / 2c, or y when grad_scale == 0. The second pass
// recomputes y from z (the same expression: the same bits) rather than storing it.
// Traffic: 4 (2) V bytes read twice (the second often from L2), 4 (1) V written.
template <int W, bool kWide, class In>
__global__ void __launch_bounds__(kHeadThreads)
    softcap_cross_entropy_kernel(const In* logits, SoftcapOutput output, float* row_loss, const int32_t* targets,
                                 int V, float softcap, float grad_scale) {
  __shared__ float shared_max[kBlockReduceSlots];
  __shared__ double shared_sum[kBlockReduceSlots];
  const size_t row = static_cast<size_t>(blockIdx.x) * V;
  const In* z = logits + row;
  const Softcap cap{2.f * softcap, 1.f / (2.f * softcap), -2.f / softcap};
  const int groups = V / W;
  const int target = targets[blockIdx.x];
  // Read before the barriers below: the second pass may overwrite it.
  const float target_y = cap(load_lanes<1>(z, target)[0]);
  RunningExpSum running;
  for (int j = threadIdx.x; j < groups; j += blockDim.x) {
    const Lanes<W> lanes = load_lanes<W, kWide>(z, j);
#pragma unroll
    for (int k = 0; k < W; ++k) running.add(cap(lanes[k]));
  }
  const float row_max = block_reduce(running.max, MaxOp{}, -INFINITY, shared_max);
  const float mine = running.sum == 0.f ? 0.f : running.sum * expf(running.max - row_max);
  const double total = block_reduce(static_cast<double>(mine), SumOp{}, 0.0, shared_sum);
  const float lse = row_max + static_cast<float>(log(total));
  if (threadIdx.x == 0) row_loss[blockIdx.x] = lse - target_y;
  const float target_sig = target_y * cap.inv_two_c;
  const float target_term = grad_scale * 4.f * target_sig * (1.f - target_sig);
  for (int j = threadIdx.x; j < groups; j += blockDim.x) {
    Lanes<W> lanes = load_lanes<W, kWide>(z, j);
    softcap_gradient<W>(lanes, cap, lse, grad_scale, target / W == j ? target % W : -1, target_term);
    if (output.e5m2) {
      store_e5m2_lanes<W, kWide>(output.e5m2 + row, j, lanes, output.e5m2_scale);
    } else {
      store_lanes<W, kWide>(output.values + row, j, lanes);
    }
  }
}

// Groups of 4 where V allows (the summation order then depends on V alone), wide accesses
// where every pointer allows.
template <class In>
void launch_softcap_cross_entropy(cudaStream_t s, const In* logits, const SoftcapOutput& output, float* row_loss,
                                  const int32_t* targets, int rows, int V, float softcap, float grad_scale) {
  if (rows <= 0) return;
  const auto args = [&](auto kernel) {
    kernel<<<rows, kHeadThreads, 0, s>>>(logits, output, row_loss, targets, V, softcap, grad_scale);
  };
  if (V % 4 != 0) {
    args(softcap_cross_entropy_kernel<1, false, In>);
  } else if (aligned_16({logits, output.values, output.e5m2})) {
    args(softcap_cross_entropy_kernel<4, true, In>);
  } else {
    args(softcap_cross_entropy_kernel<4, false, In>);
  }
  check_launch("softcap_cross_entropy_kernel");
}

// dot_reduce over b as float32 or as bf16 codes: one kernel, instantiated for each.
template <typename B>
void launch_dot_reduce(cudaStream_t s, Scratch& scratch, const float* a, const B* b, size_t n, size_t stride,
                       int batch, DotResult result, void* out, float eps) {
  if (batch <= 0) return;
  if (batch > 65535) throw Error("dot_reduce: " + std::to_string(batch) + " batches exceed the CUDA grid (65535)");
  const bool wide = (batch == 1 || stride % 4 == 0) && aligned_16({a, b});
  const int blocks = reduce_blocks(n);
  double* partials = static_cast<double*>(scratch.get(sizeof(double) * blocks * batch));
  if (wide) {
    dot_partials_kernel<true, B><<<dim3(blocks, batch), kReduceThreads, 0, s>>>(partials, a, b, n, stride);
  } else {
    dot_partials_kernel<false, B><<<dim3(blocks, batch), kReduceThreads, 0, s>>>(partials, a, b, n, stride);
  }
  check_launch("dot_partials_kernel");
  dot_finish_kernel<<<batch, kReduceThreads, 0, s>>>(out, partials, blocks, result, eps);
  check_launch("dot_finish_kernel");
}

// mix_backward with a and b as float32 or as bf16 codes: one kernel, instantiated for each.
template <typename In>
void launch_mix_backward(cudaStream_t s, Scratch& scratch, float* da, uint16_t* da_codes, bool accumulate_da,
                         float* db, bool accumulate_db, float* dcoef, const float* dout, const In* a, const In* b,
                         const float* coef, size_t n) {
  if (n == 0) return;
  if (!da && (!da_codes || accumulate_da)) throw Error("mix_backward: a null da needs da_codes, not accumulating");
  const MixBackward<In> op{da, da_codes, accumulate_da, db, accumulate_db, dout, a, b, coef};
  const int blocks = reduce_blocks(n);
  double* partials = static_cast<double*>(scratch.get(sizeof(double) * blocks * 2));
  if (op.vectorisable()) {
    mix_backward_kernel<true, In><<<blocks, kReduceThreads, 0, s>>>(op, n, partials);
  } else {
    mix_backward_kernel<false, In><<<blocks, kReduceThreads, 0, s>>>(op, n, partials);
  }
  check_launch("mix_backward_kernel");
  dot_finish_kernel<<<b ? 2 : 1, kReduceThreads, 0, s>>>(dcoef, partials, blocks, DotResult::kAccumulateFloat, 0.f);
  check_launch("dot_finish_kernel");
}

}  // namespace

void dot_reduce(cudaStream_t s, Scratch& scratch, const float* a, const float* b, size_t n, size_t stride, int batch,
                DotResult result, void* out, float eps) {
  launch_dot_reduce(s, scratch, a, b, n, stride, batch, result, out, eps);
}

void dot_reduce_bf16(cudaStream_t s, Scratch& scratch, const float* a, const uint16_t* b, size_t n, size_t stride,
                     int batch, DotResult result, void* out, float eps) {
  launch_dot_reduce(s, scratch, a, b, n, stride, batch, result, out, eps);
}

void mix_backward(cudaStream_t s, Scratch& scratch, float* da, uint16_t* da_codes, bool accumulate_da, float* db,
                  bool accumulate_db, float* dcoef, const float* dout, const float* a, const float* b,
                  const float* coef, size_t n) {
  launch_mix_backward(s, scratch, da, da_codes, accumulate_da, db, accumulate_db, dcoef, dout, a, b, coef, n);
}

void mix_backward_bf16(cudaStream_t s, Scratch& scratch, float* da, uint16_t* da_codes, bool accumulate_da, float* db,
                       bool accumulate_db, float* dcoef, const float* dout, const uint16_t* a, const uint16_t* b,
                       const float* coef, size_t n) {
  launch_mix_backward(s, scratch, da, da_codes, accumulate_da, db, accumulate_db, dcoef, dout, a, b, coef, n);
}

void softcap_cross_entropy(cudaStream_t s, float* logits, float* row_loss, const int32_t* targets, int rows, int V,
                           float softcap, float grad_scale) {
  launch_softcap_cross_entropy(s, logits, SoftcapOutput{logits}, row_loss, targets, rows, V, softcap, grad_scale);
}

void softcap_cross_entropy_to_e5m2(cudaStream_t s, uint8_t* gradient, float e5m2_scale, float* row_loss,
                                   const uint16_t* logits, const int32_t* targets, int rows, int V, float softcap,
                                   float grad_scale) {
  launch_softcap_cross_entropy(s, logits, SoftcapOutput{nullptr, gradient, e5m2_scale}, row_loss, targets, rows, V,
                               softcap, grad_scale);
}

}  // namespace speedrun::cuda
