// Throughput of the GPT-2 tokenizer on the Brown corpus (.cache/corpus/brown):
// encode with a warm and a cold piece cache, encode from several threads, decode.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "util/error.h"
#include "util/paths.h"

namespace {

const std::string& brown_text() {
  static const std::string text = [] {
    std::vector<std::filesystem::path> files;
    const std::filesystem::path dir = speedrun::cache_dir() + "/corpus/brown";
    if (!std::filesystem::is_directory(dir)) throw speedrun::Error(dir.string() + " is missing; run scripts/setup.sh");
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      if (entry.path().extension() == ".txt") files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
    std::string all;
    for (const auto& file : files) {
      std::ifstream in(file, std::ios::binary);
      std::stringstream ss;
      ss << in.rdbuf();
      all += ss.str();
    }
    return all;
  }();
  return text;
}

const speedrun::Tokenizer& tokenizer() {
  static const speedrun::Tokenizer instance = speedrun::Tokenizer::load_default();
  return instance;
}

// Steady state: after the first pass every repeated piece comes from the cache.
void BM_EncodeBrown(benchmark::State& state) {
  const std::string& text = brown_text();
  size_t tokens = 0;
  for (auto _ : state) {
    auto ids = tokenizer().encode(text);
    tokens = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
  state.counters["tokens"] = static_cast<double>(tokens);
}
BENCHMARK(BM_EncodeBrown)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_EncodeBrown)->Unit(benchmark::kMillisecond)->UseRealTime()->Threads(2);

// One pass with an empty cache (a fresh tokenizer owns no cached pieces).
void BM_EncodeBrownColdCache(benchmark::State& state) {
  const std::string& text = brown_text();
  for (auto _ : state) {
    state.PauseTiming();
    const speedrun::Tokenizer fresh = speedrun::Tokenizer::load_default();
    state.ResumeTiming();
    auto ids = fresh.encode(text);
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
}
BENCHMARK(BM_EncodeBrownColdCache)->Unit(benchmark::kMillisecond)->Iterations(3);

void BM_DecodeBrown(benchmark::State& state) {
  const std::string& text = brown_text();
  const std::vector<uint32_t> ids = tokenizer().encode(text);
  for (auto _ : state) {
    std::string bytes = tokenizer().decode(ids);
    benchmark::DoNotOptimize(bytes.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
}
BENCHMARK(BM_DecodeBrown)->Unit(benchmark::kMillisecond);

void BM_Load(benchmark::State& state) {
  for (auto _ : state) {
    auto loaded = speedrun::Tokenizer::load_default();
    benchmark::DoNotOptimize(&loaded);
  }
}
BENCHMARK(BM_Load)->Unit(benchmark::kMillisecond)->Iterations(3);

}  // namespace
