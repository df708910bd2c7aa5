// A background reader that keeps the next TokenStream batches ready in a bounded
// queue; errors cross to the consumer thread, and shutdown never deadlocks.
#include "data/prefetcher.h"

#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "util/error.h"

namespace speedrun {

struct Prefetcher::Impl {
  TokenStream stream;  // touched only by the reader thread once it has started
  int first_rank;
  int num_ranks;
  size_t depth;

  std::mutex mutex;
  std::condition_variable batch_ready;   // reader -> consumer: a batch or an error is waiting
  std::condition_variable space_freed;   // consumer -> reader: the queue has room, or stop
  std::deque<TokenBatch> queue;          // guarded by mutex
  std::exception_ptr error;              // guarded by mutex; set once, after which the reader ends
  bool stopping = false;                 // guarded by mutex
  std::thread reader;

  Impl(TokenStream s, int first, int count, size_t d)
      : stream(std::move(s)), first_rank(first), num_ranks(count), depth(d) {}

  void run() {
    for (;;) {
      {
        std::unique_lock lock(mutex);
        space_freed.wait(lock, [&] { return stopping || queue.size() < depth; });
        if (stopping) return;
      }
      // Read outside the lock so that the consumer can take batches meanwhile.
      TokenBatch batch;
      try {
        batch = stream.next(first_rank, num_ranks);
      } catch (...) {
        std::lock_guard lock(mutex);
        error = std::current_exception();
        batch_ready.notify_all();
        return;
      }
      std::lock_guard lock(mutex);
      queue.push_back(std::move(batch));
      batch_ready.notify_all();
    }
  }
};

Prefetcher::Prefetcher(TokenStream stream, int first_rank, int num_ranks, int depth) {
  if (depth < 1) throw UsageError("prefetch depth " + std::to_string(depth) + " must be at least 1");
  if (first_rank < 0 || num_ranks < 1 || first_rank + num_ranks > stream.world_size()) {
    throw UsageError("ranks [" + std::to_string(first_rank) + ", " + std::to_string(first_rank + num_ranks) +
                     ") are not a non-empty range inside [0, world_size = " + std::to_string(stream.world_size()) +
                     ")");
  }
  impl_ = std::make_unique<Impl>(std::move(stream), first_rank, num_ranks, static_cast<size_t>(depth));
  impl_->reader = std::thread([impl = impl_.get()] { impl->run(); });
}

Prefetcher::~Prefetcher() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->space_freed.notify_all();
  // The reader may be inside stream.next(); it finishes that read, sees stopping and ends.
  impl_->reader.join();
}

TokenBatch Prefetcher::next() {
  Impl& s = *impl_;
  std::unique_lock lock(s.mutex);
  s.batch_ready.wait(lock, [&] { return !s.queue.empty() || s.error; });
  // Batches read before a failure are still delivered, in order; then the error.
  if (s.queue.empty()) std::rethrow_exception(s.error);
  TokenBatch batch = std::move(s.queue.front());
  s.queue.pop_front();
  lock.unlock();
  s.space_freed.notify_one();
  return batch;
}

}  // namespace speedrun
