// Document-causal sliding-window attention on the GPU in float32 (SPEC §2.5, §3), the
// simple correct form: one warp per (head, query) row walks the contiguous visible key
// range [max(doc_start(q), (q/B - N + 1) B), q] 32 keys at a time with an online softmax
// (lane j scores key base + j; lane d accumulates output dims d, d + 32, ...). The backward
// mirrors the CPU backend: delta = rowsum(dy * y), then dq per query and dk, dv per key in
// separate kernels over contiguous ranges, so every sum has a fixed order (deterministic,
// no atomics). Document ranges come from the per-token ids (cuda_document_bounds.cu).
#include <cmath>

#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {
namespace {

constexpr int kAttentionWarps = 4;  // (head, token) rows per block
constexpr int kMaxHeadDim = 256;    // 8 output dims per lane

struct AttentionArgs {
  int T, H, D, B, N;  // N = max(window_blocks, 1)
  float scale;
};

__device__ inline int first_visible_key(const int32_t* doc_start, int q, const AttentionArgs& a) {
  const int window_start = (q / a.B - a.N + 1) * a.B;
  return max(doc_start[q], max(window_start, 0));
}

// One past the last query that sees key k.
__device__ inline int seeing_query_end(const int32_t* doc_end, int k, const AttentionArgs& a) {
  const long long window_end = static_cast<long long>(k / a.B + a.N) * a.B;
  return static_cast<int>(min(static_cast<long long>(min(doc_end[k], a.T)), window_end));
}

struct Row {
  int h, t;
  bool valid;
};

__device__ inline Row warp_row(const AttentionArgs& a) {
  const long long row = static_cast<long long>(blockIdx.x) * kAttentionWarps + threadIdx.x / 32;
  Row r;
  r.valid = row < static_cast<long long>(a.H) * a.T;
  r.h = static_cast<int>(row / a.T);
  r.t = static_cast<int>(row % a.T);
  return r;
}

__device__ inline float dot_shared(const float* shared_row, const float* row, int D) {
  float acc = 0.f;
  for (int d = 0; d < D; ++d) acc += shared_row[d] * row[d];
  return acc;
}

// y[t, h] = softmax(scale q k^T) v over the visible keys; lse[h, t] = log-sum-exp of the
// scaled scores. Traffic floor: 4 T H D (q) + 4 T H D (y) + k, v re-read per query (from L2).
template <int kPerLane>
__global__ void __launch_bounds__(kAttentionWarps * 32)
    attention_forward_kernel(float* y, float* lse, const float* q, const float* k, const float* v,
                             const int32_t* doc_start, AttentionArgs a) {
  extern __shared__ float shared[];
  const Row r = warp_row(a);
  if (!r.valid) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const size_t token_stride = static_cast<size_t>(a.H) * a.D;
  const size_t head_offset = static_cast<size_t>(r.h) * a.D;
  float* q_s = shared + (threadIdx.x / 32) * a.D;
  for (int d = lane; d < a.D; d += 32) q_s[d] = q[r.t * token_stride + head_offset + d];
  __syncwarp();

  float m = -INFINITY, l = 0.f;
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  for (int base = first_visible_key(doc_start, r.t, a); base <= r.t; base += 32) {
    const int key = base + lane;
    const bool visible = key <= r.t;
    const float score = visible ? a.scale * dot_shared(q_s, k + key * token_stride + head_offset, a.D) : -INFINITY;
    const float m_new = fmaxf(m, warp_reduce(score, MaxOp{}));  // finite: key `base` is visible
    const float correction = expf(m - m_new);                  // 0 on the first tile (m = -inf)
    const float p = visible ? expf(score - m_new) : 0.f;
    l = l * correction + warp_reduce(p, SumOp{});
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] *= correction;
    const int count = min(32, r.t - base + 1);
    for (int j = 0; j < count; ++j) {
      const float pj = __shfl_sync(kFullMask, p, j);
      const float* vr = v + (base + j) * token_stride + head_offset;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < a.D) acc[i] += pj * vr[d];
      }
    }
    m = m_new;
  }
  const float inv_l = 1.f / l;
  float* yt = y + r.t * token_stride + head_offset;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < a.D) yt[d] = acc[i] * inv_l;
  }
  if (lane == 0) lse[static_cast<size_t>(r.h) * a.T + r.t] = m + logf(l);
}

// delta[h, t] = <dy[t, h], y[t, h]>. Traffic: 8 T H D bytes.
__global__ void __launch_bounds__(kAttentionWarps * 32)
    attention_delta_kernel(float* delta, const float* dy, const float* y, AttentionArgs a) {
  const Row r = warp_row(a);
  if (!r.valid) return;
  const int lane = threadIdx.x % 32;
  const size_t off = r.t * static_cast<size_t>(a.H) * a.D + static_cast<size_t>(r.h) * a.D;
  float acc = 0.f;
  for (int d = lane; d < a.D; d += 32) acc += dy[off + d] * y[off + d];
  acc = warp_reduce(acc, SumOp{});
  if (lane == 0) delta[static_cast<size_t>(r.h) * a.T + r.t] = acc;
}

