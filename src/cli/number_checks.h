// Checks of numeric flags on their text, which CLI11 hands to a validator before it
// converts it: the whole text must be a number of the flag's kind, in range, or the error
// says so in words. CLI11's own range checks print "Value 0 not in range 0.000000 to
// 1.79...e+308", and its conversions let "-1" wrap into an unsigned flag and an
// out-of-range integer saturate.
#pragma once

#include <cstdint>
#include <limits>

#include <CLI/CLI.hpp>

namespace speedrun::cli {

// A whole number in [min, max] (the flag's type must hold that range).
CLI::Validator whole_number(int64_t min, int64_t max = std::numeric_limits<int32_t>::max());
// A whole number in [0, 2^64 - 1], for uint64_t flags (seeds).
CLI::Validator unsigned_whole_number();
// A finite number >= min (> min when exclusive), and at most max.
CLI::Validator finite_number(double min, bool exclusive, double max = std::numeric_limits<double>::max());
// A shard glob given on the command line: an empty one is refused rather than read as
// "not given" (which means the default corpus).
CLI::Validator shard_glob();

}  // namespace speedrun::cli
