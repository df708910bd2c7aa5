// The SPEC §1 training-stream generator over token shards, glob expansion of shard
// patterns and the validation window count.
#include "data/token_stream.h"

#include <glob.h>

#include <algorithm>
#include <optional>

#include "util/error.h"

namespace speedrun {
namespace {

// Windows of B tokens (each needing B + 1) that a fresh shard of n tokens serves:
// the k-th read (pos = kB) happens while kB + B + 1 < n.
size_t windows_in_shard(size_t n, size_t window) {
  return n >= window + 2 ? (n - window - 2) / window + 1 : 0;
}

// The same count for a shard already read up to pos.
size_t windows_from(size_t n, size_t pos, size_t window) { return n >= pos ? windows_in_shard(n - pos, window) : 0; }

}  // namespace

struct TokenStream::Impl {
  std::vector<std::string> paths;
  int world_size = 0;
  int seq_len = 0;
  uint32_t vocab_size = 0;
  Purpose purpose = Purpose::kTraining;
  StreamPosition position;
  std::optional<ShardReader> shard;  // opened lazily: the shard at shard_open_index
  size_t shard_open_index = 0;

  size_t window() const { return static_cast<size_t>(world_size) * static_cast<size_t>(seq_len); }

  const ShardReader& open_current() {
    if (!shard || shard_open_index != position.shard_index) {
      shard.reset();  // unmap the previous shard before mapping the next
      shard.emplace(paths[position.shard_index]);
      shard_open_index = position.shard_index;
    }
    return *shard;
  }

  // Applies SPEC §1's rule before a read: moves on while the current shard cannot
  // serve the next window, skipping shards too small for even one.
  const ShardReader& shard_for_next_window() {
    for (;;) {
      const ShardReader& current = open_current();
      if (position.pos + window() + 1 < current.num_tokens()) return current;
      if (position.shard_index + 1 >= paths.size()) throw_out_of_data();
      ++position.shard_index;
      position.pos = 0;
    }
  }

  [[noreturn]] void throw_out_of_data() const {
    size_t total_tokens = 0;
    size_t total_windows = 0;
    for (const std::string& path : paths) {
      ShardReader reader(path);
      total_tokens += reader.num_tokens();
      total_windows += windows_in_shard(reader.num_tokens(), window());
    }
    const bool training = purpose == Purpose::kTraining;
    throw Error(std::string(training ? "out of training data" : "out of validation data") + ": the " +
                std::to_string(paths.size()) + " shard(s) from '" + paths.front() +
                "' to '" + paths.back() + "' hold " + std::to_string(total_tokens) + " tokens, which serve " +
                std::to_string(total_windows) + " windows of world_size * seq_len = " + std::to_string(world_size) +
                " * " + std::to_string(seq_len) + " = " + std::to_string(window()) +
                " tokens (+1 for the last target); all of them have been read and another window was asked for " +
                (training ? "(add shards or train for fewer steps)" : "(add shards or lower val_tokens)"));
  }

