// The CUDA backend's elementwise, row-normalisation, rotary, optimiser and transpose
// kernels. Each mirrors the CPU backend's loop of the same name (same operation order
// where it matters); "traffic" is the floor of device-memory bytes a call must move.
#include <cuda_bf16.h>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/cuda_lanes.cuh"
#include "backends/cuda/cuda_row_math.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kRowWarps = 8;  // rows per block in the warp-per-row kernels

__device__ __forceinline__ float relu_squared(float h) {
  const float r = h > 0.f ? h : 0.f;
  return r * r;
}

// out[i] = bf16(in[i]) (nearest even; NaN stays NaN), as raw bits. Traffic: 6 n bytes.
struct ToBf16 {
  uint16_t* out;
  const float* in;
  template <int W>
  __device__ void at(size_t g) const { store_code_lanes<W>(out, g, load_lanes<W>(in, g)); }
  bool vectorisable() const { return aligned_16({out, in}); }
};

// x[i] = the codes of a bf16 uniform in [-amplitude, amplitude) from a hash of (seed, i):
// benchmark operands, random rather than zeros (the tensor cores draw less power on zeros).
// Traffic: 2 n bytes.
__global__ void fill_random_bf16_kernel(uint16_t* x, size_t n, uint32_t seed, float amplitude) {
  SPEEDRUN_GRID_STRIDE(i, n) {
    uint32_t hsh = static_cast<uint32_t>(i) * 2654435761u ^ (seed * 40503u + static_cast<uint32_t>(i >> 32));
    hsh ^= hsh >> 16;
    hsh *= 0x7feb352du;
    hsh ^= hsh >> 15;
    hsh *= 0x846ca68bu;
    hsh ^= hsh >> 16;
    const float u = static_cast<float>(hsh >> 8) * (1.f / 16777216.f);
    x[i] = __bfloat16_as_ushort(__float2bfloat16_rn((2.f * u - 1.f) * amplitude));
  }
}

// out[i] = bf16(in[i] + float32(addend[i])): a float32 product and the bf16 stream it is
// added onto, rounded once. out may alias addend. Traffic: 8 n bytes.
struct ToBf16Plus {
  uint16_t* out;
  const float* in;
  const uint16_t* addend;
  template <int W>
  __device__ void at(size_t g) const {
    Lanes<W> x = load_lanes<W>(in, g);
    const Lanes<W> y = load_lanes<W>(addend, g);
#pragma unroll
    for (int k = 0; k < W; ++k) x[k] += y[k];
    store_code_lanes<W>(out, g, x);
  }
  bool vectorisable() const { return aligned_16({out, in, addend}); }
};

// Lanes g of an output as float32, or as bf16 codes (nearest even): one body for either.
template <int W>
__device__ __forceinline__ void store_out_lanes(float* p, size_t g, const Lanes<W>& x) { store_lanes<W>(p, g, x); }
template <int W>
__device__ __forceinline__ void store_out_lanes(uint16_t* p, size_t g, const Lanes<W>& x) {
  store_code_lanes<W>(p, g, x);
}

// out[t, c] = table[tokens[t], c], out as float32 or as its bf16 codes (a value embedding
// as a bf16 activation). Traffic per element: 8 bytes (6 into codes), + 4 T for the ids.
template <typename Out>
struct EmbeddingForward {
  Out* out;
  const float* table;
  const int32_t* tokens;
  int dim;
  template <int W>
  __device__ void at(size_t g) const {
    const size_t i = g * W, t = i / dim, c = i % dim;  // W divides dim: a group stays in its row
    store_out_lanes<W>(out + i, 0, load_lanes<W>(table + static_cast<size_t>(tokens[t]) * dim + c, 0));
  }
  // dim % 4 == 0 keeps every row of a 16-byte-aligned out 16 (codes: 8) bytes aligned.
  bool vectorisable() const { return dim % 4 == 0 && aligned_16({out, table}); }
};

