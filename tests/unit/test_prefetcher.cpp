// The prefetcher delivers exactly the direct stream's batches in order, carries reader
// errors to the consumer, and shuts down cleanly however early the consumer stops.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include "data/host_buffer.h"
#include "data/prefetcher.h"
#include "data/shard.h"
#include "util/error.h"
#include "support/temp_dir.h"

namespace fs = std::filesystem;
using speedrun::Prefetcher;
using speedrun::TokenBatch;
using speedrun::TokenStream;

namespace {

constexpr uint32_t kVocab = 50257;

using speedrun::testing::fresh_dir;

std::vector<std::string> make_shards(const fs::path& dir, const std::vector<size_t>& sizes) {
  std::vector<std::string> paths;
  for (size_t s = 0; s < sizes.size(); ++s) {
    std::vector<uint16_t> tokens(sizes[s]);
    for (size_t i = 0; i < sizes[s]; ++i) tokens[i] = static_cast<uint16_t>((s * 7919 + i * 31) % kVocab);
    paths.push_back((dir / ("train_" + std::to_string(100000 + s) + ".bin")).string());
    speedrun::write_shard(paths.back(), tokens);
  }
  return paths;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const speedrun::Error& e) {
    return e.what();
  }
  return "<no error>";
}

void expect_same_batch(const TokenBatch& a, const TokenBatch& b) {
  EXPECT_EQ(a.inputs, b.inputs);
  EXPECT_EQ(a.targets, b.targets);
  EXPECT_EQ(a.position_after, b.position_after);
  EXPECT_EQ(a.first_rank, b.first_rank);
  EXPECT_EQ(a.num_ranks, b.num_ranks);
  EXPECT_EQ(a.seq_len, b.seq_len);
}

TEST(Prefetcher, DeliversTheDirectStreamInOrderThenItsError) {
  fs::path dir = fresh_dir("prefetch_order");
  std::vector<std::string> paths = make_shards(dir, {1000, 77, 513, 2000});
  for (int depth : {1, 2, 5}) {
    SCOPED_TRACE("depth " + std::to_string(depth));
    TokenStream direct(paths, 4, 16, kVocab);
    Prefetcher prefetcher(TokenStream(paths, 4, 16, kVocab), 1, 2, depth);
    size_t windows = 0;
    for (;;) {
      TokenBatch expected;
      try {
        expected = direct.next(1, 2);
      } catch (const speedrun::Error& e) {
        // The direct stream ran out: the prefetcher must report the same error, every time.
        EXPECT_EQ(error_of([&] { prefetcher.next(); }), e.what());
        EXPECT_EQ(error_of([&] { prefetcher.next(); }), e.what());
        break;
      }
      expect_same_batch(prefetcher.next(), expected);
      ++windows;
    }
    // (1000-66)/64+1 + (513-66)/64+1 + (2000-66)/64+1 windows; the 77-token shard serves 1.
    EXPECT_EQ(windows, 15u + 1u + 7u + 31u);
  }
}

TEST(Prefetcher, CorruptShardErrorComesAfterTheGoodBatches) {
  fs::path dir = fresh_dir("prefetch_corrupt");
  std::vector<std::string> paths = make_shards(dir, {100, 100});
  fs::resize_file(paths[1], 1024 + 2 * 99);
  Prefetcher prefetcher(TokenStream(paths, 1, 10, kVocab), 0, 1, 3);
  for (int i = 0; i < 9; ++i) EXPECT_EQ(prefetcher.next().inputs[0], static_cast<int32_t>((i * 10 * 31) % kVocab));
  std::string message = error_of([&] { prefetcher.next(); });
  EXPECT_NE(message.find(paths[1]), std::string::npos) << message;
  EXPECT_NE(message.find("header says N=100"), std::string::npos) << message;
}

TEST(Prefetcher, EarlyDestructionDoesNotDeadlock) {
  fs::path dir = fresh_dir("prefetch_early");
  std::vector<std::string> paths = make_shards(dir, {20000});
  { Prefetcher untouched(TokenStream(paths, 2, 8, kVocab), 0, 2, 2); }
  {
    Prefetcher one(TokenStream(paths, 2, 8, kVocab), 0, 2, 1);
    one.next();
  }
  {
    Prefetcher several(TokenStream(paths, 2, 8, kVocab), 0, 2, 4);
    for (int i = 0; i < 10; ++i) several.next();
  }
  {
    // Destroyed after its reader has failed (the stream runs out at once).
    std::vector<std::string> tiny = make_shards(fresh_dir("prefetch_early_tiny"), {3});
    Prefetcher failed(TokenStream(tiny, 1, 8, kVocab), 0, 1, 2);
    EXPECT_THROW(failed.next(), speedrun::Error);
  }
  SUCCEED();
}

