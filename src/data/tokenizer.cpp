// GPT-2 byte-level BPE (tiktoken "gpt2"): loading encoder.json/vocab.bpe, PCRE2
// pre-tokenisation, rank-ordered merges with a per-thread piece cache, and decoding.
#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <fstream>
#include <functional>
#include <limits>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/input_file.h"
#include "util/paths.h"
#include "util/utf8.h"

namespace speedrun {
namespace {

constexpr uint32_t kNoRank = std::numeric_limits<uint32_t>::max();
constexpr const char* kEndOfTextText = "<|endoftext|>";

// GPT-2's pre-tokenisation pattern from tiktoken's "gpt2" encoding,
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// with \s spelled out as Unicode White_Space, which is what tiktoken's Rust regex
// means by \s. PCRE2's own \s (with UCP) also takes U+180E, which tiktoken does not.
#define SPEEDRUN_WHITE_SPACE R"(\t\n\x{0B}\f\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})"
constexpr const char* kPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^)" SPEEDRUN_WHITE_SPACE R"(\p{L}\p{N}]+)"
    R"(|[)" SPEEDRUN_WHITE_SPACE R"(]+(?![^)" SPEEDRUN_WHITE_SPACE R"(])|[)" SPEEDRUN_WHITE_SPACE R"(]+)";
#undef SPEEDRUN_WHITE_SPACE

// Pieces longer than this are merged with a heap (O(n log n)) instead of the
// quadratic scan, and are not cached (they are rare and would bloat the cache).
constexpr size_t kLongPiece = 128;
// A thread's cache is dropped when it grows past this many pieces.
constexpr size_t kMaxCachedPieces = size_t{1} << 18;

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using RankMap = std::unordered_map<std::string, uint32_t, StringHash, std::equal_to<>>;

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves, the
// rest to code points 256.. in byte order. encoder.json keys are written in it.
std::array<uint32_t, 256> byte_to_code_point() {
  std::array<uint32_t, 256> map{};
  auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); };
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) map[b] = printable(b) ? static_cast<uint32_t>(b) : next++;
  return map;
}

// Decodes one key of encoder.json (UTF-8 of the byte-to-unicode alphabet) to bytes.
bool key_to_bytes(const std::string& key, const std::unordered_map<uint32_t, unsigned char>& code_point_to_byte,
                  std::string& out) {
  out.clear();
  for (size_t i = 0; i < key.size();) {
    const size_t len = utf8_sequence_length(key, i);
    if (len == 0) return false;
    uint32_t cp = static_cast<unsigned char>(key[i]);
    if (len > 1) {
      cp &= (0xFF >> (len + 1));
      for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(key[i + k]) & 0x3F);
    }
    auto it = code_point_to_byte.find(cp);
    if (it == code_point_to_byte.end()) return false;
    out.push_back(static_cast<char>(it->second));
    i += len;
  }
  return true;
}

std::string read_file_or_throw(const std::string& path) {
  if (input_file_problem(path) == "is a directory, not a file") {
    throw Error("tokenizer file '" + path + "' is a directory, not a file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open tokenizer file '" + path + "' (run scripts/setup.sh to download it)");
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error("cannot read tokenizer file '" + path + "'");
  return ss.str();
}

std::atomic<uint64_t> g_next_instance_id{1};

}  // namespace

struct Tokenizer::Impl {
  std::vector<std::string> id_to_bytes;  // index = token id
  RankMap ranks;                         // mergeable bytes -> rank (= token id); no special tokens
  pcre2_code* pattern = nullptr;
  bool jit = false;
  uint64_t instance_id = g_next_instance_id.fetch_add(1);

  ~Impl() {
    if (pattern) pcre2_code_free(pattern);
  }

  uint32_t rank_of(std::string_view bytes) const {
    auto it = ranks.find(bytes);
    return it == ranks.end() ? kNoRank : it->second;
  }

  void compile_pattern();
  void load_encoder(const std::string& path);
  void check_merges(const std::string& path) const;

  void encode_piece(std::string_view piece, std::vector<uint32_t>& out) const;
  void merge_short(std::string_view piece, std::vector<uint32_t>& out) const;
  void merge_long(std::string_view piece, std::vector<uint32_t>& out) const;
  void encode_valid_run(std::string_view run, std::vector<uint32_t>& out) const;
};

