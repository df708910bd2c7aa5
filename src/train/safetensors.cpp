// Reads and writes safetensors files; every malformed header or data layout is
// rejected on open with an error naming the file, so later lookups can trust it.
#include "train/safetensors.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <new>
#include <set>

#include <unistd.h>

#include "util/atomic_file.h"
#include "util/error.h"
#include "util/input_file.h"

namespace speedrun {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; this code copies it unconverted");

using OrderedJson = nlohmann::ordered_json;

constexpr const char* kMetadataKey = "__metadata__";
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;  // the reference reader's limit

const std::map<std::string, size_t>& dtype_sizes() {
  static const std::map<std::string, size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8},
  };
  return sizes;
}

[[noreturn]] void fail(const std::string& path, const std::string& problem) {
  throw Error("safetensors file '" + path + "': " + problem);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// product(shape) * element size, or false when it does not fit in 64 bits.
bool byte_size(const std::vector<int64_t>& shape, size_t element_size, uint64_t* out) {
  uint64_t total = element_size;
  for (int64_t dim : shape) {
    if (__builtin_mul_overflow(total, static_cast<uint64_t>(dim), &total)) return false;
  }
  *out = total;
  return true;
}

uint64_t read_u64_le(const std::byte* p) {
  uint64_t value = 0;  // host is little-endian (static_assert above)
  std::memcpy(&value, p, sizeof value);
  return value;
}

// Opens the file and checks its size and header length before anything else is read, so
// that a corrupt length is reported without reading a huge file. Returns the file's size;
// `in` is left at the start of the header text.
uint64_t open_checked(std::ifstream& in, const std::string& path, uint64_t* header_size) {
  if (const std::string problem = input_file_problem(path); !problem.empty()) {
    throw Error("safetensors file '" + path + "' " + problem);
  }
  in.open(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error("cannot open safetensors file '" + path + "': " + std::strerror(errno));
  const std::streamoff size = in.tellg();
  if (size < 0) throw Error("cannot read safetensors file '" + path + "': not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(size);
  if (file_size < 8) {
    fail(path, "file is " + std::to_string(file_size) + " bytes, too short for the 8-byte header length");
  }
  std::byte length_bytes[8];
  in.seekg(0);
  if (!in.read(reinterpret_cast<char*>(length_bytes), 8)) throw Error("cannot read safetensors file '" + path + "'");
  *header_size = read_u64_le(length_bytes);
  if (*header_size > kMaxHeaderBytes || *header_size > file_size - 8) {
    fail(path, "header length " + std::to_string(*header_size) + " is impossible for a file of " +
                   std::to_string(file_size) + " bytes (limit " + std::to_string(kMaxHeaderBytes) + ")");
  }
  return file_size;
}

// The machine's memory, or no limit where the system does not say.
uint64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_size <= 0) return std::numeric_limits<uint64_t>::max();
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size);
}

// The data section is read whole: one larger than the machine's memory is refused by name
// rather than left to the allocator or the out-of-memory killer.
std::vector<std::byte> read_data_section(std::ifstream& in, const std::string& path, uint64_t data_size) {
  const uint64_t memory = physical_memory_bytes();
  if (data_size > memory) {
    fail(path, "its data section of " + std::to_string(data_size) + " bytes is larger than this machine's memory (" +
                   std::to_string(memory) + " bytes)");
  }
  std::vector<std::byte> data;
  try {
    data.resize(data_size);
  } catch (const std::bad_alloc&) {
    fail(path, "no memory for its data section of " + std::to_string(data_size) + " bytes");
  }
  if (!in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data_size))) {
    throw Error("cannot read safetensors file '" + path + "': its data section ends early");
  }
  return data;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const OrderedJson& json) {
  if (!json.is_object()) fail(path, std::string(kMetadataKey) + " is not a JSON object");
  std::map<std::string, std::string> metadata;
  for (const auto& [key, value] : json.items()) {
    if (!value.is_string()) {
      fail(path, std::string(kMetadataKey) + " value of '" + key + "' is " + value.type_name() +
                     ", expected a string");
    }
    metadata[key] = value.get<std::string>();
  }
  return metadata;
}

