// The CUDA backend's elementwise, row-normalisation, rotary, optimiser and transpose
// kernels. Each mirrors the CPU backend's loop of the same name (same operation order
// where it matters); "traffic" is the floor of device-memory bytes a call must move.
#include <cuda_bf16.h>

#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {
namespace {

// out[i] = bf16(in[i]) (nearest even; NaN stays NaN), as raw bits. Traffic: 6 n bytes.
__global__ void to_bf16_kernel(uint16_t* out, const float* in, size_t n) {
  SPEEDRUN_GRID_STRIDE(i, n) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}

constexpr int kRowWarps = 8;  // rows per block in the warp-per-row kernels

// out[t, c] = table[tokens[t], c]. Traffic: 8 T dim bytes (+ 4 T for the ids).
__global__ void embedding_forward_kernel(float* out, const float* table, const int32_t* tokens, int T, int dim) {
  const size_t n = static_cast<size_t>(T) * dim;
  SPEEDRUN_GRID_STRIDE(i, n) {
    const size_t t = i / dim, c = i % dim;
    out[i] = table[static_cast<size_t>(tokens[t]) * dim + c];
  }
}

// An activation as float32, whether kept as float32 or as a bf16 code.
__device__ __forceinline__ float widened(float x) { return x; }
__device__ __forceinline__ float widened(uint16_t code) { return __bfloat162float(__ushort_as_bfloat16(code)); }

// codes[i] = bf16(value) when codes is not null: an op's out_codes, a held matmul operand.
__device__ __forceinline__ void store_code(uint16_t* codes, size_t i, float value) {
  if (codes) codes[i] = __bfloat16_as_ushort(__float2bfloat16_rn(value));
}

// An activation as it is kept: with `stored` (bf16 activations) rounded to bf16, its code
// stored at i and its widening returned; else the value itself.
__device__ __forceinline__ float kept_activation(uint16_t* stored, size_t i, float value) {
  if (!stored) return value;
  const __nv_bfloat16 rounded = __float2bfloat16_rn(value);
  stored[i] = __bfloat16_as_ushort(rounded);
  return __bfloat162float(rounded);
}

__device__ __forceinline__ float relu_squared(float h) {
  const float r = h > 0.f ? h : 0.f;
  return r * r;
}

// One warp per row: s = 1 / sqrt(mean(x^2) + eps), out = x s (kRound: bf16(x s) widened),
// rstd = s, and the codes of out into `stored` unless null. out may alias x (each lane
// rereads only its own elements). Traffic: 8 rows dim bytes (+2 with codes).
template <bool kRound>
__global__ void rmsnorm_forward_kernel(float* out, uint16_t* stored, float* rstd, const float* x, int rows, int dim,
                                       float eps) {
  const int row = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const size_t off = static_cast<size_t>(row) * dim;
  const float* xr = x + off;
  float* yr = out + off;
  float sum_sq = 0.f;
  for (int i = lane; i < dim; i += 32) sum_sq += xr[i] * xr[i];
  sum_sq = warp_reduce(sum_sq, SumOp{});
  const float s = 1.f / sqrtf(sum_sq / dim + eps);
  for (int i = lane; i < dim; i += 32) {
    const float y = xr[i] * s;
    if constexpr (kRound) {
      const __nv_bfloat16 rounded = __float2bfloat16_rn(y);
      if (stored) stored[off + i] = __bfloat16_as_ushort(rounded);
      yr[i] = __bfloat162float(rounded);
    } else {
      yr[i] = y;
      if (stored) stored[off + i] = __bfloat16_as_ushort(__float2bfloat16_rn(y));
    }
  }
  if (lane == 0) rstd[row] = s;
}

// One warp per row: dx (+)= rstd (dout - out mean(dout out)), out as float32 or bf16 codes.
// dx may alias dout (each lane reads an element before writing it); dx_codes = bf16(dx)
// unless null. Traffic: 12 (16 accumulating; 2 less with codes in, 2 more with codes out)
// rows dim bytes.
template <typename Out>
__global__ void rmsnorm_backward_kernel(float* dx, uint16_t* dx_codes, const float* dout, const Out* out,
                                        const float* rstd, int rows, int dim, bool accumulate) {
  const int row = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const size_t off = static_cast<size_t>(row) * dim;
  float dot = 0.f;
  for (int i = lane; i < dim; i += 32) dot += dout[off + i] * widened(out[off + i]);
  dot = warp_reduce(dot, SumOp{});
  const float mean = dot / dim;
  const float r = rstd[row];
  for (int i = lane; i < dim; i += 32) {
    const float g = r * (dout[off + i] - widened(out[off + i]) * mean);
    const float result = accumulate ? dx[off + i] + g : g;
    dx[off + i] = result;
    store_code(dx_codes, off + i, result);
  }
}

// x [T, H, D] in place: with theta = fl32(t freq[i]), i < D/2, (x1, x2) = (x[i], x[i + D/2])
// -> (x1 cos + x2 sin, -x1 sin + x2 cos), sin negated for the inverse; with `stored` (bf16
// activations) the result rounded to bf16 and its codes stored. Traffic: 8 T H D bytes (+2
// with codes).
__global__ void rotary_kernel(float* x, uint16_t* stored, int T, int H, int D, const float* freq, float sign) {
  const int half = D / 2;
  const size_t n = static_cast<size_t>(T) * H * half;
  SPEEDRUN_GRID_STRIDE(idx, n) {
    const int i = static_cast<int>(idx % half);
    const size_t token_head = idx / half;
    const int t = static_cast<int>(token_head / H);
    const float theta = static_cast<float>(t) * freq[i];
    const float c = cosf(theta);
    const float s = sign * sinf(theta);
    float* row = x + token_head * D;
    const float x1 = row[i];
    const float x2 = row[i + half];
    const size_t at = token_head * D + i;
    row[i] = kept_activation(stored, at, x1 * c + x2 * s);
    row[i + half] = kept_activation(stored, at + half, -x1 * s + x2 * c);
  }
}

// out = coef[0] a + coef[1] b (or coef[0] a); with `stored` (bf16 activations) rounded to
// bf16 and its codes stored. out may alias a. Traffic: 12 n bytes (8 n without b; +2 n with
// codes).
__global__ void mix_forward_kernel(float* out, uint16_t* stored, const float* a, const float* b, const float* coef,
                                   size_t n) {
  const float c0 = coef[0];
  const float c1 = b ? coef[1] : 0.f;
  SPEEDRUN_GRID_STRIDE(i, n) out[i] = kept_activation(stored, i, b ? c0 * a[i] + c1 * b[i] : c0 * a[i]);
}

// db += coef[1] dout (when db); da (+)= coef[0] dout, its bf16 codes too when da_codes.
// da may alias dout. Traffic: up to 22 n bytes.
__global__ void mix_backward_kernel(float* da, uint16_t* da_codes, bool accumulate_da, float* db, const float* dout,
                                    const float* coef, bool has_b, size_t n) {
  const float c0 = coef[0];
  const float c1 = has_b ? coef[1] : 0.f;
  SPEEDRUN_GRID_STRIDE(i, n) {
    const float g = dout[i];
    if (db) db[i] += c1 * g;
    const float result = accumulate_da ? da[i] + c0 * g : c0 * g;
    da[i] = result;
    store_code(da_codes, i, result);
  }
}

// out += weight[0] y. Traffic: 12 n bytes.
__global__ void scaled_add_kernel(float* out, const float* y, const float* weight, size_t n) {
  const float w = weight[0];
  SPEEDRUN_GRID_STRIDE(i, n) out[i] += w * y[i];
}

// out += x, and the sum's bf16 codes when out_codes. Traffic: 12 n bytes (14 n with codes).
__global__ void add_kernel(float* out, uint16_t* out_codes, const float* x, size_t n) {
  SPEEDRUN_GRID_STRIDE(i, n) {
    const float sum = out[i] + x[i];
    out[i] = sum;
    store_code(out_codes, i, sum);
  }
}

// out = relu(x)^2, x as float32 or bf16 codes, and out_codes = bf16(out), each unless null.
// out may alias x. Traffic: 8 (6) n bytes, + 2 n with codes, - 4 n without out.
template <typename X>
__global__ void relu2_forward_kernel(float* out, uint16_t* out_codes, const X* x, size_t n) {
  SPEEDRUN_GRID_STRIDE(i, n) {
    const float y = relu_squared(widened(x[i]));
    if (out) out[i] = y;
    store_code(out_codes, i, y);
  }
}

// stored = bf16(x); out = relu(bf16(x))^2, out_codes = bf16(out); each unless null. out
// may alias x. Traffic: 10 n bytes, + 2 n with codes, - 4 n without out.
__global__ void relu2_forward_bf16_kernel(float* out, uint16_t* out_codes, uint16_t* stored, const float* x,
                                          size_t n) {
  SPEEDRUN_GRID_STRIDE(i, n) {
    const __nv_bfloat16 rounded = __float2bfloat16_rn(x[i]);
    if (stored) stored[i] = __bfloat16_as_ushort(rounded);
    const float y = relu_squared(__bfloat162float(rounded));
    if (out) out[i] = y;
    store_code(out_codes, i, y);
  }
}

// dx = x > 0 ? 2 x dout : 0, x as float32 or bf16 codes, dx_codes = bf16(dx) unless null.
// dx may alias dout. Traffic: 12 (10) n bytes, + 2 n with codes.
template <typename X>
__global__ void relu2_backward_kernel(float* dx, uint16_t* dx_codes, const float* dout, const X* x, size_t n) {
  SPEEDRUN_GRID_STRIDE(i, n) {
    const float xi = widened(x[i]);
    const float g = xi > 0.f ? 2.f * xi * dout[i] : 0.f;
    dx[i] = g;
    store_code(dx_codes, i, g);
  }
}

// out = float32(x). Traffic: 6 n bytes.
__global__ void widen_bf16_kernel(float* out, const uint16_t* x, size_t n) {
  SPEEDRUN_GRID_STRIDE(i, n) out[i] = widened(x[i]);
}

// Up to kAdamTensorsPerLaunch tensors of one Adam update, by value (1.5 KB of the 4 KB of
// kernel parameters). Tensor t owns blocks [block_begin[t], block_begin[t + 1]).
constexpr int kAdamTensorsPerLaunch = 32;
constexpr unsigned kAdamMaxBlocksPerTensor = 2048;  // a grid-stride loop covers the rest
struct AdamLaunch {
  int count = 0;
  unsigned block_begin[kAdamTensorsPerLaunch + 1] = {};
  float* param[kAdamTensorsPerLaunch] = {};
  const float* grad[kAdamTensorsPerLaunch] = {};
  float* m[kAdamTensorsPerLaunch] = {};
  float* v[kAdamTensorsPerLaunch] = {};
  size_t n[kAdamTensorsPerLaunch] = {};
  float step_size[kAdamTensorsPerLaunch] = {};
};

// Multi-tensor Adam (PyTorch's form, bias corrections folded into step_size and
// inv_sqrt_bias2 on the host exactly as the CPU backend does). Traffic: 28 bytes per element.
__global__ void adam_kernel(AdamLaunch launch, float beta1, float beta2, float eps, float inv_sqrt_bias2,
                            const int32_t* skip) {
  if (skip && *skip) return;
  int t = 0;
  while (t + 1 < launch.count && blockIdx.x >= launch.block_begin[t + 1]) ++t;
  const unsigned first = launch.block_begin[t], blocks = launch.block_begin[t + 1] - first;
  float* param = launch.param[t];
  const float* grad = launch.grad[t];
  float *m = launch.m[t], *v = launch.v[t];
  const float step_size = launch.step_size[t];
  const size_t n = launch.n[t];
  for (size_t i = static_cast<size_t>(blockIdx.x - first) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(blocks) * blockDim.x) {
    const float g = grad[i];
    const float mi = beta1 * m[i] + (1.f - beta1) * g;
    const float vi = beta2 * v[i] + (1.f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] -= step_size * mi / (sqrtf(vi) * inv_sqrt_bias2 + eps);
  }
}

// buf = m buf + (1-m) g; out = (1-m) g + m buf. out may alias grad. Traffic: 16 n bytes.
__global__ void muon_momentum_kernel(float* out, float* buf, const float* grad, size_t n, float momentum,
                                     const int32_t* skip) {
  if (skip && *skip) return;
  SPEEDRUN_GRID_STRIDE(i, n) {
    const float g = grad[i];
    const float b = momentum * buf[i] + (1.f - momentum) * g;
    buf[i] = b;
    out[i] = (1.f - momentum) * g + momentum * b;
  }
}

// param -= scale update. Traffic: 12 n bytes.
__global__ void apply_update_kernel(float* param, const float* update, size_t n, float scale, const int32_t* skip) {
  if (skip && *skip) return;
  SPEEDRUN_GRID_STRIDE(i, n) param[i] -= scale * update[i];
}

// x[b, i] *= scale[b] over batch rows of count (grid.y = batch). Traffic: 8 batch count bytes.
__global__ void scale_batches_kernel(float* x, const float* scale, size_t count) {
  float* xb = x + blockIdx.y * count;
  const float s = scale[blockIdx.y];
  SPEEDRUN_GRID_STRIDE(i, count) xb[i] *= s;
}

// C = beta C (0 when beta == 0, never reading C) per matrix (grid.y = batch). Traffic: 8 M N bytes.
__global__ void scale_matrix_kernel(float* C, int M, int N, int ldc, size_t stride_c, float beta) {
  float* Cb = C + blockIdx.y * stride_c;
  const size_t n = static_cast<size_t>(M) * N;
  SPEEDRUN_GRID_STRIDE(i, n) {
    float& c = Cb[(i / N) * ldc + i % N];
    c = beta == 0.f ? 0.f : beta * c;
  }
}

// out[b] (cols x rows) = x[b]^T through a padded 32x32 shared tile (grid.z = batch).
// Traffic: 8 batch rows cols bytes.
__global__ void transpose_kernel(float* out, const float* x, int rows, int cols) {
  __shared__ float tile[32][33];
  const size_t offset = static_cast<size_t>(blockIdx.z) * rows * cols;
  x += offset;
  out += offset;
  const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
  for (int j = threadIdx.y; j < 32; j += blockDim.y) {
    const int r = r0 + j, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[j][threadIdx.x] = x[static_cast<size_t>(r) * cols + c];
  }
  __syncthreads();
  for (int j = threadIdx.y; j < 32; j += blockDim.y) {
    const int c = c0 + j, r = r0 + threadIdx.x;
    if (c < cols && r < rows) out[static_cast<size_t>(c) * rows + r] = tile[threadIdx.x][j];
  }
}

unsigned row_blocks(int rows) { return static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps); }

}  // namespace

