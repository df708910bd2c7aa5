// `speedrun prepare`: turns text files and JSONL records into FineWeb-format token shards.
#include <cstdio>
#include <cstdlib>

#include "cli/commands.h"
#include "cli/number_checks.h"
#include "data/prepare.h"
#include "data/tokenizer.h"
#include "train/interrupt.h"
#include "util/error.h"

namespace speedrun::cli {
namespace {

struct PrepareArgs {
  std::vector<std::string> inputs;
  std::string format = "auto";
  std::string out_dir;
  size_t val_tokens = PrepareOptions{}.val_tokens;
  size_t shard_tokens = PrepareOptions{}.shard_tokens;
  bool force = false;
  int threads = 0;
};

void run_prepare(const PrepareArgs& args) {
  PrepareOptions options;
  options.inputs = args.inputs;
  options.format = parse_input_format(args.format);
  options.out_dir = args.out_dir;
  options.val_tokens = args.val_tokens;
  options.shard_tokens = args.shard_tokens;
  options.force = args.force;
  options.threads = args.threads;
  Tokenizer tokenizer = Tokenizer::load_default();
  // Ctrl-C or SIGTERM stops between chunks, the staging folder removed and out_dir as it was.
  InterruptGuard guard;
  clear_interrupt();
  options.stop_requested = pending_interrupt;
  PrepareResult result;
  try {
    result = prepare_dataset(options, tokenizer);
  } catch (const Interrupted& stopped) {
    std::fprintf(stderr, "speedrun: prepare stopped by %s; nothing was written\n", signal_name(stopped.signal_number));
    std::exit(exit_status_for_signal(stopped.signal_number));
  }

  std::printf("prepared %zu %s, %zu tokens into %s", result.documents, result.documents == 1 ? "document" : "documents",
              result.tokens, args.out_dir.c_str());
  if (result.empty_skipped > 0) std::printf(" (%zu empty documents skipped)", result.empty_skipped);
  std::printf("\n%zu shard(s) written:\n", result.shards.size());
  for (size_t i = 0; i < result.shards.size(); ++i) {
    std::printf("  %s  %zu tokens\n", result.shards[i].c_str(), result.shard_token_counts[i]);
  }
}

}  // namespace

void register_prepare_command(CLI::App& app) {
  auto args = std::make_shared<PrepareArgs>();
  CLI::App* cmd = app.add_subcommand(
      "prepare",
      "Tokenize documents into FineWeb-format token shards (val_000000.bin, train_000000.bin, ...).\n"
      "Each text file, or each JSONL record's \"text\" field, is one document, written as 50256\n"
      "(<|endoftext|>) followed by its GPT-2 tokens, in input order (empty documents are skipped).\n"
      "The first --val-tokens tokens of the stream form the val shard, the rest the train shards.");
  cmd->add_option("--input", args->inputs, "Input files: text (one document each) or JSONL")
      ->required()
      ->expected(1, -1);
  cmd->add_option("--format", args->format, "auto (by extension: .jsonl/.json-lines are JSONL), text or jsonl")
      ->capture_default_str();
  cmd->add_option("--out", args->out_dir, "Output directory for the shards")->required();
  cmd->add_option("--val-tokens", args->val_tokens,
                  "Tokens in val_000000.bin (0: none). A val shard must hold val_tokens + 2 tokens to serve\n"
                  "val_tokens of validation (SPEC 1), so the default 65538 serves val_tokens up to 65536")
      ->check(unsigned_whole_number())
      ->capture_default_str();
  cmd->add_option("--shard-tokens", args->shard_tokens, "Tokens per train shard (the last one may be shorter)")
      ->check(unsigned_whole_number())
      ->capture_default_str();
  cmd->add_flag("--force", args->force,
                "Replace existing train_*/val_* shards in --out (only once the new ones are complete)");
  cmd->add_option("--threads", args->threads, "Encoding threads (default 0: every core); output does not depend on it")
      ->check(whole_number(0, 4096))
      ->capture_default_str();
  // A repeated option takes its last value, as in most command-line tools.
  for (const char* name : {"--format", "--out", "--val-tokens", "--shard-tokens", "--threads"}) {
    cmd->get_option(name)->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  }
  cmd->callback([args] { run_prepare(*args); });
}

}  // namespace speedrun::cli