void Tokenizer::Impl::compile_pattern() {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pattern = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                          &error_code, &error_offset, nullptr);
  if (!pattern) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error_code, message, sizeof message);
    throw Error(std::string("cannot compile the GPT-2 pre-tokenisation pattern with PCRE2: ") +
                reinterpret_cast<const char*>(message));
  }
  // JIT is an optimisation only: PCRE2 built without it still matches, just slower.
  jit = pcre2_jit_compile(pattern, PCRE2_JIT_COMPLETE) == 0;
}

void Tokenizer::Impl::load_encoder(const std::string& path) {
  const std::string text = read_file_or_throw(path);
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error("malformed tokenizer file '" + path + "': not valid JSON (" + e.what() + ")");
  }
  if (!json.is_object() || json.empty()) {
    throw Error("malformed tokenizer file '" + path + "': expected a JSON object mapping token strings to ids");
  }
  const auto byte_map = byte_to_code_point();
  std::unordered_map<uint32_t, unsigned char> code_point_to_byte;
  for (int b = 0; b < 256; ++b) code_point_to_byte[byte_map[b]] = static_cast<unsigned char>(b);

  id_to_bytes.assign(json.size(), std::string());
  std::vector<bool> seen(json.size(), false);
  std::string bytes;
  for (const auto& [key, value] : json.items()) {
    if (!value.is_number_unsigned() || value.get<uint64_t>() >= json.size()) {
      throw Error("malformed tokenizer file '" + path + "': the id of token '" + key + "' is " + value.dump() +
                  ", expected an integer in [0, " + std::to_string(json.size()) + ")");
    }
    const auto id = value.get<uint32_t>();
    if (seen[id]) throw Error("malformed tokenizer file '" + path + "': id " + std::to_string(id) + " is used twice");
    seen[id] = true;
    if (key == kEndOfTextText) {
      id_to_bytes[id] = key;
      continue;
    }
    if (!key_to_bytes(key, code_point_to_byte, bytes)) {
      throw Error("malformed tokenizer file '" + path + "': token '" + key +
                  "' has a character outside GPT-2's byte-to-unicode alphabet");
    }
    id_to_bytes[id] = bytes;
    if (!ranks.emplace(bytes, id).second) {
      throw Error("malformed tokenizer file '" + path + "': two tokens decode to the same bytes (id " +
                  std::to_string(id) + ")");
    }
  }
  if (id_to_bytes.size() <= Tokenizer::kEndOfText || id_to_bytes[Tokenizer::kEndOfText] != kEndOfTextText) {
    throw Error("malformed tokenizer file '" + path + "': expected \"<|endoftext|>\" with id 50256");
  }
  for (int b = 0; b < 256; ++b) {
    if (rank_of(std::string(1, static_cast<char>(b))) == kNoRank) {
      throw Error("malformed tokenizer file '" + path + "': no token for byte " + std::to_string(b));
    }
  }
}

// tiktoken ranks a merge by the id of its result; that equals GPT-2's merge order
// only when vocab.bpe's line k creates token 256 + k. Check it, as tiktoken does.
void Tokenizer::Impl::check_merges(const std::string& path) const {
  const std::string text = read_file_or_throw(path);
  std::istringstream lines(text);
  std::string line;
  if (!std::getline(lines, line) || line.rfind("#version", 0) != 0) {
    throw Error("malformed tokenizer file '" + path + "': expected a first line '#version: ...'");
  }
  const auto byte_map = byte_to_code_point();
  std::unordered_map<uint32_t, unsigned char> code_point_to_byte;
  for (int b = 0; b < 256; ++b) code_point_to_byte[byte_map[b]] = static_cast<unsigned char>(b);

  uint32_t expected_id = 256;
  size_t line_number = 1;
  std::string left, right;
  while (std::getline(lines, line)) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const size_t space = line.find(' ');
    const std::string where = "malformed tokenizer file '" + path + "' line " + std::to_string(line_number) + ": ";
    if (space == std::string::npos || space == 0 || line.find(' ', space + 1) != std::string::npos ||
        space + 1 == line.size()) {
      throw Error(where + "expected two tokens separated by one space, got '" + line + "'");
    }
    if (!key_to_bytes(line.substr(0, space), code_point_to_byte, left) ||
        !key_to_bytes(line.substr(space + 1), code_point_to_byte, right)) {
      throw Error(where + "a token has a character outside GPT-2's byte-to-unicode alphabet");
    }
    const uint32_t rank = rank_of(left + right);
    if (rank != expected_id) {
      throw Error(where + "merge '" + line + "' should create token " + std::to_string(expected_id) +
                  " but encoder.json gives " + (rank == kNoRank ? std::string("no token") : std::to_string(rank)));
    }
    ++expected_id;
  }
  if (expected_id != Tokenizer::kEndOfText) {
    throw Error("malformed tokenizer file '" + path + "': " + std::to_string(expected_id - 256) +
                " merges, expected " + std::to_string(Tokenizer::kEndOfText - 256));
  }
}

