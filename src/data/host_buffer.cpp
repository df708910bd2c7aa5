// The registrable host memory resource behind token batch buffers.
#include "data/host_buffer.h"

#include <atomic>
#include <utility>

namespace speedrun {
namespace {

class NewDeleteResource final : public HostMemoryResource {
 public:
  void* allocate(size_t bytes) override { return ::operator new(bytes); }
  void deallocate(void* pointer, size_t bytes) noexcept override { ::operator delete(pointer, bytes); }
};

NewDeleteResource g_new_delete;
std::atomic<HostMemoryResource*> g_resource{&g_new_delete};

}  // namespace

HostMemoryResource* default_host_memory_resource() { return &g_new_delete; }

HostMemoryResource* host_memory_resource() { return g_resource.load(std::memory_order_acquire); }

HostMemoryResource* set_host_memory_resource(HostMemoryResource* resource) {
  return g_resource.exchange(resource ? resource : &g_new_delete, std::memory_order_acq_rel);
}

PooledHostMemoryResource::PooledHostMemoryResource(Allocate allocate, Release release)
    : allocate_(std::move(allocate)), release_(std::move(release)) {}

PooledHostMemoryResource::~PooledHostMemoryResource() {
  for (void* block : all_) release_(block);
}

void* PooledHostMemoryResource::allocate(size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = free_.find(bytes);
  if (found != free_.end()) {
    void* block = found->second;
    free_.erase(found);
    return block;
  }
  all_.reserve(all_.size() + 1);  // so that a throwing push_back cannot leak the block
  void* block = allocate_(bytes);
  all_.push_back(block);
  return block;
}

void PooledHostMemoryResource::deallocate(void* pointer, size_t bytes) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  try {
    free_.emplace(bytes, pointer);
  } catch (...) {
    // Out of memory for a map node: the block stays owned (in all_) and is released at
    // the end; only its reuse is lost.
  }
}

size_t PooledHostMemoryResource::blocks() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return all_.size();
}

}  // namespace speedrun
