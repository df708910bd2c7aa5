// The optimisers of SPEC §4 over the model's flat parameter buffer: Adam for the head,
// the embeddings and the scalars; Muon (momentum, Nesterov, batched Newton-Schulz) for
// every matrix inside the blocks. Both follow the per-step schedules of model/config.h.
#pragma once

#include <string>
#include <vector>

#include "backends/backend.h"
#include "comm/communicator.h"
#include "model/config.h"
#include "model/params.h"

namespace speedrun {

class Optimizer {
 public:
  Optimizer(const Config& config, const ParamLayout& layout, Backend& backend);
  ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  // The bytes the constructor allocates: Adam's m and v, Muon's momentum and the
  // Newton-Schulz scratch.
  static size_t memory_bytes(const ParamLayout& layout);
  Optimizer& operator=(const Optimizer&) = delete;

  // Applies the update of step s (0-based) to params from grads. With a communicator of
  // P > 1 processes (all holding the same grads), Muon is sharded as in the record: the
  // i-th Muon matrix tensor is orthogonalised by process i % P and broadcast
  // asynchronously while the next is computed; Adam runs replicated (its cost is a few
  // elementwise passes, so sharding its state would save memory, not time).
  // With `skip` (a backend int32, see Backend::adam_update) set to non-zero by the time the
  // queued update runs, nothing changes: the host need not wait for a fault verdict.
  void step(float* params, const float* grads, int step, Communicator* comm = nullptr,
            const int32_t* skip = nullptr);

  // Newton-Schulz orthogonalisation of `batch` matrices of rows x cols in place (x is
  // scratch-sized by the caller's layout). Exposed for tests and benchmarks.
  void orthogonalize(float* x, int batch, int rows, int cols);

  // Optimiser state as named host tensors ("adam_m.<param>", "adam_v.<param>",
  // "muon_buf.<param>") for checkpoints, and back.
  struct NamedState {
    std::string name;
    const ParamSpec* spec;
    float* data;  // backend memory
  };
  const std::vector<NamedState>& state() const { return state_; }

 private:
  float adam_lr(const ParamSpec& spec) const;
  void muon_update(float* param, const float* grad, float* buf, const ParamSpec& spec, float lr, float momentum,
                   bool owner, const int32_t* skip);

  const Config config_;
  const ParamLayout& layout_;
  Backend& backend_;
  std::vector<NamedState> state_;
  std::vector<float*> first_state_;   // per spec: Adam m or Muon buffer (nullptr if none)
  std::vector<float*> second_state_;  // per spec: Adam v
  std::vector<AdamTensor> adam_tensors_;  // a step's Adam update, one call (capacity kept)
  float* update_ = nullptr;           // Muon scratch: the momentum update [largest tensor]
  float* x_ = nullptr;                // Newton-Schulz iterate [largest tensor]
  float* x_next_ = nullptr;
  float* gram_ = nullptr;             // X X^T per matrix [batch, r, r]
  float* poly_ = nullptr;             // b A + c A A
};

}  // namespace speedrun
