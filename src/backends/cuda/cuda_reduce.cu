// Deterministic float64 reductions (dot products, sums, Frobenius norms) and the fused
// softcap + cross-entropy head of the CUDA backend. Every sum uses a fixed partition and
// a fixed tree, so results are bit-identical run to run.
#include <cmath>

#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kReduceThreads = 256;
constexpr int kMaxReduceBlocks = 256;  // partial sums per batch; the order depends on n only
constexpr int kHeadThreads = 1024;     // softcap cross-entropy: one block per row

// partials[b, block] = sum over this block's grid-stride share of a[b] * bb[b] (or a[b]), in
// float64 (grid.y = batch). Traffic: 4 (8 with b) batch n bytes.
__global__ void dot_partials_kernel(double* partials, const float* a, const float* b, size_t n, size_t stride) {
  __shared__ double shared[kBlockReduceSlots];
  const size_t offset = blockIdx.y * stride;
  double acc = 0.0;
  SPEEDRUN_GRID_STRIDE(i, n) {
    acc += b ? static_cast<double>(a[offset + i]) * static_cast<double>(b[offset + i])
             : static_cast<double>(a[offset + i]);
  }
  acc = block_reduce(acc, SumOp{}, 0.0, shared);
  if (threadIdx.x == 0) partials[static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
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

// One block per row of V logits, in place (the CPU backend's formula and order of steps):
// y = 2c / (1 + exp(-z / (c/2))); lse = max + log(sum exp(y - max)) with per-thread float
// sums combined in float64; row_loss = lse - y[target]; then, if grad_scale != 0,
// z <- grad_scale (softmax(y) - onehot) 4 s (1 - s) with s = y / 2c.
// Traffic: 4 V bytes read + 4 V written without the gradient, 8 V more with it.
__global__ void __launch_bounds__(kHeadThreads) softcap_cross_entropy_kernel(float* logits, float* row_loss, const int32_t* targets, int V,
                                             float softcap, float grad_scale) {
  __shared__ float shared_max[kBlockReduceSlots];
  __shared__ double shared_sum[kBlockReduceSlots];
  float* z = logits + static_cast<size_t>(blockIdx.x) * V;
  const float two_c = 2.f * softcap;
  const float inv_two_c = 1.f / two_c;
  const float neg_inv_half_c = -2.f / softcap;
  float local_max = -INFINITY;
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    const float y = two_c / (1.f + expf(z[j] * neg_inv_half_c));
    z[j] = y;
    local_max = local_max > y ? local_max : y;
  }
  const float max_y = block_reduce(local_max, MaxOp{}, -INFINITY, shared_max);
  float local_sum = 0.f;
  for (int j = threadIdx.x; j < V; j += blockDim.x) local_sum += expf(z[j] - max_y);
  const double total = block_reduce(static_cast<double>(local_sum), SumOp{}, 0.0, shared_sum);
  const float lse = max_y + static_cast<float>(log(total));
  const int target = targets[blockIdx.x];
  const float target_y = z[target];  // written in the first pass; the reductions' barriers ordered it
  __syncthreads();                   // every thread has read z[target] before the gradient overwrites it
  if (threadIdx.x == 0) row_loss[blockIdx.x] = lse - target_y;
  if (grad_scale == 0.f) return;
  const float target_sig = target_y * inv_two_c;
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    const float sig = z[j] * inv_two_c;
    float g = grad_scale * expf(z[j] - lse) * 4.f * sig * (1.f - sig);
    if (j == target) g -= grad_scale * 4.f * target_sig * (1.f - target_sig);
    z[j] = g;
  }
}

}  // namespace

void dot_reduce(cudaStream_t s, Scratch& scratch, const float* a, const float* b, size_t n, size_t stride, int batch,
                DotResult result, void* out, float eps) {
  if (batch <= 0) return;
  if (batch > 65535) throw Error("dot_reduce: " + std::to_string(batch) + " batches exceed the CUDA grid (65535)");
  const size_t wanted = (n + kReduceThreads - 1) / kReduceThreads;
  const int blocks = static_cast<int>(std::clamp<size_t>(wanted, 1, kMaxReduceBlocks));
  double* partials = static_cast<double*>(scratch.get(sizeof(double) * blocks * batch));
  dot_partials_kernel<<<dim3(blocks, batch), kReduceThreads, 0, s>>>(partials, a, b, n, stride);
  check_launch("dot_partials_kernel");
  dot_finish_kernel<<<batch, kReduceThreads, 0, s>>>(out, partials, blocks, result, eps);
  check_launch("dot_finish_kernel");
}

void softcap_cross_entropy(cudaStream_t s, float* logits, float* row_loss, const int32_t* targets, int rows, int V,
                           float softcap, float grad_scale) {
  if (rows <= 0) return;
  softcap_cross_entropy_kernel<<<rows, kHeadThreads, 0, s>>>(logits, row_loss, targets, V, softcap, grad_scale);
  check_launch("softcap_cross_entropy_kernel");
}

}  // namespace speedrun::cuda
