#include "cli/number_checks.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace speedrun::cli {
namespace {

// Both ends, always: a value past the upper one (an int's 2147483647) must say why it fails.
std::string bound_text(int64_t min, int64_t max) {
  if (min == std::numeric_limits<int64_t>::min()) return "in [-2^63, 2^63 - 1]";
  return "in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
}

}  // namespace

CLI::Validator whole_number(int64_t min, int64_t max) {
  const std::string bound = bound_text(min, max);
  return CLI::Validator(
      [min, max, bound](std::string& text) -> std::string {
        int64_t value = 0;
        const char* end = text.data() + text.size();
        const auto [stop, error] = std::from_chars(text.data(), end, value);
        const bool whole = stop == end && (error == std::errc() || error == std::errc::result_out_of_range);
        if (!whole || text.empty()) return "expected a whole number " + bound + ", got '" + text + "'";
        if (error != std::errc() || value < min || value > max) {
          return "expected a whole number " + bound + ", got " + text;
        }
        return std::string();
      },
      "INT " + bound);
}

CLI::Validator unsigned_whole_number() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        uint64_t value = 0;
        const char* end = text.data() + text.size();
        const auto [stop, error] = std::from_chars(text.data(), end, value);
        if (text.empty() || stop != end || error != std::errc()) {
          return "expected a whole number in [0, 18446744073709551615], got '" + text + "'";
        }
        return std::string();
      },
      "INT in [0, 2^64-1]");
}

CLI::Validator finite_number(double min, bool exclusive, double max) {
  char min_text[32], max_text[32];
  std::snprintf(min_text, sizeof min_text, "%.10g", min);
  std::snprintf(max_text, sizeof max_text, "%.10g", max);
  std::string bound = (exclusive ? "> " : ">= ") + std::string(min_text);
  if (max < std::numeric_limits<double>::max()) bound += " and <= " + std::string(max_text);
  return CLI::Validator(
      [min, exclusive, max, bound](std::string& text) -> std::string {
        char* stop = nullptr;
        const double value = std::strtod(text.c_str(), &stop);
        const bool number = !text.empty() && stop == text.c_str() + text.size() && std::isfinite(value);
        if (!number || (exclusive ? !(value > min) : !(value >= min)) || value > max) {
          return "expected a finite number " + bound + ", got '" + text + "'";
        }
        return std::string();
      },
      "NUMBER " + bound);
}

CLI::Validator shard_glob() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        return text.empty() ? "expected a glob of token shards, got an empty one (omit the flag for the default corpus)"
                            : std::string();
      },
      "GLOB");
}

}  // namespace speedrun::cli
