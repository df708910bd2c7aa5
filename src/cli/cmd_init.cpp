#include "cli/commands.h"
#include "util/error.h"

namespace speedrun::cli {

void register_init_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("init", "(not implemented yet)");
  cmd->callback([] { throw Error("'init' is not implemented yet"); });
}

}  // namespace speedrun::cli