// out = coef[0] a + coef[1] b (or coef[0] a), a and b as float32 or bf16 codes; with
// `stored` (bf16 activations) rounded to bf16 and its codes stored (out then may be null).
// out and stored may alias a (or b: each lane reads its inputs before writing). One
// template for both, so that the bf16 residual stream's mix does the very arithmetic of
// the float one. Traffic: 12 n bytes (8 n without b; +2 n with codes; -4 n without out;
// -2 n per operand given as codes: 6 n for codes in and out).
template <typename In>
struct MixForward {
  float* out;
  uint16_t* stored;
  const In* a;
  const In* b;
  const float* coef;
  template <int W>
  __device__ void at(size_t g) const {
    const float c0 = coef[0];
    Lanes<W> x = load_lanes<W>(a, g);
    if (b) {
      const float c1 = coef[1];
      const Lanes<W> y = load_lanes<W>(b, g);
#pragma unroll
      for (int k = 0; k < W; ++k) x[k] = c0 * x[k] + c1 * y[k];
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) x[k] = c0 * x[k];
    }
    keep_lanes<W>(stored, g, x);
    if (out) store_lanes<W>(out, g, x);
  }
  bool vectorisable() const { return aligned_16({out, stored, a, b}); }
};

// o += w v over the lanes: the U-net skip's arithmetic, shared by the float32 and the bf16
// stream's kernels so that both compute the same values.
template <int W>
__device__ __forceinline__ void add_scaled(Lanes<W>& o, float w, const Lanes<W>& v) {
#pragma unroll
  for (int k = 0; k < W; ++k) o[k] += w * v[k];
}

// out += weight[0] y. Traffic: 12 n bytes.
struct ScaledAdd {
  float* out;
  const float* y;
  const float* weight;
  template <int W>
  __device__ void at(size_t g) const {
    Lanes<W> o = load_lanes<W>(out, g);
    add_scaled<W>(o, weight[0], load_lanes<W>(y, g));
    store_lanes<W>(out, g, o);
  }
  bool vectorisable() const { return aligned_16({out, y}); }
};

// out = bf16(x + weight[0] y), all three bf16 codes: the skip added onto the bf16 stream.
// out may alias x. Traffic: 6 n bytes.
struct ScaledAddBf16 {
  uint16_t* out;
  const uint16_t* x;
  const uint16_t* y;
  const float* weight;
  template <int W>
  __device__ void at(size_t g) const {
    Lanes<W> o = load_lanes<W>(x, g);
    add_scaled<W>(o, weight[0], load_lanes<W>(y, g));
    store_code_lanes<W>(out, g, o);
  }
  bool vectorisable() const { return aligned_16({out, x, y}); }
};

// out += x, and the sum's bf16 codes when out_codes. Traffic: 12 n bytes (14 n with codes).
struct Add {
  float* out;
  uint16_t* out_codes;
  const float* x;
  template <int W>
  __device__ void at(size_t g) const {
    Lanes<W> o = load_lanes<W>(out, g);
    const Lanes<W> v = load_lanes<W>(x, g);
#pragma unroll
    for (int k = 0; k < W; ++k) o[k] += v[k];
    store_lanes<W>(out, g, o);
    store_code_lanes<W>(out_codes, g, o);
  }
  bool vectorisable() const { return aligned_16({out, out_codes, x}); }
};

// out = relu(x)^2, x as float32 or bf16 codes, and out_codes = bf16(out), each unless null.
// out may alias x. Traffic: 8 (6) n bytes, + 2 n with codes, - 4 n without out.
template <typename X>
struct Relu2Forward {
  float* out;
  uint16_t* out_codes;
  const X* x;
  template <int W>
  __device__ void at(size_t g) const {
    Lanes<W> y = load_lanes<W>(x, g);
#pragma unroll
    for (int k = 0; k < W; ++k) y[k] = relu_squared(y[k]);
    if (out) store_lanes<W>(out, g, y);
    store_code_lanes<W>(out_codes, g, y);
  }
  bool vectorisable() const { return aligned_16({out, out_codes, x}); }
};

// stored = bf16(x); out = relu(bf16(x))^2, out_codes = bf16(out); each unless null. out
// may alias x. Traffic: 10 n bytes, + 2 n with codes, - 4 n without out.
struct Relu2ForwardBf16 {
  float* out;
  uint16_t* out_codes;
  uint16_t* stored;
  const float* x;
  template <int W>
  __device__ void at(size_t g) const {
    Lanes<W> y = load_lanes<W>(x, g);
#pragma unroll
    for (int k = 0; k < W; ++k) y[k] = __bfloat162float(__float2bfloat16_rn(y[k]));
    store_code_lanes<W>(stored, g, y);  // the rounded values' codes: bf16(x)
#pragma unroll
    for (int k = 0; k < W; ++k) y[k] = relu_squared(y[k]);
    if (out) store_lanes<W>(out, g, y);
    store_code_lanes<W>(out_codes, g, y);
  }
  bool vectorisable() const { return aligned_16({out, out_codes, stored, x}); }
};

