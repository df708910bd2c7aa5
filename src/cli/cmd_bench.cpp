#include "cli/commands.h"
#include "util/error.h"

namespace speedrun::cli {

void register_bench_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("bench", "(not implemented yet)");
  cmd->callback([] { throw Error("'bench' is not implemented yet"); });
}

}  // namespace speedrun::cli
