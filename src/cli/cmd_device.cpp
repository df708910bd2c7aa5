#include "cli/commands.h"
#include "util/error.h"

namespace speedrun::cli {

void register_device_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("device", "(not implemented yet)");
  cmd->callback([] { throw Error("'device' is not implemented yet"); });
}

}  // namespace speedrun::cli
