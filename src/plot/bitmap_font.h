// A 5x7 pixel font for printable ASCII, drawn for this project, used to label PNG plots.
#pragma once

#include <array>
#include <cstdint>

namespace speedrun::plot {

constexpr int kGlyphWidth = 5;
constexpr int kGlyphHeight = 7;

// Rows top to bottom; bit 4 is the leftmost column. Characters outside 32..126 get a box.
const std::array<uint8_t, kGlyphHeight>& glyph(char c);

}  // namespace speedrun::plot