TEST(Prefetcher, ValidatesArguments) {
  fs::path dir = fresh_dir("prefetch_args");
  std::vector<std::string> paths = make_shards(dir, {100});
  EXPECT_THROW(Prefetcher(TokenStream(paths, 2, 8, kVocab), 0, 2, 0), speedrun::UsageError);
  EXPECT_THROW(Prefetcher(TokenStream(paths, 2, 8, kVocab), 1, 2, 2), speedrun::UsageError);
}

// Counts what passes through it; thread-safe because the reader thread allocates.
class CountingResource final : public speedrun::HostMemoryResource {
 public:
  void* allocate(size_t bytes) override {
    allocations++;
    bytes_live += static_cast<long long>(bytes);
    return ::operator new(bytes);
  }
  void deallocate(void* pointer, size_t bytes) noexcept override {
    deallocations++;
    bytes_live -= static_cast<long long>(bytes);
    ::operator delete(pointer);
  }
  std::atomic<int> allocations{0}, deallocations{0};
  std::atomic<long long> bytes_live{0};
};

TEST(HostBuffer, VectorsUseTheRegisteredResourceAcrossThreads) {
  CountingResource counting;
  speedrun::HostMemoryResource* previous = speedrun::set_host_memory_resource(&counting);
  EXPECT_EQ(previous, speedrun::default_host_memory_resource());
  {
    // Allocated on a reader thread, freed on this one, as prefetched batches would be.
    speedrun::HostVector<int32_t> buffer;
    std::thread reader([&] { buffer.assign(1000, 7); });
    reader.join();
    EXPECT_EQ(buffer.get_allocator().resource(), &counting);
    EXPECT_EQ(counting.allocations.load(), 1);
    EXPECT_EQ(counting.bytes_live.load(), static_cast<long long>(1000 * sizeof(int32_t)));
    // Switching back while buffers live is safe: each frees through its own resource.
    speedrun::set_host_memory_resource(nullptr);
    EXPECT_EQ(speedrun::host_memory_resource(), speedrun::default_host_memory_resource());
    speedrun::HostVector<int32_t> later(10, 1);
    EXPECT_EQ(later.get_allocator().resource(), speedrun::default_host_memory_resource());
  }
  EXPECT_EQ(counting.deallocations.load(), 1);
  EXPECT_EQ(counting.bytes_live.load(), 0);
}

TEST(HostBuffer, PoolReusesFreedBlocksOfTheSameSizeAndReleasesAllAtTheEnd) {
  std::atomic<int> allocated{0}, released{0};
  {
    speedrun::PooledHostMemoryResource pool(
        [&](size_t bytes) {
          allocated++;
          return ::operator new(bytes);
        },
        [&](void* pointer) {
          released++;
          ::operator delete(pointer);
        });
    void* a = pool.allocate(4096);
    void* b = pool.allocate(4096);
    EXPECT_NE(a, b);
    pool.deallocate(a, 4096);
    EXPECT_EQ(pool.allocate(4096), a);  // reused, not allocated again
    void* c = pool.allocate(100);       // another size: a new block
    EXPECT_EQ(allocated.load(), 3);
    pool.deallocate(b, 4096);
    pool.deallocate(c, 100);
    EXPECT_EQ(pool.allocate(100), c);
    EXPECT_EQ(pool.blocks(), 3u);
    EXPECT_EQ(released.load(), 0);
  }
  EXPECT_EQ(released.load(), 3);  // every block, handed out or free, goes back once
}

TEST(HostBuffer, PrefetchedBatchesComeFromTheRegisteredPoolWithoutAllocationPerStep) {
  const fs::path dir = fresh_dir("pool_prefetch");
  std::vector<std::string> paths = make_shards(dir, {5000});
  std::atomic<int> allocated{0};
  speedrun::PooledHostMemoryResource pool(
      [&](size_t bytes) {
        allocated++;
        return ::operator new(bytes);
      },
      [](void* pointer) { ::operator delete(pointer); });
  speedrun::ScopedHostMemoryResource scope(&pool);
  {
    Prefetcher prefetcher(TokenStream(paths, 2, 8, kVocab), 0, 2, 2);
    for (int step = 0; step < 100; ++step) {
      TokenBatch batch = prefetcher.next();
      EXPECT_EQ(batch.inputs.get_allocator().resource(), &pool);
    }
  }
  // Two buffers a batch; at most depth 2 + one being filled + one in use are alive.
  EXPECT_LE(allocated.load(), 2 * 4);
  EXPECT_GE(allocated.load(), 2);
}

}  // namespace
