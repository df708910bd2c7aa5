// Layout of the loss chart: panels, log-scale loss axis with readable ticks, curves,
// legend; and reading the metrics files it is drawn from.
#include "plot/loss_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "plot/png.h"
#include "plot/raster_canvas.h"
#include "plot/svg_canvas.h"
#include "train/metrics.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/input_file.h"

namespace speedrun::plot {
namespace {

constexpr double kPanelWidth = 520, kPanelHeight = 340;
constexpr double kMarginLeft = 80, kMarginTop = 50, kMarginRight = 30, kPanelGap = 100, kAxisSpace = 60;
constexpr double kLegendRow = 22;
constexpr int kTextSize = 14;
constexpr Color kBackground{255, 255, 255}, kInk{40, 40, 40}, kGrid{228, 228, 228}, kFrame{120, 120, 120};
constexpr Color kPalette[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},   {214, 39, 40},  {148, 103, 189},
                              {140, 86, 75},  {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};

Color run_color(size_t index) { return kPalette[index % std::size(kPalette)]; }

std::string format_tick(double v) {
  char buffer[32];
  if (v != 0 && (std::abs(v) >= 1e6 || std::abs(v) < 1e-3)) {
    std::snprintf(buffer, sizeof buffer, "%.0e", v);
  } else {
    std::snprintf(buffer, sizeof buffer, "%.6g", v);
  }
  return buffer;
}

// Ticks at 1, 2 or 5 times a power of ten, about `target` of them in [lo, hi].
std::vector<double> linear_ticks(double lo, double hi, int target) {
  const double raw = (hi - lo) / target;
  if (!(raw > 0)) return {lo};
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  double step = magnitude;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    step = m * magnitude;
    if (step >= raw) break;
  }
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push_back(std::abs(t) < step * 1e-9 ? 0 : t);
  return ticks;
}

// Ticks for a log axis: the finest set of "round" mantissas that gives at most 9
// ticks; a narrow range (under a factor 3) uses linear round numbers instead.
std::vector<double> log_ticks(double lo, double hi) {
  if (hi / lo < 3) return linear_ticks(lo, hi, 6);
  const std::vector<std::vector<double>> mantissa_sets = {
      {1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9}, {1, 1.5, 2, 3, 4, 5, 6, 8}, {1, 2, 3, 5}, {1, 2, 5}, {1}};
  std::vector<double> ticks;
  for (const auto& mantissas : mantissa_sets) {
    ticks.clear();
    for (int e = static_cast<int>(std::floor(std::log10(lo))); e <= static_cast<int>(std::ceil(std::log10(hi))); ++e) {
      for (double m : mantissas) {
        const double v = m * std::pow(10.0, e);
        if (v >= lo && v <= hi) ticks.push_back(v);
      }
    }
    if (ticks.size() <= 9) break;
  }
  return ticks;
}

struct TimeUnit {
  double seconds;
  const char* name;
};

TimeUnit time_unit(double max_seconds) {
  if (max_seconds > 2 * 3600) return {3600, "h"};
  if (max_seconds > 10 * 60) return {60, "min"};
  return {1, "s"};
}

const std::vector<double>& xs(const RunCurves& run, XAxis axis, bool val) {
  if (axis == XAxis::kStep) return val ? run.val_step : run.train_step;
  return val ? run.val_time : run.train_time;
}

// The legend's names: each run's directory, with as many of the directories above it as
// tell apart runs of the same name ("a/run" and "b/run").
std::vector<std::string> run_names(const std::vector<std::string>& metrics_paths) {
  std::vector<std::vector<std::string>> directories;  // innermost first
  for (const std::string& path : metrics_paths) {
    std::vector<std::string> names;
    for (const auto& part : std::filesystem::absolute(path).lexically_normal().parent_path()) {
      if (!part.empty() && part != "/") names.insert(names.begin(), part.string());
    }
    if (names.empty()) names.push_back(std::filesystem::path(path).stem().string());
    directories.push_back(std::move(names));
  }
  const auto name_at = [&](size_t run, size_t depth) {
    const std::vector<std::string>& names = directories[run];
    std::string name = names[0];
    for (size_t d = 1; d < std::min(depth, names.size()); ++d) name = names[d] + "/" + name;
    return name;
  };
  std::vector<size_t> depth(metrics_paths.size(), 1);
  for (bool changed = true; changed;) {
    changed = false;
    for (size_t a = 0; a < depth.size(); ++a) {
      for (size_t b = a + 1; b < depth.size(); ++b) {
        if (name_at(a, depth[a]) != name_at(b, depth[b])) continue;
        for (size_t run : {a, b}) {
          if (depth[run] < directories[run].size()) ++depth[run], changed = true;
        }
      }
    }
  }
  std::vector<std::string> names;
  for (size_t run = 0; run < depth.size(); ++run) names.push_back(name_at(run, depth[run]));
  return names;
}

}  // namespace