// dx = x > 0 ? 2 x dout : 0, x and dout each as float32 or bf16 codes (one template, so
// the codes' op is the very expression of the float one), dx_codes = bf16(dx), each unless
// null. dx may alias a float dout. Traffic: 12 n bytes, - 2 n per operand given as codes,
// + 2 n with codes out, - 4 n without dx.
template <typename X, typename Dout = float>
struct Relu2Backward {
  float* dx;
  uint16_t* dx_codes;
  const Dout* dout;
  const X* x;
  template <int W>
  __device__ void at(size_t g) const {
    const Lanes<W> xi = load_lanes<W>(x, g);
    Lanes<W> d = load_lanes<W>(dout, g);
#pragma unroll
    for (int k = 0; k < W; ++k) d[k] = xi[k] > 0.f ? 2.f * xi[k] * d[k] : 0.f;
    if (dx) store_lanes<W>(dx, g, d);
    store_code_lanes<W>(dx_codes, g, d);
  }
  bool vectorisable() const { return aligned_16({dx, dx_codes, dout, x}); }
};

// out = float32(x). Traffic: 6 n bytes.
struct WidenBf16 {
  float* out;
  const uint16_t* x;
  template <int W>
  __device__ void at(size_t g) const { store_lanes<W>(out, g, load_lanes<W>(x, g)); }
  bool vectorisable() const { return aligned_16({out, x}); }
};

// x [T, H, D] in place: with theta = fl32(t freq[i]), i < D/2, (x1, x2) = (x[i], x[i + D/2])
// -> (x1 cos + x2 sin, -x1 sin + x2 cos), sin negated for the inverse; with `stored` (bf16
// activations) the result rounded to bf16 and its codes stored. Elements are the T H D/2
// pairs, W consecutive i of one head at a time. Traffic: 8 T H D bytes (+2 with codes).
struct Rotary {
  float* x;
  uint16_t* stored;
  const float* freq;
  int H, D, half;
  float sign;
  template <int W>
  __device__ void at(size_t g) const {
    const size_t pair = g * W, token_head = pair / half;  // W divides half: one head per group
    const int i = static_cast<int>(pair % half);
    const float t = static_cast<float>(token_head / H);
    const size_t at1 = token_head * D + i, at2 = at1 + half;
    Lanes<W> x1 = load_lanes<W>(x + at1, 0);
    Lanes<W> x2 = load_lanes<W>(x + at2, 0);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float theta = t * freq[i + k];
      const float c = cosf(theta), s = sign * sinf(theta);
      rotate_pair(x1[k], x2[k], c, s, x1[k], x2[k]);
    }
    if (stored) {
      keep_lanes<W>(stored + at1, 0, x1);
      keep_lanes<W>(stored + at2, 0, x2);
    }
    store_lanes<W>(x + at1, 0, x1);
    store_lanes<W>(x + at2, 0, x2);
  }
  bool vectorisable() const { return D % 8 == 0 && aligned_16({x, stored}); }
};

// buf = m buf + (1-m) g; out = (1-m) g + m buf. out may alias grad. Traffic: 16 n bytes.
struct MuonMomentum {
  float* out;
  float* buf;
  const float* grad;
  float momentum;
  const int32_t* skip;
  template <int W>
  __device__ void at(size_t g) const {
    if (skip && *skip) return;
    const Lanes<W> gr = load_lanes<W>(grad, g);
    Lanes<W> b = load_lanes<W>(buf, g), o;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      b[k] = momentum * b[k] + (1.f - momentum) * gr[k];
      o[k] = (1.f - momentum) * gr[k] + momentum * b[k];
    }
    store_lanes<W>(buf, g, b);
    store_lanes<W>(out, g, o);
  }
  bool vectorisable() const { return aligned_16({out, buf, grad}); }
};

// param -= scale update. Traffic: 12 n bytes.
struct ApplyUpdate {
  float* param;
  const float* update;
  float scale;
  const int32_t* skip;
  template <int W>
  __device__ void at(size_t g) const {
    if (skip && *skip) return;
    Lanes<W> p = load_lanes<W>(param, g);
    const Lanes<W> u = load_lanes<W>(update, g);
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] -= scale * u[k];
    store_lanes<W>(param, g, p);
  }
  bool vectorisable() const { return aligned_16({param, update}); }
};

