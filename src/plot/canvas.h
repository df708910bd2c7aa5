// The drawing surface the loss chart is laid out on once and rendered twice: as SVG
// text and as pixels for PNG. Coordinates are pixels, origin top left.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace speedrun::plot {

struct Color {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Color&) const = default;
};

struct Point {
  double x = 0, y = 0;
};

enum class Anchor { kStart, kMiddle, kEnd };

// What a polyline shows, so that an SVG reader (or a test) can tell the series apart.
struct SeriesTag {
  std::string run;     // run name
  std::string series;  // "train" or "val"
  std::string panel;   // "step" or "time"
};

class Canvas {
 public:
  virtual ~Canvas() = default;
  virtual void fill_rect(double x, double y, double w, double h, Color color) = 0;
  virtual void line(Point a, Point b, Color color, double width) = 0;
  // opacity < 1 lets crowded curves show through (the raster renders it as a paler colour).
  virtual void polyline(const std::vector<Point>& points, Color color, double width, double opacity,
                        const SeriesTag* tag) = 0;
  virtual void dot(Point center, double radius, Color color) = 0;
  // Text vertically centred on y; size is the glyph height in pixels.
  virtual void text(Point at, const std::string& text, Color color, Anchor anchor, int size) = 0;
};

}  // namespace speedrun::plot
