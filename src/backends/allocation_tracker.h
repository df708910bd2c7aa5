// The bytes a backend's alloc/alloc_i32 hold, for Backend::peak_memory_bytes(): each
// backend records its allocations here so that memory plans can be checked against them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <mutex>
#include <unordered_map>

namespace speedrun {

class AllocationTracker {
 public:
  void allocated(void* pointer, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    bytes_[pointer] = bytes;
    live_ += bytes;
    peak_ = std::max(peak_, live_);
  }
  // Pointers it never saw are ignored.
  void released(void* pointer) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto held = bytes_.find(pointer);
    if (held == bytes_.end()) return;
    live_ -= held->second;
    bytes_.erase(held);
  }
  size_t peak() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<void*, size_t> bytes_;
  size_t live_ = 0;
  size_t peak_ = 0;
};

}  // namespace speedrun
