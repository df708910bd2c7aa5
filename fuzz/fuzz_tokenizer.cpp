// Fuzzes the GPT-2 tokenizer: decode(encode(bytes)) == bytes for every byte string
// (the contract of Tokenizer::encode), with every id inside the vocabulary.
// Needs the BPE files at speedrun::tokenizer_dir() (scripts/setup.sh fetches them).
#include <string_view>

#include "data/tokenizer.h"
#include "fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const speedrun::Tokenizer tokenizer = speedrun::Tokenizer::load_default();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const std::vector<uint32_t> ids = tokenizer.encode(text);
  if (ids.size() > size) speedrun::fuzz::invariant_broken("more tokens than bytes");
  for (uint32_t id : ids) {
    if (id >= tokenizer.vocab_size()) speedrun::fuzz::invariant_broken("id " + std::to_string(id) + " out of range");
  }
  if (tokenizer.decode(ids) != text) speedrun::fuzz::invariant_broken("decode(encode(s)) != s");
  return 0;
}
