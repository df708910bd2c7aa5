// speedrun sample: text from a checkpoint, generated token by token on the CPU with the
// model's own attention mask (window of the checkpoint's step, documents).
#include <cstdio>

#include "cli/commands.h"
#include "cli/number_checks.h"
#include "data/tokenizer.h"
#include "model/gpt.h"
#include "model/sampler.h"
#include "train/checkpoint.h"
#include "util/error.h"

namespace speedrun::cli {

void register_sample_command(CLI::App& app) {
  struct Options {
    std::string checkpoint;
    std::string prompt;
    int max_new_tokens = 100;
    SamplingOptions sampling;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("sample", "generate text from a checkpoint");
  cmd->add_option("--ckpt", opts->checkpoint, "model checkpoint (FILE.safetensors)")->required();
  cmd->add_option("--prompt", opts->prompt, "text to continue (a new document)")->capture_default_str();
  cmd->add_option("--max-new-tokens", opts->max_new_tokens, "tokens to generate")
      ->check(whole_number(0))
      ->capture_default_str();
  cmd->add_option("--temperature", opts->sampling.temperature, "softmax temperature; 0 picks the likeliest token")
      ->check(finite_number(0, false))
      ->capture_default_str();
  cmd->add_option("--top-k", opts->sampling.top_k, "sample among the k likeliest tokens (0: all)")
      ->check(whole_number(0))
      ->capture_default_str();
  cmd->add_option("--seed", opts->sampling.seed, "random seed (same seed, same text)")
      ->check(unsigned_whole_number())
      ->capture_default_str();
  cmd->callback([opts] {
    const Config config = read_checkpoint_config(opts->checkpoint);
    // Text goes in and out through GPT-2's tokenizer: a model of another vocabulary would
    // read ids it was not trained on, or choose ids that have no text, partway through.
    constexpr int kGpt2Vocabulary = static_cast<int>(Tokenizer::kEndOfText) + 1;
    if (config.vocab_size != kGpt2Vocabulary) {
      throw UsageError("sample encodes and decodes text with GPT-2's tokenizer (" + std::to_string(kGpt2Vocabulary) +
                       " ids); the model of '" + opts->checkpoint + "' has vocab_size " +
                       std::to_string(config.vocab_size));
    }
    const bool has_separator = config.document_separator < config.vocab_size;
    if (!has_separator && opts->prompt.empty()) {
      throw UsageError("the model of '" + opts->checkpoint + "' has no document separator (document_separator " +
                       std::to_string(config.document_separator) + " is past its vocabulary): give a --prompt to "
                       "start from");
    }
    const Tokenizer tokenizer = Tokenizer::load_default();
    auto backend = make_cpu_backend();
    GPT model(config, *backend, config.attn_block_size, config.attn_block_size);
    const int step = load_model(opts->checkpoint, model);
    Sampler sampler(model, long_window_blocks(config, step));
    TokenChooser chooser(opts->sampling, config.vocab_size);
    // The prompt is a document of its own: it starts after the config's document_separator
    // (50256 by default), where the model has one.
    std::vector<int32_t> prompt;
    if (has_separator) prompt.push_back(config.document_separator);
    for (uint32_t id : tokenizer.encode(opts->prompt)) prompt.push_back(static_cast<int32_t>(id));
    std::fwrite(opts->prompt.data(), 1, opts->prompt.size(), stdout);
    generate(sampler, prompt, opts->max_new_tokens, chooser, [&](int32_t token) {
      const std::string& bytes = tokenizer.token_bytes(static_cast<uint32_t>(token));
      std::fwrite(bytes.data(), 1, bytes.size(), stdout);
      std::fflush(stdout);
    });
    std::fputc('\n', stdout);
  });
}

}  // namespace speedrun::cli
