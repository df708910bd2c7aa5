// The training-stream generator and validation reader of SPEC §1.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/host_buffer.h"
#include "data/shard.h"

namespace speedrun {

// Where the stream stands: the shard it reads and the position in it. Saved in
// checkpoints so that a resumed run reads exactly the tokens it would have read.
struct StreamPosition {
  size_t shard_index = 0;
  size_t pos = 0;
  bool operator==(const StreamPosition&) const = default;
};

// Host buffer of token ids, allocated from the registered HostMemoryResource: the
// trainer registers a pool of the backend's host memory (pinned on CUDA), so batches
// upload asynchronously and no step allocates.
using TokenBuffer = HostVector<int32_t>;

// One step's tokens for a contiguous range of ranks [first_rank, first_rank + num_ranks):
// rank r's inputs are inputs[(r - first_rank) * seq_len ...], targets likewise.
struct TokenBatch {
  int seq_len = 0;
  int first_rank = 0;
  int num_ranks = 0;
  TokenBuffer inputs;
  TokenBuffer targets;
  StreamPosition position_after;  // the stream's position once this batch was read
};

// Reads windows of B = world_size * seq_len tokens from shards in sorted filename order,
// exactly as SPEC §1: before each read, if pos + B + 1 >= N move to the next shard
// (pos = 0); rank r reads [pos + r*seq_len, pos + (r+1)*seq_len + 1); then pos += B.
// Running out of shards throws speedrun::Error; so does a token id >= vocab_size.
class TokenStream {
 public:
  // What the stream feeds, named in its out-of-data error with the fix that applies.
  enum class Purpose { kTraining, kValidation };

  // shard_paths are sorted by filename here; an empty list is an error. Shards are
  // opened (and validated) when the stream first reads from them.
  TokenStream(std::vector<std::string> shard_paths, int world_size, int seq_len, uint32_t vocab_size,
              Purpose purpose = Purpose::kTraining);
  ~TokenStream();
  TokenStream(TokenStream&&) noexcept;
  TokenStream& operator=(TokenStream&&) noexcept;

  // Reads the next window and returns ranks [first_rank, first_rank + num_ranks) of it.
  // A UsageError when the rank range is not inside [0, world_size).
  TokenBatch next(int first_rank, int num_ranks);
  StreamPosition position() const;
  // Windows next() can still return from the current position (reads every shard's
  // header), so that a run can know before it starts whether its data suffices.
  size_t windows_left() const;
  // Validated against the shards: shard_index must name a shard and pos be at most
  // its token count (a pos past the last window just moves on at the next read).
  void seek(const StreamPosition& position);
  int world_size() const;
  int seq_len() const;
  const std::vector<std::string>& shard_paths() const;  // in reading order

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Expands a glob pattern into sorted paths; no match is an error naming the pattern.
std::vector<std::string> expand_glob(const std::string& pattern);

// Number of validation windows: val_tokens / (world_size * val_seq_len); throws a
// UsageError naming the three values when val_tokens does not divide.
size_t validation_windows(size_t val_tokens, int world_size, int val_seq_len);

}  // namespace speedrun
