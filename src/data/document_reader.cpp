// Document extraction for `speedrun prepare`: whole text files and the "text" field
// of JSONL records, read one document at a time.
#include "data/document_reader.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "util/error.h"

namespace speedrun {
namespace {

bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r\n") == std::string_view::npos;
}

void check_readable_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw Error("input file '" + path + "': " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) throw Error("input '" + path + "' is not a regular file");
}

std::string read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open input file '" + path + "': " + std::strerror(errno));
  std::string text;
  in.seekg(0, std::ios::end);
  std::streamoff size = in.tellg();
  in.seekg(0, std::ios::beg);
  if (size > 0) {
    text.resize(static_cast<size_t>(size));
    in.read(text.data(), size);
  }
  if (in.bad() || (size > 0 && in.gcount() != size)) throw Error("cannot read input file '" + path + "'");
  return text;
}

}  // namespace

InputFormat parse_input_format(std::string_view name) {
  if (name == "auto") return InputFormat::kAuto;
  if (name == "text") return InputFormat::kText;
  if (name == "jsonl") return InputFormat::kJsonl;
  throw UsageError("unknown input format '" + std::string(name) + "' (expected auto, text or jsonl)");
}

InputFormat format_for_path(const std::string& path, InputFormat requested) {
  if (requested != InputFormat::kAuto) return requested;
  return ends_with(path, ".jsonl") || ends_with(path, ".json-lines") ? InputFormat::kJsonl : InputFormat::kText;
}

DocumentReader::DocumentReader(std::vector<std::string> paths, InputFormat format)
    : paths_(std::move(paths)), format_(format) {
  if (paths_.empty()) throw UsageError("no input files given");
  for (const std::string& path : paths_) check_readable_file(path);
}

bool DocumentReader::next(std::string& text) {
  for (;;) {
    if (jsonl_.is_open()) {
      if (next_jsonl_record(text)) return true;
      jsonl_.close();
    }
    if (next_file_ >= paths_.size()) return false;
    const std::string& path = paths_[next_file_++];
    if (format_for_path(path, format_) == InputFormat::kText) {
      text = read_whole_file(path);
      return true;
    }
    jsonl_.clear();
    jsonl_.open(path, std::ios::binary);
    if (!jsonl_) throw Error("cannot open input file '" + path + "': " + std::strerror(errno));
    jsonl_path_ = path;
    line_number_ = 0;
  }
}

bool DocumentReader::next_jsonl_record(std::string& text) {
  while (std::getline(jsonl_, line_)) {
    ++line_number_;
    if (is_blank(line_)) continue;  // blank lines (a trailing one, say) hold no record
    std::string where = "'" + jsonl_path_ + "' line " + std::to_string(line_number_);
    nlohmann::json record;
    try {
      record = nlohmann::json::parse(line_);
    } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for huge numbers
      throw Error(where + ": not valid JSON (" + e.what() + ")");
    }
    auto field = record.is_object() ? record.find("text") : record.end();
    if (!record.is_object() || field == record.end() || !field->is_string()) {
      throw Error(where + ": expected a JSON object with a string field \"text\"");
    }
    text = field->get<std::string>();
    return true;
  }
  if (jsonl_.bad()) throw Error("cannot read input file '" + jsonl_path_ + "'");
  return false;
}

}  // namespace speedrun
