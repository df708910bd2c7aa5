// Checkpoints: the model as safetensors with SPEC §2's state-dict names and shapes
// (float32, the full config in __metadata__) so PyTorch can load it; and beside it,
// FILE.optim.safetensors with the optimiser state, the step and the data position,
// so a run resumes exactly. Both are written atomically (the state file first).
#pragma once

#include <string>
#include <vector>

#include "data/token_stream.h"
#include "model/config.h"
#include "model/gpt.h"
#include "optim/optimizer.h"

namespace speedrun {

struct TrainingState {
  int step = 0;                // steps completed
  StreamPosition data_position;
};

// The choices outside the config that decide a run's bits, as the run resolved its flags:
// recorded in its checkpoints (both files), so that --resume continues with them and eval
// reproduces a CPU run's validation. Not recorded (device empty): a checkpoint from init,
// or from before this record.
struct RunNumerics {
  std::string device;       // "cpu" or "cuda"
  std::string matmul;       // --matmul: "fp32" or "bf16"
  std::string attention;    // --attention-kernel: "reference" or "flash"
  std::string activations;  // --activations: "fp32" or "bf16"
  std::string grad_reduce;  // --grad-reduce: "exact" or "overlap"
  int head_chunk_rows = 0;  // --head-chunk-rows as the backend ran it
  bool recorded() const { return !device.empty(); }
  bool operator==(const RunNumerics&) const = default;
};

// The optimiser-state file that belongs to a model checkpoint.
std::string optimizer_state_path(const std::string& model_path);

void save_model(const std::string& path, GPT& model, int step, const RunNumerics& numerics = {});
void save_checkpoint(const std::string& path, GPT& model, const Optimizer& optimizer, const TrainingState& state,
                     const RunNumerics& numerics = {});

// The config stored in a checkpoint (errors name the file when it is missing or bad).
Config read_checkpoint_config(const std::string& path);
// The numerics recorded in a checkpoint (either file); not recorded when it has none. Errors
// name the file when the record is malformed.
RunNumerics read_checkpoint_numerics(const std::string& path);
// Loads parameters; every tensor must be present with the model's shape and dtype F32.
// Returns the step stored in the file.
int load_model(const std::string& path, GPT& model);
// Loads parameters and the optimiser state and returns the training state.
TrainingState load_checkpoint(const std::string& path, GPT& model, Optimizer& optimizer);

// Keys whose values fix the parameter shapes or the model's function: a checkpoint
// can only be used with a config that agrees on them.
void require_same_model(const Config& expected, const Config& stored, const std::string& path);

}  // namespace speedrun