void to_bf16(cudaStream_t s, uint16_t* out, const float* in, size_t n) {
  if (n == 0) return;
  to_bf16_kernel<<<grid_for(n), kThreads, 0, s>>>(out, in, n);
  check_launch("to_bf16_kernel");
}

void embedding_forward(cudaStream_t s, float* out, const float* table, const int32_t* tokens, int T, int dim) {
  const size_t n = static_cast<size_t>(T) * dim;
  if (n == 0) return;
  embedding_forward_kernel<<<grid_for(n), kThreads, 0, s>>>(out, table, tokens, T, dim);
  check_launch("embedding_forward_kernel");
}

void rmsnorm_forward(cudaStream_t s, float* out, uint16_t* out_codes, float* rstd, const float* x, int rows, int dim,
                     float eps) {
  if (rows <= 0) return;
  rmsnorm_forward_kernel<false><<<row_blocks(rows), kRowWarps * 32, 0, s>>>(out, out_codes, rstd, x, rows, dim, eps);
  check_launch("rmsnorm_forward_kernel");
}

void rmsnorm_forward_bf16(cudaStream_t s, float* out, uint16_t* stored, float* rstd, const float* x, int rows,
                          int dim, float eps) {
  if (rows <= 0) return;
  rmsnorm_forward_kernel<true><<<row_blocks(rows), kRowWarps * 32, 0, s>>>(out, stored, rstd, x, rows, dim, eps);
  check_launch("rmsnorm_forward_kernel<bf16>");
}

