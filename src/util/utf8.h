// UTF-8 well-formedness, shared by the tokenizer, the SVG writer and shard previews.
#pragma once

#include <cstddef>
#include <string_view>

namespace speedrun {

// Length of the well-formed UTF-8 sequence at s[i] (Unicode table 3-7), 0 when the byte does
// not start one. Same definition as PCRE2's UTF check.
size_t utf8_sequence_length(std::string_view s, size_t i);

}  // namespace speedrun