// One warp per row, W elements per group (W divides dim; lane L sums groups L, L + 32, ...:
// an order set by the shape alone, 16-byte float / 8-byte code accesses when kWide): x as
// float32 or bf16 codes (the bf16 stream), s = 1 / sqrt(mean(x^2) + eps), out = x s
// (kRound: bf16(x s) widened), rstd = s, and the codes of out into `stored`; out or stored
// may be null (not both). out may alias x (each lane rereads only its own elements).
// Traffic: 8 rows dim bytes (-2 with codes in, +2 with codes out, -4 without out).
template <int W, bool kWide, bool kRound, typename In>
__global__ void rmsnorm_forward_kernel(float* out, uint16_t* stored, float* rstd, const In* x, int rows, int dim,
                                       float eps) {
  const int row = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const size_t off = static_cast<size_t>(row) * dim;
  const In* xr = x + off;
  float* yr = out ? out + off : nullptr;
  uint16_t* codes = stored ? stored + off : nullptr;
  const int groups = dim / W;
  float sum_sq = 0.f;
  for (int j = lane; j < groups; j += 32) {
    const Lanes<W> v = load_lanes<W, kWide>(xr, j);
#pragma unroll
    for (int k = 0; k < W; ++k) sum_sq = multiply_add(v[k], v[k], sum_sq);
  }
  sum_sq = warp_reduce(sum_sq, SumOp{});
  const float s = 1.f / sqrtf(sum_sq / dim + eps);
  for (int j = lane; j < groups; j += 32) {
    Lanes<W> y = load_lanes<W, kWide>(xr, j);
#pragma unroll
    for (int k = 0; k < W; ++k) y[k] *= s;
    if constexpr (kRound) {
      keep_lanes<W, kWide>(codes, j, y);
      if (!codes) {
#pragma unroll
        for (int k = 0; k < W; ++k) y[k] = __bfloat162float(__float2bfloat16_rn(y[k]));
      }
    } else {
      store_code_lanes<W, kWide>(codes, j, y);
    }
    if (yr) store_lanes<W, kWide>(yr, j, y);
  }
  if (lane == 0) rstd[row] = s;
}

// One warp per row, W elements per group as in the forward: dx (+)= rstd (dout - out
// mean(dout out)), out as float32 or bf16 codes. dx may alias dout (each lane reads an
// element before writing it); dx_codes = bf16(dx), each unless null (not dx when
// accumulating). Traffic: 12 (16 accumulating; 2 less with codes in, 2 more with codes out,
// 4 less without dx) rows dim bytes.
template <int W, bool kWide, typename Out>
__global__ void rmsnorm_backward_kernel(float* dx, uint16_t* dx_codes, const float* dout, const Out* out,
                                        const float* rstd, int rows, int dim, bool accumulate) {
  const int row = blockIdx.x * kRowWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const size_t off = static_cast<size_t>(row) * dim;
  const float* dr = dout + off;
  const Out* yr = out + off;
  float* dxr = dx ? dx + off : nullptr;
  uint16_t* codes = dx_codes ? dx_codes + off : nullptr;
  const int groups = dim / W;
  float dot = 0.f;
  for (int j = lane; j < groups; j += 32) {
    const Lanes<W> d = load_lanes<W, kWide>(dr, j), y = load_lanes<W, kWide>(yr, j);
#pragma unroll
    for (int k = 0; k < W; ++k) dot = multiply_add(d[k], y[k], dot);
  }
  dot = warp_reduce(dot, SumOp{});
  const float mean = dot / dim;
  const float r = rstd[row];
  for (int j = lane; j < groups; j += 32) {
    const Lanes<W> d = load_lanes<W, kWide>(dr, j), y = load_lanes<W, kWide>(yr, j);
    Lanes<W> result;
#pragma unroll
    for (int k = 0; k < W; ++k) result[k] = rmsnorm_gradient(r, d[k], y[k], mean);
    if (accumulate) {
      const Lanes<W> old = load_lanes<W, kWide>(dxr, j);
#pragma unroll
      for (int k = 0; k < W; ++k) result[k] = old[k] + result[k];
    }
    if (dxr) store_lanes<W, kWide>(dxr, j, result);
    store_code_lanes<W, kWide>(codes, j, result);
  }
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

// Ops that may write their codes alone (a null float output) need one of the two.
void require_an_output(const float* out, const uint16_t* codes, const char* op) {
  if (!out && !codes) throw Error(std::string(op) + ": a null out needs codes");
}

}  // namespace