// Checks one header entry's fields and types; data_size bounds its offsets.
TensorInfo parse_tensor_entry(const std::string& path, const std::string& name, const OrderedJson& entry,
                              uint64_t data_size) {
  const std::string where = "tensor '" + name + "': ";
  if (!entry.is_object()) fail(path, where + "header entry is " + entry.type_name() + ", expected an object");
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(field)) fail(path, where + "header entry has no '" + field + "'");
  }
  TensorInfo info;
  const OrderedJson& dtype = entry["dtype"];
  if (!dtype.is_string()) fail(path, where + "dtype is " + dtype.type_name() + ", expected a string");
  info.dtype = dtype.get<std::string>();
  if (!dtype_sizes().count(info.dtype)) fail(path, where + "unknown dtype '" + info.dtype + "'");

  const OrderedJson& shape = entry["shape"];
  if (!shape.is_array()) fail(path, where + "shape is " + shape.type_name() + ", expected an array");
  for (const OrderedJson& dim : shape) {
    if (!dim.is_number_integer()) fail(path, where + "shape has a " + dim.type_name() + ", expected integers");
    if (dim.is_number_unsigned() && dim.get<uint64_t>() > uint64_t(INT64_MAX)) {
      fail(path, where + "shape dimension " + dim.dump() + " is too large");
    }
    if (dim.get<int64_t>() < 0) fail(path, where + "negative dimension " + dim.dump() + " in shape");
    info.shape.push_back(dim.get<int64_t>());
  }

  const OrderedJson& offsets = entry["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned()) {
    fail(path, where + "data_offsets is " + offsets.dump() + ", expected [begin, end] of non-negative integers");
  }
  info.data_begin = offsets[0].get<uint64_t>();
  info.data_end = offsets[1].get<uint64_t>();
  if (info.data_end < info.data_begin) fail(path, where + "data_offsets " + offsets.dump() + " end before begin");
  if (info.data_end > data_size) {
    fail(path, where + "data_offsets " + offsets.dump() + " run past the data section of " +
                   std::to_string(data_size) + " bytes");
  }
  uint64_t expected = 0;
  const bool fits = byte_size(info.shape, safetensors_dtype_size(info.dtype), &expected);
  if (!fits || expected != info.data_end - info.data_begin) {
    fail(path, where + "data_offsets " + offsets.dump() + " hold " + std::to_string(info.data_end - info.data_begin) +
                   " bytes but " + info.dtype + " " + shape_text(info.shape) + " needs " +
                   (fits ? std::to_string(expected) : std::string("more than 2^64")));
  }
  return info;
}

// The spec requires the tensors to tile the data section exactly: no overlap,
// no holes, nothing left over. Returns the names sorted by data offset.
std::vector<std::string> check_layout(const std::string& path, const std::vector<std::string>& header_order,
                                      const std::map<std::string, TensorInfo>& infos, uint64_t data_size) {
  std::vector<std::string> names = header_order;
  std::stable_sort(names.begin(), names.end(), [&](const std::string& a, const std::string& b) {
    return infos.at(a).data_begin < infos.at(b).data_begin;
  });
  uint64_t covered = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    const TensorInfo& info = infos.at(names[i]);
    if (info.data_begin < covered) {
      fail(path, "tensors '" + names[i - 1] + "' and '" + names[i] + "' overlap in the data section");
    }
    if (info.data_begin > covered) {
      fail(path, "data section has unused bytes [" + std::to_string(covered) + ", " +
                     std::to_string(info.data_begin) + ") before tensor '" + names[i] + "'");
    }
    covered = info.data_end;
  }
  if (covered != data_size) {
    fail(path, "data section has " + std::to_string(data_size) + " bytes but the tensors cover " +
                   std::to_string(covered));
  }
  return names;
}

void check_tensor_to_write(const std::string& path, const TensorView& tensor, std::set<std::string>* seen) {
  const std::string where = "cannot write tensor '" + tensor.name + "': ";
  if (tensor.name == kMetadataKey) fail(path, where + "the name is reserved for metadata");
  if (!seen->insert(tensor.name).second) fail(path, where + "the name is used twice");
  if (!dtype_sizes().count(tensor.dtype)) fail(path, where + "unknown dtype '" + tensor.dtype + "'");
  for (int64_t dim : tensor.shape) {
    if (dim < 0) fail(path, where + "negative dimension in shape " + shape_text(tensor.shape));
  }
  uint64_t expected = 0;
  const bool fits = byte_size(tensor.shape, safetensors_dtype_size(tensor.dtype), &expected);
  if (!fits || expected != tensor.bytes.size()) {
    fail(path, where + "has " + std::to_string(tensor.bytes.size()) + " bytes but " + tensor.dtype + " " +
                   shape_text(tensor.shape) + " needs " + (fits ? std::to_string(expected) : "more than 2^64"));
  }
}

