// Keeps the next batches of a TokenStream ready on a background thread so that
// training never waits on I/O. Batches come out in stream order; an error raised
// by the reader thread is rethrown by next() on the consumer's side.
#pragma once

#include <memory>

#include "data/token_stream.h"

namespace speedrun {

class Prefetcher {
 public:
  // Reads ranks [first_rank, first_rank + num_ranks) of each window; keeps up to
  // depth batches ready.
  Prefetcher(TokenStream stream, int first_rank, int num_ranks, int depth = 2);
  ~Prefetcher();  // stops and joins the thread
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  TokenBatch next();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace speedrun
