// Tile schedule of the block-sparse flash attention (SPEC §3's equivalent rule), shared by
// the CUDA kernels and the CPU tests: which key tiles a query tile visits, which need a mask.
//
// Under the rule "k visible to q iff k <= q, doc[k] == doc[q], q/B - k/B < max(N, 1)" the
// keys a query sees form one contiguous range [first_visible_key(q), q], and the queries
// that see a key form [k, seeing_query_end(k)). Both ends are non-decreasing in q (in k), so
// a query tile [q0, q1) needs exactly the key tiles meeting [first(q0), q1 - 1], a key tile
// [k0, k1) exactly the query tiles meeting [k0, end(k1 - 1)); every tile so visited holds at
// least one visible pair (the diagonal or the first query's range), and the two schedules
// are transposes of each other. The unit test checks all of this by brute force.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define SPEEDRUN_HOST_DEVICE __host__ __device__
#else
#define SPEEDRUN_HOST_DEVICE
#endif

namespace speedrun::tiles {

// A window of N blocks means the query's own block and N - 1 before it; N = 0 acts as 1.
SPEEDRUN_HOST_DEVICE inline int effective_window(int window_blocks) { return window_blocks > 1 ? window_blocks : 1; }

// The first key query q sees, given the first token of q's document. `window` is effective.
SPEEDRUN_HOST_DEVICE inline int first_visible_key(int doc_start_of_q, int q, int block_size, int window) {
  const int window_start = (q / block_size - window + 1) * block_size;
  const int start = window_start > 0 ? window_start : 0;
  return doc_start_of_q > start ? doc_start_of_q : start;
}

// One past the last query that sees key k, given one past the last token of k's document.
// 64-bit: (k / B + window) * B can pass INT_MAX for long sequences and wide windows.
SPEEDRUN_HOST_DEVICE inline int seeing_query_end(int doc_end_of_k, int k, int block_size, int window, int T) {
  const long long window_end = (static_cast<long long>(k / block_size) + window) * block_size;
  long long end = doc_end_of_k < T ? doc_end_of_k : T;
  if (window_end < end) end = window_end;
  return static_cast<int>(end);
}

// Whether key k is visible to query q, from q's visible range (the form the kernels mask with).
SPEEDRUN_HOST_DEVICE inline bool in_query_range(int first_key_of_q, int q, int k) {
  return k >= first_key_of_q && k <= q;
}

// The same from k's side: q sees k iff k <= q < seeing_query_end(k).
SPEEDRUN_HOST_DEVICE inline bool in_key_range(int seeing_end_of_k, int k, int q) { return q >= k && q < seeing_end_of_k; }

struct TileRange {
  int begin;  // first tile index
  int end;    // one past the last
};

SPEEDRUN_HOST_DEVICE inline int tile_count(int T, int tile) { return (T + tile - 1) / tile; }

// Key tiles (of `key_tile` keys) that query rows [q0, q1) visit; first_key_of_q0 =
// first_visible_key(q0). Every tile in the range holds a visible pair.
SPEEDRUN_HOST_DEVICE inline TileRange key_tiles_for_query_tile(int first_key_of_q0, int q1, int key_tile) {
  return TileRange{first_key_of_q0 / key_tile, (q1 - 1) / key_tile + 1};
}

// Query tiles (of `query_tile` rows) that see keys [k0, k1); seeing_end_of_last_key =
// seeing_query_end(k1 - 1). Exactly the transpose of key_tiles_for_query_tile.
SPEEDRUN_HOST_DEVICE inline TileRange query_tiles_for_key_tile(int k0, int seeing_end_of_last_key, int query_tile) {
  return TileRange{k0 / query_tile, (seeing_end_of_last_key - 1) / query_tile + 1};
}

// True when every query in [q0, q1) sees every key in [k0, k1), so no per-element mask is
// needed; first_key_of_last_query = first_visible_key(q1 - 1), the largest first key of the
// tile. Kernels pass the unclamped k1 = k0 + tile: a tile reaching past T is then never
// "fully visible" (k1 - 1 <= q0 < T fails), so its zero-filled keys always get masked.
SPEEDRUN_HOST_DEVICE inline bool tile_fully_visible(int first_key_of_last_query, int q0, int k0, int k1) {
  return k1 - 1 <= q0 && k0 >= first_key_of_last_query;
}

// Per-token document ranges [start[t], end[t]) from per-token document ids (equal ids that
// are adjacent form one document; the ids need not be increasing). Host form of what the
// CUDA code computes with two scans.
struct DocumentBounds {
  std::vector<int> start;
  std::vector<int> end;
};

inline DocumentBounds document_bounds(const int32_t* doc, int T) {
  DocumentBounds b{std::vector<int>(T), std::vector<int>(T)};
  for (int t = 0; t < T; ++t) b.start[t] = (t > 0 && doc[t] == doc[t - 1]) ? b.start[t - 1] : t;
  for (int t = T - 1; t >= 0; --t) b.end[t] = (t + 1 < T && doc[t] == doc[t + 1]) ? b.end[t + 1] : t + 1;
  return b;
}

// The whole forward schedule of one sequence on the host: key tiles per query tile and
// whether each visited tile needs the mask. Used by tests and FLOP counts.
struct QueryTileSchedule {
  int q0, q1;
  TileRange keys;
  std::vector<uint8_t> fully_visible;  // one flag per key tile in `keys`
};

inline std::vector<QueryTileSchedule> forward_schedule(const DocumentBounds& b, int T, int block_size,
                                                       int window_blocks, int query_tile, int key_tile) {
  const int window = effective_window(window_blocks);
  std::vector<QueryTileSchedule> out;
  for (int i = 0; i < tile_count(T, query_tile); ++i) {
    QueryTileSchedule s;
    s.q0 = i * query_tile;
    s.q1 = s.q0 + query_tile < T ? s.q0 + query_tile : T;
    s.keys = key_tiles_for_query_tile(first_visible_key(b.start[s.q0], s.q0, block_size, window), s.q1, key_tile);
    const int last_first = first_visible_key(b.start[s.q1 - 1], s.q1 - 1, block_size, window);
    for (int j = s.keys.begin; j < s.keys.end; ++j) {
      s.fully_visible.push_back(tile_fully_visible(last_first, s.q0, j * key_tile, (j + 1) * key_tile));
    }
    out.push_back(std::move(s));
  }
  return out;
}

// Visible (query, key) pairs of one head: the FLOP count of attention is 4 D pairs forward.
inline long long visible_pairs(const DocumentBounds& b, int T, int block_size, int window_blocks) {
  const int window = effective_window(window_blocks);
  long long pairs = 0;
  for (int q = 0; q < T; ++q) pairs += q - first_visible_key(b.start[q], q, block_size, window) + 1;
  return pairs;
}

}  // namespace speedrun::tiles
