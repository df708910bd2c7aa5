// The model's parameters as one flat float32 buffer: every tensor of SPEC §2's state
// dict at a fixed offset, with its shape, initialisation and optimiser group. Each tensor
// starts 256-byte aligned (as cudaMalloc's memory does): a weight's gradient is the output
// of its products, and cuBLASLt's fastest kernels (TMA on Hopper) and the vectorised
// optimiser kernels want 16-byte-aligned matrices. The padding between tensors is never
// read as a parameter: checkpoints and the optimisers go tensor by tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "model/arena_carver.h"
#include "model/config.h"

namespace speedrun {

enum class ParamGroup { kLmHead, kEmbedding, kScalar, kMuon };
enum class ParamInit { kNormal, kUniform, kZeros, kOnes, kConstant };

struct ParamSpec {
  std::string name;            // PyTorch state-dict name
  std::vector<int64_t> shape;
  size_t offset = 0;           // in floats, into the flat buffer
  size_t count = 0;
  ParamGroup group = ParamGroup::kScalar;
  ParamInit init = ParamInit::kZeros;
  std::vector<float> constant;  // values for kConstant
  // Muon sees this tensor as `matrices` matrices of rows x cols.
  int matrices = 1;
  int rows = 0;
  int cols = 0;
};

class ParamLayout {
 public:
  explicit ParamLayout(const Config& config);
  const std::vector<ParamSpec>& specs() const { return specs_; }
  // Floats of the flat buffer, the padding between tensors included.
  size_t total() const { return total_; }
  // Parameters: the tensors' elements, no padding.
  size_t parameter_count() const;
  // Each tensor's offset is a multiple of this: the activation arena's alignment.
  static constexpr size_t kAlignFloats = ArenaCarver::kAlignFloats;
  const ParamSpec& at(const std::string& name) const;  // throws Error naming the tensor
  bool contains(const std::string& name) const;

 private:
  void add(std::string name, std::vector<int64_t> shape, ParamGroup group, ParamInit init,
           std::vector<float> constant = {});
  std::vector<ParamSpec> specs_;
  size_t total_ = 0;
};

// Fills host memory with the initialisation of SPEC §2. Deterministic for a seed
// and independent of the number of threads (a counter-based generator per tensor).
void initialize_parameters(const Config& config, const ParamLayout& layout, std::vector<float>& params);

}  // namespace speedrun
