// Fuzzes DocumentReader on JSONL: every record is read or the reader throws
// speedrun::Error naming the file and line; it never yields more documents than lines.
#include <algorithm>

#include "data/document_reader.h"
#include "fuzz_support.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = speedrun::fuzz::write_scratch(data, size, ".jsonl");
  const size_t lines = std::count(data, data + size, '\n') + 1;
  size_t documents = 0;
  try {
    speedrun::DocumentReader reader({path}, speedrun::InputFormat::kAuto);
    std::string text;
    while (reader.next(text)) {
      if (++documents > lines) speedrun::fuzz::invariant_broken("more documents than lines");
    }
  } catch (const speedrun::Error& e) {
    if (std::string(e.what()).find(path) == std::string::npos) {
      speedrun::fuzz::invariant_broken(std::string("error does not name the file: ") + e.what());
    }
  }
  return 0;
}