// The forward's output as floats or as bf16 codes: one kernel, instantiated for each.
template <class Out>
void launch_rmsnorm_backward(cudaStream_t s, float* dx, uint16_t* dx_codes, const float* dout, const Out* out,
                             const float* rstd, int rows, int dim, bool accumulate) {
  if (rows <= 0) return;
  rmsnorm_backward_kernel<<<row_blocks(rows), kRowWarps * 32, 0, s>>>(dx, dx_codes, dout, out, rstd, rows, dim,
                                                                       accumulate);
  check_launch("rmsnorm_backward_kernel");
}

void rmsnorm_backward(cudaStream_t s, float* dx, uint16_t* dx_codes, const float* dout, const float* out,
                      const float* rstd, int rows, int dim, bool accumulate) {
  launch_rmsnorm_backward(s, dx, dx_codes, dout, out, rstd, rows, dim, accumulate);
}

void rmsnorm_backward_bf16(cudaStream_t s, float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* out,
                           const float* rstd, int rows, int dim, bool accumulate) {
  launch_rmsnorm_backward(s, dx, dx_codes, dout, out, rstd, rows, dim, accumulate);
}

void rotary(cudaStream_t s, float* x, uint16_t* stored, int T, int H, int D, const float* freq, bool inverse) {
  const size_t n = static_cast<size_t>(T) * H * (D / 2);
  if (n == 0) return;
  rotary_kernel<<<grid_for(n), kThreads, 0, s>>>(x, stored, T, H, D, freq, inverse ? -1.f : 1.f);
  check_launch("rotary_kernel");
}

