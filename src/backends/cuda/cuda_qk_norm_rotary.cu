// Attention's q and k as bf16 activations: the per-head rmsnorm and the rotary that follows
// it in one pass over each head, forward (from floats or from codes), recomputed and backward
// (the Backend ops rmsnorm_rotary_bf16, rmsnorm_rotary_from_bf16, rotary_from_bf16 and
// rotary_rmsnorm_backward_bf16). One warp per head of D <= 128 (D % 8 == 0): lane L holds
// elements 4L .. 4L + 3, and the rotation's partner of element i < D/2, i + D/2, sits in
// lane L + D/8 (a shuffle away). Every step is the unfused kernels' own expression in their
// order (rmsnorm's sums over the same groups of 4, rotary's theta, cos and sin;
// cuda_row_math.cuh), so the codes are the same bits either way. Other head sizes run the
// unfused kernels in sequence.
#include <cuda_bf16.h>

#include <type_traits>

#include "backends/cuda/cuda_kernels.cuh"
#include "backends/cuda/cuda_lanes.cuh"
#include "backends/cuda/cuda_row_math.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kHeadWarps = 8;  // heads per block
constexpr int kMaxFusedHead = 128;

bool fusable(int D) { return D % 8 == 0 && D <= kMaxFusedHead; }

// The lanes of the partner group (L +- D/8) for every lane; idle lanes get their own.
__device__ __forceinline__ Lanes<4> partner_lanes(const Lanes<4>& mine, int lane, int groups) {
  const int quarter = groups / 2;  // groups per half head
  int partner = lane;
  if (lane < quarter) partner = lane + quarter;
  else if (lane < groups) partner = lane - quarter;
  Lanes<4> theirs;
#pragma unroll
  for (int k = 0; k < 4; ++k) theirs[k] = __shfl_sync(kFullMask, mine[k], partner);
  return theirs;
}

// cos and sin of theta = fl32(t f), as rotary_kernel computes them; a frequency of 0 (the
// half-truncated rotary's second half) gives exactly cosf(0) = 1 and sinf(0) = 0 uncomputed.
__device__ __forceinline__ void turn_angle(float t, float f, float& c, float& s) {
  if (f == 0.f) {
    c = 1.f;
    s = 0.f;
    return;
  }
  const float theta = t * f;
  c = cosf(theta);
  s = sinf(theta);
}

// Rotary's step for the lane's four elements (sign -1: the inverse), as rotary_kernel
// computes it: the first half's element i = x1 c + x2 s, the second half's -x1 s + x2 c,
// with theta = fl32(t freq[i]). Each of the D/2 <= 64 angles is computed once, by lane i % 32
// (its first or second), and shuffled to the four lanes that turn by it: 2 cosf/sinf pairs per
// lane (1 where the second 32 frequencies are all 0, as at D = 128) instead of 4, and
// warp-uniform. Every lane takes part in the shuffles; idle lanes (past the head) get zeros.
__device__ __forceinline__ Lanes<4> rotate(const Lanes<4>& mine, const Lanes<4>& theirs, int lane, int groups,
                                           float t, const float* freq, float sign) {
  const int angles = 2 * groups;  // D/2, freq's length
  float c_first = 1.f, s_first = 0.f, c_second = 1.f, s_second = 0.f;
  if (lane < angles) turn_angle(t, freq[lane], c_first, s_first);
  if (lane + 32 < angles) turn_angle(t, freq[lane + 32], c_second, s_second);
  const int quarter = groups / 2;
  const bool first_half = lane < quarter;
  const int i0 = 4 * (first_half ? lane : lane - quarter);
  Lanes<4> out{};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int i = i0 + k, source = i % 32;
    const float c1 = __shfl_sync(kFullMask, c_first, source), c2 = __shfl_sync(kFullMask, c_second, source);
    const float s1 = __shfl_sync(kFullMask, s_first, source), s2 = __shfl_sync(kFullMask, s_second, source);
    const float c = i < 32 ? c1 : c2, s = sign * (i < 32 ? s1 : s2);
    float y1, y2;
    rotate_pair(first_half ? mine[k] : theirs[k], first_half ? theirs[k] : mine[k], c, s, y1, y2);
    out[k] = first_half ? y1 : y2;
  }
  if (lane >= groups) return Lanes<4>{};
  return out;
}

