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

// One call's tensors ([T, H, D] rows, lse and delta [H, T]) and its documents' ranges.
struct AttentionTensors {
  const AttentionShape& s;
  const DocumentRanges& ranges;
  size_t row;  // floats between consecutive tokens: H * D
  const float *q, *k, *v, *dy, *lse, *delta;
  float *y, *lse_out, *dq, *dk, *dv;
  const float* at(const float* x, int t, int h) const { return x + t * row + h * s.D; }
  float* at(float* x, int t, int h) const { return x + t * row + h * s.D; }
};

// A thread's working memory, reused across its tasks.
struct AttentionScratch {
  std::vector<float> logit, dp, p, ds;
  TransposedRows first, second;
  void resize(int n) {
    logit.resize(n);
    dp.resize(n);
    p.resize(n);
    ds.resize(n);
  }
  // For a run of n pairs that share a query (x, g: its q and dy; rows: the keys' k and v
  // from `from`) or a key (x, g: its k and v; rows: the queries' q and dy): logit =
  // scale <x, first row>, dP = <g, second row>, then P recomputed from the saved lse and
  // dS = P * (dP - delta). lse and delta advance by `stride` per pair (0 for one query).
  void pair_run(const float* x, const float* g, float scale, int from, int n, int D, const float* lse,
                const float* delta, int stride) {
    resize(n);
    first.dots(logit.data(), x, scale, from, n, D);
    second.dots(dp.data(), g, 1.f, from, n, D);
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      p[j] = exp_approx(logit[j] - lse[j * stride]);
      ds[j] = p[j] * (dp[j] - delta[j * stride]);
    }
  }
};

// The forward of one block of queries of head h: the block's keys transposed once, then
// each query's visible run.
void forward_block(const AttentionTensors& a, int h, int b, AttentionScratch& scratch) {
  const AttentionShape& s = a.s;
  const int t0 = b * s.block_size, t1 = std::min(s.T, t0 + s.block_size);
  const int first_key = first_visible_key(a.ranges, t0, s);  // the block's earliest
  scratch.first.load(a.k, a.row, h, s.D, first_key, t1 - first_key);
  for (int t = t0; t < t1; ++t) {
    const int k0 = first_visible_key(a.ranges, t, s), n = t - k0 + 1;
    scratch.logit.resize(n);  // the scores, then their exps
    float* scores = scratch.logit.data();
    scratch.first.dots(scores, a.at(a.q, t, h), s.scale, k0, n, s.D);
    float max_score = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < n; ++j) max_score = std::max(max_score, scores[j]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int j = 0; j < n; ++j) {
      scores[j] = exp_approx(scores[j] - max_score);
      total += scores[j];
    }
    float* yt = a.at(a.y, t, h);
    std::fill(yt, yt + s.D, 0.f);
    const float inv_total = 1.f / total;
    for (int j = 0; j < n; ++j) axpy(yt, scores[j] * inv_total, a.at(a.v, k0 + j, h), s.D);
    a.lse_out[static_cast<size_t>(h) * s.T + t] = max_score + std::log(total);
  }
}

// dq of one block of queries of head h (its keys and values transposed once).
void query_gradients_of_block(const AttentionTensors& a, int h, int b, AttentionScratch& scratch) {
  const AttentionShape& s = a.s;
  const int t0 = b * s.block_size, t1 = std::min(s.T, t0 + s.block_size);
  const int first_key = first_visible_key(a.ranges, t0, s);
  scratch.first.load(a.k, a.row, h, s.D, first_key, t1 - first_key);
  scratch.second.load(a.v, a.row, h, s.D, first_key, t1 - first_key);
  for (int t = t0; t < t1; ++t) {
    const int k0 = first_visible_key(a.ranges, t, s), n = t - k0 + 1;
    const size_t at = static_cast<size_t>(h) * s.T + t;
    scratch.pair_run(a.at(a.q, t, h), a.at(a.dy, t, h), s.scale, k0, n, s.D, a.lse + at, a.delta + at, 0);
    float* dqt = a.at(a.dq, t, h);
    std::fill(dqt, dqt + s.D, 0.f);
    for (int j = 0; j < n; ++j) axpy(dqt, s.scale * scratch.ds[j], a.at(a.k, k0 + j, h), s.D);
  }
}

// dk and dv of one block of keys of head h (the queries and output gradients that see it
// transposed once).
void key_gradients_of_block(const AttentionTensors& a, int h, int b, AttentionScratch& scratch) {
  const AttentionShape& s = a.s;
  const int k0 = b * s.block_size, k1 = std::min(s.T, k0 + s.block_size);
  const int query_end = last_seeing_query_end(a.ranges, k1 - 1, s);  // the block's latest
  scratch.first.load(a.q, a.row, h, s.D, k0, query_end - k0);
  scratch.second.load(a.dy, a.row, h, s.D, k0, query_end - k0);
  for (int ki = k0; ki < k1; ++ki) {
    const int n = last_seeing_query_end(a.ranges, ki, s) - ki;
    const size_t at = static_cast<size_t>(h) * s.T + ki;
    scratch.pair_run(a.at(a.k, ki, h), a.at(a.v, ki, h), s.scale, ki, n, s.D, a.lse + at, a.delta + at, 1);
    float* dkt = a.at(a.dk, ki, h);
    float* dvt = a.at(a.dv, ki, h);
    std::fill(dkt, dkt + s.D, 0.f);
    std::fill(dvt, dvt + s.D, 0.f);
    for (int m = 0; m < n; ++m) {
      axpy(dkt, s.scale * scratch.ds[m], a.at(a.q, ki + m, h), s.D);
      axpy(dvt, scratch.p[m], a.at(a.dy, ki + m, h), s.D);
    }
  }
}

// Runs task(h, b, scratch) for every head and block, one scratch per thread.
template <typename Task>
void for_each_head_and_block(const AttentionShape& s, Task task) {
  const int blocks = block_count(s);
#pragma omp parallel
  {
    AttentionScratch scratch;
#pragma omp for collapse(2) schedule(dynamic)
    for (int h = 0; h < s.H; ++h) {
      for (int b = 0; b < blocks; ++b) task(h, b, scratch);
    }
  }
}

}  // namespace

void attention_forward(float* y, float* lse, const float* q, const float* k, const float* v, const int32_t* doc,
                       const AttentionShape& s) {
  const DocumentRanges ranges = document_ranges(doc, s.T);
  const AttentionTensors a{s, ranges, static_cast<size_t>(s.H) * s.D, q, k, v, nullptr, nullptr, nullptr,
                           y, lse, nullptr, nullptr, nullptr};
  for_each_head_and_block(s, [&](int h, int b, AttentionScratch& scratch) { forward_block(a, h, b, scratch); });
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
  // dq per query, then dk and dv per key: every sum has one fixed order, whatever the threads.
  const AttentionTensors a{s, ranges, row, q, k, v, dy, lse, delta.data(), nullptr, nullptr, dq, dk, dv};
  for_each_head_and_block(s, [&](int h, int b, AttentionScratch& scratch) {
    query_gradients_of_block(a, h, b, scratch);
  });
  for_each_head_and_block(s, [&](int h, int b, AttentionScratch& scratch) { key_gradients_of_block(a, h, b, scratch); });
}

}  // namespace speedrun::cpu
