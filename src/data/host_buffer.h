// Host memory for token batches. Allocations go through a registrable memory resource
// so that a GPU backend can hand out pinned (page-locked) memory for faster uploads.
#pragma once

#include <cstddef>
#include <functional>
#include <map>
#include <mutex>
#include <new>
#include <vector>

namespace speedrun {

// Where host token buffers come from. Implementations must be thread-safe: the
// prefetcher allocates on its own thread and the trainer frees on another.
class HostMemoryResource {
 public:
  virtual ~HostMemoryResource() = default;
  virtual void* allocate(size_t bytes) = 0;  // throws on failure (std::bad_alloc or speedrun::Error)
  virtual void deallocate(void* pointer, size_t bytes) noexcept = 0;
};

// Plain operator new / delete.
HostMemoryResource* default_host_memory_resource();
// The resource new buffers use. Buffers remember the resource they were allocated
// from, so replacing it is safe at any time; the resource itself must outlive them.
HostMemoryResource* host_memory_resource();
// nullptr restores the default. Returns the previous resource.
HostMemoryResource* set_host_memory_resource(HostMemoryResource* resource);

// Keeps every block it hands out and reuses freed blocks of the same size, so a steady
// stream of same-sized batches allocates only as many blocks as are alive at once (the
// prefetcher's depth plus the batch in use): no allocation per step, and blocks from an
// expensive allocator (cudaHostAlloc pins pages, its free synchronises the device) are
// paid for once. Blocks go back to `release` when the pool is destroyed; every buffer
// must be gone by then.
class PooledHostMemoryResource final : public HostMemoryResource {
 public:
  using Allocate = std::function<void*(size_t bytes)>;
  using Release = std::function<void(void* pointer)>;
  PooledHostMemoryResource(Allocate allocate, Release release);
  ~PooledHostMemoryResource() override;
  PooledHostMemoryResource(const PooledHostMemoryResource&) = delete;
  PooledHostMemoryResource& operator=(const PooledHostMemoryResource&) = delete;

  void* allocate(size_t bytes) override;
  void deallocate(void* pointer, size_t bytes) noexcept override;
  size_t blocks() const;  // allocated from `allocate` so far

 private:
  Allocate allocate_;
  Release release_;
  mutable std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // by size
  std::vector<void*> all_;
};

// Registers a resource for the lifetime of this object, then restores the previous one.
class ScopedHostMemoryResource {
 public:
  explicit ScopedHostMemoryResource(HostMemoryResource* resource) : previous_(set_host_memory_resource(resource)) {}
  ~ScopedHostMemoryResource() { set_host_memory_resource(previous_); }
  ScopedHostMemoryResource(const ScopedHostMemoryResource&) = delete;
  ScopedHostMemoryResource& operator=(const ScopedHostMemoryResource&) = delete;

 private:
  HostMemoryResource* previous_;
};

// A std allocator bound to the resource current at its construction.
template <class T>
class HostAllocator {
 public:
  using value_type = T;

  HostAllocator() noexcept : resource_(host_memory_resource()) {}
  explicit HostAllocator(HostMemoryResource* resource) noexcept : resource_(resource) {}
  template <class U>
  HostAllocator(const HostAllocator<U>& other) noexcept : resource_(other.resource()) {}

  T* allocate(size_t n) { return static_cast<T*>(resource_->allocate(n * sizeof(T))); }
  void deallocate(T* pointer, size_t n) noexcept { resource_->deallocate(pointer, n * sizeof(T)); }
  HostMemoryResource* resource() const noexcept { return resource_; }

  template <class U>
  bool operator==(const HostAllocator<U>& other) const noexcept {
    return resource_ == other.resource();
  }

 private:
  HostMemoryResource* resource_;
};

template <class T>
using HostVector = std::vector<T, HostAllocator<T>>;

}  // namespace speedrun
