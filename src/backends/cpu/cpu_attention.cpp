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
#include "backends/cpu/vector_math.h"

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

// One head's rows [first, first + n) of a [T, H, D] tensor, transposed to [D, n]: a
// vector's dot products with a run of those rows become D vectorised passes along the run
// (no horizontal sum per pair). Built once per block of B rows, used by each of them.
struct TransposedRows {
  std::vector<float> values;
  int first = 0, n = 0;
  void load(const float* x, size_t row, int h, int D, int first_row, int count) {
    first = first_row;
    n = count;
    values.resize(static_cast<size_t>(D) * n);
    for (int j = 0; j < n; ++j) {
      const float* src = x + (first + j) * row + h * D;
      for (int d = 0; d < D; ++d) values[static_cast<size_t>(d) * n + j] = src[d];
    }
  }
  // out[j] = scale * <a, row (from + j)> for j < count, rows inside the loaded range.
  void dots(float* out, const float* a, float scale, int from, int count, int D) const {
    const int offset = from - first;
    std::fill(out, out + count, 0.f);
    for (int d = 0; d < D; ++d) {
      const float* column = values.data() + static_cast<size_t>(d) * n + offset;
      const float ad = a[d];
#pragma omp simd
      for (int j = 0; j < count; ++j) out[j] += ad * column[j];
    }
    if (scale != 1.f) {
#pragma omp simd
      for (int j = 0; j < count; ++j) out[j] *= scale;
    }
  }
};

int block_count(const AttentionShape& s) { return (s.T + s.block_size - 1) / s.block_size; }

}  // namespace

void attention_forward(float* y, float* lse, const float* q, const float* k, const float* v, const int32_t* doc,
                       const AttentionShape& s) {
  const DocumentRanges ranges = document_ranges(doc, s.T);
  const size_t row = static_cast<size_t>(s.H) * s.D;
  const int blocks = block_count(s);
#pragma omp parallel
  {
    std::vector<float> scores;
    TransposedRows keys;
    // A block of queries and a head per task: the block's keys are transposed once.
#pragma omp for collapse(2) schedule(dynamic)
    for (int h = 0; h < s.H; ++h) {
      for (int b = 0; b < blocks; ++b) {
        const int t0 = b * s.block_size, t1 = std::min(s.T, t0 + s.block_size);
        const int first_key = first_visible_key(ranges, t0, s);  // the block's earliest
        keys.load(k, row, h, s.D, first_key, t1 - first_key);
        for (int t = t0; t < t1; ++t) {
          const float* qt = q + t * row + h * s.D;
          const int k0 = first_visible_key(ranges, t, s);
          const int n = t - k0 + 1;
          scores.resize(n);
          keys.dots(scores.data(), qt, s.scale, k0, n, s.D);
          float max_score = -std::numeric_limits<float>::infinity();
          for (int j = 0; j < n; ++j) max_score = std::max(max_score, scores[j]);
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int j = 0; j < n; ++j) {
            scores[j] = exp_approx(scores[j] - max_score);
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
}

void attention_backward(float* dq, float* dk, float* dv, const float* dy, const float* y, const float* lse,
                        const float* q, const float* k, const float* v, const int32_t* doc,
                        const AttentionShape& s) {
  const DocumentRanges ranges = document_ranges(doc, s.T);
  const size_t row = static_cast<size_t>(s.H) * s.D;
  const int blocks = block_count(s);
  // delta[h, t] = <dy_t, y_t>: the softmax backward's row term.
  std::vector<float> delta(static_cast<size_t>(s.H) * s.T);
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < s.H; ++h) {
    for (int t = 0; t < s.T; ++t) {
      delta[static_cast<size_t>(h) * s.T + t] = dot(dy + t * row + h * s.D, y + t * row + h * s.D, s.D);
    }
  }
  // dS[q,k] = P[q,k] * (<dy_q, v_k> - delta_q), P recomputed from the saved lse, for a run
  // of pairs that share a query (one key each) or a key (one query each): the dot products
  // first, then the run's exps and dS in one vectorised loop.
  struct PairRun {
    std::vector<float> p, ds;
    void compute(int n, const float* logit, const float* dp, const float* lse, const float* delta, int stride) {
      p.resize(n);
      ds.resize(n);
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        p[j] = exp_approx(logit[j] - lse[j * stride]);
        ds[j] = p[j] * (dp[j] - delta[j * stride]);
      }
    }
  };
  // dq per query and dk, dv per key in two passes, each over (head, block) tasks whose
  // block's keys (queries) are transposed once: every sum has one fixed order.
#pragma omp parallel
  {
    std::vector<float> logit, dp;
    PairRun run;
    TransposedRows keys, values;
#pragma omp for collapse(2) schedule(dynamic)
    for (int h = 0; h < s.H; ++h) {
      for (int b = 0; b < blocks; ++b) {
        const int t0 = b * s.block_size, t1 = std::min(s.T, t0 + s.block_size);
        const int first_key = first_visible_key(ranges, t0, s);
        keys.load(k, row, h, s.D, first_key, t1 - first_key);
        values.load(v, row, h, s.D, first_key, t1 - first_key);
        for (int t = t0; t < t1; ++t) {
          const int k0 = first_visible_key(ranges, t, s), n = t - k0 + 1;
          logit.resize(n);
          dp.resize(n);
          keys.dots(logit.data(), q + t * row + h * s.D, s.scale, k0, n, s.D);
          values.dots(dp.data(), dy + t * row + h * s.D, 1.f, k0, n, s.D);
          const size_t at = static_cast<size_t>(h) * s.T + t;
          run.compute(n, logit.data(), dp.data(), lse + at, delta.data() + at, 0);
          float* dqt = dq + t * row + h * s.D;
          std::fill(dqt, dqt + s.D, 0.f);
          for (int j = 0; j < n; ++j) axpy(dqt, s.scale * run.ds[j], k + (k0 + j) * row + h * s.D, s.D);
        }
      }
    }
    TransposedRows queries, output_grads;
#pragma omp for collapse(2) schedule(dynamic)
    for (int h = 0; h < s.H; ++h) {
      for (int b = 0; b < blocks; ++b) {
        const int k0 = b * s.block_size, k1 = std::min(s.T, k0 + s.block_size);
        const int query_end = last_seeing_query_end(ranges, k1 - 1, s);  // the block's latest
        queries.load(q, row, h, s.D, k0, query_end - k0);
        output_grads.load(dy, row, h, s.D, k0, query_end - k0);
        for (int ki = k0; ki < k1; ++ki) {
          const int n = last_seeing_query_end(ranges, ki, s) - ki;
          logit.resize(n);
          dp.resize(n);
          queries.dots(logit.data(), k + ki * row + h * s.D, s.scale, ki, n, s.D);
          output_grads.dots(dp.data(), v + ki * row + h * s.D, 1.f, ki, n, s.D);
          const size_t at = static_cast<size_t>(h) * s.T + ki;
          run.compute(n, logit.data(), dp.data(), lse + at, delta.data() + at, 1);
          float* dkt = dk + ki * row + h * s.D;
          float* dvt = dv + ki * row + h * s.D;
          std::fill(dkt, dkt + s.D, 0.f);
          std::fill(dvt, dvt + s.D, 0.f);
          for (int m = 0; m < n; ++m) {
            axpy(dkt, s.scale * run.ds[m], q + (ki + m) * row + h * s.D, s.D);
            axpy(dvt, run.p[m], dy + (ki + m) * row + h * s.D, s.D);
          }
        }
      }
    }
  }
}

}  // namespace speedrun::cpu
