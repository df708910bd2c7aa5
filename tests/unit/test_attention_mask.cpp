// SPEC §3: the block-selection mask equals the per-element rule, and the window schedule.
#include <gtest/gtest.h>

#include <random>

#include "model/attention_mask.h"
#include "model/config.h"

namespace speedrun {
namespace {

std::vector<int32_t> random_tokens(int T, double doc_probability, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution is_eot(doc_probability);
  std::vector<int32_t> tokens(T);
  for (int32_t& t : tokens) t = is_eot(rng) ? 50256 : 7;
  return tokens;
}

TEST(AttentionMask, DocumentIdsCountEndOfTextInclusive) {
  std::vector<int32_t> tokens = {50256, 1, 2, 50256, 50256, 3};
  EXPECT_EQ(document_ids(tokens, 50256), (std::vector<int32_t>{1, 1, 1, 2, 3, 3}));
}

TEST(AttentionMask, BlockSelectionEqualsElementRuleOnRandomDocuments) {
  const int block = 8;
  const int T = 12 * block;
  int cases = 0;
  for (double p : {0.0, 0.01, 0.05, 0.2, 0.6}) {
    for (uint64_t seed = 0; seed < 6; ++seed) {
      const std::vector<int32_t> doc = document_ids(random_tokens(T, p, seed * 31 + 7), 50256);
      for (int window = 0; window <= 14; ++window) {
        const std::vector<uint8_t> mask = block_selection_mask(doc, block, window);
        for (int q = 0; q < T; ++q) {
          for (int k = 0; k < T; ++k) {
            ASSERT_EQ(mask[static_cast<size_t>(q) * T + k], key_visible(doc.data(), q, k, block, window))
                << "q=" << q << " k=" << k << " window=" << window << " p=" << p << " seed=" << seed;
          }
        }
        ++cases;
      }
    }
  }
  EXPECT_EQ(cases, 5 * 6 * 15);
}

TEST(AttentionMask, WindowOfZeroActsAsOneAndSeesOwnBlockOnly) {
  std::vector<int32_t> doc(32, 1);
  EXPECT_TRUE(key_visible(doc.data(), 17, 16, 8, 0));
  EXPECT_FALSE(key_visible(doc.data(), 17, 15, 8, 0));
  EXPECT_TRUE(key_visible(doc.data(), 17, 8, 8, 2));
  EXPECT_FALSE(key_visible(doc.data(), 17, 7, 8, 2));
  EXPECT_FALSE(key_visible(doc.data(), 17, 18, 8, 2));  // causal
}

TEST(WindowSchedule, MatchesSpecAtEndsAndRounding) {
  Config c;  // speedrun-124m: 1728 tokens, blocks of 128, 1770 steps
  EXPECT_EQ(long_window_blocks(c, 0), 1);
  EXPECT_EQ(long_window_blocks(c, 1770), 14);
  EXPECT_EQ(short_window_blocks(long_window_blocks(c, 0)), 0);
  EXPECT_EQ(short_window_blocks(long_window_blocks(c, 1770)), 7);
  for (int s = 0; s <= 1770; ++s) {
    // ceil(1728 s / (128 n)) computed independently in double with a guard for exact multiples.
    const double exact = 1728.0 * s / (128.0 * 1770);
    int expected = static_cast<int>(std::ceil(exact - 1e-12));
    expected = std::max(expected, 1);
    ASSERT_EQ(long_window_blocks(c, s), expected) << "step " << s;
  }
}

TEST(WindowSchedule, LayerPatternLongShortMirrored) {
  Config c;
  const std::string expected = "LSSSLSSLSSSL";
  for (int i = 0; i < 12; ++i) EXPECT_EQ(c.layer_uses_long_window(i), expected[i] == 'L') << "layer " << i;
}

}  // namespace
}  // namespace speedrun