void mix_forward(cudaStream_t s, float* out, uint16_t* stored, const float* a, const float* b, const float* coef,
                 size_t n) {
  if (n == 0) return;
  mix_forward_kernel<<<grid_for(n), kThreads, 0, s>>>(out, stored, a, b, coef, n);
  check_launch("mix_forward_kernel");
}

void mix_backward_elementwise(cudaStream_t s, float* da, uint16_t* da_codes, bool accumulate_da, float* db,
                              const float* dout, const float* coef, bool has_b, size_t n) {
  if (n == 0) return;
  mix_backward_kernel<<<grid_for(n), kThreads, 0, s>>>(da, da_codes, accumulate_da, db, dout, coef, has_b, n);
  check_launch("mix_backward_kernel");
}

void scaled_add_forward(cudaStream_t s, float* out, const float* y, const float* weight, size_t n) {
  if (n == 0) return;
  scaled_add_kernel<<<grid_for(n), kThreads, 0, s>>>(out, y, weight, n);
  check_launch("scaled_add_kernel");
}

void scaled_add_backward_elementwise(cudaStream_t s, float* dy, const float* dout, const float* weight, size_t n) {
  scaled_add_forward(s, dy, dout, weight, n);  // dy += weight[0] dout
}

void add(cudaStream_t s, float* out, uint16_t* out_codes, const float* x, size_t n) {
  if (n == 0) return;
  add_kernel<<<grid_for(n), kThreads, 0, s>>>(out, out_codes, x, n);
  check_launch("add_kernel");
}

