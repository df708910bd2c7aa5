// Streams documents out of input files for `speedrun prepare`: a text file is one
// document; a JSONL file holds one document per line, in its string field "text".
#pragma once

#include <fstream>
#include <string>
#include <string_view>
#include <vector>

namespace speedrun {

enum class InputFormat { kAuto, kText, kJsonl };

// "auto", "text" or "jsonl"; anything else is a UsageError.
InputFormat parse_input_format(std::string_view name);
// Resolves kAuto by the file name: .jsonl and .json-lines are JSONL, the rest text.
InputFormat format_for_path(const std::string& path, InputFormat requested);

class DocumentReader {
 public:
  // Checks up front that every input is a readable regular file (a UsageError
  // naming the first that is not), so that a typo fails before any work.
  DocumentReader(std::vector<std::string> paths, InputFormat format);

  // Reads the next document into text; false once every input is exhausted.
  // Malformed JSONL throws speedrun::Error naming the file and line.
  bool next(std::string& text);

 private:
  bool open_next_file();
  bool next_jsonl_record(std::string& text);

  std::vector<std::string> paths_;
  InputFormat format_;
  size_t next_file_ = 0;         // index of the file to open after the current one
  std::ifstream jsonl_;          // the JSONL file being read, when one is open
  std::string jsonl_path_;
  size_t line_number_ = 0;
  std::string line_;
};

}  // namespace speedrun