RunCurves read_run_curves(const std::string& metrics_path) {
  if (const std::string problem = input_file_problem(metrics_path); !problem.empty()) {
    throw Error("metrics file '" + metrics_path + "' " + problem);
  }
  std::ifstream in(metrics_path);
  if (!in) throw Error("cannot read metrics file '" + metrics_path + "'");
  RunCurves run;
  run.name = run_names({metrics_path}).front();
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.empty()) continue;
    const nlohmann::json record = nlohmann::json::parse(line, nullptr, false);
    if (record.is_discarded() && in.eof()) {  // no newline after it: not a whole record
      run.incomplete_last_line = true;
      break;
    }
    if (record.is_discarded() || !record.is_object()) {
      throw Error(metrics_path + ":" + std::to_string(number) + ": not a JSON object");
    }
    const bool train = record.contains("train_loss"), val = record.contains("val_loss");
    if (!train && !val) continue;
    // A skipped non-finite step records its loss as null: nothing a log axis can show.
    if (record[train ? "train_loss" : "val_loss"].is_null()) continue;
    const double step = metrics_number(record, "step", metrics_path, number);
    const double time = metrics_number(record, "elapsed_s", metrics_path, number);
    // train writes whole steps from 0 and times from launch: anything else is not its file.
    if (!(step >= 0 && step <= std::numeric_limits<int>::max() && std::floor(step) == step)) {
      throw Error(metrics_path + ":" + std::to_string(number) + ": 'step' must be a whole number >= 0, got " +
                  record["step"].dump());
    }
    if (!(time >= 0)) {
      throw Error(metrics_path + ":" + std::to_string(number) + ": 'elapsed_s' must be >= 0, got " +
                  record["elapsed_s"].dump());
    }
    const double loss = metrics_number(record, train ? "train_loss" : "val_loss", metrics_path, number);
    if (!(loss > 0) || !std::isfinite(loss)) continue;  // a log axis cannot show it
    auto& steps = train ? run.train_step : run.val_step;
    auto& times = train ? run.train_time : run.val_time;
    auto& losses = train ? run.train_loss : run.val_loss;
    // A run resumed from an earlier checkpoint (after a crash) appends steps its file already
    // holds: the later timeline replaces the abandoned one, so the curve never runs back.
    while (!steps.empty() && steps.back() >= step) {
      steps.pop_back();
      times.pop_back();
      losses.pop_back();
    }
    steps.push_back(step);
    times.push_back(time);
    losses.push_back(loss);
  }
  return run;
}

XAxis parse_x_axis(const std::string& name) {
  if (name == "step") return XAxis::kStep;
  if (name == "time") return XAxis::kTime;
  if (name == "both") return XAxis::kBoth;
  throw UsageError("--x must be step, time or both, got '" + name + "'");
}

