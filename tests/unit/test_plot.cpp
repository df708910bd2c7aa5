// Loss plots: the SVG's structure (well-formed, one polyline per run, series and panel,
// legend names) and the PNG decoded with zlib (chunks, CRCs, size, curve pixels).
#include <gtest/gtest.h>
#include <zlib.h>

#include <fstream>
#include <regex>

#include "plot/loss_plot.h"
#include "plot/png.h"
#include "plot/svg_canvas.h"
#include "support/temp_dir.h"
#include "util/error.h"

namespace speedrun::plot {
namespace {

std::string write_metrics(const testing::TempDir& dir, const std::string& run, double offset) {
  std::filesystem::create_directories(dir / run);
  const std::string path = dir / (run + "/metrics.jsonl");
  std::ofstream out(path);
  for (int step = 0; step < 40; ++step) {
    if (step % 10 == 0) {
      out << "{\"step\":" << step << ",\"val_loss\":" << (offset + 8.0 / (1 + step * 0.2))
          << ",\"elapsed_s\":" << step * 2.0 + 0.5 << "}\n";
    }
    out << "{\"step\":" << step << ",\"train_loss\":" << (offset + 8.2 / (1 + step * 0.2))
        << ",\"elapsed_s\":" << step * 2.0 + 1 << ",\"lr_mult\":1}\n";
  }
  out << "{\"step\":40,\"val_loss\":" << offset + 8.0 / 9.0 << ",\"elapsed_s\":81}\n";
  return path;
}

// Every tag closes in order (a small well-formedness check for the SVG we write).
bool balanced_xml(const std::string& xml, std::string& problem) {
  std::vector<std::string> open;
  const std::regex tag(R"re(<(/?)([A-Za-z][\w:-]*)[^>]*?(/?)>)re");
  for (auto it = std::sregex_iterator(xml.begin(), xml.end(), tag); it != std::sregex_iterator(); ++it) {
    const std::string name = (*it)[2];
    if ((*it)[1] == "/") {
      if (open.empty() || open.back() != name) return problem = "unexpected </" + name + ">", false;
      open.pop_back();
    } else if ((*it)[3] != "/") {
      open.push_back(name);
    }
  }
  if (!open.empty()) return problem = "unclosed <" + open.back() + ">", false;
  return true;
}

int count(const std::string& text, const std::string& part) {
  int n = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++n;
  return n;
}

TEST(Plot, ReadsCurvesAndNamesRunsByDirectory) {
  testing::TempDir dir("plot_read");
  const RunCurves run = read_run_curves(write_metrics(dir, "run-a", 3.0));
  EXPECT_EQ(run.name, "run-a");
  EXPECT_EQ(run.train_step.size(), 40u);
  EXPECT_EQ(run.val_step.size(), 5u);
  EXPECT_EQ(run.val_step.back(), 40);
  EXPECT_EQ(run.val_time.back(), 81);
  EXPECT_DOUBLE_EQ(run.train_loss[0], 11.2);
}

// train writes a skipped non-finite step's loss as null, and its fault as a record of its own.
TEST(Plot, SkipsTheNullLossOfASkippedStep) {
  testing::TempDir dir("plot_null");
  const std::string path = write_metrics(dir, "skipped", 3.0);
  std::ofstream(path, std::ios::app) << "{\"step\":41,\"fault\":\"training loss is nan\"}\n"
                                     << "{\"step\":41,\"train_loss\":null,\"elapsed_s\":83}\n";
  const RunCurves run = read_run_curves(path);
  EXPECT_EQ(run.train_step.size(), 40u);
  EXPECT_EQ(run.train_step.back(), 39);
}

// What train cannot have written is an error naming the file and line, and a file with
// no loss at all is refused rather than drawn as an empty chart.
TEST(Plot, RefusesStepsAndTimesTrainCannotWriteAndFilesWithoutLosses) {
  testing::TempDir dir("plot_bad_records");
  const std::string path = dir / "metrics.jsonl";
  const std::pair<std::string, std::string> cases[] = {
      {"{\"step\":-1,\"train_loss\":5,\"elapsed_s\":1}", ":2: 'step' must be a whole number >= 0, got -1"},
      {"{\"step\":1e30,\"train_loss\":5,\"elapsed_s\":1}", ":2: 'step' must be a whole number >= 0, got 1e+30"},
      {"{\"step\":2.5,\"val_loss\":5,\"elapsed_s\":1}", ":2: 'step' must be a whole number >= 0, got 2.5"},
      {"{\"step\":3,\"train_loss\":5,\"elapsed_s\":-4}", ":2: 'elapsed_s' must be >= 0, got -4"},
  };
  for (const auto& [record, said] : cases) {
    std::ofstream(path) << "{\"step\":0,\"val_loss\":9,\"elapsed_s\":0.5}\n" << record << "\n";
    try {
      read_run_curves(path);
      ADD_FAILURE() << record << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path + said), std::string::npos) << e.what();
    }
  }
  std::ofstream(path) << "\n{\"step\":0,\"fault\":\"x\"}\n";
  try {
    write_loss_plot({path}, dir / "empty.svg");
    ADD_FAILURE() << "a file without losses was plotted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'" + path + "' holds no loss to plot"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "empty.svg"));
}