// tiktoken's byte_pair_merge: repeatedly merge the adjacent pair whose
// concatenation has the lowest rank, the leftmost on ties.
void Tokenizer::Impl::merge_short(std::string_view piece, std::vector<uint32_t>& out) const {
  const size_t n = piece.size();
  // starts[k] = start of part k; pair_rank[k] = rank of parts k and k+1 joined.
  uint32_t starts_buf[kLongPiece + 2], ranks_buf[kLongPiece + 2];
  size_t parts = n;
  for (size_t k = 0; k <= n; ++k) starts_buf[k] = static_cast<uint32_t>(k);
  const auto pair_rank = [&](size_t k) {
    return k + 1 < parts ? rank_of(piece.substr(starts_buf[k], starts_buf[k + 2] - starts_buf[k])) : kNoRank;
  };
  for (size_t k = 0; k < parts; ++k) ranks_buf[k] = pair_rank(k);
  while (parts > 1) {
    uint32_t best = kNoRank;
    size_t at = 0;
    for (size_t k = 0; k + 1 < parts; ++k) {
      if (ranks_buf[k] < best) best = ranks_buf[k], at = k;
    }
    if (best == kNoRank) break;
    std::copy(starts_buf + at + 2, starts_buf + parts + 1, starts_buf + at + 1);
    std::copy(ranks_buf + at + 2, ranks_buf + parts, ranks_buf + at + 1);
    --parts;
    ranks_buf[at] = pair_rank(at);
    if (at > 0) ranks_buf[at - 1] = pair_rank(at - 1);
  }
  for (size_t k = 0; k < parts; ++k) out.push_back(rank_of(piece.substr(starts_buf[k], starts_buf[k + 1] - starts_buf[k])));
}

// The same merges in O(n log n) for long pieces (e.g. runs of thousands of
// spaces): a heap ordered by (rank, start) yields the lowest rank, leftmost first.
void Tokenizer::Impl::merge_long(std::string_view piece, std::vector<uint32_t>& out) const {
  const size_t n = piece.size();
  std::vector<uint32_t> next(n), prev(n), rank(n, kNoRank);  // parts are named by their first byte
  for (size_t k = 0; k < n; ++k) next[k] = static_cast<uint32_t>(k + 1), prev[k] = static_cast<uint32_t>(k - 1);
  const auto end_of = [&](uint32_t k) { return k < n ? next[k] : static_cast<uint32_t>(n); };
  const auto pair_rank = [&](uint32_t k) {
    const uint32_t j = next[k];
    return j < n ? rank_of(piece.substr(k, end_of(j) - k)) : kNoRank;
  };
  using Entry = std::pair<uint32_t, uint32_t>;  // (rank, start)
  std::priority_queue<Entry, std::vector<Entry>, std::greater<>> heap;
  for (uint32_t k = 0; k + 1 < n; ++k) {
    rank[k] = pair_rank(k);
    if (rank[k] != kNoRank) heap.emplace(rank[k], k);
  }
  while (!heap.empty()) {
    const auto [r, k] = heap.top();
    heap.pop();
    if (rank[k] != r) continue;  // stale: the part changed since this entry was pushed
    const uint32_t j = next[k];
    next[k] = next[j];
    if (next[k] < n) prev[next[k]] = k;
    rank[j] = kNoRank;
    rank[k] = pair_rank(k);
    if (rank[k] != kNoRank) heap.emplace(rank[k], k);
    if (k > 0) {
      const uint32_t p = prev[k];
      rank[p] = pair_rank(p);
      if (rank[p] != kNoRank) heap.emplace(rank[p], p);
    }
  }
  for (uint32_t k = 0; k < n; k = next[k]) out.push_back(rank_of(piece.substr(k, end_of(k) - k)));
}

