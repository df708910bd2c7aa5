// speedrun memory: what a training run of a configuration holds in the backend's memory
// (parameters, gradients, optimiser state, activations), computed from the same plan the
// model and the optimiser allocate by, without allocating: whether a run fits a device
// can be known before launching it, and on a machine without that device.
#include <cstdio>

#include <nlohmann/json.hpp>

#include "backends/backend.h"
#include "cli/activation_flags.h"
#include "cli/backend_flags.h"
#include "cli/commands.h"
#include "cli/number_checks.h"
#include "cli/config_options.h"
#include "train/run_memory.h"
#include "util/error.h"

namespace speedrun::cli {
namespace {

struct MemoryLine {
  const char* key;
  const char* label;
  size_t bytes;
  const char* what;
};

double gib(size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0); }

}  // namespace

void register_memory_command(CLI::App& app) {
  struct Options {
    ConfigOptions config;
    std::string device = "cpu";
    ActivationFlags activations;
    int processes = 1;
    int head_chunk_rows = 0;
    std::string grad_reduce = "auto";
    bool json = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("memory", "memory a training run needs, planned without allocating");
  opts->config.add_to(cmd, "tiny");
  cmd->add_option("--device", opts->device, "the backend to plan for (its logits chunk and --activations auto)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  opts->activations.add_to(cmd);
  BackendFlags::add_head_chunk_rows(cmd, opts->head_chunk_rows);
  cmd->add_option("--processes", opts->processes, "processes sharing world_size (mpirun -np); the plan is per process")
      ->capture_default_str()
      ->check(whole_number(1));
  cmd->add_option("--grad-reduce", opts->grad_reduce,
                  "gradient reduction to plan for: exact, overlap, or auto as train resolves it (overlap on cuda, "
                  "else exact; see train --help)")
      ->check(CLI::IsMember({"auto", "exact", "overlap"}))
      ->capture_default_str();
  cmd->add_flag("--json", opts->json, "print the plan as one JSON object (bytes)");
  cmd->callback([opts] {
    const Config config = opts->config.build();
    const ActivationOptions activations = opts->activations.resolve(opts->device);
    BackendOptions backend;
    backend.head_chunk_rows = opts->head_chunk_rows;
    const int head_rows = head_chunk_rows_for(opts->device, backend);
    if (config.world_size % opts->processes != 0) {
      throw UsageError("--processes " + std::to_string(opts->processes) + " does not divide world_size " +
                       std::to_string(config.world_size));
    }
    // As train resolves it: auto is the overlapped reduction (in the model's own gradients) on
    // CUDA, else exact.
    const GradReduce reduce = resolve_grad_reduce(parse_grad_reduce(opts->grad_reduce), opts->device == "cuda");
    const RunMemoryPlan run = plan_run_memory(config, activations, head_rows, opts->processes, reduce);
    const GPT::MemoryPlan& plan = run.model;
    const size_t total = run.total_bytes();
    const std::string forward_only =
        "validation (its MLPs " + std::to_string(activations.forward_mlp_rows) + " rows at a time)";
    const MemoryLine lines[] = {
        {"parameter_bytes", "parameters", plan.parameter_bytes, "float32 master copies"},
        {"gradient_bytes", "gradients", plan.gradient_bytes, "float32"},
        {"optimizer_bytes", "optimizer state", run.optimizer_bytes, "Adam m and v, Muon momentum, Newton-Schulz scratch"},
        {"gradient_reduction_bytes", "gradient reduction", run.gradient_reduction_bytes,
         "exact reduction only: one process's running sum of its sequences but the last, or the gathered copies"},
        {"arena_bytes", "activations", plan.arena_bytes(), "the larger of the two passes below, in one arena"},
        {"training_bytes", "  training pass", plan.training_bytes, "activations kept for the backward, gradient scratch"},
        {"forward_only_bytes", "  forward-only pass", plan.forward_only_bytes, forward_only.c_str()},
        {"sequence_bytes", "sequence", plan.sequence_bytes, "tokens, targets, document ids, token losses"},
    };
    // Inside each pass's share above, not added to the total.
    const MemoryLine logits{"logits_bytes", "  logits chunk", plan.logits_bytes,
                            "head rows at a time x padded vocabulary, inside each pass's share (in training, the "
                            "block gradients' buffer)"};
    if (opts->json) {
      nlohmann::json record = {{"device", opts->device},
                               {"seq_len", config.seq_len},
                               {"val_seq_len", config.val_seq_len},
                               {"recompute_activations", activations.memory == ActivationMemory::kRecompute},
                               {"activation_memory", ActivationFlags::memory_name(activations.memory)},
                               {"activation_precision", ActivationFlags::precision_name(activations.precision)},
                               {"processes", opts->processes},
                               {"grad_reduce", grad_reduce_name(reduce)},
                               {"head_chunk_rows", head_rows},
                               {"total_bytes", total}};
      for (const MemoryLine& line : lines) record[line.key] = line.bytes;
      record[logits.key] = logits.bytes;
      std::printf("%s\n", record.dump().c_str());
      return;
    }
    std::printf(
        "per process of %d: %d of world_size %d sequences of %d tokens, validation sequences of %d, activations %s, "
        "%s logits chunks of %d rows, %s gradient reduction\n",
        opts->processes, config.world_size / opts->processes, config.world_size, config.seq_len, config.val_seq_len,
        ActivationFlags::describe(activations).c_str(), opts->device.c_str(), head_rows,
        grad_reduce_name(reduce).c_str());
    for (const MemoryLine& line : lines) {
      std::printf("%-20s %9.3f GiB  %s\n", line.label, gib(line.bytes), line.what);
      if (line.key == std::string("forward_only_bytes")) {
        std::printf("%-20s %9.3f GiB  %s\n", logits.label, gib(logits.bytes), logits.what);
      }
    }
    std::printf("%-20s %9.3f GiB  plus the backend's own scratch (matmul workspace, bf16 operand copies)\n", "total",
                gib(total));
  });
}

}  // namespace speedrun::cli
