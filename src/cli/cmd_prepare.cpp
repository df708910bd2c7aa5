#include "cli/commands.h"
#include "util/error.h"

namespace speedrun::cli {

void register_prepare_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("prepare", "(not implemented yet)");
  cmd->callback([] { throw Error("'prepare' is not implemented yet"); });
}

}  // namespace speedrun::cli
