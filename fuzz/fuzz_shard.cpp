// Fuzzes ShardReader: any byte string as a .bin file either opens as a shard whose
// size is exactly 1024 + 2N with every token readable, or throws speedrun::Error.
#include <cstring>

#include "data/shard.h"
#include "fuzz_support.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = speedrun::fuzz::write_scratch(data, size, ".bin");
  try {
    speedrun::ShardReader reader(path);
    if (speedrun::kShardHeaderBytes + 2 * reader.num_tokens() != size) {
      speedrun::fuzz::invariant_broken("accepted a shard whose size is not 1024 + 2N");
    }
    uint64_t sum = 0;  // touch every token: the mapping must cover them all
    for (uint16_t token : reader.tokens()) sum += token;
    uint64_t expected = 0;
    for (size_t i = speedrun::kShardHeaderBytes; i + 1 < size; i += 2) {
      uint16_t token;
      std::memcpy(&token, data + i, 2);
      expected += token;
    }
    if (sum != expected) speedrun::fuzz::invariant_broken("tokens differ from the file's bytes");
  } catch (const speedrun::Error&) {
  }
  return 0;
}
