#include "cli/commands.h"
#include "util/error.h"

namespace speedrun::cli {

void register_inspect_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("inspect", "(not implemented yet)");
  cmd->callback([] { throw Error("'inspect' is not implemented yet"); });
}

}  // namespace speedrun::cli
