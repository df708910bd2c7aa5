#include "model/params.h"

#include <cmath>
#include <numbers>

#include "util/error.h"

namespace speedrun {
namespace {

// SplitMix64: a stateless mixing of (seed, tensor, index) into 64 random bits.
uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1), never 0 (safe for log).
double uniform_open(uint64_t seed, uint64_t stream, uint64_t index) {
  uint64_t bits = mix64(seed ^ mix64(stream * 0x100000001B3ull + index));
  return (static_cast<double>(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

double standard_normal(uint64_t seed, uint64_t stream, uint64_t index) {
  const double u1 = uniform_open(seed, stream, 2 * index);
  const double u2 = uniform_open(seed, stream, 2 * index + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

}  // namespace

ParamLayout::ParamLayout(const Config& c) {
  const int64_t V = c.vocab_size, d = c.model_dim, hd = c.hidden_dim(), m = c.mlp_dim();
  // PyTorch state-dict order: a module's own parameters, then its children's.
  add("skip_weights", {c.num_encoder_layers()}, ParamGroup::kScalar, ParamInit::kOnes);
  add("embed.weight", {V, d}, ParamGroup::kEmbedding, ParamInit::kNormal);
  for (int j = 0; j < c.num_value_embeds; ++j) {
    add("value_embeds.embed." + std::to_string(j) + ".weight", {V, d}, ParamGroup::kEmbedding, ParamInit::kNormal);
  }
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string block = "blocks." + std::to_string(i) + ".";
    add(block + "lambdas", {2}, ParamGroup::kScalar, ParamInit::kConstant, {1.f, 0.f});
    if (c.layer_has_attention(i)) {
      add(block + "attn.qkv_w", {3, hd, d}, ParamGroup::kMuon, ParamInit::kUniform);
      add(block + "attn.lambdas", {2}, ParamGroup::kScalar, ParamInit::kConstant, {0.5f, 0.5f});
      add(block + "attn.c_proj.weight", {d, hd}, ParamGroup::kMuon, ParamInit::kZeros);
    }
    add(block + "mlp.c_fc.weight", {m, d}, ParamGroup::kMuon, ParamInit::kUniform);
    add(block + "mlp.c_proj.weight", {d, m}, ParamGroup::kMuon, ParamInit::kZeros);
  }
  add("lm_head.weight", {c.padded_vocab(), d}, ParamGroup::kLmHead, ParamInit::kZeros);
}

void ParamLayout::add(std::string name, std::vector<int64_t> shape, ParamGroup group, ParamInit init,
                      std::vector<float> constant) {
  ParamSpec spec;
  spec.count = 1;
  for (int64_t dim : shape) spec.count *= static_cast<size_t>(dim);
  spec.name = std::move(name);
  spec.shape = std::move(shape);
  spec.offset = (total_ + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
  spec.group = group;
  spec.init = init;
  spec.constant = std::move(constant);
  if (spec.shape.size() == 3) {  // [3, hdim, d]: three matrices, orthogonalised independently
    spec.matrices = static_cast<int>(spec.shape[0]);
    spec.rows = static_cast<int>(spec.shape[1]);
    spec.cols = static_cast<int>(spec.shape[2]);
  } else if (spec.shape.size() == 2) {
    spec.rows = static_cast<int>(spec.shape[0]);
    spec.cols = static_cast<int>(spec.shape[1]);
  }
  total_ = spec.offset + spec.count;
  specs_.push_back(std::move(spec));
}

size_t ParamLayout::parameter_count() const {
  size_t n = 0;
  for (const ParamSpec& spec : specs_) n += spec.count;
  return n;
}

const ParamSpec& ParamLayout::at(const std::string& name) const {
  for (const ParamSpec& spec : specs_) {
    if (spec.name == name) return spec;
  }
  throw Error("the model has no parameter '" + name + "'");
}

bool ParamLayout::contains(const std::string& name) const {
  for (const ParamSpec& spec : specs_) {
    if (spec.name == name) return true;
  }
  return false;
}

void initialize_parameters(const Config& config, const ParamLayout& layout, std::vector<float>& params) {
  params.assign(layout.total(), 0.f);
  const uint64_t seed = mix64(static_cast<uint64_t>(config.seed));
  const double bound = std::sqrt(3.0) * config.matrix_init_scale / std::sqrt(static_cast<double>(config.model_dim));
  for (size_t p = 0; p < layout.specs().size(); ++p) {
    const ParamSpec& spec = layout.specs()[p];
    float* data = params.data() + spec.offset;
    const auto n = static_cast<int64_t>(spec.count);
    switch (spec.init) {
      case ParamInit::kNormal:
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
          data[i] = static_cast<float>(config.embed_init_std * standard_normal(seed, p, i));
        }
        break;
      case ParamInit::kUniform:
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
          data[i] = static_cast<float>(bound * (2.0 * uniform_open(seed, p, i) - 1.0));
        }
        break;
      case ParamInit::kZeros:
        break;
      case ParamInit::kOnes:
        for (int64_t i = 0; i < n; ++i) data[i] = 1.f;
        break;
      case ParamInit::kConstant:
        for (int64_t i = 0; i < n; ++i) data[i] = spec.constant[i];
        break;
    }
  }
}

}  // namespace speedrun