void fill_random_bf16(cudaStream_t s, uint16_t* x, size_t n, uint32_t seed, float amplitude) {
  if (n == 0) return;
  fill_random_bf16_kernel<<<grid_for(n), kThreads, 0, s>>>(x, n, seed, amplitude);
  check_launch("fill_random_bf16_kernel");
}

void to_bf16(cudaStream_t s, uint16_t* out, const float* in, size_t n) {
  launch_lanes(s, ToBf16{out, in}, n, "to_bf16");
}

void to_bf16_plus(cudaStream_t s, uint16_t* out, const float* in, const uint16_t* addend, size_t n) {
  launch_lanes(s, ToBf16Plus{out, in, addend}, n, "to_bf16_plus");
}

void embedding_forward(cudaStream_t s, float* out, const float* table, const int32_t* tokens, int T, int dim) {
  launch_lanes(s, EmbeddingForward<float>{out, table, tokens, dim}, static_cast<size_t>(T) * dim,
               "embedding_forward");
}

void embedding_forward_bf16(cudaStream_t s, uint16_t* out, const float* table, const int32_t* tokens, int T,
                            int dim) {
  launch_lanes(s, EmbeddingForward<uint16_t>{out, table, tokens, dim}, static_cast<size_t>(T) * dim,
               "embedding_forward_bf16");
}

// Groups of 4 where dim allows (the summation order then depends on the shape alone),
// accessed 16 bytes at a time where the pointers allow (every pointer 16-byte aligned, codes
// included as in the backward: a row of codes then starts 8-byte aligned, dim % 4 == 0).
template <bool kRound, typename In>
void launch_rmsnorm_forward(cudaStream_t s, float* out, uint16_t* stored, float* rstd, const In* x, int rows,
                            int dim, float eps) {
  if (rows <= 0) return;
  const unsigned blocks = row_blocks(rows), threads = kRowWarps * 32;
  if (dim % 4 != 0) {
    rmsnorm_forward_kernel<1, false, kRound><<<blocks, threads, 0, s>>>(out, stored, rstd, x, rows, dim, eps);
  } else if (aligned_16({out, stored, x})) {
    rmsnorm_forward_kernel<4, true, kRound><<<blocks, threads, 0, s>>>(out, stored, rstd, x, rows, dim, eps);
  } else {
    rmsnorm_forward_kernel<4, false, kRound><<<blocks, threads, 0, s>>>(out, stored, rstd, x, rows, dim, eps);
  }
  check_launch("rmsnorm_forward_kernel");
}

void rmsnorm_forward(cudaStream_t s, float* out, uint16_t* out_codes, float* rstd, const float* x, int rows, int dim,
                     float eps) {
  launch_rmsnorm_forward<false>(s, out, out_codes, rstd, x, rows, dim, eps);
}

void rmsnorm_forward_bf16(cudaStream_t s, float* out, uint16_t* stored, float* rstd, const float* x, int rows,
                          int dim, float eps) {
  require_an_output(out, stored, "rmsnorm_forward_bf16");
  launch_rmsnorm_forward<true>(s, out, stored, rstd, x, rows, dim, eps);
}

void rmsnorm_forward_from_bf16(cudaStream_t s, float* out, uint16_t* out_codes, float* rstd, const uint16_t* x,
                               int rows, int dim, float eps) {
  require_an_output(out, out_codes, "rmsnorm_forward_from_bf16");
  launch_rmsnorm_forward<true>(s, out, out_codes, rstd, x, rows, dim, eps);
}

// The forward's output as floats or as bf16 codes: one kernel, instantiated for each.
template <class Out>
void launch_rmsnorm_backward(cudaStream_t s, float* dx, uint16_t* dx_codes, const float* dout, const Out* out,
                             const float* rstd, int rows, int dim, bool accumulate) {
  require_codes_for_null_output(dx, dx_codes, accumulate, "rmsnorm_backward");
  if (rows <= 0) return;
  const unsigned blocks = row_blocks(rows), threads = kRowWarps * 32;
  if (dim % 4 != 0) {
    rmsnorm_backward_kernel<1, false><<<blocks, threads, 0, s>>>(dx, dx_codes, dout, out, rstd, rows, dim, accumulate);
  } else if (aligned_16({dx, dx_codes, dout, out})) {
    rmsnorm_backward_kernel<4, true><<<blocks, threads, 0, s>>>(dx, dx_codes, dout, out, rstd, rows, dim, accumulate);
  } else {
    rmsnorm_backward_kernel<4, false><<<blocks, threads, 0, s>>>(dx, dx_codes, dout, out, rstd, rows, dim, accumulate);
  }
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
  const int half = D / 2;
  launch_lanes(s, Rotary{x, stored, freq, H, D, half, inverse ? -1.f : 1.f}, static_cast<size_t>(T) * H * half,
               "rotary");
}

