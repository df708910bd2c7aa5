#include "optim/optimizer.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "util/error.h"

namespace speedrun {

namespace {

bool is_tall(const ParamSpec& spec) { return spec.rows > spec.cols; }

std::vector<Optimizer::MuonGroup> group_muon_tensors(const ParamLayout& layout) {
  std::vector<Optimizer::MuonGroup> groups;
  const auto& specs = layout.specs();
  for (size_t i = 0; i < specs.size(); ++i) {
    if (specs[i].group != ParamGroup::kMuon) continue;
    const int r = std::min(specs[i].rows, specs[i].cols), c = std::max(specs[i].rows, specs[i].cols);
    auto group = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.r == r && g.c == c; });
    if (group == groups.end()) group = groups.insert(groups.end(), Optimizer::MuonGroup{r, c, {}});
    group->specs.push_back(i);
  }
  return groups;
}

// Muon scratch in floats: one momentum update (the largest tensor), a batch of wide matrices,
// and the Gram matrices of the most matrices a batch of any group can hold.
struct ScratchSizes {
  size_t largest = 1;
  size_t batch = 1;
  size_t gram = 1;
};

ScratchSizes scratch_sizes(const ParamLayout& layout, size_t requested_batch) {
  ScratchSizes sizes;
  const std::vector<Optimizer::MuonGroup> groups = group_muon_tensors(layout);
  size_t largest_group = 1;
  for (const Optimizer::MuonGroup& g : groups) {
    size_t total = 0;
    for (size_t i : g.specs) {
      sizes.largest = std::max(sizes.largest, layout.specs()[i].count);
      total += layout.specs()[i].count;
    }
    largest_group = std::max(largest_group, total);
  }
  const size_t wanted = requested_batch > 0 ? requested_batch : Optimizer::kMuonBatchFloats;
  sizes.batch = std::max(sizes.largest, std::min(wanted, largest_group));
  for (const Optimizer::MuonGroup& g : groups) {
    const size_t matrix = static_cast<size_t>(g.r) * g.c;
    sizes.gram = std::max(sizes.gram, sizes.batch / matrix * g.r * g.r);
  }
  return sizes;
}

}  // namespace

size_t Optimizer::memory_bytes(const ParamLayout& layout, size_t muon_batch_floats) {
  size_t floats = 0;
  for (const ParamSpec& spec : layout.specs()) floats += (spec.group == ParamGroup::kMuon ? 1 : 2) * spec.count;
  const ScratchSizes scratch = scratch_sizes(layout, muon_batch_floats);
  floats += scratch.largest + 2 * scratch.batch + 2 * scratch.gram;
  return floats * sizeof(float);
}

Optimizer::Optimizer(const Config& config, const ParamLayout& layout, Backend& backend, size_t muon_batch_floats)
    : config_(config), layout_(layout), backend_(backend), muon_groups_(group_muon_tensors(layout)) {
  int muon_tensors = 0;
  for (const ParamSpec& spec : layout_.specs()) {
    float* first = nullptr;
    float* second = nullptr;
    if (spec.group == ParamGroup::kMuon) {
      first = backend_.alloc(spec.count);
      state_.push_back({"muon_buf." + spec.name, &spec, first});
    } else {
      first = backend_.alloc(spec.count);
      second = backend_.alloc(spec.count);
      state_.push_back({"adam_m." + spec.name, &spec, first});
      state_.push_back({"adam_v." + spec.name, &spec, second});
    }
    first_state_.push_back(first);
    second_state_.push_back(second);
    muon_ordinal_.push_back(spec.group == ParamGroup::kMuon ? muon_tensors++ : -1);
  }
  const ScratchSizes scratch = scratch_sizes(layout_, muon_batch_floats);
  batch_floats_ = scratch.batch;
  gram_floats_ = scratch.gram;
  update_ = backend_.alloc(scratch.largest);
  x_ = backend_.alloc(scratch.batch);
  x_next_ = backend_.alloc(scratch.batch);
  gram_ = backend_.alloc(scratch.gram);
  poly_ = backend_.alloc(scratch.gram);
}

Optimizer::~Optimizer() {
  for (float* p : first_state_) backend_.release(p);
  for (float* p : second_state_) backend_.release(p);
  for (float* p : {update_, x_, x_next_, gram_, poly_}) backend_.release(p);
}

float Optimizer::adam_lr(const ParamSpec& spec) const {
  switch (spec.group) {
    case ParamGroup::kLmHead: return static_cast<float>(config_.lr_lm_head);
    case ParamGroup::kEmbedding: return static_cast<float>(config_.lr_embed);
    case ParamGroup::kScalar: return static_cast<float>(config_.lr_scalar);
    case ParamGroup::kMuon: break;
  }
  return 0.f;
}

void Optimizer::step(float* params, const float* grads, int step, Communicator* comm, const int32_t* skip) {
  const double mult = lr_multiplier(config_, step);
  const float momentum = static_cast<float>(muon_momentum(config_, step));
  for (const MuonGroup& group : muon_groups_) {
    update_muon_group(group, params, grads, static_cast<float>(config_.lr_muon * mult), momentum, comm, skip);
  }
  adam_tensors_.clear();
  const auto& specs = layout_.specs();
  for (size_t i = 0; i < specs.size(); ++i) {
    const ParamSpec& spec = specs[i];
    if (spec.group == ParamGroup::kMuon) continue;
    adam_tensors_.push_back({params + spec.offset, grads + spec.offset, first_state_[i], second_state_[i], spec.count,
                             static_cast<float>(adam_lr(spec) * mult)});
  }
  backend_.adam_update(adam_tensors_.data(), adam_tensors_.size(), static_cast<float>(config_.adam_beta1),
                       static_cast<float>(config_.adam_beta2), static_cast<float>(config_.adam_eps), step + 1, skip);
  if (comm) comm->wait_all();
}