// A run that died after its last checkpoint and was resumed from it appends steps its
// file already holds: the resumed timeline replaces the abandoned one.
TEST(Plot, AResumedTimelineReplacesTheAbandonedOne) {
  testing::TempDir dir("plot_resumed");
  const std::string path = write_metrics(dir, "resumed", 3.0);  // train steps 0..39
  std::ofstream(path, std::ios::app) << "{\"step\":38,\"train_loss\":2.5,\"elapsed_s\":90}\n"
                                     << "{\"step\":39,\"train_loss\":2.4,\"elapsed_s\":91}\n"
                                     << "{\"step\":40,\"train_loss\":2.3,\"elapsed_s\":92}\n";
  const RunCurves run = read_run_curves(path);
  ASSERT_EQ(run.train_step.size(), 41u);
  for (size_t i = 0; i < run.train_step.size(); ++i) EXPECT_EQ(run.train_step[i], static_cast<double>(i));
  EXPECT_EQ(run.train_loss[38], 2.5);
  EXPECT_EQ(run.train_time[39], 91);
  EXPECT_EQ(run.train_loss.back(), 2.3);
}

// A line without its newline at the end of a file is a write cut off (or a running
// training's, not yet finished): left out and said, where one in the middle is an error.
TEST(Plot, AnIncompleteLastLineIsLeftOutAndSaid) {
  testing::TempDir dir("plot_incomplete");
  const std::string path = write_metrics(dir, "cut", 3.0);
  std::ofstream(path, std::ios::app) << "{\"step\":41,\"train_loss\":2.5,\"ela";
  const RunCurves run = read_run_curves(path);
  EXPECT_TRUE(run.incomplete_last_line);
  EXPECT_EQ(run.train_step.back(), 39);
  const std::vector<std::string> warnings = write_loss_plot({path}, dir / "cut.svg");
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_EQ(warnings[0],
            "metrics file '" + path + "' ends in an incomplete line (a write cut off, or still under way): left out");
  EXPECT_TRUE(std::filesystem::exists(dir / "cut.svg"));
  EXPECT_FALSE(read_run_curves(write_metrics(dir, "whole", 3.0)).incomplete_last_line);

  std::ofstream(path, std::ios::app) << "\n{\"step\":42,\"train_loss\":2.4,\"elapsed_s\":90}\n";  // now whole
  try {
    read_run_curves(path);
    ADD_FAILURE() << "a malformed line before the last was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path + ":46: not a JSON object"), std::string::npos) << e.what();
  }
}

// Runs in directories of the same name are named with the directories above them.
TEST(Plot, RunsOfTheSameNameAreToldApartInTheLegend) {
  testing::TempDir dir("plot_names");
  const std::string a = write_metrics(dir, "a/run", 3.0), b = write_metrics(dir, "b/run", 3.5),
                    other = write_metrics(dir, "c/other", 4.0);
  write_loss_plot({a, b, other}, dir / "names.svg");
  std::ifstream in(dir / "names.svg");
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (const char* name : {"data-run=\"a/run\"", "data-run=\"b/run\"", "data-run=\"other\""}) {
    EXPECT_EQ(count(svg, name), 4) << name;  // train and val, in both panels
  }
  EXPECT_EQ(read_run_curves(a).name, "run");
}

