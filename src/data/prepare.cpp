// Dataset preparation: streams documents, encodes them in parallel in ordered
// chunks, and cuts the token stream into a val shard and fixed-size train shards.
#include "data/prepare.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <thread>

#include "data/shard.h"
#include "data/tokenizer.h"
#include "util/error.h"
#include "util/process_liveness.h"

namespace fs = std::filesystem;

namespace speedrun {
namespace {

// Documents are encoded a chunk at a time: enough text to keep every thread busy,
// little enough that the chunk's text and tokens are small next to a shard.
constexpr size_t kChunkBytes = size_t{8} << 20;
constexpr size_t kChunkDocuments = 8192;

std::string shard_name(const char* prefix, size_t index) {
  char name[64];
  std::snprintf(name, sizeof(name), "%s_%06zu.bin", prefix, index);
  return name;
}

bool is_shard_name(const std::string& name) {
  return name.size() > 4 && name.ends_with(".bin") && (name.starts_with("train_") || name.starts_with("val_"));
}

std::vector<fs::path> existing_bin_files(const fs::path& dir) {
  std::vector<fs::path> found;
  if (!fs::is_directory(dir)) return found;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
    if (entry.is_regular_file() && entry.path().extension() == ".bin") found.push_back(entry.path());
  }
  return found;
}

void validate(const PrepareOptions& options) {
  if (options.inputs.empty()) throw UsageError("prepare needs at least one --input file");
  if (options.out_dir.empty()) throw UsageError("prepare needs an output directory (--out)");
  constexpr size_t kMaxShard = static_cast<size_t>(std::numeric_limits<int32_t>::max());
  if (options.shard_tokens == 0) throw UsageError("--shard-tokens must be at least 1 (got 0)");
  if (options.shard_tokens > kMaxShard) {
    throw UsageError("--shard-tokens " + std::to_string(options.shard_tokens) + " exceeds a shard's limit of " +
                     std::to_string(kMaxShard) + " tokens");
  }
  if (options.val_tokens > kMaxShard) {
    throw UsageError("--val-tokens " + std::to_string(options.val_tokens) + " exceeds a shard's limit of " +
                     std::to_string(kMaxShard) + " tokens");
  }
  if (options.threads < 0) throw UsageError("--threads must be at least 1 (or 0 for every core)");
}

// Creates the output folder if needed, and removes it again (when still empty)
// unless the run succeeded, so that a failed first run leaves nothing behind.
class CreatedDir {
 public:
  explicit CreatedDir(const fs::path& path) : path_(path), created_(fs::create_directories(path)) {}
  ~CreatedDir() {
    std::error_code ignored;
    if (created_ && !kept_ && fs::is_empty(path_, ignored)) fs::remove(path_, ignored);
  }
  void keep() { kept_ = true; }

 private:
  fs::path path_;
  bool created_;
  bool kept_ = false;
};

// Removes the staging folder unless its shards were moved into place.
class StagingDir {
 public:
  explicit StagingDir(const fs::path& out_dir)
      : path_(out_dir / (std::string(kPrefix) + std::to_string(::getpid()))) {
    remove_abandoned(out_dir);
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~StagingDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  const fs::path& path() const { return path_; }

 private:
  static constexpr const char* kPrefix = ".speedrun-prepare-";

  // Staging folders of runs whose process no longer exists (killed, or SIGKILLed).
  static void remove_abandoned(const fs::path& out_dir) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(out_dir, ec)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(kPrefix, 0) != 0) continue;
      if (names_a_dead_process(name.substr(std::strlen(kPrefix)))) fs::remove_all(entry.path(), ec);
    }
  }

  fs::path path_;
};

// Cuts the token stream: the first val_tokens into the val shard, the rest into
// train shards of shard_tokens each. Holds at most one shard's tokens.
class ShardCutter {
 public:
  ShardCutter(const fs::path& dir, size_t val_tokens, size_t shard_tokens)
      : dir_(dir), val_tokens_(val_tokens), shard_tokens_(shard_tokens) {}

  void append(uint32_t token) {
    buffer_.push_back(static_cast<uint16_t>(token));
    ++total_;
    if (buffer_.size() == current_capacity()) flush();
  }

  // Writes the last, partial train shard and checks the stream was long enough.
  void finish() {
    if (total_ <= val_tokens_) {
      throw Error("the input holds " + std::to_string(total_) + " tokens, not more than --val-tokens " +
                  std::to_string(val_tokens_) + ": nothing would be left for training (lower --val-tokens or add input)");
    }
    if (!buffer_.empty()) flush();
  }

  size_t total() const { return total_; }
  const std::vector<std::string>& names() const { return names_; }
  const std::vector<size_t>& counts() const { return counts_; }

