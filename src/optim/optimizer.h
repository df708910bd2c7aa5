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
  // Muon orthogonalises the matrices of one shape (once made wide) together, in batches of
  // at most this many floats (or the largest Muon tensor, when larger): 32 MB, so that
  // speedrun-124m's 44 matrices of 768 x 768 go in 4 batched products per Newton-Schulz
  // product instead of 22, its 24 of 768 x 3072 in 8 instead of 24.
  static constexpr size_t kMuonBatchFloats = size_t{8} << 20;

  // muon_batch_floats: the batch bound above (0: kMuonBatchFloats); results do not depend on it.
  Optimizer(const Config& config, const ParamLayout& layout, Backend& backend, size_t muon_batch_floats = 0);
  ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  // The bytes the constructor allocates: Adam's m and v, Muon's momentum and the
  // Newton-Schulz scratch.
  static size_t memory_bytes(const ParamLayout& layout, size_t muon_batch_floats = 0);
  Optimizer& operator=(const Optimizer&) = delete;

  // Applies the update of step s (0-based) to params from grads. With a communicator of
  // P > 1 processes (all holding the same grads), Muon is sharded as in the record: the
  // i-th Muon matrix tensor is orthogonalised by process i % P; each shape group's tensors
  // are broadcast asynchronously once the group is applied, overlapping the next group's
  // work; Adam runs replicated (its cost is a few
  // elementwise passes, so sharding its state would save memory, not time).
  // With `skip` (a backend int32, see Backend::adam_update) set to non-zero by the time the
  // queued update runs, nothing changes: the host need not wait for a fault verdict.
  void step(float* params, const float* grads, int step, Communicator* comm = nullptr,
            const int32_t* skip = nullptr);

  // Newton-Schulz orthogonalisation of `batch` matrices of rows x cols in place, at most a
  // Muon batch of floats (Error otherwise). Exposed for tests and benchmarks.
  void orthogonalize(float* x, int batch, int rows, int cols);

  // The Muon tensors whose matrices have one shape once made wide (r <= c: a tall tensor's
  // are transposed), in layout order; orthogonalised together. Exposed for tests.
  struct MuonGroup {
    int r = 0, c = 0;
    std::vector<size_t> specs;  // indices into layout.specs()
  };
  const std::vector<MuonGroup>& muon_groups() const { return muon_groups_; }

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
  // Momentum for every tensor of the group; this process's tensors orthogonalised in batches
  // and applied; then each tensor broadcast from its owner (every process in the same order).
  void update_muon_group(const MuonGroup& group, float* params, const float* grads, float lr, float momentum,
                         Communicator* comm, const int32_t* skip);
  // The tensors of muon_batch_ (their momentum updates laid out wide in x_) orthogonalised
  // and applied to their parameters; the batch is empty afterwards.
  void orthogonalize_and_apply(const MuonGroup& group, float* params, float lr, const int32_t* skip);
  // Newton-Schulz on the `batch` wide r x c matrices in x_; returns the buffer holding the result.
  float* newton_schulz(int batch, int r, int c);

  const Config config_;
  const ParamLayout& layout_;
  Backend& backend_;
  std::vector<NamedState> state_;
  std::vector<float*> first_state_;   // per spec: Adam m or Muon buffer (nullptr if none)
  std::vector<float*> second_state_;  // per spec: Adam v
  std::vector<AdamTensor> adam_tensors_;  // a step's Adam update, one call (capacity kept)
  std::vector<MuonGroup> muon_groups_;
  std::vector<int> muon_ordinal_;     // per spec: its place among the Muon tensors (owner: ordinal % processes)
  std::vector<size_t> muon_batch_;    // the spec indices whose updates x_ holds (capacity kept)
  size_t batch_floats_ = 0;           // a Muon batch's bound (ScratchSizes::batch)
  size_t gram_floats_ = 0;            // the Gram matrices' bound (ScratchSizes::gram)
  float* update_ = nullptr;           // Muon scratch: a momentum update [largest tensor]
  float* x_ = nullptr;                // Newton-Schulz iterate [a batch]
  float* x_next_ = nullptr;
  float* gram_ = nullptr;             // X X^T per matrix [batch, r, r]
  float* poly_ = nullptr;             // b A + c A A
};

}  // namespace speedrun
