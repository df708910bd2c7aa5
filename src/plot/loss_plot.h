// Loss curves of one or more runs from their metrics.jsonl files: train and validation
// loss against step and against wall-clock time (elapsed_s), on a log-scale loss axis,
// one colour per run named by its directory, rendered as SVG or PNG.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "plot/canvas.h"

namespace speedrun::plot {

struct RunCurves {
  std::string name;  // the metrics file's parent directory name
  std::vector<double> train_step, train_time, train_loss;
  std::vector<double> val_step, val_time, val_loss;
  // The file ended in a line without its newline that is not JSON: a write cut off (or
  // still under way, when a running training's file is plotted), left out.
  bool incomplete_last_line = false;
};

// Reads train_loss and val_loss records (step, elapsed_s) of a metrics JSONL file.
RunCurves read_run_curves(const std::string& metrics_path);

enum class XAxis { kBoth, kStep, kTime };
// "step", "time" or "both" (UsageError otherwise).
XAxis parse_x_axis(const std::string& name);

class LossChart {
 public:
  LossChart(std::vector<RunCurves> runs, XAxis x);
  int width() const { return width_; }
  int height() const { return height_; }
  void draw(Canvas& canvas) const;
  // Where a data point lands in the panel whose x axis is `panel` (kStep or kTime).
  Point to_pixel(XAxis panel, double x, double loss) const;

 private:
  struct Panel {
    XAxis axis;
    double left, top, width, height;  // plot area in pixels
    double x_min, x_max;
  };
  const Panel& panel(XAxis axis) const;
  void draw_panel(Canvas& canvas, const Panel& p) const;
  void draw_series(Canvas& canvas, const Panel& p) const;
  void draw_legend(Canvas& canvas) const;

  std::vector<RunCurves> runs_;
  std::vector<Panel> panels_;
  double log_y_min_ = 0, log_y_max_ = 1;
  int width_ = 0, height_ = 0;
  double legend_top_ = 0;
};

std::string render_svg(const LossChart& chart);
std::vector<uint8_t> render_png(const LossChart& chart);

// Reads the metrics files and writes the chart to out_path: SVG or PNG by its extension.
// Returns warnings for the user: a file whose incomplete last line was left out.
std::vector<std::string> write_loss_plot(const std::vector<std::string>& metrics_paths, const std::string& out_path,
                                         XAxis x = XAxis::kBoth);

}  // namespace speedrun::plot
