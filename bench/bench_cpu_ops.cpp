// The CPU backend's hottest non-matmul ops at the shapes a training step runs them:
// attention forward and backward (tiny: T 512, 2 heads of 32, blocks of 64, the final
// window of 8 blocks; and a 124M-like head: T 4096, 6 heads of 128, blocks of 128,
// window 14) and the fused softcap cross-entropy over a chunk of 256 rows of the padded
// vocabulary. Items are visible (query, key) pairs per head for attention, logits for the
// cross-entropy. `speedrun bench` times the whole step; this isolates one op.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "backends/backend.h"
#include "backends/attention_tiles.h"
#include "model/attention_mask.h"

namespace {

using speedrun::AttentionShape;

struct AttentionCase {
  AttentionShape shape;
  std::vector<float> q, k, v, y, dy, lse, dq, dk, dv;
  std::vector<int32_t> doc;
  double visible_pairs = 0;
};

// Random q, k, v, dy and documents of ~700 tokens on average, as in web text.
AttentionCase attention_case(int T, int H, int D, int block, int window) {
  AttentionCase c;
  c.shape = {T, H, D, block, window, 0.12f};
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  const size_t n = static_cast<size_t>(T) * H * D;
  for (auto* x : {&c.q, &c.k, &c.v, &c.dy}) {
    x->resize(n);
    for (float& value : *x) value = normal(rng);
  }
  for (auto* x : {&c.y, &c.dq, &c.dk, &c.dv}) x->assign(n, 0.f);
  c.lse.assign(static_cast<size_t>(H) * T, 0.f);
  std::vector<int32_t> tokens(T);
  for (int32_t& t : tokens) t = rng() % 700 == 0 ? 50256 : 1;
  c.doc = speedrun::document_ids(tokens, 50256);
  const auto bounds = speedrun::tiles::document_bounds(c.doc.data(), T);
  c.visible_pairs = static_cast<double>(speedrun::tiles::visible_pairs(bounds, T, block, window));
  return c;
}

speedrun::Backend& cpu() {
  static const auto backend = speedrun::make_cpu_backend();
  return *backend;
}

void attention_forward(benchmark::State& state, int T, int H, int D, int block, int window) {
  AttentionCase c = attention_case(T, H, D, block, window);
  for (auto _ : state) {
    cpu().attention_forward(c.y.data(), nullptr, c.lse.data(), c.q.data(), c.k.data(), c.v.data(), {}, c.doc.data(),
                            c.shape);
    benchmark::DoNotOptimize(c.y.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * c.visible_pairs * H));
  state.counters["GFLOP/s"] = benchmark::Counter(4.0 * D * c.visible_pairs * H * state.iterations() / 1e9,
                                                 benchmark::Counter::kIsRate);
}

void attention_backward(benchmark::State& state, int T, int H, int D, int block, int window) {
  AttentionCase c = attention_case(T, H, D, block, window);
  cpu().attention_forward(c.y.data(), nullptr, c.lse.data(), c.q.data(), c.k.data(), c.v.data(), {}, c.doc.data(),
                          c.shape);
  for (auto _ : state) {
    cpu().attention_backward(c.dq.data(), c.dk.data(), c.dv.data(), c.dy.data(), c.y.data(), c.lse.data(), c.q.data(),
                             c.k.data(), c.v.data(), {}, c.doc.data(), c.shape);
    benchmark::DoNotOptimize(c.dq.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * c.visible_pairs * H));
  // FlashAttention's convention: the backward's FLOPs are 2.5 times the forward's.
  state.counters["GFLOP/s"] = benchmark::Counter(10.0 * D * c.visible_pairs * H * state.iterations() / 1e9,
                                                 benchmark::Counter::kIsRate);
}

BENCHMARK_CAPTURE(attention_forward, tiny, 512, 2, 32, 64, 8)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(attention_backward, tiny, 512, 2, 32, 64, 8)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(attention_forward, gpt124m_T4096, 4096, 6, 128, 128, 14)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(attention_backward, gpt124m_T4096, 4096, 6, 128, 128, 14)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The head's fused softcap + cross-entropy forward and backward over one chunk of rows.
void softcap_cross_entropy(benchmark::State& state) {
  const int rows = 256, V = 50304;
  std::mt19937_64 rng(2);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::vector<float> source(static_cast<size_t>(rows) * V), logits(source.size()), loss(rows);
  for (float& x : source) x = normal(rng);
  std::vector<int32_t> targets(rows);
  for (int32_t& t : targets) t = static_cast<int32_t>(rng() % 50257);
  for (auto _ : state) {
    state.PauseTiming();
    logits = source;  // the op works in place
    state.ResumeTiming();
    cpu().softcap_cross_entropy(logits.data(), loss.data(), targets.data(), rows, V, 15.f, 1.f / 1024);
    benchmark::DoNotOptimize(logits.data());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(rows) * V);
}
BENCHMARK(softcap_cross_entropy)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
