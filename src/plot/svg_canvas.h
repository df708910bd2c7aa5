// A Canvas that writes SVG 1.1 text.
#pragma once

#include <string>

#include "plot/canvas.h"

namespace speedrun::plot {

class SvgCanvas : public Canvas {
 public:
  SvgCanvas(int width, int height);
  void fill_rect(double x, double y, double w, double h, Color color) override;
  void line(Point a, Point b, Color color, double width) override;
  void polyline(const std::vector<Point>& points, Color color, double width, double opacity,
                const SeriesTag* tag) override;
  void dot(Point center, double radius, Color color) override;
  void text(Point at, const std::string& text, Color color, Anchor anchor, int size) override;
  // The finished document.
  std::string str() const { return body_ + "</svg>\n"; }

 private:
  std::string body_;
};

// Escapes &, <, >, " and ' for XML text and attribute values; invalid UTF-8 and control
// characters XML cannot hold (all below 0x20 but tab, newline, return) become U+FFFD.
std::string xml_escape(const std::string& text);

}  // namespace speedrun::plot
