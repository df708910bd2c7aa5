// `speedrun prepare`: documents -> GPT-2 tokens -> FineWeb .bin shards (SPEC §1).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "data/document_reader.h"
#include "util/error.h"

namespace speedrun {

class Tokenizer;

struct PrepareOptions {
  std::vector<std::string> inputs;
  InputFormat format = InputFormat::kAuto;
  std::string out_dir;
  // The first val_tokens tokens of the stream form val_000000.bin (none when 0). A
  // val shard serves val_tokens' worth of windows only if it holds val_tokens + 2
  // tokens (SPEC §1), hence 65538 for the default val_tokens of 65536.
  size_t val_tokens = 65538;
  size_t shard_tokens = 100'000'000;  // per train shard; the last one may be shorter
  bool force = false;                 // replace existing train_*/val_* shards in out_dir
  int threads = 0;                    // encoding threads; 0: every core
  // Polled between chunks of documents: a nonzero signal number stops the run with an
  // Interrupted error, out_dir left as it was.
  int (*stop_requested)() = nullptr;
};

// prepare_dataset stopped by stop_requested: nothing was written.
struct Interrupted : Error {
  explicit Interrupted(int signal) : Error("interrupted; nothing was written"), signal_number(signal) {}
  int signal_number;
};

struct PrepareResult {
  size_t documents = 0;      // non-empty documents written
  size_t empty_skipped = 0;  // documents without text, which add nothing
  size_t tokens = 0;         // all tokens written, val and train
  std::vector<std::string> shards;         // file names written into out_dir, val first
  std::vector<size_t> shard_token_counts;  // parallel to shards
};

// Each document becomes 50256 followed by its tokens, in input order whatever the
// thread count. Shards are produced in a staging folder inside out_dir and moved in
// only once all of them are complete, so a failure leaves out_dir as it was. A staging
// folder left by a killed run (its process gone) is removed.
PrepareResult prepare_dataset(const PrepareOptions& options, const Tokenizer& tokenizer);

}  // namespace speedrun
