#include "util/atomic_file.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "util/error.h"
#include "util/process_liveness.h"

namespace speedrun {
namespace {

// The budget starts from $SPEEDRUN_TEST_WRITE_BUDGET (bytes; read once, at start-up) so
// that end-to-end tests can simulate a full disk in the speedrun binary.
long long initial_write_budget() {
  const char* text = std::getenv("SPEEDRUN_TEST_WRITE_BUDGET");
  if (!text || !*text) return -1;
  char* end = nullptr;
  const long long bytes = std::strtoll(text, &end, 10);
  return *end == '\0' ? bytes : -1;
}

std::atomic<long long> g_write_budget{initial_write_budget()};

// A temporary is its target's name, this mark and the writer's process id.
constexpr const char* kTemporaryMark = ".tmp.";

std::string errno_text(int err) { return std::strerror(err); }

bool consume_budget(size_t bytes) {
  long long budget = g_write_budget.load();
  if (budget < 0) return true;
  if (static_cast<long long>(bytes) > budget) {
    g_write_budget.store(0);
    return false;
  }
  g_write_budget.store(budget - static_cast<long long>(bytes));
  return true;
}

}  // namespace

void set_write_budget_for_testing(long long bytes) { g_write_budget.store(bytes); }

size_t bytes_the_write_budget_allows(size_t bytes) {
  const long long budget = g_write_budget.load();
  if (budget < 0) return bytes;
  return consume_budget(bytes) ? bytes : static_cast<size_t>(budget);
}

AtomicFileWriter::AtomicFileWriter(std::string target_path) : target_(std::move(target_path)) {
  temp_ = target_ + kTemporaryMark + std::to_string(::getpid());
  file_ = std::fopen(temp_.c_str(), "wb");
  if (!file_) {
    throw Error("cannot write '" + target_ + "': " + errno_text(errno));
  }
}

AtomicFileWriter::~AtomicFileWriter() {
  if (file_) std::fclose(file_);
  if (!committed_) std::remove(temp_.c_str());
}

void AtomicFileWriter::write(const void* data, size_t bytes) {
  if (!consume_budget(bytes)) {
    throw Error("cannot write '" + target_ + "': " + errno_text(ENOSPC));
  }
  if (bytes > 0 && std::fwrite(data, 1, bytes, file_) != bytes) {
    throw Error("cannot write '" + target_ + "': " + errno_text(errno));
  }
}

void AtomicFileWriter::commit() {
  if (std::fflush(file_) != 0 || ::fsync(::fileno(file_)) != 0) {
    throw Error("cannot write '" + target_ + "': " + errno_text(errno));
  }
  std::FILE* f = file_;
  file_ = nullptr;
  if (std::fclose(f) != 0) {
    throw Error("cannot write '" + target_ + "': " + errno_text(errno));
  }
  std::error_code ec;
  std::filesystem::rename(temp_, target_, ec);
  if (ec) throw Error("cannot rename '" + temp_ + "' to '" + target_ + "': " + ec.message());
  committed_ = true;
}

void write_file_atomically(const std::string& path, const void* data, size_t bytes) {
  AtomicFileWriter writer(path);
  writer.write(data, bytes);
  writer.commit();
}

void write_file_atomically(const std::string& path, const std::string& text) {
  write_file_atomically(path, text.data(), text.size());
}

void remove_abandoned_temporaries(const std::string& dir) {
  std::error_code ec;  // a folder that cannot be listed holds nothing to remove
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    const size_t mark = name.rfind(kTemporaryMark);
    if (mark == std::string::npos || mark == 0 || !entry.is_regular_file(ec)) continue;
    if (names_a_dead_process(name.substr(mark + std::strlen(kTemporaryMark)))) {
      std::filesystem::remove(entry.path(), ec);
    }
  }
}

}  // namespace speedrun