LossChart::LossChart(std::vector<RunCurves> runs, XAxis x) : runs_(std::move(runs)) {
  std::vector<XAxis> axes;
  if (x != XAxis::kTime) axes.push_back(XAxis::kStep);
  if (x != XAxis::kStep) axes.push_back(XAxis::kTime);
  double y_lo = INFINITY, y_hi = -INFINITY;
  for (const RunCurves& run : runs_) {
    for (const auto* losses : {&run.train_loss, &run.val_loss}) {
      for (double v : *losses) y_lo = std::min(y_lo, v), y_hi = std::max(y_hi, v);
    }
  }
  if (!(y_lo <= y_hi)) y_lo = 1, y_hi = 10;  // nothing to show yet: an honest empty frame
  if (y_hi / y_lo < 1.02) y_lo /= 1.01, y_hi *= 1.01;
  const double pad = 0.04 * (std::log(y_hi) - std::log(y_lo));
  log_y_min_ = std::log(y_lo) - pad;
  log_y_max_ = std::log(y_hi) + pad;

  double left = kMarginLeft;
  for (XAxis axis : axes) {
    double x_hi = 0;
    for (const RunCurves& run : runs_) {
      for (bool val : {false, true}) {
        for (double v : xs(run, axis, val)) x_hi = std::max(x_hi, v);
      }
    }
    if (x_hi <= 0) x_hi = 1;
    panels_.push_back({axis, left, kMarginTop, kPanelWidth, kPanelHeight, 0, x_hi});
    left += kPanelWidth + kPanelGap;
  }
  width_ = static_cast<int>(left - kPanelGap + kMarginRight);
  legend_top_ = kMarginTop + kPanelHeight + kAxisSpace;
  height_ = static_cast<int>(legend_top_ + kLegendRow * (runs_.size() + 1) + 10);
}

const LossChart::Panel& LossChart::panel(XAxis axis) const {
  for (const Panel& p : panels_) {
    if (p.axis == axis) return p;
  }
  throw Error("the chart has no panel for that x axis");
}

Point LossChart::to_pixel(XAxis axis, double x, double loss) const {
  const Panel& p = panel(axis);
  const double fx = (x - p.x_min) / (p.x_max - p.x_min);
  const double fy = (std::log(loss) - log_y_min_) / (log_y_max_ - log_y_min_);
  return {p.left + fx * p.width, p.top + (1 - fy) * p.height};
}

void LossChart::draw_panel(Canvas& canvas, const Panel& p) const {
  const bool time = p.axis == XAxis::kTime;
  const TimeUnit unit = time ? time_unit(p.x_max) : TimeUnit{1, ""};
  canvas.text({p.left + p.width / 2, p.top - 22}, time ? "loss vs wall-clock time" : "loss vs step", kInk,
              Anchor::kMiddle, kTextSize);
  for (double v : log_ticks(std::exp(log_y_min_), std::exp(log_y_max_))) {
    const double y = to_pixel(p.axis, p.x_min, v).y;
    canvas.line({p.left, y}, {p.left + p.width, y}, kGrid, 1);
    canvas.text({p.left - 8, y}, format_tick(v), kInk, Anchor::kEnd, kTextSize);
  }
  for (double v : linear_ticks(p.x_min / unit.seconds, p.x_max / unit.seconds, 6)) {
    const double x = p.left + (v * unit.seconds - p.x_min) / (p.x_max - p.x_min) * p.width;
    canvas.line({x, p.top}, {x, p.top + p.height}, kGrid, 1);
    canvas.text({x, p.top + p.height + 14}, format_tick(v), kInk, Anchor::kMiddle, kTextSize);
  }
  const double right = p.left + p.width, bottom = p.top + p.height;
  canvas.line({p.left, p.top}, {right, p.top}, kFrame, 1);
  canvas.line({p.left, bottom}, {right, bottom}, kFrame, 1);
  canvas.line({p.left, p.top}, {p.left, bottom}, kFrame, 1);
  canvas.line({right, p.top}, {right, bottom}, kFrame, 1);
  const std::string label = time ? std::string("wall-clock time (") + unit.name + ")" : "step";
  canvas.text({p.left + p.width / 2, bottom + 38}, label, kInk, Anchor::kMiddle, kTextSize);
  canvas.text({p.left - 8, p.top - 22}, "loss", kInk, Anchor::kEnd, kTextSize);
}

