// The sampler's incremental decode against GPT::forward on a random micro model with
// document boundaries and sliding windows, and the determinism of sampling.
#include <gtest/gtest.h>

#include <limits>

#include <cmath>
#include <random>

#include "backends/backend.h"
#include "model/gpt.h"
#include "model/sampler.h"
#include "util/error.h"

namespace speedrun {
namespace {

constexpr int32_t kEot = 50256;

// micro's structure with GPT-2's vocabulary, so that 50256 really separates documents.
struct RandomModel {
  std::unique_ptr<Backend> be = make_cpu_backend();
  Config config;
  std::unique_ptr<GPT> model;

  explicit RandomModel(int T) {
    config = Config::preset("micro");
    config.vocab_size = 50257;
    config.document_separator = kEot;
    model = std::make_unique<GPT>(config, *be, T, T);
    std::mt19937_64 rng(42);
    std::uniform_real_distribution<float> noise(-1.f, 1.f);
    std::vector<float> params(model->layout().total());
    for (float& p : params) p = 0.5f * noise(rng);
    for (const ParamSpec& s : model->layout().specs()) {
      if (s.name.find("lambdas") != std::string::npos || s.name == "skip_weights") {
        for (size_t i = 0; i < s.count; ++i) params[s.offset + i] = 0.6f + 0.3f * params[s.offset + i];
      }
    }
    model->load_parameters(params);
  }
};

// T+1 tokens: documents starting at 0, 37 and 90 (and a short one at 91).
std::vector<int32_t> tokens_with_documents(int T) {
  std::mt19937 rng(7);
  std::vector<int32_t> tokens(T + 1);
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % 2000);
  for (int at : {0, 37, 90, 91}) tokens[at] = kEot;
  return tokens;
}

double mean_incremental_loss(GPT& model, int window, const std::vector<int32_t>& tokens) {
  Sampler sampler(model, window);
  double total = 0;
  const int T = static_cast<int>(tokens.size()) - 1;
  for (int t = 0; t < T; ++t) {
    const std::vector<float>& logits = sampler.feed(tokens[t]);
    double max = -INFINITY;
    for (float z : logits) max = std::max(max, static_cast<double>(z));
    double sum = 0;
    for (float z : logits) sum += std::exp(z - max);
    total += max + std::log(sum) - logits[tokens[t + 1]];
  }
  return total / T;
}

TEST(Sampler, IncrementalLossEqualsForwardForEveryWindow) {
  const int T = 128;  // 16 blocks of 8: windows of 1..3 blocks cut real context
  RandomModel m(T);
  const std::vector<int32_t> tokens = tokens_with_documents(T);
  const std::vector<int32_t> inputs(tokens.begin(), tokens.end() - 1), targets(tokens.begin() + 1, tokens.end());
  std::vector<double> losses;
  for (int window : {1, 2, 3, 16}) {
    const double expected = m.model->forward(inputs, targets, window);
    const double got = mean_incremental_loss(*m.model, window, tokens);
    EXPECT_NEAR(got, expected, 1e-5 * expected) << "window " << window;
    losses.push_back(expected);
  }
  // The windows matter on this sequence, so the comparison above checks the masking.
  EXPECT_NE(losses[0], losses[1]);
  EXPECT_NE(losses[1], losses[2]);
}

TEST(Sampler, DocumentStartHidesEarlierTokens) {
  RandomModel m(64);
  // After an end-of-text token, what came before cannot matter.
  Sampler a(*m.model, 4), b(*m.model, 4);
  for (int32_t t : {5, 17, 99, 3}) a.feed(t);
  for (int32_t t : {8, 8, 1000, 2}) b.feed(t);
  a.feed(kEot);
  b.feed(kEot);
  const std::vector<float> la = a.feed(42), lb = b.feed(42);
  EXPECT_EQ(la, lb);
}

TEST(Sampler, CacheKeepsOnlyWhatTheWindowCanSee) {
  RandomModel m(64);
  Sampler sampler(*m.model, 2);  // long window 2 blocks of 8 tokens
  sampler.feed(kEot);
  for (int i = 0; i < 300; ++i) sampler.feed(100 + i);
  EXPECT_EQ(sampler.position(), 301);
  EXPECT_LE(sampler.cached_positions(), 2 * 16 + 8);
  EXPECT_GE(sampler.cached_positions(), 9);  // the query's own block and the one before
}

std::vector<int32_t> sample(GPT& model, uint64_t seed, double temperature, int top_k) {
  Sampler sampler(model, 2);
  SamplingOptions options;
  options.seed = seed;
  options.temperature = temperature;
  options.top_k = top_k;
  TokenChooser chooser(options, model.config().vocab_size);
  const std::vector<int32_t> prompt = {kEot, 464, 2068};
  return generate(sampler, prompt, 24, chooser);
}

TEST(Sampler, SameSeedSameTokensOtherSeedOtherTokens) {
  RandomModel m(64);
  const auto a = sample(*m.model, 1, 1.0, 0);
  const auto b = sample(*m.model, 1, 1.0, 0);
  const auto c = sample(*m.model, 2, 1.0, 0);
  ASSERT_EQ(a.size(), 24u);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  for (int32_t t : a) EXPECT_LT(t, 50257);  // never a padding column of the head
}

TEST(Sampler, TemperatureZeroAndTopOneAreGreedy) {
  RandomModel m(64);
  const auto greedy = sample(*m.model, 1, 0.0, 0);
  EXPECT_EQ(greedy, sample(*m.model, 99, 0.0, 0));
  EXPECT_EQ(greedy, sample(*m.model, 5, 1.0, 1));
  // Each greedy token is the argmax of the logits after the tokens before it.
  Sampler sampler(*m.model, 2);
  std::vector<float> logits;
  for (int32_t t : {kEot, 464, 2068}) logits = sampler.feed(t);
  for (int32_t token : greedy) {
    const auto best = std::max_element(logits.begin(), logits.begin() + 50257) - logits.begin();
    ASSERT_EQ(token, best);
    logits = sampler.feed(token);
  }
}

TEST(Sampler, TopKRestrictsTheCandidates) {
  std::vector<float> logits(10, 0.f);
  logits[3] = 5.f;
  logits[7] = 4.9f;
  logits[9] = 4.8f;
  SamplingOptions options;
  options.top_k = 2;
  options.temperature = 10.0;  // nearly uniform among the candidates
  TokenChooser chooser(options, 10);
  int seen[10] = {};
  for (int i = 0; i < 400; ++i) ++seen[chooser.choose(logits)];
  EXPECT_GT(seen[3], 0);
  EXPECT_GT(seen[7], 0);
  EXPECT_EQ(seen[3] + seen[7], 400);
}

// Overflowed weights give NaN logits: choosing among them would print arbitrary text.
TEST(Sampler, ANonFiniteLogitIsAnErrorNotAChoice) {
  std::vector<float> logits(10, 1.f);
  logits[4] = std::numeric_limits<float>::quiet_NaN();
  for (const double temperature : {0.0, 1.0}) {
    SamplingOptions options;
    options.temperature = temperature;
    TokenChooser chooser(options, 10);
    EXPECT_THROW(chooser.choose(logits), Error) << temperature;
  }
}

TEST(Sampler, RejectsTokensOutsideTheVocabulary) {
  RandomModel m(64);
  Sampler sampler(*m.model, 1);
  EXPECT_THROW(sampler.feed(50257), Error);
  EXPECT_THROW(sampler.feed(-1), Error);
}

}  // namespace
}  // namespace speedrun
