// `speedrun tokenize`: GPT-2 ids of a text (from --text, --file or stdin), or with
// --decode the bytes of space-separated ids.
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "data/tokenizer.h"
#include "util/error.h"
#include "util/input_file.h"

namespace speedrun::cli {
namespace {

struct TokenizeOptions {
  std::string text;
  std::string file;
  bool decode = false;
  CLI::Option* text_option = nullptr;
  CLI::Option* file_option = nullptr;
};

std::string read_stream(std::istream& in) {
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string read_input(const TokenizeOptions& options) {
  if (options.text_option->count() > 0) return options.text;
  if (options.file_option->count() > 0) {
    if (const std::string problem = input_file_problem(options.file); !problem.empty()) {
      throw Error("input file '" + options.file + "' " + problem);
    }
    std::ifstream in(options.file, std::ios::binary);
    if (!in) throw Error("cannot open input file '" + options.file + "': " + std::strerror(errno));
    std::string content = read_stream(in);
    if (in.bad()) throw Error("cannot read input file '" + options.file + "'");
    return content;
  }
  std::ios::sync_with_stdio(false);
  return read_stream(std::cin);
}

void write_stdout(const std::string& bytes) {
  if (std::fwrite(bytes.data(), 1, bytes.size(), stdout) != bytes.size() || std::fflush(stdout) != 0) {
    throw Error(std::string("cannot write to standard output: ") + std::strerror(errno));
  }
}

// Parses whitespace-separated ids; anything but an id in [0, vocab_size) is an error: of usage
// when the ids were given with --text, of data when they were read (--file or stdin).
std::vector<uint32_t> parse_ids(const std::string& input, size_t vocab_size, const std::string& source) {
  std::vector<uint32_t> ids;
  std::istringstream words(input);
  std::string word;
  while (words >> word) {
    unsigned long long value = 0;
    const auto [end, error] = std::from_chars(word.data(), word.data() + word.size(), value);
    if (error != std::errc() || end != word.data() + word.size() || value >= vocab_size) {
      const std::string problem =
          "invalid token id '" + word + "': expected an integer in [0, " + std::to_string(vocab_size) + ")";
      if (source.empty()) throw UsageError(problem);
      throw Error(source + ": " + problem);
    }
    ids.push_back(static_cast<uint32_t>(value));
  }
  return ids;
}

void run_tokenize(const TokenizeOptions& options) {
  if (options.text_option->count() > 0 && options.file_option->count() > 0) {
    throw UsageError("--text and --file cannot be used together: give one, or neither to read stdin");
  }
  const std::string input = read_input(options);
  const Tokenizer tokenizer = Tokenizer::load_default();
  if (options.decode) {
    const std::string source = options.text_option->count() > 0 ? ""
                               : options.file_option->count() > 0 ? "input file '" + options.file + "'"
                                                                   : std::string("standard input");
    write_stdout(tokenizer.decode(parse_ids(input, tokenizer.vocab_size(), source)));
    return;
  }
  std::string line;
  for (uint32_t id : tokenizer.encode(input)) {
    if (!line.empty()) line.push_back(' ');
    line += std::to_string(id);
  }
  line.push_back('\n');
  write_stdout(line);
}

}  // namespace

void register_tokenize_command(CLI::App& app) {
  auto options = std::make_shared<TokenizeOptions>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize", "Print the GPT-2 token ids of a text (stdin unless --text/--file), or decode ids with --decode");
  options->text_option = cmd->add_option("--text", options->text, "The text (or, with --decode, the ids)");
  options->file_option = cmd->add_option("--file", options->file, "Read the text (or ids) from this file");
  cmd->add_flag("--decode", options->decode, "Read space-separated ids and write their bytes");
  cmd->callback([options] { run_tokenize(*options); });
}

}  // namespace speedrun::cli