void LossChart::draw_series(Canvas& canvas, const Panel& p) const {
  const std::string panel_name = p.axis == XAxis::kStep ? "step" : "time";
  // Train curves first: the sparser validation curves stay visible on top of them.
  for (bool val : {false, true}) {
    for (size_t r = 0; r < runs_.size(); ++r) {
      const RunCurves& run = runs_[r];
      const std::vector<double>& x = xs(run, p.axis, val);
      const std::vector<double>& loss = val ? run.val_loss : run.train_loss;
      if (x.empty()) continue;
      std::vector<Point> points;
      for (size_t i = 0; i < x.size(); ++i) points.push_back(to_pixel(p.axis, x[i], loss[i]));
      const SeriesTag tag{run.name, val ? "val" : "train", panel_name};
      canvas.polyline(points, run_color(r), val ? 2.5 : 1.2, val ? 1.0 : 0.45, &tag);
      if (val) {
        for (const Point& point : points) canvas.dot(point, 3.5, run_color(r));
      }
    }
  }
}

void LossChart::draw_legend(Canvas& canvas) const {
  double y = legend_top_;
  for (size_t r = 0; r < runs_.size(); ++r, y += kLegendRow) {
    canvas.line({kMarginLeft, y}, {kMarginLeft + 30, y}, run_color(r), 3);
    canvas.text({kMarginLeft + 40, y}, runs_[r].name, kInk, Anchor::kStart, kTextSize);
  }
  canvas.text({kMarginLeft, y}, "thin pale line: train loss; thick line with dots: validation loss", kInk,
              Anchor::kStart, kTextSize);
}

void LossChart::draw(Canvas& canvas) const {
  canvas.fill_rect(0, 0, width_, height_, kBackground);
  for (const Panel& p : panels_) draw_panel(canvas, p);
  for (const Panel& p : panels_) draw_series(canvas, p);
  draw_legend(canvas);
}

std::string render_svg(const LossChart& chart) {
  SvgCanvas canvas(chart.width(), chart.height());
  chart.draw(canvas);
  return canvas.str();
}

std::vector<uint8_t> render_png(const LossChart& chart) {
  RasterCanvas canvas(chart.width(), chart.height(), kBackground);
  chart.draw(canvas);
  return encode_png(canvas.width(), canvas.height(), canvas.rgb());
}

std::vector<std::string> write_loss_plot(const std::vector<std::string>& metrics_paths, const std::string& out_path,
                                         XAxis x) {
  const std::string extension = std::filesystem::path(out_path).extension().string();
  if (extension != ".svg" && extension != ".png") {
    throw UsageError("plot output '" + out_path + "' must end in .svg or .png");
  }
  std::vector<RunCurves> runs;
  std::vector<std::string> warnings;
  for (const std::string& path : metrics_paths) {
    runs.push_back(read_run_curves(path));
    if (runs.back().incomplete_last_line) {
      warnings.push_back("metrics file '" + path + "' ends in an incomplete line (a write cut off, or still under "
                         "way): left out");
    }
    if (runs.back().train_step.empty() && runs.back().val_step.empty()) {
      throw Error("metrics file '" + path + "' holds no loss to plot (no train_loss or val_loss record)");
    }
  }
  const std::vector<std::string> names = run_names(metrics_paths);
  for (size_t i = 0; i < runs.size(); ++i) runs[i].name = names[i];
  const LossChart chart(std::move(runs), x);
  if (extension == ".svg") {
    write_file_atomically(out_path, render_svg(chart));
  } else {
    const std::vector<uint8_t> png = render_png(chart);
    write_file_atomically(out_path, std::string(png.begin(), png.end()));
  }
  return warnings;
}

}  // namespace speedrun::plot