  void check_vocab(const ShardReader& reader, size_t begin, size_t end) const {
    std::span<const uint16_t> tokens = reader.tokens();
    for (size_t i = begin; i < end; ++i) {
      if (tokens[i] >= vocab_size) {
        throw Error("token shard '" + reader.path() + "': token id " + std::to_string(tokens[i]) + " at offset " +
                    std::to_string(i) + " is not below vocab_size " + std::to_string(vocab_size));
      }
    }
  }
};

TokenStream::TokenStream(std::vector<std::string> shard_paths, int world_size, int seq_len, uint32_t vocab_size,
                         Purpose purpose)
    : impl_(std::make_unique<Impl>()) {
  if (shard_paths.empty()) throw UsageError("the token stream needs at least one shard; the list is empty");
  if (world_size < 1) throw UsageError("world_size " + std::to_string(world_size) + " must be at least 1");
  if (seq_len < 1) throw UsageError("seq_len " + std::to_string(seq_len) + " must be at least 1");
  if (vocab_size < 1) throw UsageError("vocab_size must be at least 1");
  std::sort(shard_paths.begin(), shard_paths.end());
  impl_->paths = std::move(shard_paths);
  impl_->world_size = world_size;
  impl_->seq_len = seq_len;
  impl_->vocab_size = vocab_size;
  impl_->purpose = purpose;
}

TokenStream::~TokenStream() = default;
TokenStream::TokenStream(TokenStream&&) noexcept = default;
TokenStream& TokenStream::operator=(TokenStream&&) noexcept = default;

TokenBatch TokenStream::next(int first_rank, int num_ranks) {
  Impl& s = *impl_;
  if (first_rank < 0 || num_ranks < 1 || first_rank + num_ranks > s.world_size) {
    throw UsageError("ranks [" + std::to_string(first_rank) + ", " + std::to_string(first_rank + num_ranks) +
                     ") are not a non-empty range inside [0, world_size = " + std::to_string(s.world_size) + ")");
  }
  const ShardReader& reader = s.shard_for_next_window();
  const size_t seq = static_cast<size_t>(s.seq_len);
  const size_t begin = s.position.pos + static_cast<size_t>(first_rank) * seq;
  const size_t count = static_cast<size_t>(num_ranks) * seq;
  // Rank r's last target is the first input of rank r + 1, so the ranks asked for
  // read one contiguous run of count + 1 tokens.
  s.check_vocab(reader, begin, begin + count + 1);

  TokenBatch batch;
  batch.seq_len = s.seq_len;
  batch.first_rank = first_rank;
  batch.num_ranks = num_ranks;
  std::span<const uint16_t> run = reader.tokens().subspan(begin, count + 1);
  batch.inputs.assign(run.begin(), run.end() - 1);
  batch.targets.assign(run.begin() + 1, run.end());
  s.position.pos += s.window();
  batch.position_after = s.position;
  return batch;
}

StreamPosition TokenStream::position() const { return impl_->position; }

size_t TokenStream::windows_left() const {
  const Impl& s = *impl_;
  size_t windows = 0;
  for (size_t i = s.position.shard_index; i < s.paths.size(); ++i) {
    const size_t n = ShardReader(s.paths[i]).num_tokens();
    const bool current = i == s.position.shard_index;
    windows += current ? windows_from(n, s.position.pos, s.window()) : windows_in_shard(n, s.window());
  }
  return windows;
}

void TokenStream::seek(const StreamPosition& position) {
  Impl& s = *impl_;
  if (position.shard_index >= s.paths.size()) {
    throw Error("cannot seek the token stream to shard " + std::to_string(position.shard_index) + ": there are only " +
                std::to_string(s.paths.size()) + " shard(s) (was the data directory changed since the checkpoint?)");
  }
  ShardReader reader(s.paths[position.shard_index]);
  if (position.pos > reader.num_tokens()) {
    throw Error("cannot seek the token stream to position " + std::to_string(position.pos) + " of shard '" +
                reader.path() + "': it holds only " + std::to_string(reader.num_tokens()) + " tokens");
  }
  s.position = position;
  s.shard.reset();
  s.shard.emplace(std::move(reader));
  s.shard_open_index = position.shard_index;
}

int TokenStream::world_size() const { return impl_->world_size; }
int TokenStream::seq_len() const { return impl_->seq_len; }
const std::vector<std::string>& TokenStream::shard_paths() const { return impl_->paths; }

std::vector<std::string> expand_glob(const std::string& pattern) {
  glob_t result{};
  int rc = ::glob(pattern.c_str(), GLOB_ERR, nullptr, &result);
  std::vector<std::string> paths;
  if (rc == 0) paths.assign(result.gl_pathv, result.gl_pathv + result.gl_pathc);
  ::globfree(&result);
  if (rc == GLOB_NOMATCH || (rc == 0 && paths.empty())) {
    throw Error("no file matches the shard pattern '" + pattern + "'");
  }
  if (rc != 0) throw Error("cannot expand the shard pattern '" + pattern + "' (a directory could not be read)");
  std::sort(paths.begin(), paths.end());
  return paths;
}

size_t validation_windows(size_t val_tokens, int world_size, int val_seq_len) {
  if (world_size < 1 || val_seq_len < 1) {
    throw UsageError("validation needs world_size >= 1 and val_seq_len >= 1 (got world_size " +
                     std::to_string(world_size) + ", val_seq_len " + std::to_string(val_seq_len) + ")");
  }
  size_t window = static_cast<size_t>(world_size) * static_cast<size_t>(val_seq_len);
  if (val_tokens % window != 0) {
    throw UsageError("val_tokens " + std::to_string(val_tokens) + " is not a multiple of world_size * val_seq_len = " +
                     std::to_string(world_size) + " * " + std::to_string(val_seq_len) + " = " +
                     std::to_string(window));
  }
  return val_tokens / window;
}

}  // namespace speedrun