void relu2_forward(cudaStream_t s, float* out, const float* x, size_t n) {
  if (n == 0) return;
  relu2_forward_kernel<<<grid_for(n), kThreads, 0, s>>>(out, nullptr, x, n);
  check_launch("relu2_forward_kernel");
}

void relu2_backward(cudaStream_t s, float* dx, const float* dout, const float* x, size_t n) {
  if (n == 0) return;
  relu2_backward_kernel<<<grid_for(n), kThreads, 0, s>>>(dx, nullptr, dout, x, n);
  check_launch("relu2_backward_kernel");
}

void relu2_forward_bf16(cudaStream_t s, float* out, uint16_t* out_codes, uint16_t* stored, const float* x, size_t n) {
  if (n == 0) return;
  relu2_forward_bf16_kernel<<<grid_for(n), kThreads, 0, s>>>(out, out_codes, stored, x, n);
  check_launch("relu2_forward_bf16_kernel");
}

void relu2_from_bf16(cudaStream_t s, float* out, uint16_t* out_codes, const uint16_t* x, size_t n) {
  if (n == 0) return;
  relu2_forward_kernel<<<grid_for(n), kThreads, 0, s>>>(out, out_codes, x, n);
  check_launch("relu2_forward_kernel<bf16>");
}

void relu2_backward_bf16(cudaStream_t s, float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* x,
                         size_t n) {
  if (n == 0) return;
  relu2_backward_kernel<<<grid_for(n), kThreads, 0, s>>>(dx, dx_codes, dout, x, n);
  check_launch("relu2_backward_kernel<bf16>");
}

