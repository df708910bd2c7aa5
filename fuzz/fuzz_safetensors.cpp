// Fuzzes SafetensorsFile::open: a file either opens and then every lookup the
// checkpoint loader makes stays inside the file, or open throws speedrun::Error.
#include <numeric>

#include "fuzz_support.h"
#include "train/safetensors.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = speedrun::fuzz::write_scratch(data, size, ".safetensors");
  try {
    const speedrun::SafetensorsFile file = speedrun::SafetensorsFile::open(path);
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
  }
  return 0;
}
