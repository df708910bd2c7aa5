// The safetensors checkpoint format (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace speedrun {

// One tensor to write: bytes are little-endian, row-major, exactly
// product(shape) * dtype_size(dtype) long. The view does not own its bytes.
struct TensorView {
  std::string name;
  std::string dtype;  // as safetensors spells it: "F32", "BF16", "I64", "U8", ...
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;
};

// What the header says about one stored tensor; offsets are relative to the
// start of the data section.
struct TensorInfo {
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t data_begin = 0;
  uint64_t data_end = 0;
};

// Bytes per element of a safetensors dtype; throws speedrun::Error for an unknown one.
size_t safetensors_dtype_size(const std::string& dtype);

// Writes the tensors (in the given order, contiguous) and string metadata
// atomically. Throws speedrun::Error naming the path and tensor when a name is
// repeated or reserved, a dtype is unknown, or the byte count does not match.
void write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata);

// A safetensors file read fully into memory and validated on open.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::vector<std::string> names() const { return names_; }  // in file (data offset) order
  bool contains(const std::string& name) const { return infos_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  std::span<const std::byte> bytes(const std::string& name) const;

  // The tensor as floats; it must be stored as F32 with exactly this shape.
  std::vector<float> read_f32(const std::string& name, const std::vector<int64_t>& expected_shape) const;

 private:
  std::string path_;
  std::vector<std::byte> file_bytes_;
  size_t data_start_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, TensorInfo> infos_;
  std::vector<std::string> names_;
};

}  // namespace speedrun