template <int W>
__device__ __forceinline__ void round_lanes(Lanes<W>& x) {
#pragma unroll
  for (int k = 0; k < W; ++k) x[k] = __bfloat162float(__float2bfloat16_rn(x[k]));
}

// kNormalise: normed (unless null) = codes of bf16(rmsnorm(x)) (rstd saved), then rotated;
// else x holds the normed codes (In = uint16_t) and is rotated. x as float32 or bf16 codes
// (widened exactly: the same values, so the same bits). out (unless null) = float32(rotated). kWide: 16-byte
// float (8-byte code) accesses. Traffic: 8 T H D bytes (6 from codes; +4 with out; 4 when
// recomputing).
template <bool kNormalise, bool kWide, typename In = float>
__global__ void norm_rotary_kernel(float* out, uint16_t* normed, uint16_t* rotated, float* rstd, const In* x,
                                   int rows, int H, int D, float eps, const float* freq) {
  const int row = blockIdx.x * kHeadWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp: rows are per warp
  const int groups = D / 4;
  const bool active = lane < groups;
  const size_t off = static_cast<size_t>(row) * D;
  Lanes<4> y{};
  if constexpr (kNormalise) {
    if (active) y = load_lanes<4, kWide>(x + off, lane);
    float sum_sq = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) sum_sq = multiply_add(y[k], y[k], sum_sq);
    sum_sq = warp_reduce(sum_sq, SumOp{});
    const float s = 1.f / sqrtf(sum_sq / D + eps);
#pragma unroll
    for (int k = 0; k < 4; ++k) y[k] *= s;
    round_lanes(y);
    if (active && normed) store_code_lanes<4, kWide>(normed + off, lane, y);
    if (lane == 0) rstd[row] = s;
  } else {
    if (active) y = load_lanes<4, kWide>(x + off, lane);  // x: the normed codes
  }
  const Lanes<4> partner = partner_lanes(y, lane, groups);
  Lanes<4> turned = rotate(y, partner, lane, groups, static_cast<float>(row / H), freq, 1.f);
  round_lanes(turned);
  if (!active) return;
  store_code_lanes<4, kWide>(rotated + off, lane, turned);
  if (out) store_lanes<4, kWide>(out + off, lane, turned);
}

// dx = rmsnorm's backward (from normed, rstd) of the inverse rotation of dout, dx_codes =
// bf16(dx); each unless null. dx may alias dout. Traffic: 8 T H D bytes (+4 with dx).
template <bool kWide>
__global__ void rotary_norm_backward_kernel(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* normed,
                                            const float* rstd, int rows, int H, int D, const float* freq) {
  const int row = blockIdx.x * kHeadWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int groups = D / 4;
  const bool active = lane < groups;
  const size_t off = static_cast<size_t>(row) * D;
  Lanes<4> g{}, y{};
  if (active) {
    g = load_lanes<4, kWide>(dout + off, lane);
    y = load_lanes<4, kWide>(normed + off, lane);
  }
  const Lanes<4> partner = partner_lanes(g, lane, groups);
  g = rotate(g, partner, lane, groups, static_cast<float>(row / H), freq, -1.f);
  float dot = 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k) dot = multiply_add(g[k], y[k], dot);
  dot = warp_reduce(dot, SumOp{});
  const float mean = dot / D;
  const float r = rstd[row];
  Lanes<4> result;
#pragma unroll
  for (int k = 0; k < 4; ++k) result[k] = rmsnorm_gradient(r, g[k], y[k], mean);
  if (!active) return;
  if (dx) store_lanes<4, kWide>(dx + off, lane, result);
  if (dx_codes) store_code_lanes<4, kWide>(dx_codes + off, lane, result);
}

unsigned head_blocks(int rows) { return static_cast<unsigned>((rows + kHeadWarps - 1) / kHeadWarps); }