// Run names come from directory names: whatever their bytes, the SVG stays well-formed XML.
TEST(Plot, XmlEscapeWritesAnyTextAsXmlCanHoldIt) {
  EXPECT_EQ(xml_escape("a<b&c\"d'e>"), "a&lt;b&amp;c&quot;d&apos;e&gt;");
  EXPECT_EQ(xml_escape("caf\xC3\xA9 \xE2\x82\xAC\tz"), "caf\xC3\xA9 \xE2\x82\xAC\tz");  // UTF-8 and tab kept
  EXPECT_EQ(xml_escape("ctl\x01x"), "ctl\xEF\xBF\xBDx");
  EXPECT_EQ(xml_escape("bad\xFFname\xC3"), "bad\xEF\xBF\xBDname\xEF\xBF\xBD");
  EXPECT_EQ(xml_escape("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // a surrogate's bytes
}

TEST(Plot, SvgHasAPolylinePerRunSeriesAndPanelAndALegend) {
  testing::TempDir dir("plot_svg");
  const LossChart chart({read_run_curves(write_metrics(dir, "alpha", 3.0)),
                         read_run_curves(write_metrics(dir, "beta", 3.5))},
                        XAxis::kBoth);
  const std::string svg = render_svg(chart);
  std::string problem;
  EXPECT_TRUE(balanced_xml(svg, problem)) << problem;
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_NE(svg.find("width=\"" + std::to_string(chart.width()) + "\""), std::string::npos);
  EXPECT_EQ(count(svg, "<polyline class=\"series\""), 8);  // 2 runs x {train, val} x {step, time}
  for (const char* run : {"alpha", "beta"}) {
    for (const char* series : {"train", "val"}) {
      for (const char* panel : {"step", "time"}) {
        const std::string attrs = std::string("data-run=\"") + run + "\" data-series=\"" + series +
                                  "\" data-panel=\"" + panel + "\"";
        EXPECT_EQ(count(svg, attrs), 1) << attrs;
      }
    }
    EXPECT_EQ(count(svg, std::string(">") + run + "</text>"), 1) << run;  // legend entry
  }
  // The val polyline of alpha in the step panel has one point per validation.
  const std::regex points(R"re(data-run="alpha" data-series="val" data-panel="step"[^>]*points="([^"]*)")re");
  std::smatch match;
  ASSERT_TRUE(std::regex_search(svg, match, points));
  EXPECT_EQ(count(match[1].str(), ","), 5);
}

TEST(Plot, XAxisChoiceGivesOnePanel) {
  testing::TempDir dir("plot_x");
  const LossChart chart({read_run_curves(write_metrics(dir, "alpha", 3.0))}, XAxis::kTime);
  const std::string svg = render_svg(chart);
  EXPECT_EQ(count(svg, "data-panel=\"time\""), 2);
  EXPECT_EQ(count(svg, "data-panel=\"step\""), 0);
  EXPECT_THROW(chart.to_pixel(XAxis::kStep, 0, 5), Error);
}

uint32_t be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }

struct DecodedPng {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;
  uint8_t pixel(int x, int y, int channel) const { return rgb[(static_cast<size_t>(y) * width + x) * 3 + channel]; }
};

DecodedPng decode(const std::vector<uint8_t>& png) {
  const uint8_t signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  EXPECT_TRUE(std::equal(signature, signature + 8, png.begin()));
  DecodedPng image;
  std::vector<uint8_t> idat;
  std::vector<std::string> types;
  for (size_t at = 8; at < png.size();) {
    const uint32_t length = be32(&png[at]);
    const std::string type(png.begin() + at + 4, png.begin() + at + 8);
    types.push_back(type);
    const uint8_t* data = &png[at + 8];
    EXPECT_EQ(be32(data + length), crc32(0L, &png[at + 4], length + 4)) << type << " CRC";
    if (type == "IHDR") {
      image.width = static_cast<int>(be32(data));
      image.height = static_cast<int>(be32(data + 4));
      EXPECT_EQ(data[8], 8);  // bit depth
      EXPECT_EQ(data[9], 2);  // truecolour
    }
    if (type == "IDAT") idat.insert(idat.end(), data, data + length);
    at += 12 + length;
  }
  EXPECT_EQ(types.front(), "IHDR");
  EXPECT_EQ(types.back(), "IEND");
  std::vector<uint8_t> raw(static_cast<size_t>(image.width * 3 + 1) * image.height);
  uLongf raw_size = raw.size();
  EXPECT_EQ(uncompress(raw.data(), &raw_size, idat.data(), idat.size()), Z_OK);
  EXPECT_EQ(raw_size, raw.size());
  for (int y = 0; y < image.height; ++y) {
    const uint8_t* row = &raw[static_cast<size_t>(y) * (image.width * 3 + 1)];
    EXPECT_EQ(row[0], 0) << "filter type of row " << y;
    image.rgb.insert(image.rgb.end(), row + 1, row + 1 + image.width * 3);
  }
  return image;
}

bool is_background(const DecodedPng& image, int x, int y) {
  return image.pixel(x, y, 0) == 255 && image.pixel(x, y, 1) == 255 && image.pixel(x, y, 2) == 255;
}

TEST(Plot, PngDecodesToTheChartWithCurvePixelsWhereTheDataIs) {
  testing::TempDir dir("plot_png");
  const RunCurves run = read_run_curves(write_metrics(dir, "alpha", 3.0));
  const LossChart chart({run}, XAxis::kBoth);
  const DecodedPng image = decode(render_png(chart));
  ASSERT_EQ(image.width, chart.width());
  ASSERT_EQ(image.height, chart.height());
  // Each validation point is a dot of the run's colour (the first palette entry).
  for (size_t i = 0; i < run.val_step.size(); ++i) {
    for (XAxis panel : {XAxis::kStep, XAxis::kTime}) {
      const double x = panel == XAxis::kStep ? run.val_step[i] : run.val_time[i];
      const Point p = chart.to_pixel(panel, x, run.val_loss[i]);
      const int px = static_cast<int>(p.x), py = static_cast<int>(p.y);
      EXPECT_EQ(image.pixel(px, py, 0), 31) << i;
      EXPECT_EQ(image.pixel(px, py, 1), 119) << i;
      EXPECT_EQ(image.pixel(px, py, 2), 180) << i;
    }
  }
  // Far from the curve (high loss, late step) the plot area is background.
  const Point empty = chart.to_pixel(XAxis::kStep, 35, 10.5);
  EXPECT_TRUE(is_background(image, static_cast<int>(empty.x), static_cast<int>(empty.y)));
  // Train curve pixels: somewhere on the column of step 25 near its loss, not background.
  const Point train = chart.to_pixel(XAxis::kStep, 25, run.train_loss[25]);
  bool found = false;
  for (int dy = -2; dy <= 2; ++dy) found |= !is_background(image, static_cast<int>(train.x), static_cast<int>(train.y) + dy);
  EXPECT_TRUE(found);
}

TEST(Plot, WritesFilesByExtensionAndRejectsOthers) {
  testing::TempDir dir("plot_files");
  const std::string metrics = write_metrics(dir, "alpha", 3.0);
  write_loss_plot({metrics}, dir / "out.svg");
  write_loss_plot({metrics}, dir / "out.png");
  EXPECT_TRUE(std::filesystem::file_size(dir / "out.svg") > 1000);
  EXPECT_TRUE(std::filesystem::file_size(dir / "out.png") > 1000);
  EXPECT_THROW(write_loss_plot({metrics}, dir / "out.jpg"), UsageError);
  EXPECT_THROW(write_loss_plot({dir / "missing.jsonl"}, dir / "x.svg"), Error);
}

TEST(Plot, PngEncoderRejectsAWrongBufferSize) {
  EXPECT_THROW(encode_png(2, 2, std::vector<uint8_t>(11)), Error);
  const DecodedPng one = decode(encode_png(1, 1, {1, 2, 3}));
  EXPECT_EQ(one.width, 1);
  EXPECT_EQ(one.height, 1);
  EXPECT_EQ(one.rgb, (std::vector<uint8_t>{1, 2, 3}));
}

}  // namespace
}  // namespace speedrun::plot
