#include "cli/commands.h"
#include "util/error.h"

namespace speedrun::cli {

void register_tokenize_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("tokenize", "(not implemented yet)");
  cmd->callback([] { throw Error("'tokenize' is not implemented yet"); });
}

}  // namespace speedrun::cli
