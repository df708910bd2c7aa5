// A Canvas that draws into an RGB pixel buffer: square-brush lines, filled rectangles
// and dots, and text in the 5x7 bitmap font scaled by an integer factor.
#pragma once

#include <cstdint>
#include <vector>

#include "plot/canvas.h"

namespace speedrun::plot {

class RasterCanvas : public Canvas {
 public:
  RasterCanvas(int width, int height, Color background);
  void fill_rect(double x, double y, double w, double h, Color color) override;
  void line(Point a, Point b, Color color, double width) override;
  void polyline(const std::vector<Point>& points, Color color, double width, double opacity,
                const SeriesTag* tag) override;
  void dot(Point center, double radius, Color color) override;
  void text(Point at, const std::string& text, Color color, Anchor anchor, int size) override;

  int width() const { return width_; }
  int height() const { return height_; }
  const std::vector<uint8_t>& rgb() const { return rgb_; }
  Color pixel(int x, int y) const;

 private:
  void set(int x, int y, Color color);
  void stamp(double cx, double cy, double radius, Color color);

  int width_, height_;
  Color background_;
  std::vector<uint8_t> rgb_;
};

}  // namespace speedrun::plot
