// The registrable host memory resource behind token batch buffers.
#include "data/host_buffer.h"

#include <atomic>

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

}  // namespace speedrun
