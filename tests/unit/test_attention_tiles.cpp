// The flash-attention tile schedule (src/backends/attention_tiles.h) against the brute-force
// per-element rule of SPEC §3 (key_visible, itself tested against the block selection):
// coverage, exact "fully visible" flags, the backward schedule as the exact transpose, and
// no visited tile without a visible pair (the bound asserted is 0: see the header's proof).
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "backends/attention_tiles.h"
#include "model/attention_mask.h"

namespace speedrun {
namespace {

using tiles::DocumentBounds;

// Per-token document ids: a new document starts at each token with probability p (the
// first token always starts one), plus boundaries forced at the given positions.
std::vector<int32_t> random_documents(int T, double p, uint64_t seed, const std::vector<int>& forced = {}) {
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution starts(p);
  std::vector<int32_t> doc(T);
  int32_t id = 0;
  for (int t = 0; t < T; ++t) {
    bool boundary = t > 0 && starts(rng);
    for (int f : forced) boundary = boundary || (t > 0 && t == f);
    id += boundary;
    doc[t] = id;
  }
  return doc;
}

struct Case {
  std::string name;
  std::vector<int32_t> doc;
  int block_size;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  out.push_back({"one document, T=640", std::vector<int32_t>(640, 3), 128});
  out.push_back({"one document, T=1000 (not a tile multiple)", std::vector<int32_t>(1000, 0), 16});
  out.push_back({"single token", std::vector<int32_t>(1, 0), 128});
  // Every token its own document (all length-1 documents).
  std::vector<int32_t> singles(300);
  for (int t = 0; t < 300; ++t) singles[t] = t;
  out.push_back({"all length-1 documents", singles, 16});
  // Boundaries just inside and around tile edges, plus random ones.
  out.push_back({"boundaries inside tiles", random_documents(777, 0.004, 1, {1, 63, 64, 65, 127, 129, 200, 201}), 16});
  for (uint64_t seed = 0; seed < 3; ++seed) {
    out.push_back({"sparse documents seed " + std::to_string(seed), random_documents(1100, 0.003, 10 + seed), 16});
    out.push_back({"dense documents seed " + std::to_string(seed), random_documents(513, 0.05, 20 + seed), 16});
    out.push_back({"many short documents seed " + std::to_string(seed), random_documents(300, 0.4, 30 + seed), 8});
    out.push_back({"block 128 seed " + std::to_string(seed), random_documents(1280 + 37, 0.001, 40 + seed), 128});
  }
  return out;
}

// Visibility of all (q, k) as a dense T x T bitmap from the brute-force rule.
std::vector<uint8_t> brute_mask(const std::vector<int32_t>& doc, int block_size, int window) {
  const int T = static_cast<int>(doc.size());
  std::vector<uint8_t> m(static_cast<size_t>(T) * T);
  for (int q = 0; q < T; ++q) {
    for (int k = 0; k < T; ++k) m[static_cast<size_t>(q) * T + k] = key_visible(doc.data(), q, k, block_size, window);
  }
  return m;
}

// Per query row and 32-key column tile: does it hold a visible key, are all its keys visible.
// Tiles of 64 and 128 keys are unions of these.
constexpr int kFine = 32;
struct FineTiles {
  int tiles;
  std::vector<uint8_t> any, all;
};

FineTiles fine_tiles(const std::vector<uint8_t>& mask, int T) {
  FineTiles f{tiles::tile_count(T, kFine), {}, {}};
  f.any.assign(static_cast<size_t>(T) * f.tiles, 0);
  f.all.assign(static_cast<size_t>(T) * f.tiles, 1);
  for (int q = 0; q < T; ++q) {
    for (int k = 0; k < T; ++k) {
      const size_t cell = static_cast<size_t>(q) * f.tiles + k / kFine;
      if (mask[static_cast<size_t>(q) * T + k]) {
        f.any[cell] = 1;
      } else {
        f.all[cell] = 0;
      }
    }
  }
  return f;
}

TEST(AttentionTiles, RowAndColumnRangesEqualTheRule) {
  for (const Case& c : cases()) {
    const int T = static_cast<int>(c.doc.size());
    const DocumentBounds b = tiles::document_bounds(c.doc.data(), T);
    for (int window = 0; window <= 15; ++window) {
      const int w = tiles::effective_window(window);
      const std::vector<uint8_t> mask = brute_mask(c.doc, c.block_size, window);
      std::vector<int> end(T);
      for (int k = 0; k < T; ++k) end[k] = tiles::seeing_query_end(b.end[k], k, c.block_size, w, T);
      for (int q = 0; q < T; ++q) {
        const int first = tiles::first_visible_key(b.start[q], q, c.block_size, w);
        for (int k = 0; k < T; ++k) {
          const bool visible = mask[static_cast<size_t>(q) * T + k];
          ASSERT_EQ(tiles::in_query_range(first, q, k), visible) << c.name << " window " << window << " q " << q << " k " << k;
          ASSERT_EQ(tiles::in_key_range(end[k], k, q), visible) << c.name << " window " << window << " q " << q << " k " << k;
        }
      }
    }
  }
}

// The forward schedule covers every visible pair, flags exactly the tiles whose pairs are
// all visible (tiles reaching past T never), visits no tile without a visible pair, and the
// backward schedule (per key tile) visits exactly the same tile pairs.
TEST(AttentionTiles, SchedulesCoverVisiblePairsExactlyAndTranspose) {
  long long full_tiles_seen = 0, masked_tiles_seen = 0;
  for (const Case& c : cases()) {
    const int T = static_cast<int>(c.doc.size());
    const DocumentBounds b = tiles::document_bounds(c.doc.data(), T);
    for (int window = 0; window <= 15; ++window) {
      const int w = tiles::effective_window(window);
      const FineTiles fine = fine_tiles(brute_mask(c.doc, c.block_size, window), T);
      for (int query_tile : {32, 64, 128}) {
        for (int key_tile : {32, 64, 128}) {
          const std::string where = c.name + " window " + std::to_string(window) + " BQ " +
                                    std::to_string(query_tile) + " BK " + std::to_string(key_tile);
          const int nq = tiles::tile_count(T, query_tile), nk = tiles::tile_count(T, key_tile);
          std::vector<uint8_t> pair_count_positive(static_cast<size_t>(nq) * nk, 0);
          std::vector<uint8_t> all_visible(static_cast<size_t>(nq) * nk, 1);
          const int per_tile = key_tile / kFine;
          for (int q = 0; q < T; ++q) {
            for (int f = 0; f < fine.tiles; ++f) {
              const size_t tile = static_cast<size_t>(q / query_tile) * nk + f / per_tile;
              pair_count_positive[tile] |= fine.any[static_cast<size_t>(q) * fine.tiles + f];
              all_visible[tile] &= fine.all[static_cast<size_t>(q) * fine.tiles + f];
            }
          }
          std::set<std::pair<int, int>> forward;
          for (const tiles::QueryTileSchedule& s :
               tiles::forward_schedule(b, T, c.block_size, window, query_tile, key_tile)) {
            const int i = s.q0 / query_tile;
            ASSERT_GE(s.keys.begin, 0) << where;
            ASSERT_LE(s.keys.end, nk) << where;
            for (int j = s.keys.begin; j < s.keys.end; ++j) {
              const size_t tile = static_cast<size_t>(i) * nk + j;
              forward.insert({i, j});
              // Bound on wasted tiles: 0. Every visited tile holds a visible pair.
              ASSERT_TRUE(pair_count_positive[tile]) << where << " visits empty tile " << i << "," << j;
              const bool in_bounds = (j + 1) * key_tile <= T;
              const bool flagged = s.fully_visible[j - s.keys.begin];
              if (flagged) {
                ASSERT_TRUE(in_bounds && all_visible[tile]) << where << " tile " << i << "," << j;
              } else {
                ASSERT_FALSE(in_bounds && all_visible[tile]) << where << " misses full tile " << i << "," << j;
              }
              (flagged ? full_tiles_seen : masked_tiles_seen) += 1;
            }
          }
          for (int i = 0; i < nq; ++i) {
            for (int j = 0; j < nk; ++j) {
              if (pair_count_positive[static_cast<size_t>(i) * nk + j]) {
                ASSERT_TRUE(forward.count({i, j})) << where << " does not visit tile " << i << "," << j;
              }
            }
          }
          std::set<std::pair<int, int>> backward;
          for (int j = 0; j < nk; ++j) {
            const int k0 = j * key_tile;
            const int last_key = std::min(k0 + key_tile, T) - 1;
            const int end = tiles::seeing_query_end(b.end[last_key], last_key, c.block_size, w, T);
            const tiles::TileRange r = tiles::query_tiles_for_key_tile(k0, end, query_tile);
            ASSERT_GE(r.begin, 0) << where;
            ASSERT_LE(r.end, nq) << where;
            for (int i = r.begin; i < r.end; ++i) backward.insert({i, j});
          }
          ASSERT_EQ(backward, forward) << where;
        }
      }
    }
  }
  // The flags must take both values somewhere, or the exactness checks above prove little.
  EXPECT_GT(full_tiles_seen, 1000);
  EXPECT_GT(masked_tiles_seen, 1000);
}

TEST(AttentionTiles, DocumentBoundsFollowRunsOfEqualIds) {
  const std::vector<int32_t> doc = {0, 0, 1, 2, 2, 2, 5};
  const DocumentBounds b = tiles::document_bounds(doc.data(), 7);
  EXPECT_EQ(b.start, (std::vector<int>{0, 0, 2, 3, 3, 3, 6}));
  EXPECT_EQ(b.end, (std::vector<int>{2, 2, 3, 6, 6, 6, 7}));
}

TEST(AttentionTiles, WindowZeroActsAsOneAndEndDoesNotOverflow) {
  EXPECT_EQ(tiles::effective_window(0), 1);
  EXPECT_EQ(tiles::first_visible_key(0, 300, 128, 1), 256);
  EXPECT_EQ(tiles::first_visible_key(0, 300, 128, 2), 128);
  EXPECT_EQ(tiles::first_visible_key(270, 300, 128, 3), 270);
  // (k / B + window) * B passes INT_MAX here; the end must still be the document end.
  const int T = INT_MAX - 7;
  const int k = INT_MAX - 300;
  EXPECT_EQ(tiles::seeing_query_end(T, k, 128, 14, T), T);
  EXPECT_EQ(tiles::seeing_query_end(k + 5, k, 128, 14, T), k + 5);
}

TEST(AttentionTiles, VisiblePairsCountsEachQueryRange) {
  // One document of 300 tokens, blocks of 128, window 1: each query sees its own block's
  // prefix, so the count is sum over blocks of n (n + 1) / 2.
  const std::vector<int32_t> doc(300, 0);
  const DocumentBounds b = tiles::document_bounds(doc.data(), 300);
  EXPECT_EQ(tiles::visible_pairs(b, 300, 128, 1), 128LL * 129 / 2 * 2 + 44LL * 45 / 2);
  EXPECT_EQ(tiles::visible_pairs(b, 300, 128, 14), 300LL * 301 / 2);
}

}  // namespace
}  // namespace speedrun