void mix_forward(cudaStream_t s, float* out, uint16_t* stored, const float* a, const float* b, const float* coef,
                 size_t n) {
  require_an_output(out, stored, "mix_forward");
  launch_lanes(s, MixForward<float>{out, stored, a, b, coef}, n, "mix_forward");
}

// The float mix with codes in and the codes alone out: stored's rounding is the output's.
void mix_forward_bf16(cudaStream_t s, uint16_t* out, const uint16_t* a, const uint16_t* b, const float* coef,
                      size_t n) {
  launch_lanes(s, MixForward<uint16_t>{nullptr, out, a, b, coef}, n, "mix_forward_bf16");
}

void scaled_add_forward(cudaStream_t s, float* out, const float* y, const float* weight, size_t n) {
  launch_lanes(s, ScaledAdd{out, y, weight}, n, "scaled_add");
}

void scaled_add_forward_bf16(cudaStream_t s, uint16_t* out, const uint16_t* x, const uint16_t* y,
                             const float* weight, size_t n) {
  launch_lanes(s, ScaledAddBf16{out, x, y, weight}, n, "scaled_add_forward_bf16");
}

void scaled_add_backward_elementwise(cudaStream_t s, float* dy, bool accumulate, const float* dout,
                                     const float* weight, size_t n) {
  if (accumulate) {
    scaled_add_forward(s, dy, dout, weight, n);  // dy += weight[0] dout
  } else {
    mix_forward(s, dy, nullptr, dout, nullptr, weight, n);  // dy = weight[0] dout
  }
}

void add(cudaStream_t s, float* out, uint16_t* out_codes, const float* x, size_t n) {
  launch_lanes(s, Add{out, out_codes, x}, n, "add");
}

void relu2_forward(cudaStream_t s, float* out, const float* x, size_t n) {
  launch_lanes(s, Relu2Forward<float>{out, nullptr, x}, n, "relu2_forward");
}

void relu2_backward(cudaStream_t s, float* dx, const float* dout, const float* x, size_t n) {
  launch_lanes(s, Relu2Backward<float>{dx, nullptr, dout, x}, n, "relu2_backward");
}

void relu2_forward_bf16(cudaStream_t s, float* out, uint16_t* out_codes, uint16_t* stored, const float* x, size_t n) {
  launch_lanes(s, Relu2ForwardBf16{out, out_codes, stored, x}, n, "relu2_forward_bf16");
}

void relu2_from_bf16(cudaStream_t s, float* out, uint16_t* out_codes, const uint16_t* x, size_t n) {
  launch_lanes(s, Relu2Forward<uint16_t>{out, out_codes, x}, n, "relu2_from_bf16");
}

void relu2_backward_bf16(cudaStream_t s, float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* x,
                         size_t n) {
  require_codes_for_null_output(dx, dx_codes, false, "relu2_backward_bf16");
  launch_lanes(s, Relu2Backward<uint16_t>{dx, dx_codes, dout, x}, n, "relu2_backward_bf16");
}

void relu2_backward_from_bf16(cudaStream_t s, float* dx, uint16_t* dx_codes, const uint16_t* dout,
                              const uint16_t* x, size_t n) {
  require_codes_for_null_output(dx, dx_codes, false, "relu2_backward_from_bf16");
  launch_lanes(s, Relu2Backward<uint16_t, uint16_t>{dx, dx_codes, dout, x}, n, "relu2_backward_from_bf16");
}

void widen_bf16(cudaStream_t s, float* out, const uint16_t* x, size_t n) {
  launch_lanes(s, WidenBf16{out, x}, n, "widen_bf16");
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
  launch_lanes(s, MuonMomentum{out, buf, grad, momentum, skip}, n, "muon_momentum");
}

void apply_update(cudaStream_t s, float* param, const float* update, size_t n, float scale, const int32_t* skip) {
  launch_lanes(s, ApplyUpdate{param, update, scale, skip}, n, "apply_update");
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
