// The safetensors checkpoint format (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
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

// What a safetensors file's header says, read and validated without the tensor data: the
// layout is checked against the file's size, so a truncated file is refused here as on a
// full open, and metadata is read from a file of any size at the cost of its header alone.
class SafetensorsHeader {
 public:
  static SafetensorsHeader read(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::vector<std::string> names() const { return names_; }  // in file (data offset) order
  bool contains(const std::string& name) const { return infos_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  uint64_t data_size() const { return data_size_; }

 private:
  friend class SafetensorsFile;
  // Opens `path` into `in` and reads the header, leaving `in` at the start of the data section.
  static SafetensorsHeader read_from(std::ifstream& in, const std::string& path);

  std::string path_;
  uint64_t data_size_ = 0;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, TensorInfo> infos_;
  std::vector<std::string> names_;
};

// A safetensors file with its data section read into memory, validated on open.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);

  const SafetensorsHeader& header() const { return header_; }
  const std::string& path() const { return header_.path(); }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata(); }
  std::vector<std::string> names() const { return header_.names(); }
  bool contains(const std::string& name) const { return header_.contains(name); }
  const TensorInfo& info(const std::string& name) const { return header_.info(name); }
  std::span<const std::byte> bytes(const std::string& name) const;

  // The tensor as floats; it must be stored as F32 with exactly this shape.
  std::vector<float> read_f32(const std::string& name, const std::vector<int64_t>& expected_shape) const;

 private:
  SafetensorsHeader header_;
  std::vector<std::byte> data_;  // the data section
};

}  // namespace speedrun