// x as floats or as codes: one kernel, instantiated for each. A lane's wide access is 16
// bytes of floats or 8 of codes at a multiple of that past x (a head starts a multiple of 32
// or 16 bytes in), so x needs 16-byte alignment as floats and 8 as codes; asking 16 of every
// pointer alike, as the other launchers do, suffices for both. The fallback normalises with
// the rmsnorm of the same input type, whose rounding is rmsnorm_forward_bf16's.
template <typename In>
void launch_norm_rotary(cudaStream_t s, Scratch& scratch, float* out, uint16_t* normed, uint16_t* rotated,
                        float* rstd, const In* x, int T, int H, int D, float eps, const float* freq) {
  const int rows = T * H;
  if (rows <= 0 || D <= 0) return;
  if (fusable(D)) {
    const bool wide = aligned_16({out, normed, rotated, x});
    auto kernel = wide ? norm_rotary_kernel<true, true, In> : norm_rotary_kernel<true, false, In>;
    kernel<<<head_blocks(rows), kHeadWarps * 32, 0, s>>>(out, normed, rotated, rstd, x, rows, H, D, eps, freq);
    check_launch("norm_rotary_kernel");
    return;
  }
  const size_t n = static_cast<size_t>(rows) * D;
  float* values = out ? out : static_cast<float*>(scratch.get(n * sizeof(float)));
  if constexpr (std::is_same_v<In, float>) {
    rmsnorm_forward_bf16(s, values, normed, rstd, x, rows, D, eps);
  } else {
    rmsnorm_forward_from_bf16(s, values, normed, rstd, x, rows, D, eps);
  }
  rotary(s, values, rotated, T, H, D, freq, false);
}

}  // namespace

void rmsnorm_rotary_bf16(cudaStream_t s, Scratch& scratch, float* out, uint16_t* normed, uint16_t* rotated,
                         float* rstd, const float* x, int T, int H, int D, float eps, const float* freq) {
  launch_norm_rotary(s, scratch, out, normed, rotated, rstd, x, T, H, D, eps, freq);
}

// out may not alias x: a head's floats span twice its codes' bytes, over codes of heads not
// yet read.
void rmsnorm_rotary_from_bf16(cudaStream_t s, Scratch& scratch, float* out, uint16_t* normed, uint16_t* rotated,
                              float* rstd, const uint16_t* x, int T, int H, int D, float eps, const float* freq) {
  launch_norm_rotary(s, scratch, out, normed, rotated, rstd, x, T, H, D, eps, freq);
}

void rotary_from_bf16(cudaStream_t s, Scratch& scratch, float* out, uint16_t* rotated, const uint16_t* normed, int T,
                      int H, int D, const float* freq) {
  const int rows = T * H;
  if (rows <= 0 || D <= 0) return;
  if (fusable(D)) {
    auto kernel = aligned_16({out, rotated, normed}) ? norm_rotary_kernel<false, true, uint16_t>
                                                     : norm_rotary_kernel<false, false, uint16_t>;
    kernel<<<head_blocks(rows), kHeadWarps * 32, 0, s>>>(out, nullptr, rotated, nullptr, normed, rows, H, D, 0.f,
                                                          freq);
    check_launch("norm_rotary_kernel<recompute>");
    return;
  }
  const size_t n = static_cast<size_t>(rows) * D;
  float* values = out ? out : static_cast<float*>(scratch.get(n * sizeof(float)));
  widen_bf16(s, values, normed, n);
  rotary(s, values, rotated, T, H, D, freq, false);
}

void rotary_rmsnorm_backward_bf16(cudaStream_t s, Scratch& scratch, float* dx, uint16_t* dx_codes, const float* dout,
                                  const uint16_t* normed, const float* rstd, int T, int H, int D, const float* freq) {
  require_codes_for_null_output(dx, dx_codes, false, "rotary_rmsnorm_backward_bf16");
  const int rows = T * H;
  if (rows <= 0 || D <= 0) return;
  if (fusable(D)) {
    auto kernel = aligned_16({dx, dx_codes, dout, normed}) ? rotary_norm_backward_kernel<true>
                                                           : rotary_norm_backward_kernel<false>;
    kernel<<<head_blocks(rows), kHeadWarps * 32, 0, s>>>(dx, dx_codes, dout, normed, rstd, rows, H, D, freq);
    check_launch("rotary_norm_backward_kernel");
    return;
  }
  const size_t n = static_cast<size_t>(rows) * D;
  float* turned = static_cast<float*>(scratch.get(n * sizeof(float)));
  SPEEDRUN_CUDA_CHECK(cudaMemcpyAsync(turned, dout, n * sizeof(float), cudaMemcpyDeviceToDevice, s));
  rotary(s, turned, nullptr, T, H, D, freq, true);
  rmsnorm_backward_bf16(s, dx, dx_codes, turned, normed, rstd, rows, D, false);
}

}  // namespace speedrun::cuda
