// FineWeb .bin token shards: validated read-only memory maps and atomic writes.
#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "util/atomic_file.h"
#include "util/error.h"

namespace speedrun {
namespace {

// Closes the descriptor whatever happens while the shard is being validated.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error("token shard '" + path + "': " + what);
}

std::array<int32_t, kShardHeaderInts> read_header(int fd, const std::string& path) {
  std::array<int32_t, kShardHeaderInts> header{};
  ssize_t got = ::pread(fd, header.data(), kShardHeaderBytes, 0);
  if (got < 0) fail(path, std::string("cannot read the header: ") + std::strerror(errno));
  if (static_cast<size_t>(got) != kShardHeaderBytes) {
    fail(path, "file of " + std::to_string(got) + " bytes is too short for the " +
                   std::to_string(kShardHeaderBytes) + "-byte header");
  }
  return header;  // the format is little-endian, as is every machine we build for
}

void validate_header(const std::array<int32_t, kShardHeaderInts>& header, size_t file_bytes,
                     const std::string& path) {
  if (header[0] != kShardMagic) {
    fail(path, "bad magic " + std::to_string(header[0]) + " (expected " + std::to_string(kShardMagic) +
                   "): not a FineWeb .bin token shard");
  }
  if (header[1] != kShardVersion) {
    fail(path, "unsupported version " + std::to_string(header[1]) + " (expected " +
                   std::to_string(kShardVersion) + ")");
  }
  if (header[2] < 0) fail(path, "header says N=" + std::to_string(header[2]) + " tokens (negative)");
  size_t expected = kShardHeaderBytes + 2 * static_cast<size_t>(header[2]);
  if (file_bytes != expected) {
    fail(path, "size " + std::to_string(file_bytes) + " bytes but header says N=" + std::to_string(header[2]) +
                   " tokens (expected " + std::to_string(expected) + " bytes): the file is truncated or corrupt");
  }
}

}  // namespace

ShardReader::ShardReader(const std::string& path) : path_(path) {
  FdGuard guard{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (guard.fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(guard.fd, &st) != 0) fail(path, std::string("cannot stat: ") + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
  size_t file_bytes = static_cast<size_t>(st.st_size);
  if (file_bytes < kShardHeaderBytes) {
    fail(path, "file of " + std::to_string(file_bytes) + " bytes is too short for the " +
                   std::to_string(kShardHeaderBytes) + "-byte header");
  }
  validate_header(read_header(guard.fd, path), file_bytes, path);

  num_tokens_ = (file_bytes - kShardHeaderBytes) / 2;
  if (num_tokens_ == 0) return;  // nothing to map: mmap of zero bytes is invalid
  void* mapping = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, guard.fd, 0);
  if (mapping == MAP_FAILED) fail(path, std::string("cannot mmap: ") + std::strerror(errno));
  mapping_ = mapping;
  mapping_bytes_ = file_bytes;
  tokens_ = reinterpret_cast<const uint16_t*>(static_cast<const char*>(mapping) + kShardHeaderBytes);
}

ShardReader::~ShardReader() {
  if (mapping_) ::munmap(mapping_, mapping_bytes_);
}

ShardReader::ShardReader(ShardReader&& other) noexcept
    : path_(std::move(other.path_)),
      mapping_(std::exchange(other.mapping_, nullptr)),
      mapping_bytes_(std::exchange(other.mapping_bytes_, 0)),
      tokens_(std::exchange(other.tokens_, nullptr)),
      num_tokens_(std::exchange(other.num_tokens_, 0)) {}

ShardReader& ShardReader::operator=(ShardReader&& other) noexcept {
  if (this != &other) {
    if (mapping_) ::munmap(mapping_, mapping_bytes_);
    path_ = std::move(other.path_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    mapping_bytes_ = std::exchange(other.mapping_bytes_, 0);
    tokens_ = std::exchange(other.tokens_, nullptr);
    num_tokens_ = std::exchange(other.num_tokens_, 0);
  }
  return *this;
}

void write_shard(const std::string& path, std::span<const uint16_t> tokens) {
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    throw Error("token shard '" + path + "': " + std::to_string(tokens.size()) +
                " tokens do not fit the header's int32 count");
  }
  std::array<int32_t, kShardHeaderInts> header{};
  header[0] = kShardMagic;
  header[1] = kShardVersion;
  header[2] = static_cast<int32_t>(tokens.size());
  AtomicFileWriter writer(path);
  writer.write(header.data(), kShardHeaderBytes);
  writer.write(tokens.data(), tokens.size_bytes());
  writer.commit();
}

}  // namespace speedrun
