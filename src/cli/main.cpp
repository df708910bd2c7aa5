// speedrun: trains GPT models with the NanoGPT-speedrun recipe. See README.md.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "util/error.h"

namespace {

// Output the system refused (a full disk, a closed file) makes a successful command fail:
// a script reading `speedrun eval --json > result.json` must not get status 0 and no result.
// "" when everything printed reached stdout.
std::string stdout_failure() {
  errno = 0;
  if (std::fflush(stdout) != 0) return std::strerror(errno);
  return std::ferror(stdout) ? "an earlier write failed" : "";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"speedrun: train GPT models with the NanoGPT-speedrun recipe"};
  app.require_subcommand(0, 1);
  app.set_version_flag("--version", "speedrun 0.1.0");
  speedrun::cli::register_tokenize_command(app);
  speedrun::cli::register_prepare_command(app);
  speedrun::cli::register_inspect_command(app);
  speedrun::cli::register_device_command(app);
  speedrun::cli::register_init_command(app);
  speedrun::cli::register_train_command(app);
  speedrun::cli::register_bench_command(app);
  speedrun::cli::register_memory_command(app);
  speedrun::cli::register_eval_command(app);
  speedrun::cli::register_sample_command(app);
  speedrun::cli::register_plot_command(app);
  try {
    app.parse(argc, argv);
    if (app.get_subcommands().empty()) {
      std::fputs(app.help().c_str(), stdout);
    }
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return static_cast<int>(speedrun::ExitCode::kUsage);
  } catch (const speedrun::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "speedrun: error: %s\n", e.what());
    return static_cast<int>(e.code());
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "speedrun: internal error: %s\n", e.what());
    return 1;
  }
  if (const std::string failure = stdout_failure(); !failure.empty()) {
    std::fprintf(stderr, "speedrun: error: cannot write to standard output: %s\n", failure.c_str());
    return 1;
  }
  return 0;
}
