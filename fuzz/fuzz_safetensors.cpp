// Fuzzes SafetensorsFile::open: a file either opens and then every lookup the
// checkpoint loader makes stays inside the file, or open throws speedrun::Error. Reading
// the header alone (SafetensorsHeader::read) agrees: a file this small fails one iff the other.
#include <numeric>
#include <optional>

#include "fuzz_support.h"
#include "train/safetensors.h"
#include "util/error.h"

namespace {

// The header alone, or nullopt where reading it throws speedrun::Error.
std::optional<speedrun::SafetensorsHeader> header_alone(const std::string& path) {
  try {
    return speedrun::SafetensorsHeader::read(path);
  } catch (const speedrun::Error&) {
    return std::nullopt;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = speedrun::fuzz::write_scratch(data, size, ".safetensors");
  const std::optional<speedrun::SafetensorsHeader> header = header_alone(path);
  try {
    const speedrun::SafetensorsFile file = speedrun::SafetensorsFile::open(path);
    if (!header || header->names() != file.names() || header->metadata() != file.metadata()) {
      speedrun::fuzz::invariant_broken("the header alone does not read as the opened file's");
    }
    uint64_t total = 0;
    for (const std::string& name : file.names()) {
      const speedrun::TensorInfo& info = file.info(name);
      std::span<const std::byte> bytes = file.bytes(name);
      if (bytes.size() != info.data_end - info.data_begin) speedrun::fuzz::invariant_broken("span size of " + name);
      total += bytes.size();
      unsigned checksum = 0;  // read every byte: ASan checks the span lies in the buffer
      for (std::byte b : bytes) checksum += static_cast<unsigned>(b);
      (void)checksum;
      if (info.dtype == "F32") {
        std::vector<float> values = file.read_f32(name, info.shape);
        if (values.size() * 4 != bytes.size()) speedrun::fuzz::invariant_broken("read_f32 size of " + name);
      }
    }
    if (total > size) speedrun::fuzz::invariant_broken("tensors cover more bytes than the file holds");
    try {
      file.info("\x01 no such tensor");
      speedrun::fuzz::invariant_broken("lookup of a missing tensor did not throw");
    } catch (const speedrun::Error&) {
    }
  } catch (const speedrun::Error&) {
    if (header) speedrun::fuzz::invariant_broken("the header alone reads but the file does not open");
  }
  return 0;
}
