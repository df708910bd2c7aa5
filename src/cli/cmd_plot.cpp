// speedrun plot: train and validation loss of runs against step and wall-clock time.
#include <cstdio>

#include "cli/commands.h"
#include "plot/loss_plot.h"

namespace speedrun::cli {

void register_plot_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> metrics;
    std::string out;
    std::string x = "both";
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("plot", "plot the loss curves of runs (metrics.jsonl files) as SVG or PNG");
  cmd->add_option("metrics", opts->metrics, "metrics.jsonl of each run (the legend names runs by directory)")
      ->required();
  cmd->add_option("--out", opts->out, "output FILE.svg or FILE.png")->required();
  cmd->add_option("--x", opts->x, "x axis: step, time or both (two panels)")
      ->check(CLI::IsMember({"step", "time", "both"}))
      ->capture_default_str();
  cmd->callback([opts] {
    for (const std::string& warning : plot::write_loss_plot(opts->metrics, opts->out, plot::parse_x_axis(opts->x))) {
      std::fprintf(stderr, "warning: %s\n", warning.c_str());
    }
    std::printf("wrote %s\n", opts->out.c_str());
  });
}

}  // namespace speedrun::cli
