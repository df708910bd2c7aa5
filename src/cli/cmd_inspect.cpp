// `speedrun inspect`: validates token shards and shows their size, document count
// and the start of their first document.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "cli/commands.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "util/error.h"
#include "util/utf8.h"

namespace speedrun::cli {
namespace {

constexpr size_t kPreviewChars = 200;
constexpr size_t kPreviewTokens = 256;  // plenty for 200 characters

// "1 token", "2 tokens".
std::string count_of(size_t n, const std::string& noun) { return std::to_string(n) + " " + noun + (n == 1 ? "" : "s"); }

// A directory stands for the .bin files in it, sorted.
std::vector<std::string> shard_paths(const std::vector<std::string>& arguments) {
  std::vector<std::string> paths;
  for (const std::string& argument : arguments) {
    if (!std::filesystem::is_directory(argument)) {
      paths.push_back(argument);
      continue;
    }
    std::vector<std::string> inside;
    for (const auto& entry : std::filesystem::directory_iterator(argument)) {
      if (entry.path().extension() == ".bin") inside.push_back(entry.path().string());
    }
    if (inside.empty()) throw Error("directory '" + argument + "' holds no .bin shards");
    std::sort(inside.begin(), inside.end());
    paths.insert(paths.end(), inside.begin(), inside.end());
  }
  return paths;
}

// Text on one line, at most max_chars characters of it: control characters and bytes that
// are not UTF-8 escaped (\n, \t, \xNN), and "..." where it goes on (past max_chars, or
// beyond the text when `continues`: the document's tokens were cut, maybe inside a character).
std::string one_line_preview(const std::string& text, size_t max_chars, bool continues) {
  std::string out;
  size_t i = 0;
  for (size_t chars = 0; i < text.size() && chars < max_chars; ++chars) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    const size_t length = utf8_sequence_length(text, i);
    if (length == 0 && continues && text.size() - i < 4) break;  // a character the cut split
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (length == 0 || c < 0x20 || c == 0x7F) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\x%02x", c);
      out += escaped;
    } else {
      out.append(text, i, length);
    }
    i += std::max<size_t>(length, 1);
  }
  if (i < text.size() || continues) out += "...";
  return out;
}

// The first document that starts in the shard: a shard may begin with the tail of a
// document cut at the previous shard's end (FineWeb's are), which is not shown.
std::string first_document_preview(const ShardReader& shard, const Tokenizer& tokenizer) {
  std::span<const uint16_t> tokens = shard.tokens();
  const uint16_t* separator = std::find(tokens.data(), tokens.data() + tokens.size(), Tokenizer::kEndOfText);
  if (separator == tokens.data() + tokens.size()) return "(no document starts in this shard)";
  size_t begin = static_cast<size_t>(separator - tokens.data()) + 1;
  std::vector<uint32_t> ids;
  for (size_t i = begin; i < tokens.size() && ids.size() < kPreviewTokens; ++i) {
    if (tokens[i] == Tokenizer::kEndOfText) break;
    if (tokens[i] >= tokenizer.vocab_size()) {
      return "(token id " + std::to_string(tokens[i]) + " at offset " + std::to_string(i) +
             " is outside the GPT-2 vocabulary)";
    }
    ids.push_back(tokens[i]);
  }
  const size_t end = begin + ids.size();
  const bool continues = end < tokens.size() && tokens[end] != Tokenizer::kEndOfText;
  std::string preview = "\"" + one_line_preview(tokenizer.decode(ids), kPreviewChars, continues) + "\"";
  if (begin > 1) {
    preview += " (after " + count_of(begin - 1, "token") + " continuing an earlier document)";
  }
  return preview;
}

// train stops at a token id its vocabulary does not have: the first such id, said here.
std::string id_outside_vocabulary(const ShardReader& shard, uint32_t vocab_size) {
  std::span<const uint16_t> tokens = shard.tokens();
  const auto outside = std::find_if(tokens.begin(), tokens.end(), [&](uint16_t id) { return id >= vocab_size; });
  if (outside == tokens.end()) return "";
  return "token shard '" + shard.path() + "': token id " + std::to_string(*outside) + " at offset " +
         std::to_string(outside - tokens.begin()) + " is not below the GPT-2 vocabulary's " +
         std::to_string(vocab_size) + " (train with the GPT-2 vocab_size stops there)";
}

void run_inspect(const std::vector<std::string>& arguments) {
  std::vector<std::string> paths = shard_paths(arguments);
  std::optional<Tokenizer> tokenizer;
  std::vector<std::string> failures;
  for (const std::string& path : paths) {
    std::optional<ShardReader> shard;
    try {
      shard.emplace(path);
    } catch (const Error& e) {
      std::printf("%s: INVALID (see below)\n", path.c_str());
      failures.push_back(e.what());
      continue;
    }
    if (!tokenizer) tokenizer.emplace(Tokenizer::load_default());
    size_t documents = std::count(shard->tokens().begin(), shard->tokens().end(), Tokenizer::kEndOfText);
    std::printf("%s: %s, %s\n", path.c_str(), count_of(shard->num_tokens(), "token").c_str(),
                count_of(documents, "document").c_str());
    std::printf("  first document: %s\n", first_document_preview(*shard, *tokenizer).c_str());
    if (const std::string problem = id_outside_vocabulary(*shard, tokenizer->vocab_size()); !problem.empty()) {
      std::printf("  INVALID (see below)\n");
      failures.push_back(problem);
    }
  }
  if (failures.size() == 1) throw Error(failures.front());
  if (!failures.empty()) {
    std::string message = std::to_string(failures.size()) + " of " + std::to_string(paths.size()) +
                          " shards are invalid:";
    for (const std::string& failure : failures) message += "\n  " + failure;
    throw Error(message);
  }
}

}  // namespace

void register_inspect_command(CLI::App& app) {
  auto paths = std::make_shared<std::vector<std::string>>();
  CLI::App* cmd = app.add_subcommand(
      "inspect",
      "Validate token shards (header, size, every token id below the GPT-2 vocabulary's 50257) and\n"
      "show each one's token count, number of documents (tokens 50256) and the beginning of its\n"
      "first document. A directory means the .bin files in it.");
  cmd->add_option("paths", *paths, "Shard files (.bin) or directories of them")->required()->expected(1, -1);
  cmd->callback([paths] { run_inspect(*paths); });
}

}  // namespace speedrun::cli
