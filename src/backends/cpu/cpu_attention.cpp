// Document-causal sliding-window attention on the CPU, in float32.
// Under SPEC §3's rule the keys a query sees form one contiguous range
// [max(doc_start(q), (q/B - N + 1) * B), q], and the queries that see a key form
// [k, min(doc_end(k), (k/B + N) * B)): the kernels walk exactly those ranges, so the
// work is O(T * window) and no T x T matrix exists. The backward computes dq per query
// and dk, dv per key in separate passes, so every sum has a fixed order (deterministic).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backends/cpu/cpu_kernels.h"

namespace speedrun::cpu {
namespace {

struct DocumentRanges {
  std::vector<int> start;  // first token of each token's document
  std::vector<int> end;    // one past the last token of each token's document
};

DocumentRanges document_ranges(const int32_t* doc, int T) {
  DocumentRanges r{std::vector<int>(T), std::vector<int>(T)};
  for (int t = 0; t < T; ++t) r.start[t] = (t > 0 && doc[t] == doc[t - 1]) ? r.start[t - 1] : t;
  for (int t = T - 1; t >= 0; --t) r.end[t] = (t + 1 < T && doc[t] == doc[t + 1]) ? r.end[t + 1] : t + 1;
  return r;
}

int window_of(const AttentionShape& s) { return std::max(s.window_blocks, 1); }

int first_visible_key(const DocumentRanges& r, int q, const AttentionShape& s) {
  int window_start = (q / s.block_size - window_of(s) + 1) * s.block_size;
  return std::max(r.start[q], std::max(window_start, 0));
}

int last_seeing_query_end(const DocumentRanges& r, int k, const AttentionShape& s) {
  int window_end = (k / s.block_size + window_of(s)) * s.block_size;
  return std::min({r.end[k], window_end, s.T});
}

inline float dot(const float* a, const float* b, int n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float* y, float alpha, const float* x, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

void attention_forward(float* y, float* lse, const float* q, const float* k, const float* v, const int32_t* doc,
                       const AttentionShape& s) {
  const DocumentRanges ranges = document_ranges(doc, s.T);
  const size_t row = static_cast<size_t>(s.H) * s.D;
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for collapse(2) schedule(static)
    for (int h = 0; h < s.H; ++h) {
      for (int t = 0; t < s.T; ++t) {
        const float* qt = q + t * row + h * s.D;
        const int k0 = first_visible_key(ranges, t, s);
        const int n = t - k0 + 1;
        scores.resize(n);
        float max_score = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < n; ++j) {
          scores[j] = s.scale * dot(qt, k + (k0 + j) * row + h * s.D, s.D);
          max_score = std::max(max_score, scores[j]);
        }
        float total = 0.f;
        for (int j = 0; j < n; ++j) {
          scores[j] = std::exp(scores[j] - max_score);
          total += scores[j];
        }
        float* yt = y + t * row + h * s.D;
        std::fill(yt, yt + s.D, 0.f);
        const float inv_total = 1.f / total;
        for (int j = 0; j < n; ++j) axpy(yt, scores[j] * inv_total, v + (k0 + j) * row + h * s.D, s.D);
        lse[static_cast<size_t>(h) * s.T + t] = max_score + std::log(total);
      }
    }
  }
}

void attention_backward(float* dq, float* dk, float* dv, const float* dy, const float* y, const float* lse,
                        const float* q, const float* k, const float* v, const int32_t* doc,
                        const AttentionShape& s) {
  const DocumentRanges ranges = document_ranges(doc, s.T);
  const size_t row = static_cast<size_t>(s.H) * s.D;
  // delta[h, t] = <dy_t, y_t>: the softmax backward's row term.
  std::vector<float> delta(static_cast<size_t>(s.H) * s.T);
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < s.H; ++h) {
    for (int t = 0; t < s.T; ++t) {
      delta[static_cast<size_t>(h) * s.T + t] = dot(dy + t * row + h * s.D, y + t * row + h * s.D, s.D);
    }
  }
  // dS[q,k] = P[q,k] * (<dy_q, v_k> - delta_q), P recomputed from the saved lse.
  auto score_gradient = [&](int h, int qi, int ki) {
    const float* qt = q + qi * row + h * s.D;
    const float p = std::exp(s.scale * dot(qt, k + ki * row + h * s.D, s.D) - lse[static_cast<size_t>(h) * s.T + qi]);
    const float dp = dot(dy + qi * row + h * s.D, v + ki * row + h * s.D, s.D);
    return std::pair<float, float>{p, p * (dp - delta[static_cast<size_t>(h) * s.T + qi])};
  };
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < s.H; ++h) {
    for (int t = 0; t < s.T; ++t) {
      float* dqt = dq + t * row + h * s.D;
      std::fill(dqt, dqt + s.D, 0.f);
      for (int ki = first_visible_key(ranges, t, s); ki <= t; ++ki) {
        axpy(dqt, s.scale * score_gradient(h, t, ki).second, k + ki * row + h * s.D, s.D);
      }
    }
  }
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < s.H; ++h) {
    for (int ki = 0; ki < s.T; ++ki) {
      float* dkt = dk + ki * row + h * s.D;
      float* dvt = dv + ki * row + h * s.D;
      std::fill(dkt, dkt + s.D, 0.f);
      std::fill(dvt, dvt + s.D, 0.f);
      const int q_end = last_seeing_query_end(ranges, ki, s);
      for (int qi = ki; qi < q_end; ++qi) {
        auto [p, ds] = score_gradient(h, qi, ki);
        axpy(dkt, s.scale * ds, q + qi * row + h * s.D, s.D);
        axpy(dvt, p, dy + qi * row + h * s.D, s.D);
      }
    }
  }
}

}  // namespace speedrun::cpu