// dq[t, h] = sum over visible keys of scale * P (dP - delta) * k, with P = exp(scale q.k - lse)
// and dP = dy.v. Traffic floor: 12 T H D bytes + k, v re-read per query.
template <int kPerLane>
__global__ void __launch_bounds__(kAttentionWarps * 32)
    attention_dq_kernel(float* dq, const float* dy, const float* lse, const float* delta, const float* q,
                        const float* k, const float* v, const int32_t* doc_start, AttentionArgs a) {
  extern __shared__ float shared[];
  const Row r = warp_row(a);
  if (!r.valid) return;
  const int lane = threadIdx.x % 32;
  const size_t token_stride = static_cast<size_t>(a.H) * a.D;
  const size_t head_offset = static_cast<size_t>(r.h) * a.D;
  float* q_s = shared + (threadIdx.x / 32) * 2 * a.D;
  float* dy_s = q_s + a.D;
  for (int d = lane; d < a.D; d += 32) {
    q_s[d] = q[r.t * token_stride + head_offset + d];
    dy_s[d] = dy[r.t * token_stride + head_offset + d];
  }
  __syncwarp();
  const float lse_t = lse[static_cast<size_t>(r.h) * a.T + r.t];
  const float delta_t = delta[static_cast<size_t>(r.h) * a.T + r.t];
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  for (int base = first_visible_key(doc_start, r.t, a); base <= r.t; base += 32) {
    const int key = base + lane;
    float coef = 0.f;
    if (key <= r.t) {
      const float p = expf(a.scale * dot_shared(q_s, k + key * token_stride + head_offset, a.D) - lse_t);
      const float dp = dot_shared(dy_s, v + key * token_stride + head_offset, a.D);
      coef = a.scale * (p * (dp - delta_t));
    }
    const int count = min(32, r.t - base + 1);
    for (int j = 0; j < count; ++j) {
      const float cj = __shfl_sync(kFullMask, coef, j);
      const float* kr = k + (base + j) * token_stride + head_offset;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < a.D) acc[i] += cj * kr[d];
      }
    }
  }
  float* out = dq + r.t * token_stride + head_offset;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < a.D) out[d] = acc[i];
  }
}

// For key row (h, kk): dk = sum over the queries that see it of scale * P (dP - delta) * q,
// dv = sum of P * dy. Traffic floor: 16 T H D bytes + q, dy re-read per key.
template <int kPerLane>
__global__ void __launch_bounds__(kAttentionWarps * 32)
    attention_dkdv_kernel(float* dk, float* dv, const float* dy, const float* lse, const float* delta, const float* q,
                          const float* k, const float* v, const int32_t* doc_end, AttentionArgs a) {
  extern __shared__ float shared[];
  const Row r = warp_row(a);  // r.t is the key here
  if (!r.valid) return;
  const int lane = threadIdx.x % 32;
  const size_t token_stride = static_cast<size_t>(a.H) * a.D;
  const size_t head_offset = static_cast<size_t>(r.h) * a.D;
  float* k_s = shared + (threadIdx.x / 32) * 2 * a.D;
  float* v_s = k_s + a.D;
  for (int d = lane; d < a.D; d += 32) {
    k_s[d] = k[r.t * token_stride + head_offset + d];
    v_s[d] = v[r.t * token_stride + head_offset + d];
  }
  __syncwarp();
  const float* lse_h = lse + static_cast<size_t>(r.h) * a.T;
  const float* delta_h = delta + static_cast<size_t>(r.h) * a.T;
  float acc_k[kPerLane], acc_v[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc_k[i] = acc_v[i] = 0.f;
  const int q_end = seeing_query_end(doc_end, r.t, a);
  for (int base = r.t; base < q_end; base += 32) {
    const int qi = base + lane;
    float coef_k = 0.f, coef_v = 0.f;
    if (qi < q_end) {
      const float p = expf(a.scale * dot_shared(k_s, q + qi * token_stride + head_offset, a.D) - lse_h[qi]);
      const float dp = dot_shared(v_s, dy + qi * token_stride + head_offset, a.D);
      coef_k = a.scale * (p * (dp - delta_h[qi]));
      coef_v = p;
    }
    const int count = min(32, q_end - base);
    for (int j = 0; j < count; ++j) {
      const float ck = __shfl_sync(kFullMask, coef_k, j);
      const float cv = __shfl_sync(kFullMask, coef_v, j);
      const float* qr = q + (base + j) * token_stride + head_offset;
      const float* dyr = dy + (base + j) * token_stride + head_offset;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < a.D) {
          acc_k[i] += ck * qr[d];
          acc_v[i] += cv * dyr[d];
        }
      }
    }
  }
  float* out_k = dk + r.t * token_stride + head_offset;
  float* out_v = dv + r.t * token_stride + head_offset;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < a.D) {
      out_k[d] = acc_k[i];
      out_v[d] = acc_v[i];
    }
  }
}