void widen_bf16(cudaStream_t s, float* out, const uint16_t* x, size_t n) {
  if (n == 0) return;
  widen_bf16_kernel<<<grid_for(n), kThreads, 0, s>>>(out, x, n);
  check_launch("widen_bf16_kernel");
}

void adam_update(cudaStream_t s, const AdamTensor* tensors, size_t count, float beta1, float beta2, float eps,
                 const AdamBiasCorrection& bias, const int32_t* skip) {
  AdamLaunch launch;
  auto flush = [&] {
    if (launch.count == 0) return;
    adam_kernel<<<launch.block_begin[launch.count], kThreads, 0, s>>>(launch, beta1, beta2, eps, bias.inv_sqrt_bias2,
                                                                    skip);
    check_launch("adam_kernel");
    launch = AdamLaunch{};
  };
  for (size_t k = 0; k < count; ++k) {
    const AdamTensor& t = tensors[k];
    if (t.n == 0) continue;
    const int i = launch.count++;
    launch.param[i] = t.param;
    launch.grad[i] = t.grad;
    launch.m[i] = t.m;
    launch.v[i] = t.v;
    launch.n[i] = t.n;
    launch.step_size[i] = bias.step_size(t.lr);
    const unsigned blocks = std::min<unsigned>(grid_for(t.n), kAdamMaxBlocksPerTensor);
    launch.block_begin[i + 1] = launch.block_begin[i] + blocks;
    if (launch.count == kAdamTensorsPerLaunch) flush();
  }
  flush();
}

void muon_momentum(cudaStream_t s, float* out, float* buf, const float* grad, size_t n, float momentum,
                   const int32_t* skip) {
  if (n == 0) return;
  muon_momentum_kernel<<<grid_for(n), kThreads, 0, s>>>(out, buf, grad, n, momentum, skip);
  check_launch("muon_momentum_kernel");
}

void apply_update(cudaStream_t s, float* param, const float* update, size_t n, float scale, const int32_t* skip) {
  if (n == 0) return;
  apply_update_kernel<<<grid_for(n), kThreads, 0, s>>>(param, update, n, scale, skip);
  check_launch("apply_update_kernel");
}

void scale_batches(cudaStream_t s, float* x, const float* scale, size_t count, int batch) {
  if (count == 0 || batch <= 0) return;
  const dim3 grid(std::min(grid_for(count), 4096u), static_cast<unsigned>(batch));
  scale_batches_kernel<<<grid, kThreads, 0, s>>>(x, scale, count);
  check_launch("scale_batches_kernel");
}

void scale_matrix(cudaStream_t s, float* C, int M, int N, int ldc, size_t stride_c, int batch, float beta) {
  const size_t n = static_cast<size_t>(M) * N;
  if (n == 0 || batch <= 0) return;
  const dim3 grid(std::min(grid_for(n), 4096u), static_cast<unsigned>(batch));
  scale_matrix_kernel<<<grid, kThreads, 0, s>>>(C, M, N, ldc, stride_c, beta);
  check_launch("scale_matrix_kernel");
}

void transpose(cudaStream_t s, float* out, const float* x, int rows, int cols, int batch) {
  if (rows <= 0 || cols <= 0 || batch <= 0) return;
  const dim3 block(32, 8);
  const dim3 grid((cols + 31) / 32, (rows + 31) / 32, batch);
  if (grid.y > 65535u || grid.z > 65535u) {
    throw Error("transpose: " + std::to_string(rows) + " rows x " + std::to_string(batch) +
                " matrices exceed the CUDA grid (at most 65535 row tiles and 65535 matrices)");
  }
  transpose_kernel<<<grid, block, 0, s>>>(out, x, rows, cols);
  check_launch("transpose_kernel");
}

}  // namespace speedrun::cuda
