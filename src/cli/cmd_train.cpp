#include "cli/commands.h"
#include "util/error.h"

namespace speedrun::cli {

void register_train_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("train", "(not implemented yet)");
  cmd->callback([] { throw Error("'train' is not implemented yet"); });
}

}  // namespace speedrun::cli