 private:
  bool in_val() const { return val_tokens_ > 0 && !val_written_; }
  size_t current_capacity() const { return in_val() ? val_tokens_ : shard_tokens_; }

  void flush() {
    std::string name = in_val() ? shard_name("val", 0) : shard_name("train", train_index_++);
    if (in_val()) val_written_ = true;
    write_shard((dir_ / name).string(), buffer_);
    names_.push_back(name);
    counts_.push_back(buffer_.size());
    buffer_.clear();
  }

  fs::path dir_;
  size_t val_tokens_;
  size_t shard_tokens_;
  bool val_written_ = false;
  size_t train_index_ = 0;
  size_t total_ = 0;
  std::vector<uint16_t> buffer_;
  std::vector<std::string> names_;
  std::vector<size_t> counts_;
};

// Encodes every document of the chunk on up to `threads` threads; results keep
// the chunk's order, so the output never depends on the thread count.
std::vector<std::vector<uint32_t>> encode_chunk(const std::vector<std::string>& documents,
                                                const Tokenizer& tokenizer, int threads) {
  std::vector<std::vector<uint32_t>> encoded(documents.size());
  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::atomic<bool> failed{false};
  auto work = [&] {
    for (size_t i = next++; i < documents.size() && !failed; i = next++) {
      try {
        encoded[i] = tokenizer.encode(documents[i]);
      } catch (...) {
        if (!failed.exchange(true)) failure = std::current_exception();
      }
    }
  };
  size_t workers = std::min(static_cast<size_t>(threads), documents.size());
  std::vector<std::thread> pool;
  for (size_t t = 1; t < workers; ++t) pool.emplace_back(work);
  work();
  for (std::thread& thread : pool) thread.join();
  if (failure) std::rethrow_exception(failure);
  return encoded;
}

// Replaces old train_*/val_* shards of out_dir by the staged ones.
void move_into_place(const fs::path& staging, const fs::path& out_dir, const std::vector<std::string>& names) {
  for (const fs::directory_entry& entry : fs::directory_iterator(out_dir)) {
    if (entry.is_regular_file() && is_shard_name(entry.path().filename().string())) fs::remove(entry.path());
  }
  for (const std::string& name : names) fs::rename(staging / name, out_dir / name);
}

PrepareResult prepare_into(const PrepareOptions& options, const Tokenizer& tokenizer) {
  const fs::path out_dir(options.out_dir);
  if (fs::exists(out_dir) && !fs::is_directory(out_dir)) {
    throw UsageError("--out '" + options.out_dir + "' exists and is not a directory");
  }
  std::vector<fs::path> old_shards = existing_bin_files(out_dir);
  if (!old_shards.empty() && !options.force) {
    throw UsageError("'" + options.out_dir + "' already holds token shards (" + old_shards.front().filename().string() +
                     (old_shards.size() > 1 ? " and " + std::to_string(old_shards.size() - 1) + " more" : "") +
                     "); pass --force to replace them");
  }
  DocumentReader reader(options.inputs, options.format);
  int threads = options.threads > 0 ? options.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  CreatedDir created(out_dir);
  StagingDir staging(out_dir);
  ShardCutter cutter(staging.path(), options.val_tokens, options.shard_tokens);
  PrepareResult result;

  std::vector<std::string> chunk;
  std::string text;
  bool more = true;
  while (more) {
    if (const int signal = options.stop_requested ? options.stop_requested() : 0) throw Interrupted(signal);
    chunk.clear();
    size_t chunk_bytes = 0;
    while (chunk.size() < kChunkDocuments && chunk_bytes < kChunkBytes && (more = reader.next(text))) {
      if (text.empty()) {
        ++result.empty_skipped;
        continue;
      }
      chunk_bytes += text.size();
      chunk.push_back(std::move(text));
      text = std::string();
    }
    for (const std::vector<uint32_t>& tokens : encode_chunk(chunk, tokenizer, threads)) {
      cutter.append(Tokenizer::kEndOfText);
      for (uint32_t token : tokens) cutter.append(token);
    }
    result.documents += chunk.size();
  }
  if (cutter.total() == 0) {
    throw Error("the input holds no text: " + std::to_string(result.empty_skipped) +
                " empty document(s) and nothing else, so there are no tokens to write");
  }
  cutter.finish();
  move_into_place(staging.path(), out_dir, cutter.names());
  created.keep();
  result.tokens = cutter.total();
  result.shards = cutter.names();
  result.shard_token_counts = cutter.counts();
  return result;
}

}  // namespace

PrepareResult prepare_dataset(const PrepareOptions& options, const Tokenizer& tokenizer) {
  validate(options);
  try {
    return prepare_into(options, tokenizer);
  } catch (const fs::filesystem_error& e) {
    throw Error(std::string("prepare: ") + e.what());  // names the path and the reason
  }
}

}  // namespace speedrun
