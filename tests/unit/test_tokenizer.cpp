// GPT-2 tokenizer: exact ids against js-tiktoken (run with node), known ids,
// decoding, byte round trips, invalid UTF-8, threads, load errors and the CLI.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"
#include "util/error.h"
#include "util/paths.h"

namespace fs = std::filesystem;
using speedrun::Tokenizer;
using Ids = std::vector<uint32_t>;

namespace {

const std::string kSourceDir = SPEEDRUN_SOURCE_DIR;
const std::string kNodeModules = kSourceDir + "/.cache/node/node_modules";
const std::string kOracle = std::string(SPEEDRUN_TEST_TOOLS_DIR) + "/tiktoken_oracle.js";

const Tokenizer& gpt2() {
  static const Tokenizer tokenizer = Tokenizer::load_default();
  return tokenizer;
}

std::string read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_all(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

fs::path fresh_dir(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("speedrun_test_tok_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

int exit_status(int system_result) { return WIFEXITED(system_result) ? WEXITSTATUS(system_result) : -1; }

// js-tiktoken's ids for each text. Missing node or js-tiktoken fails the calling
// test (never skips): the comparison is the point of this file.
std::vector<Ids> oracle(const std::vector<std::string>& texts) {
  const fs::path dir = fresh_dir("oracle");
  write_all(dir / "in.json", nlohmann::json(texts).dump());
  if (exit_status(std::system("node --version > /dev/null 2>&1")) != 0) {
    ADD_FAILURE() << "node is not installed; run scripts/setup.sh";
    return {};
  }
  const std::string command = "node '" + kOracle + "' '" + kNodeModules + "' < '" + (dir / "in.json").string() +
                              "' > '" + (dir / "out.json").string() + "' 2> '" + (dir / "err.txt").string() + "'";
  if (exit_status(std::system(command.c_str())) != 0) {
    ADD_FAILURE() << "the js-tiktoken oracle failed (run scripts/setup.sh to install it): "
                  << read_all(dir / "err.txt");
    return {};
  }
  auto ids = nlohmann::json::parse(read_all(dir / "out.json")).get<std::vector<Ids>>();
  fs::remove_all(dir);
  EXPECT_EQ(ids.size(), texts.size());
  return ids;
}

void expect_matches_oracle(const std::vector<std::string>& texts) {
  const std::vector<Ids> expected = oracle(texts);
  ASSERT_EQ(expected.size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_EQ(gpt2().encode(texts[i]), expected[i]) << "text #" << i << ": " << nlohmann::json(texts[i]).dump();
  }
}

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// The token of a single byte, from GPT-2's bytes_to_unicode() order: printable
// Latin-1 bytes first (ids 0..187), then the others (188..255).
uint32_t byte_token(unsigned char b) {
  auto printable = [](int c) { return (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE); };
  uint32_t printable_before = 0, other_before = 0;
  for (int c = 0; c < b; ++c) (printable(c) ? printable_before : other_before)++;
  return printable(b) ? printable_before : 188 + other_before;
}

std::vector<std::string> brown_documents() {
  std::vector<std::string> docs;
  for (const char* name : {"ca01.txt", "cf09.txt", "cj06.txt", "cr09.txt"}) {
    const fs::path path = kSourceDir + "/.cache/corpus/brown/" + name;
    EXPECT_TRUE(fs::exists(path)) << path << " is missing; run scripts/setup.sh";
    docs.push_back(read_all(path));
  }
  return docs;
}

template <class Fn>
std::string error_message(Fn&& fn) {
  try {
    fn();
  } catch (const speedrun::Error& e) {
    return e.what();
  }
  return "(no speedrun::Error thrown)";
}

// ---------------------------------------------------------------------------------

TEST(Tokenizer, KnownIds) {
  EXPECT_EQ(gpt2().vocab_size(), 50257u);
  EXPECT_EQ(gpt2().encode("Hello world"), (Ids{15496, 995}));
  EXPECT_EQ(gpt2().encode("Hello, world!"), (Ids{15496, 11, 995, 0}));
  EXPECT_EQ(gpt2().encode(" 123 4567 3.14159"), (Ids{17031, 4153, 3134, 513, 13, 1415, 19707}));
  EXPECT_EQ(gpt2().encode("HE'S SHE'LL"), (Ids{13909, 6, 50, 48052, 6, 3069}));
  EXPECT_EQ(gpt2().encode("<|endoftext|>"), (Ids{27, 91, 437, 1659, 5239, 91, 29}));
  EXPECT_EQ(gpt2().encode(""), Ids{});
  EXPECT_EQ(gpt2().encode(" "), Ids{220});
}

TEST(Tokenizer, ByteTokensFollowGpt2ByteOrder) {
  EXPECT_EQ(byte_token(' '), 220u);
  EXPECT_EQ(byte_token('!'), 0u);
  EXPECT_EQ(byte_token(0xFF), 187u);
  EXPECT_EQ(byte_token(0x00), 188u);
  for (int b = 0; b < 256; ++b) {
    const std::string byte(1, static_cast<char>(b));
    EXPECT_EQ(gpt2().encode(byte), Ids{byte_token(static_cast<unsigned char>(b))}) << "byte " << b;
    EXPECT_EQ(gpt2().token_bytes(byte_token(static_cast<unsigned char>(b))), byte) << "byte " << b;
  }
}

TEST(Tokenizer, MatchesTiktokenOnVariedText) {
  expect_matches_oracle({
      "Hello world",
      "The quick brown fox jumps over the lazy dog.",
      "I'm here. You're not. They'll go, we'd see, it's done, I've seen.",
      "HE'S SHE'LL I'M WE'RE YOU'VE THEY'D IT'S",
      "don't  can't won't y'all 'tis rock'n'roll ''s ' s '",
      "x's 's 'S 'sS 'll's",
      "int main(int argc, char** argv) {\n  return argv[0][0] == '\\0' ? 1 : 0;\n}\n",
      "def f(x):\n\tif x >= 10 and x != 3:\n\t\treturn x**2  # square\n",
      "0 1 12 123 1234 12345 123456 3.14159 1,000,000 -42 +7e-10 0x1F 2024-01-01",
      "\n\n\n",
      "a\n\nb\r\nc\rd",
      "a   b",
      "a                                                                b",
      "trailing   ",
      "trailing\n",
      "   leading",
      "tab\t\tx\t",
      "  \n  \n",
      "café naïve Ünïcödé résumé façade",
      "日本語のテキストです。中文文本。한국어 텍스트",
      "😀👍🏽👨‍👩‍👧 ❤️ 🇫🇷",
      "e\u0301 a\u0300 n\u0303o\u0308 Z\u0335\u0321a\u0336l\u0337g\u0338o",
      "Привет мир! Ελληνικά עברית العربية हिन्दी ไทย",
      "mixedΑλφαbetaГамма123四五六",
      "<|endoftext|>hello<|endoftext|> <|endoftext|>",
      "x\u00a0\u00a0y x \u2003 y x\u3000y a\u2028b\u2029c",
      "\u000b\u000c\u001c\u001d x",
      "a \u200bb a\u200d\u200cb a \u180eb",
      "Ⅻ² ٣٤ ５６ ½",
      "!!!??? ... --- *** @@@ ### $$$ %%%",
      "email@example.com https://example.org/path?q=1&r=2#frag",
      std::string(1000, ' '),
      std::string(1000, ' ') + "x",
      std::string(300, '\n') + "end",
      "end" + std::string(500, ' '),
      std::string(2000, 'a'),
      std::string(600, '!'),
  });
}

TEST(Tokenizer, MatchesTiktokenOnBrownDocuments) {
  const std::vector<std::string> docs = brown_documents();
  std::string all;
  for (const auto& doc : docs) all += doc;
  std::vector<std::string> texts = docs;
  texts.push_back(all);
  expect_matches_oracle(texts);
}

// Random strings over characters chosen to hit every branch of the pattern.
TEST(Tokenizer, MatchesTiktokenOnRandomUnicode) {
  const std::vector<std::vector<uint32_t>> pools = {
      {'a', 'b', 'e', 's', 't', 'S', 'T', 'L', 'l', 'm', 'd', 'r', 'v', 'z'},
      {'0', '1', '5', '9'},
      {' ', ' ', ' ', '\n', '\t', '\r', 0xA0, 0x2003, 0x3000},
      {'\'', '.', ',', '!', '-', '(', ')', '"', '#', '_', '/'},
      {0xE9, 0xFC, 0xF1, 0x0301, 0x0308, 0x0327},      // accents, combining marks
      {0x4E2D, 0x6587, 0x3042, 0x30AB, 0xAC00},         // CJK, kana, hangul
      {0x0416, 0x03A9, 0x05D0, 0x0627, 0x0915, 0x0E01},  // other scripts
      {0x1F600, 0x1F44D, 0x1F3FD, 0x200D, 0xFE0F, 0x2764},  // emoji parts
      {0x0663, 0xFF15, 0x216B, 0x00B2},                  // other numbers
  };
  std::mt19937 rng(1234);
  std::vector<std::string> texts;
  for (int t = 0; t < 400; ++t) {
    std::string text;
    const int length = 1 + static_cast<int>(rng() % 40);
    for (int i = 0; i < length; ++i) {
      const auto& pool = pools[rng() % pools.size()];
      text += utf8(pool[rng() % pool.size()]);
    }
    texts.push_back(text);
  }
  // Long pieces take the heap merge path; check it against tiktoken too.
  for (int t = 0; t < 10; ++t) {
    std::string word;
    for (int i = 0; i < 200 + t * 50; ++i) word += "abcdefghijklmnopqrstuvwxyzeeeettt"[rng() % 33];
    texts.push_back(word);
  }
  expect_matches_oracle(texts);
}

// Characters where JavaScript's \s differs from Unicode White_Space (tiktoken's \s):
// js-tiktoken cannot judge these, so the ids are the ones tiktoken's pieces give.
TEST(Tokenizer, WhiteSpaceIsUnicodeWhiteSpaceLikeTiktoken) {
  // U+FEFF is not white space: " \uFEFF" is one punctuation-like piece.
  const std::string bom = "a " + utf8(0xFEFF) + "b";
  EXPECT_EQ(gpt2().encode(bom), (Ids{64, 27332, 119, 123, 65}));
  // U+0085 is white space: " " and "\u0085" are white-space pieces before "b".
  const std::string nel = "a " + utf8(0x85) + "b";
  EXPECT_EQ(gpt2().encode(nel), (Ids{64, 220, 126, 227, 65}));
  // Same pieces as tiktoken would cut them, encoded one by one.
  EXPECT_EQ(gpt2().encode(" " + utf8(0xFEFF)), (Ids{27332, 119, 123}));
  EXPECT_EQ(gpt2().encode(utf8(0x85)), (Ids{126, 227}));
}

TEST(Tokenizer, DecodesIds) {
  const Ids hello{15496, 995};
  EXPECT_EQ(gpt2().decode(hello), "Hello world");
  const Ids eot{Tokenizer::kEndOfText};
  EXPECT_EQ(gpt2().decode(eot), "<|endoftext|>");
  EXPECT_EQ(gpt2().token_bytes(220), " ");
  EXPECT_EQ(gpt2().token_bytes(15496), "Hello");
  // Byte tokens that split a character decode to the raw bytes.
  const Ids half_e_acute{byte_token(0xC3)};
  EXPECT_EQ(gpt2().decode(half_e_acute), "\xC3");
  EXPECT_EQ(gpt2().decode(Ids{}), "");
}

TEST(Tokenizer, DecodeOfOutOfRangeIdNamesTheId) {
  const Ids bad{15496, 50257};
  EXPECT_NE(error_message([&] { gpt2().decode(bad); }).find("50257"), std::string::npos);
  EXPECT_NE(error_message([&] { gpt2().token_bytes(4000000000u); }).find("4000000000"), std::string::npos);
}

TEST(Tokenizer, RoundTripsValidText) {
  for (const std::string& doc : brown_documents()) {
    const Ids ids = gpt2().encode(doc);
    EXPECT_EQ(gpt2().decode(ids), doc);
    EXPECT_LT(ids.size(), doc.size() / 3);  // BPE must actually merge English text
  }
}

// Invalid UTF-8: valid runs are encoded as whole texts, each invalid byte alone.
TEST(Tokenizer, InvalidUtf8EncodesRunsAndLoneBytes) {
  struct Case {
    std::string text;
    std::vector<std::string> parts;  // valid runs, and invalid bytes as 1-byte strings
  };
  const std::vector<Case> cases = {
      {"abc\xE4\xB8", {"abc", "\xE4", "\xB8"}},                   // truncated 3-byte character
      {"\xED\xA0\x80x", {"\xED", "\xA0", "\x80", "x"}},           // UTF-16 surrogate
      // Were these sequences taken as characters, "'" would join their piece.
      {"\xED\xA0\x80's", {"\xED", "\xA0", "\x80", "'s"}},
      {"\xC0\xAF's", {"\xC0", "\xAF", "'s"}},
      {"\xF4\x90\x80\x80's", {"\xF4", "\x90", "\x80", "\x80", "'s"}},
      {"\xE4\xB8's", {"\xE4", "\xB8", "'s"}},
      {" \xE4\xB8 x", {" ", "\xE4", "\xB8", " x"}},                 // truncated CJK after a space
      {"\xC0\xAFz", {"\xC0", "\xAF", "z"}},                       // overlong '/'
      {"\xF4\x90\x80\x80", {"\xF4", "\x90", "\x80", "\x80"}},     // above U+10FFFF
      {"h\xC3\xA9llo\xFF w\xC3\xB6rld  \xFE\n", {"h\xC3\xA9llo", "\xFF", " w\xC3\xB6rld  ", "\xFE", "\n"}},
      {"a  \x80  b", {"a  ", "\x80", "  b"}},
  };
  std::vector<std::string> valid_runs;
  for (const auto& c : cases) {
    for (const auto& part : c.parts) {
      if (part.size() > 1 || static_cast<unsigned char>(part[0]) < 0x80) valid_runs.push_back(part);
    }
  }
  const std::vector<Ids> run_ids = oracle(valid_runs);
  ASSERT_EQ(run_ids.size(), valid_runs.size());
  size_t next_run = 0;
  for (const auto& c : cases) {
    Ids expected;
    for (const auto& part : c.parts) {
      if (part.size() > 1 || static_cast<unsigned char>(part[0]) < 0x80) {
        expected.insert(expected.end(), run_ids[next_run].begin(), run_ids[next_run].end());
        ++next_run;
      } else {
        expected.push_back(byte_token(static_cast<unsigned char>(part[0])));
      }
    }
    EXPECT_EQ(gpt2().encode(c.text), expected) << nlohmann::json(c.parts).dump(-1, ' ', true);
    EXPECT_EQ(gpt2().decode(gpt2().encode(c.text)), c.text);
  }
}

TEST(Tokenizer, RoundTripsRandomByteStrings) {
  std::mt19937 rng(99);
  const std::string fragments[] = {"\xC3\xA9", "\xE4\xB8\xAD", "\xF0\x9F\x98\x80", "'s", " ", "  ", "\n", "ab", "7"};
  for (int t = 0; t < 3000; ++t) {
    std::string bytes;
    const int length = static_cast<int>(rng() % 120);
    for (int i = 0; i < length; ++i) {
      if (rng() % 2) {
        bytes += static_cast<char>(rng() % 256);
      } else {
        bytes += fragments[rng() % std::size(fragments)];
      }
    }
    const Ids ids = gpt2().encode(bytes);
    for (uint32_t id : ids) ASSERT_LT(id, Tokenizer::kEndOfText);
    ASSERT_EQ(gpt2().decode(ids), bytes) << "case " << t;
  }
}

TEST(Tokenizer, ConcurrentEncodesAgreeWithSerial) {
  const std::vector<std::string> docs = brown_documents();
  std::vector<Ids> serial;
  for (const auto& doc : docs) serial.push_back(gpt2().encode(doc));
  std::vector<std::vector<Ids>> results(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < results.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round) {
        for (size_t d = 0; d < docs.size(); ++d) {
          const size_t i = (d + t) % docs.size();  // different threads, different orders
          results[t].push_back(gpt2().encode(docs[i]));
          if (results[t].back() != serial[i]) return;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (size_t t = 0; t < results.size(); ++t) {
    ASSERT_EQ(results[t].size(), 3 * docs.size()) << "thread " << t << " disagreed with the serial ids";
  }
}

// Each thread's piece cache belongs to one tokenizer; switching must not mix them.
TEST(Tokenizer, TwoInstancesInOneThreadAgree) {
  const Tokenizer other = Tokenizer::load_default();
  const std::string text = "unbelievably supercalifragilistic words words words";
  const Ids first = gpt2().encode(text);
  EXPECT_EQ(other.encode(text), first);
  EXPECT_EQ(gpt2().encode(text), first);
  Tokenizer moved = Tokenizer::load_default();
  Tokenizer target = std::move(moved);
  EXPECT_EQ(target.encode(text), first);
}

// --- load errors ---------------------------------------------------------------

TEST(TokenizerLoad, MissingDirectoryNamesEncoderJson) {
  const std::string message = error_message([] { Tokenizer::load("/nonexistent/speedrun_gpt2"); });
  EXPECT_NE(message.find("/nonexistent/speedrun_gpt2/encoder.json"), std::string::npos) << message;
}

TEST(TokenizerLoad, MalformedEncoderJsonNamesTheFile) {
  const fs::path dir = fresh_dir("bad_encoder");
  for (const std::string content : {"{not json", "[1, 2, 3]", "{\"a\": \"x\"}", "{\"a\": 0, \"b\": 0}"}) {
    write_all(dir / "encoder.json", content);
    const std::string message = error_message([&] { Tokenizer::load(dir.string()); });
    EXPECT_NE(message.find((dir / "encoder.json").string()), std::string::npos) << content << ": " << message;
    EXPECT_NE(message.find("malformed"), std::string::npos) << message;
  }
  fs::remove_all(dir);
}

TEST(TokenizerLoad, MissingOrMalformedVocabBpeNamesTheFile) {
  const fs::path dir = fresh_dir("bad_vocab");
  const std::string real_dir = speedrun::tokenizer_dir();
  fs::copy_file(real_dir + "/encoder.json", dir / "encoder.json");
  const std::string vocab = (dir / "vocab.bpe").string();

  EXPECT_NE(error_message([&] { Tokenizer::load(dir.string()); }).find(vocab), std::string::npos);

  write_all(vocab, "#version: 0.2\n\xC4\xA0t\n");  // one token, not a pair
  std::string message = error_message([&] { Tokenizer::load(dir.string()); });
  EXPECT_NE(message.find(vocab + "' line 2"), std::string::npos) << message;

  write_all(vocab, "#version: 0.2\nh e\n");  // "he" is not token 256
  message = error_message([&] { Tokenizer::load(dir.string()); });
  EXPECT_NE(message.find(vocab + "' line 2"), std::string::npos) << message;

  const std::string real_vocab = read_all(real_dir + "/vocab.bpe");
  write_all(vocab, real_vocab.substr(0, real_vocab.size() / 2));  // truncated
  message = error_message([&] { Tokenizer::load(dir.string()); });
  EXPECT_NE(message.find(vocab), std::string::npos) << message;

  write_all(vocab, "no header\n");
  message = error_message([&] { Tokenizer::load(dir.string()); });
  EXPECT_NE(message.find("#version"), std::string::npos) << message;
  fs::remove_all(dir);
}

// --- speedrun tokenize -------------------------------------------------------------

struct CommandResult {
  int status;
  std::string out;
  std::string err;
};

CommandResult run_speedrun(const std::string& args, const std::string& stdin_bytes = "") {
  const fs::path dir = fresh_dir("cli");
  write_all(dir / "in", stdin_bytes);
  const std::string command = std::string("'") + SPEEDRUN_BINARY + "' " + args + " < '" + (dir / "in").string() +
                              "' > '" + (dir / "out").string() + "' 2> '" + (dir / "err").string() + "'";
  CommandResult result{exit_status(std::system(command.c_str())), read_all(dir / "out"), read_all(dir / "err")};
  fs::remove_all(dir);
  return result;
}

TEST(TokenizeCommand, EncodesTextFileAndStdin) {
  EXPECT_EQ(run_speedrun("tokenize --text 'Hello world'").out, "15496 995\n");
  EXPECT_EQ(run_speedrun("tokenize", "Hello world").out, "15496 995\n");
  const fs::path dir = fresh_dir("cli_file");
  write_all(dir / "text.txt", "Hello, world!");
  const CommandResult from_file = run_speedrun("tokenize --file '" + (dir / "text.txt").string() + "'");
  EXPECT_EQ(from_file.status, 0) << from_file.err;
  EXPECT_EQ(from_file.out, "15496 11 995 0\n");
  fs::remove_all(dir);
}

TEST(TokenizeCommand, DecodesIdsToExactBytes) {
  const CommandResult hello = run_speedrun("tokenize --decode --text '15496 995'");
  EXPECT_EQ(hello.status, 0) << hello.err;
  EXPECT_EQ(hello.out, "Hello world");
  const std::string bytes = "x\xFF\n\xC3 y  ";
  const CommandResult ids = run_speedrun("tokenize", bytes);
  const CommandResult back = run_speedrun("tokenize --decode", ids.out);
  EXPECT_EQ(back.status, 0) << back.err;
  EXPECT_EQ(back.out, bytes);
}

TEST(TokenizeCommand, UsageErrors) {
  const CommandResult both = run_speedrun("tokenize --text a --file b");
  EXPECT_EQ(both.status, 2);
  EXPECT_NE(both.err.find("--text"), std::string::npos) << both.err;
  for (const std::string token : {"x9", "50257", "-1", "1.5"}) {
    const CommandResult bad = run_speedrun("tokenize --decode --text '15496 " + token + "'");
    EXPECT_EQ(bad.status, 2) << token;
    EXPECT_NE(bad.err.find("'" + token + "'"), std::string::npos) << bad.err;
    EXPECT_EQ(bad.out, "") << token;
  }
}

// Ids read from stdin or a file are data: a bad one exits 1 naming where it came from.
TEST(TokenizeCommand, ABadIdReadFromAFileOrStdinIsADataError) {
  const CommandResult from_stdin = run_speedrun("tokenize --decode", "15496 abc");
  EXPECT_EQ(from_stdin.status, 1);
  EXPECT_NE(from_stdin.err.find("standard input: invalid token id 'abc'"), std::string::npos) << from_stdin.err;
  const fs::path dir = fresh_dir("cli_ids_file");
  write_all(dir / "ids.txt", "15496 50257\n");
  const CommandResult from_file = run_speedrun("tokenize --decode --file '" + (dir / "ids.txt").string() + "'");
  EXPECT_EQ(from_file.status, 1);
  EXPECT_NE(from_file.err.find("input file '" + (dir / "ids.txt").string() + "': invalid token id '50257'"),
            std::string::npos)
      << from_file.err;
  EXPECT_EQ(from_file.out, "");
  fs::remove_all(dir);
}

}  // namespace
