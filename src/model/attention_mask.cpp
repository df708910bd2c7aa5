#include "model/attention_mask.h"

#include <algorithm>

namespace speedrun {

std::vector<int32_t> document_ids(std::span<const int32_t> tokens, int32_t end_of_text) {
  std::vector<int32_t> doc(tokens.size());
  int32_t count = 0;
  for (size_t t = 0; t < tokens.size(); ++t) {
    count += tokens[t] == end_of_text;
    doc[t] = count;
  }
  return doc;
}

std::vector<KeptBlock> select_key_blocks(std::span<const int32_t> doc, int block_size, int query_block,
                                         int window_blocks) {
  auto lo = [&](int b) { return doc[static_cast<size_t>(b) * block_size]; };
  auto hi = [&](int b) { return doc[static_cast<size_t>(b + 1) * block_size - 1]; };
  const int i = query_block;
  std::vector<int> full;     // nearest first
  std::vector<int> partial;  // nearest first
  for (int j = i; j >= 0; --j) {
    bool touching = lo(i) <= hi(j) && hi(i) >= lo(j);
    if (!touching) continue;
    bool is_full = j < i && lo(i) == hi(j) && hi(i) == lo(j);
    (is_full ? full : partial).push_back(j);
  }
  const int n_full = static_cast<int>(full.size());
  const int keep_full = std::min(n_full, std::max(window_blocks - 1, 0));
  const int keep_partial = std::min(static_cast<int>(partial.size()), std::max(window_blocks - n_full, 1));
  std::vector<KeptBlock> kept;
  for (int n = 0; n < keep_full; ++n) kept.push_back({full[n], BlockKind::kFull});
  for (int n = 0; n < keep_partial; ++n) kept.push_back({partial[n], BlockKind::kPartial});
  return kept;
}

std::vector<uint8_t> block_selection_mask(std::span<const int32_t> doc, int block_size, int window_blocks) {
  const int T = static_cast<int>(doc.size());
  const int num_blocks = T / block_size;
  std::vector<uint8_t> mask(static_cast<size_t>(T) * T, 0);
  for (int i = 0; i < num_blocks; ++i) {
    for (const KeptBlock& kb : select_key_blocks(doc, block_size, i, window_blocks)) {
      for (int q = i * block_size; q < (i + 1) * block_size; ++q) {
        for (int k = kb.key_block * block_size; k < (kb.key_block + 1) * block_size; ++k) {
          bool visible = kb.kind == BlockKind::kFull || (k <= q && doc[k] == doc[q]);
          mask[static_cast<size_t>(q) * T + k] = visible;
        }
      }
    }
  }
  return mask;
}

}  // namespace speedrun
