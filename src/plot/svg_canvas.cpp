// SVG rendering of the chart's primitives.
#include "plot/svg_canvas.h"

#include <algorithm>
#include <cstdio>

#include "util/utf8.h"

namespace speedrun::plot {
namespace {

std::string number(double v) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.2f", v);
  std::string s = buffer;
  while (s.back() == '0') s.pop_back();
  if (s.back() == '.') s.pop_back();
  return s == "-0" ? "0" : s;
}

std::string hex(Color c) {
  char buffer[8];
  std::snprintf(buffer, sizeof buffer, "#%02x%02x%02x", c.r, c.g, c.b);
  return buffer;
}

}  // namespace

std::string xml_escape(const std::string& text) {
  static const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD
  std::string out;
  for (size_t i = 0; i < text.size();) {
    const size_t length = utf8_sequence_length(text, i);
    const unsigned char c = static_cast<unsigned char>(text[i]);
    i += std::max<size_t>(length, 1);
    // XML 1.0 has no way to write invalid UTF-8 or a control character but tab and newlines.
    if (length == 0 || (c < 0x20 && c != '\t' && c != '\n' && c != '\r')) {
      out += kReplacement;
      continue;
    }
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out.append(text, i - length, length);
    }
  }
  return out;
}

SvgCanvas::SvgCanvas(int width, int height) {
  body_ = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" +
          std::to_string(width) + "\" height=\"" + std::to_string(height) + "\" viewBox=\"0 0 " +
          std::to_string(width) + " " + std::to_string(height) + "\" font-family=\"monospace\">\n";
}

void SvgCanvas::fill_rect(double x, double y, double w, double h, Color color) {
  body_ += "<rect x=\"" + number(x) + "\" y=\"" + number(y) + "\" width=\"" + number(w) + "\" height=\"" +
           number(h) + "\" fill=\"" + hex(color) + "\"/>\n";
}

void SvgCanvas::line(Point a, Point b, Color color, double width) {
  body_ += "<line x1=\"" + number(a.x) + "\" y1=\"" + number(a.y) + "\" x2=\"" + number(b.x) + "\" y2=\"" +
           number(b.y) + "\" stroke=\"" + hex(color) + "\" stroke-width=\"" + number(width) + "\"/>\n";
}

void SvgCanvas::polyline(const std::vector<Point>& points, Color color, double width, double opacity,
                         const SeriesTag* tag) {
  body_ += "<polyline";
  if (tag) {
    body_ += " class=\"series\" data-run=\"" + xml_escape(tag->run) + "\" data-series=\"" + xml_escape(tag->series) +
             "\" data-panel=\"" + xml_escape(tag->panel) + "\"";
  }
  body_ += " fill=\"none\" stroke=\"" + hex(color) + "\" stroke-width=\"" + number(width) + "\"";
  if (opacity < 1) body_ += " stroke-opacity=\"" + number(opacity) + "\"";
  body_ += " stroke-linejoin=\"round\" points=\"";
  for (size_t i = 0; i < points.size(); ++i) {
    if (i) body_ += ' ';
    body_ += number(points[i].x);
    body_ += ',';
    body_ += number(points[i].y);
  }
  body_ += "\"/>\n";
}

void SvgCanvas::dot(Point center, double radius, Color color) {
  body_ += "<circle cx=\"" + number(center.x) + "\" cy=\"" + number(center.y) + "\" r=\"" + number(radius) +
           "\" fill=\"" + hex(color) + "\"/>\n";
}

void SvgCanvas::text(Point at, const std::string& text, Color color, Anchor anchor, int size) {
  const char* anchors[] = {"start", "middle", "end"};
  body_ += "<text x=\"" + number(at.x) + "\" y=\"" + number(at.y) + "\" font-size=\"" + std::to_string(size) +
           "\" dominant-baseline=\"middle\" text-anchor=\"" + anchors[static_cast<int>(anchor)] + "\" fill=\"" +
           hex(color) + "\">" + xml_escape(text) + "</text>\n";
}

}  // namespace speedrun::plot