// Compact JSON padded with spaces so the data section starts 8-byte aligned.
std::string header_text(const std::string& path, const std::vector<TensorView>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  OrderedJson header = OrderedJson::object();
  uint64_t offset = 0;
  for (const TensorView& tensor : tensors) {
    OrderedJson entry = OrderedJson::object();
    entry["dtype"] = tensor.dtype;
    entry["shape"] = tensor.shape;
    entry["data_offsets"] = {offset, offset + tensor.bytes.size()};
    header[tensor.name] = std::move(entry);
    offset += tensor.bytes.size();
  }
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("cannot encode header: ") + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

}  // namespace

size_t safetensors_dtype_size(const std::string& dtype) {
  auto it = dtype_sizes().find(dtype);
  if (it == dtype_sizes().end()) throw Error("unknown safetensors dtype '" + dtype + "'");
  return it->second;
}

void write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  for (const TensorView& tensor : tensors) check_tensor_to_write(path, tensor, &seen);
  const std::string header = header_text(path, tensors, metadata);

  AtomicFileWriter writer(path);
  const uint64_t header_size = header.size();  // host is little-endian (static_assert above)
  writer.write(&header_size, sizeof header_size);
  writer.write(header.data(), header.size());
  for (const TensorView& tensor : tensors) writer.write(tensor.bytes.data(), tensor.bytes.size());
  writer.commit();
}

SafetensorsHeader SafetensorsHeader::read_from(std::ifstream& in, const std::string& path) {
  uint64_t header_size = 0;
  const uint64_t file_size = open_checked(in, path, &header_size);
  std::string text(header_size, '\0');
  if (!in.read(text.data(), static_cast<std::streamsize>(header_size))) {
    throw Error("cannot read safetensors file '" + path + "': its header ends early");
  }
  SafetensorsHeader header;
  header.path_ = path;
  header.data_size_ = file_size - 8 - header_size;

  OrderedJson json;
  try {
    json = OrderedJson::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!json.is_object()) fail(path, std::string("header is JSON ") + json.type_name() + ", expected an object");

  std::vector<std::string> header_order;
  for (const auto& [key, value] : json.items()) {
    if (key == kMetadataKey) {
      header.metadata_ = parse_metadata(path, value);
      continue;
    }
    header.infos_[key] = parse_tensor_entry(path, key, value, header.data_size_);
    header_order.push_back(key);
  }
  header.names_ = check_layout(path, header_order, header.infos_, header.data_size_);
  return header;
}

SafetensorsHeader SafetensorsHeader::read(const std::string& path) {
  std::ifstream in;
  return read_from(in, path);
}

const TensorInfo& SafetensorsHeader::info(const std::string& name) const {
  auto it = infos_.find(name);
  if (it == infos_.end()) fail(path_, "no tensor named '" + name + "'");
  return it->second;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  std::ifstream in;
  file.header_ = SafetensorsHeader::read_from(in, path);
  file.data_ = read_data_section(in, path, file.header_.data_size());
  return file;
}

std::span<const std::byte> SafetensorsFile::bytes(const std::string& name) const {
  const TensorInfo& tensor = info(name);
  return std::span<const std::byte>(data_).subspan(tensor.data_begin, tensor.data_end - tensor.data_begin);
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  const TensorInfo& tensor = info(name);
  if (tensor.dtype != "F32" || tensor.shape != expected_shape) {
    fail(path(), "tensor '" + name + "' is " + tensor.dtype + " " + shape_text(tensor.shape) + ", expected F32 " +
                    shape_text(expected_shape));
  }
  std::span<const std::byte> raw = bytes(name);
  std::vector<float> values(raw.size() / sizeof(float));
  if (!raw.empty()) std::memcpy(values.data(), raw.data(), raw.size());
  return values;
}

}  // namespace speedrun