AttentionArgs make_args(const AttentionShape& s) {
  if (s.T <= 0 || s.H <= 0 || s.D <= 0 || s.D > kMaxHeadDim || s.block_size <= 0) {
    throw Error("CUDA attention: unsupported shape T=" + std::to_string(s.T) + " H=" + std::to_string(s.H) +
                " D=" + std::to_string(s.D) + " block_size=" + std::to_string(s.block_size) +
                " (needs positive sizes and D <= " + std::to_string(kMaxHeadDim) + ")");
  }
  return AttentionArgs{s.T, s.H, s.D, s.block_size, std::max(s.window_blocks, 1), s.scale};
}

unsigned row_blocks(const AttentionArgs& a) {
  const long long rows = static_cast<long long>(a.H) * a.T;
  return static_cast<unsigned>((rows + kAttentionWarps - 1) / kAttentionWarps);
}

// Each token's document range [doc_start, doc_end) from the ids, into scratch.
struct DocumentRanges {
  int32_t* start;
  int32_t* end;
  void* rest;  // scratch after the ranges, for the caller
};

DocumentRanges document_ranges(cudaStream_t s, Scratch& scratch, const int32_t* doc, int T, size_t extra_bytes) {
  const size_t bounds_bytes = document_bounds_scratch_bytes(T);
  DocumentRanges r;
  void* bounds_scratch;
  auto carve = [&](Carver& c) {
    r.start = c.take<int32_t>(T);
    r.end = c.take<int32_t>(T);
    bounds_scratch = c.take_bytes(bounds_bytes);
    r.rest = c.take_bytes(extra_bytes);
  };
  Carver measure;
  carve(measure);
  Carver cut(scratch.get(measure.size()));
  carve(cut);
  document_bounds(s, bounds_scratch, r.start, r.end, doc, T);
  return r;
}

template <int kPerLane>
void launch_forward(cudaStream_t s, float* y, float* lse, const float* q, const float* k, const float* v,
                    const int32_t* doc_start, const AttentionArgs& a) {
  const size_t shared = sizeof(float) * kAttentionWarps * a.D;
  attention_forward_kernel<kPerLane><<<row_blocks(a), kAttentionWarps * 32, shared, s>>>(y, lse, q, k, v, doc_start, a);
  check_launch("attention_forward_kernel");
}

template <int kPerLane>
void launch_backward(cudaStream_t s, float* dq, float* dk, float* dv, const float* dy, const float* lse,
                     const float* delta, const float* q, const float* k, const float* v, const DocumentRanges& r,
                     const AttentionArgs& a) {
  const size_t shared = sizeof(float) * kAttentionWarps * 2 * a.D;
  attention_dq_kernel<kPerLane><<<row_blocks(a), kAttentionWarps * 32, shared, s>>>(dq, dy, lse, delta, q, k, v,
                                                                                     r.start, a);
  check_launch("attention_dq_kernel");
  attention_dkdv_kernel<kPerLane><<<row_blocks(a), kAttentionWarps * 32, shared, s>>>(dk, dv, dy, lse, delta, q, k,
                                                                                       v, r.end, a);
  check_launch("attention_dkdv_kernel");
}

}  // namespace

void attention_forward(cudaStream_t s, Scratch& scratch, float* y, float* lse, const float* q, const float* k,
                       const float* v, const int32_t* doc, const AttentionShape& shape) {
  const AttentionArgs a = make_args(shape);
  const DocumentRanges r = document_ranges(s, scratch, doc, a.T, 0);
  if (a.D <= 32) {
    launch_forward<1>(s, y, lse, q, k, v, r.start, a);
  } else if (a.D <= 64) {
    launch_forward<2>(s, y, lse, q, k, v, r.start, a);
  } else if (a.D <= 128) {
    launch_forward<4>(s, y, lse, q, k, v, r.start, a);
  } else {
    launch_forward<8>(s, y, lse, q, k, v, r.start, a);
  }
}

void attention_backward(cudaStream_t s, Scratch& scratch, float* dq, float* dk, float* dv, const float* dy,
                        const float* y, const float* lse, const float* q, const float* k, const float* v,
                        const int32_t* doc, const AttentionShape& shape) {
  const AttentionArgs a = make_args(shape);
  const DocumentRanges r = document_ranges(s, scratch, doc, a.T, sizeof(float) * static_cast<size_t>(a.H) * a.T);
  float* delta = static_cast<float*>(r.rest);
  attention_delta_kernel<<<row_blocks(a), kAttentionWarps * 32, 0, s>>>(delta, dy, y, a);
  check_launch("attention_delta_kernel");
  if (a.D <= 32) {
    launch_backward<1>(s, dq, dk, dv, dy, lse, delta, q, k, v, r, a);
  } else if (a.D <= 64) {
    launch_backward<2>(s, dq, dk, dv, dy, lse, delta, q, k, v, r, a);
  } else if (a.D <= 128) {
    launch_backward<4>(s, dq, dk, dv, dy, lse, delta, q, k, v, r, a);
  } else {
    launch_backward<8>(s, dq, dk, dv, dy, lse, delta, q, k, v, r, a);
  }
}

}  // namespace speedrun::cuda
