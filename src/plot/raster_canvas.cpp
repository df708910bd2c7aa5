// Pixel rendering of the chart's primitives.
#include "plot/raster_canvas.h"

#include <algorithm>
#include <cmath>

#include "plot/bitmap_font.h"

namespace speedrun::plot {
namespace {

// Opacity over the background, as a solid colour: overlapping curves then simply
// overwrite each other, which keeps the rasteriser free of coverage bookkeeping.
Color blend(Color c, Color background, double opacity) {
  auto mix = [&](uint8_t a, uint8_t b) { return static_cast<uint8_t>(std::lround(a * opacity + b * (1 - opacity))); };
  return {mix(c.r, background.r), mix(c.g, background.g), mix(c.b, background.b)};
}

}  // namespace

RasterCanvas::RasterCanvas(int width, int height, Color background)
    : width_(width), height_(height), background_(background), rgb_(static_cast<size_t>(width) * height * 3) {
  for (size_t i = 0; i < rgb_.size(); i += 3) {
    rgb_[i] = background.r;
    rgb_[i + 1] = background.g;
    rgb_[i + 2] = background.b;
  }
}

Color RasterCanvas::pixel(int x, int y) const {
  const size_t i = (static_cast<size_t>(y) * width_ + x) * 3;
  return {rgb_[i], rgb_[i + 1], rgb_[i + 2]};
}

void RasterCanvas::set(int x, int y, Color color) {
  if (x < 0 || y < 0 || x >= width_ || y >= height_) return;
  const size_t i = (static_cast<size_t>(y) * width_ + x) * 3;
  rgb_[i] = color.r;
  rgb_[i + 1] = color.g;
  rgb_[i + 2] = color.b;
}

void RasterCanvas::fill_rect(double x, double y, double w, double h, Color color) {
  const int x0 = static_cast<int>(std::lround(x)), y0 = static_cast<int>(std::lround(y));
  const int x1 = static_cast<int>(std::lround(x + w)), y1 = static_cast<int>(std::lround(y + h));
  for (int py = y0; py < y1; ++py) {
    for (int px = x0; px < x1; ++px) set(px, py, color);
  }
}

// Every pixel whose centre lies within the square of half-size `radius` (at least the
// pixel under the point itself).
void RasterCanvas::stamp(double cx, double cy, double radius, Color color) {
  const int x0 = static_cast<int>(std::floor(cx - radius + 0.5)), x1 = static_cast<int>(std::floor(cx + radius - 0.5));
  const int y0 = static_cast<int>(std::floor(cy - radius + 0.5)), y1 = static_cast<int>(std::floor(cy + radius - 0.5));
  const int px = static_cast<int>(std::floor(cx)), py = static_cast<int>(std::floor(cy));
  set(px, py, color);
  for (int y = y0; y <= y1; ++y) {
    for (int x = x0; x <= x1; ++x) set(x, y, color);
  }
}

void RasterCanvas::line(Point a, Point b, Color color, double width) {
  const double length = std::hypot(b.x - a.x, b.y - a.y);
  const int samples = static_cast<int>(std::ceil(length * 2)) + 1;
  for (int i = 0; i <= samples; ++i) {
    const double t = static_cast<double>(i) / samples;
    stamp(a.x + t * (b.x - a.x), a.y + t * (b.y - a.y), width / 2, color);
  }
}

void RasterCanvas::polyline(const std::vector<Point>& points, Color color, double width, double opacity,
                            const SeriesTag*) {
  const Color solid = blend(color, background_, std::clamp(opacity, 0.0, 1.0));
  if (points.size() == 1) stamp(points[0].x, points[0].y, width / 2, solid);
  for (size_t i = 1; i < points.size(); ++i) line(points[i - 1], points[i], solid, width);
}

void RasterCanvas::dot(Point center, double radius, Color color) {
  const int x0 = static_cast<int>(std::floor(center.x - radius)), x1 = static_cast<int>(std::ceil(center.x + radius));
  const int y0 = static_cast<int>(std::floor(center.y - radius)), y1 = static_cast<int>(std::ceil(center.y + radius));
  for (int y = y0; y <= y1; ++y) {
    for (int x = x0; x <= x1; ++x) {
      if (std::hypot(x + 0.5 - center.x, y + 0.5 - center.y) <= radius) set(x, y, color);
    }
  }
}

void RasterCanvas::text(Point at, const std::string& text, Color color, Anchor anchor, int size) {
  const int scale = std::max(1, size / kGlyphHeight);
  const int advance = (kGlyphWidth + 1) * scale;
  const int total = static_cast<int>(text.size()) * advance - scale;
  double left = at.x;
  if (anchor == Anchor::kMiddle) left -= total / 2.0;
  if (anchor == Anchor::kEnd) left -= total;
  const int x0 = static_cast<int>(std::lround(left));
  const int y0 = static_cast<int>(std::lround(at.y - kGlyphHeight * scale / 2.0));
  for (size_t i = 0; i < text.size(); ++i) {
    const auto& rows = glyph(text[i]);
    for (int r = 0; r < kGlyphHeight; ++r) {
      for (int c = 0; c < kGlyphWidth; ++c) {
        if (!(rows[r] >> (kGlyphWidth - 1 - c) & 1)) continue;
        fill_rect(x0 + static_cast<int>(i) * advance + c * scale, y0 + r * scale, scale, scale, color);
      }
    }
  }
}

}  // namespace speedrun::plot
