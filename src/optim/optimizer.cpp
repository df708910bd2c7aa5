#include "optim/optimizer.h"

#include <algorithm>
#include <cmath>

namespace speedrun {

namespace {

// Newton-Schulz scratch: the largest Muon tensor and the largest batch of Gram matrices.
struct ScratchSizes {
  size_t largest = 1;
  size_t largest_gram = 1;
};

ScratchSizes scratch_sizes(const ParamLayout& layout) {
  ScratchSizes sizes;
  for (const ParamSpec& spec : layout.specs()) {
    if (spec.group != ParamGroup::kMuon) continue;
    sizes.largest = std::max(sizes.largest, spec.count);
    const size_t r = std::min(spec.rows, spec.cols);
    sizes.largest_gram = std::max(sizes.largest_gram, static_cast<size_t>(spec.matrices) * r * r);
  }
  return sizes;
}

}  // namespace

size_t Optimizer::memory_bytes(const ParamLayout& layout) {
  size_t floats = 0;
  for (const ParamSpec& spec : layout.specs()) floats += (spec.group == ParamGroup::kMuon ? 1 : 2) * spec.count;
  const ScratchSizes scratch = scratch_sizes(layout);
  floats += 3 * scratch.largest + 2 * scratch.largest_gram;
  return floats * sizeof(float);
}

Optimizer::Optimizer(const Config& config, const ParamLayout& layout, Backend& backend)
    : config_(config), layout_(layout), backend_(backend) {
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
  }
  const ScratchSizes scratch = scratch_sizes(layout_);
  update_ = backend_.alloc(scratch.largest);
  x_ = backend_.alloc(scratch.largest);
  x_next_ = backend_.alloc(scratch.largest);
  gram_ = backend_.alloc(scratch.largest_gram);
  poly_ = backend_.alloc(scratch.largest_gram);
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
  const auto& specs = layout_.specs();
  const int processes = comm ? comm->size() : 1;
  int muon_index = 0;
  adam_tensors_.clear();
  for (size_t i = 0; i < specs.size(); ++i) {
    const ParamSpec& spec = specs[i];
    float* p = params + spec.offset;
    const float* g = grads + spec.offset;
    if (spec.group == ParamGroup::kMuon) {
      const int owner = muon_index++ % processes;
      const bool mine = processes == 1 || comm->rank() == owner;
      muon_update(p, g, first_state_[i], spec, static_cast<float>(config_.lr_muon * mult), momentum, mine, skip);
      if (processes > 1) comm->broadcast_async(p, spec.count, owner);
    } else {
      adam_tensors_.push_back(
          {p, g, first_state_[i], second_state_[i], spec.count, static_cast<float>(adam_lr(spec) * mult)});
    }
  }
  backend_.adam_update(adam_tensors_.data(), adam_tensors_.size(), static_cast<float>(config_.adam_beta1),
                       static_cast<float>(config_.adam_beta2), static_cast<float>(config_.adam_eps), step + 1, skip);
  if (comm) comm->wait_all();
}

void Optimizer::muon_update(float* param, const float* grad, float* buf, const ParamSpec& spec, float lr,
                            float momentum, bool owner, const int32_t* skip) {
  // Every process keeps the momentum buffers (they are checkpointed); only the owner
  // orthogonalises and applies, the others receive the result.
  backend_.muon_momentum(update_, buf, grad, spec.count, momentum, skip);
  if (!owner) return;
  orthogonalize(update_, spec.matrices, spec.rows, spec.cols);
  const float shape_scale = std::sqrt(std::max(1.f, static_cast<float>(spec.rows) / static_cast<float>(spec.cols)));
  backend_.apply_update(param, update_, spec.count, lr * shape_scale, skip);
}

void Optimizer::orthogonalize(float* x, int batch, int rows, int cols) {
  // Work on the wide orientation (r <= c) so the Gram matrix X X^T is the small one.
  const bool tall = rows > cols;
  const int r = tall ? cols : rows;
  const int c = tall ? rows : cols;
  const size_t count = static_cast<size_t>(rows) * cols;
  float* X = x_;
  if (tall) {
    backend_.transpose(X, x, rows, cols, batch);
  } else {
    backend_.copy(X, x, count * batch);
  }
  backend_.normalize_frobenius(X, count, batch, 1e-7f);
  const float a = static_cast<float>(config_.ns_a), b = static_cast<float>(config_.ns_b),
              cc = static_cast<float>(config_.ns_c);
  const size_t rr = static_cast<size_t>(r) * r;
  float* Xn = x_next_;
  for (int it = 0; it < config_.ns_steps; ++it) {
    // A = X X^T; B = b A + c A A; X = a X + B X.
    backend_.gemm_batched(false, true, r, r, c, 1.f, X, c, count, X, c, count, 0.f, gram_, r, rr, batch);
    backend_.copy(poly_, gram_, rr * batch);
    backend_.gemm_batched(false, false, r, r, r, cc, gram_, r, rr, gram_, r, rr, b, poly_, r, rr, batch);
    backend_.copy(Xn, X, count * batch);
    backend_.gemm_batched(false, false, r, c, r, 1.f, poly_, r, rr, X, c, count, a, Xn, c, count, batch);
    std::swap(X, Xn);
  }
  if (tall) {
    backend_.transpose(x, X, r, c, batch);
  } else {
    backend_.copy(x, X, count * batch);
  }
}

}  // namespace speedrun
