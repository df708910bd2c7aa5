// The document-causal, block-sliding-window attention mask of SPEC §3, in its two
// forms: the block selection of the original FlexAttention code (the reference the
// tests check against) and the equivalent per-element rule that kernels use.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace speedrun {

// doc[t] = number of end-of-text tokens in tok[0..t] inclusive.
std::vector<int32_t> document_ids(std::span<const int32_t> tokens, int32_t end_of_text);

// The kernel rule: k <= q, same document, and q/block - k/block < max(window, 1).
inline bool key_visible(const int32_t* doc, int q, int k, int block_size, int window_blocks) {
  int window = window_blocks > 1 ? window_blocks : 1;
  return k <= q && doc[k] == doc[q] && (q / block_size - k / block_size) < window;
}

enum class BlockKind : uint8_t { kFull, kPartial };

struct KeptBlock {
  int key_block;
  BlockKind kind;
};

// SPEC §3's block selection for query block i: the kept full and partial key blocks.
std::vector<KeptBlock> select_key_blocks(std::span<const int32_t> doc, int block_size, int query_block,
                                         int window_blocks);

// Dense T x T visibility built from the block selection (for tests on small T only).
std::vector<uint8_t> block_selection_mask(std::span<const int32_t> doc, int block_size, int window_blocks);

}  // namespace speedrun
