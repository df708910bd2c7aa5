// PNG encoding of 8-bit RGB images (zlib for the deflate stream and the CRCs).
#pragma once

#include <cstdint>
#include <vector>

namespace speedrun::plot {

// rgb holds height rows of width * 3 bytes. Returns the whole file's bytes.
std::vector<uint8_t> encode_png(int width, int height, const std::vector<uint8_t>& rgb);

}  // namespace speedrun::plot