namespace {

// Per-thread memo of merged pieces: words repeat, so most pieces are merged once.
struct PieceCache {
  uint64_t owner = 0;  // Impl::instance_id the entries belong to
  std::unordered_map<std::string, std::pair<uint32_t, uint32_t>, StringHash, std::equal_to<>> spans;  // -> (offset, count)
  std::vector<uint32_t> ids;

  void reset(uint64_t new_owner) {
    owner = new_owner;
    spans.clear();
    ids.clear();
  }
};

PieceCache& thread_cache(uint64_t owner) {
  thread_local PieceCache cache;
  if (cache.owner != owner || cache.spans.size() >= kMaxCachedPieces) cache.reset(owner);
  return cache;
}

struct MatchData {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  ~MatchData() { pcre2_match_data_free(data); }
};

}  // namespace

void Tokenizer::Impl::encode_piece(std::string_view piece, std::vector<uint32_t>& out) const {
  if (const uint32_t whole = rank_of(piece); whole != kNoRank) {
    out.push_back(whole);
    return;
  }
  if (piece.size() > kLongPiece) {
    merge_long(piece, out);
    return;
  }
  PieceCache& cache = thread_cache(instance_id);
  if (auto it = cache.spans.find(piece); it != cache.spans.end()) {
    const auto [offset, count] = it->second;
    out.insert(out.end(), cache.ids.begin() + offset, cache.ids.begin() + offset + count);
    return;
  }
  const size_t first = out.size();
  merge_short(piece, out);
  cache.spans.emplace(std::string(piece), std::make_pair(static_cast<uint32_t>(cache.ids.size()),
                                                         static_cast<uint32_t>(out.size() - first)));
  cache.ids.insert(cache.ids.end(), out.begin() + first, out.end());
}

void Tokenizer::Impl::encode_valid_run(std::string_view run, std::vector<uint32_t>& out) const {
  thread_local MatchData match;
  if (!match.data) throw Error("out of memory creating PCRE2 match data");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(run.data());
  size_t offset = 0;
  while (offset < run.size()) {
    const int rc = pcre2_match(pattern, subject, run.size(), offset, PCRE2_NO_UTF_CHECK, match.data, nullptr);
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof message);
      throw Error("pre-tokenisation failed at byte " + std::to_string(offset) + ": " +
                  reinterpret_cast<const char*>(message));
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match.data);
    // The pattern matches every character, so matches tile the run with no gaps.
    if (ovector[0] != offset || ovector[1] <= offset) {
      throw Error("internal error: GPT-2 pattern left a gap at byte " + std::to_string(offset));
    }
    encode_piece(run.substr(offset, ovector[1] - offset), out);
    offset = ovector[1];
  }
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& dir) {
  auto impl = std::make_unique<Impl>();
  impl->load_encoder(dir + "/encoder.json");
  impl->check_merges(dir + "/vocab.bpe");
  impl->compile_pattern();
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::load_default() { return load(tokenizer_dir()); }

std::vector<uint32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<uint32_t> out;
  out.reserve(text.size() / 4 + 8);
  size_t run_start = 0, i = 0;
  while (i < text.size()) {
    // Fast path over ASCII; the full check only for multi-byte sequences.
    if (static_cast<unsigned char>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t len = utf8_sequence_length(text, i);
    if (len > 0) {
      i += len;
      continue;
    }
    // An invalid byte ends the valid run and is a piece of its own.
    impl_->encode_valid_run(text.substr(run_start, i - run_start), out);
    out.push_back(impl_->rank_of(text.substr(i, 1)));
    run_start = ++i;
  }
  impl_->encode_valid_run(text.substr(run_start), out);
  return out;
}

std::string Tokenizer::decode(std::span<const uint32_t> ids) const {
  std::string out;
  for (uint32_t id : ids) out += token_bytes(id);
  return out;
}

const std::string& Tokenizer::token_bytes(uint32_t id) const {
  if (id >= impl_->id_to_bytes.size()) {
    throw Error("token id " + std::to_string(id) + " is out of range: the vocabulary has " +
                std::to_string(impl_->id_to_bytes.size()) + " tokens (ids 0.." +
                std::to_string(impl_->id_to_bytes.size() - 1) + ")");
  }
  return impl_->id_to_bytes[id];
}

size_t Tokenizer::vocab_size() const { return impl_->id_to_bytes.size(); }

}  // namespace speedrun