void Optimizer::update_muon_group(const MuonGroup& group, float* params, const float* grads, float lr,
                                  float momentum, Communicator* comm, const int32_t* skip) {
  const auto& specs = layout_.specs();
  const int processes = comm ? comm->size() : 1;
  const auto owner = [&](size_t i) { return muon_ordinal_[i] % processes; };
  muon_batch_.clear();  // this process's tensors whose updates are in x_, batch_floats of them
  size_t batch_floats = 0;
  for (size_t i : group.specs) {
    const ParamSpec& spec = specs[i];
    // Every process keeps the momentum buffers (they are checkpointed); only the owner
    // orthogonalises and applies, the others receive the result.
    const bool mine = processes == 1 || comm->rank() == owner(i);
    if (mine && batch_floats + spec.count > batch_floats_) {
      orthogonalize_and_apply(group, params, lr, skip);
      batch_floats = 0;
    }
    float* slot = x_ + batch_floats;
    // A wide tensor's update goes straight into its slot, a tall one's is made wide there.
    float* update = mine && !is_tall(spec) ? slot : update_;
    backend_.muon_momentum(update, first_state_[i], grads + spec.offset, spec.count, momentum, skip);
    if (!mine) continue;
    if (is_tall(spec)) backend_.transpose(slot, update_, spec.rows, spec.cols, spec.matrices);
    muon_batch_.push_back(i);
    batch_floats += spec.count;
  }
  orthogonalize_and_apply(group, params, lr, skip);
  if (processes > 1) {
    for (size_t i : group.specs) comm->broadcast_async(params + specs[i].offset, specs[i].count, owner(i));
  }
}

void Optimizer::orthogonalize_and_apply(const MuonGroup& group, float* params, float lr, const int32_t* skip) {
  if (muon_batch_.empty()) return;
  int matrices = 0;
  for (size_t i : muon_batch_) matrices += layout_.specs()[i].matrices;
  const float* result = newton_schulz(matrices, group.r, group.c);
  for (size_t i : muon_batch_) {
    const ParamSpec& spec = layout_.specs()[i];
    const float* update = result;
    if (is_tall(spec)) {  // back to the parameter's shape
      backend_.transpose(update_, result, group.r, group.c, spec.matrices);
      update = update_;
    }
    const float shape_scale = std::sqrt(std::max(1.f, static_cast<float>(spec.rows) / static_cast<float>(spec.cols)));
    backend_.apply_update(params + spec.offset, update, spec.count, lr * shape_scale, skip);
    result += spec.count;
  }
  muon_batch_.clear();
}

void Optimizer::orthogonalize(float* x, int batch, int rows, int cols) {
  const size_t count = static_cast<size_t>(rows) * cols;
  const size_t r = static_cast<size_t>(std::min(rows, cols));  // the Gram matrices are r x r
  auto matrices = [&] {
    return std::to_string(batch) + " matrices of " + std::to_string(rows) + " x " + std::to_string(cols);
  };
  if (batch < 1 || rows < 1 || cols < 1 || count * batch > batch_floats_) {
    throw Error("Optimizer::orthogonalize: " + matrices() + " do not fit a Muon batch of " +
                std::to_string(batch_floats_) + " floats");
  }
  // The Gram scratch is sized for the layout's own shapes, which can be flatter than these.
  if (r * r * batch > gram_floats_) {
    throw Error("Optimizer::orthogonalize: the Gram matrices of " + matrices() + " (" + std::to_string(r * r * batch) +
                " floats) do not fit the " + std::to_string(gram_floats_) + " this layout's Muon batches need");
  }
  // Work on the wide orientation (r <= c) so the Gram matrix X X^T is the small one.
  const bool tall = rows > cols;
  if (tall) {
    backend_.transpose(x_, x, rows, cols, batch);
  } else {
    backend_.copy(x_, x, count * batch);
  }
  const float* result = newton_schulz(batch, tall ? cols : rows, tall ? rows : cols);
  if (tall) {
    backend_.transpose(x, result, cols, rows, batch);
  } else {
    backend_.copy(x, result, count * batch);
  }
}

float* Optimizer::newton_schulz(int batch, int r, int c) {
  const size_t count = static_cast<size_t>(r) * c;
  float* X = x_;
  float* Xn = x_next_;
  backend_.normalize_frobenius(X, count, batch, 1e-7f);
  const float a = static_cast<float>(config_.ns_a), b = static_cast<float>(config_.ns_b),
              cc = static_cast<float>(config_.ns_c);
  const size_t rr = static_cast<size_t>(r) * r;
  for (int it = 0; it < config_.ns_steps; ++it) {
    // A = X X^T; B = b A + c A A; X = a X + B X.
    backend_.gemm_batched(false, true, r, r, c, 1.f, X, c, count, X, c, count, 0.f, gram_, r, rr, batch);
    backend_.copy(poly_, gram_, rr * batch);
    backend_.gemm_batched(false, false, r, r, r, cc, gram_, r, rr, gram_, r, rr, b, poly_, r, rr, batch);
    backend_.copy(Xn, X, count * batch);
    backend_.gemm_batched(false, false, r, c, r, 1.f, poly_, r, rr, X, c, count, a, Xn, c, count, batch);
    std::swap(X, Xn);
  }
  return X;
}

}  // namespace speedrun
