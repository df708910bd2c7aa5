// The whole model on the CPU backend: initial loss, gradient against finite
// differences, determinism and forward-only consistency.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backends/profiling_backend.h"
#include "model/gpt.h"
#include "optim/optimizer.h"
#include "support/finite_difference.h"
#include "util/error.h"

namespace speedrun {
namespace {

using testing::dot;
using testing::random_vector;

std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

// Random tokens of the config's vocabulary with its document separator every `every` tokens.
std::vector<int32_t> tokens_with_documents(int n, const Config& c, uint64_t seed, int every) {
  std::vector<int32_t> t = random_tokens(n, c.vocab_size, seed);
  for (int i = 0; i < n; i += every) t[i] = c.document_separator;
  return t;
}

TEST(GPT, InitialLossIsLogOfPaddedVocabulary) {
  auto be = make_cpu_backend();
  Config c = Config::preset("tiny");
  GPT model(c, *be, 128, 128);
  const auto inputs = random_tokens(128, 50257, 1), targets = random_tokens(128, 50257, 2);
  const double loss = model.forward(inputs, targets, 1);
  EXPECT_EQ(c.padded_vocab(), 50304);
  EXPECT_NEAR(loss, std::log(50304.0), 4 * 9.5e-7) << "loss " << loss;
}

TEST(GPT, ParameterShapesFollowTheSpecStateDict) {
  const ParamLayout layout(Config::preset("speedrun-124m"));
  EXPECT_EQ(layout.at("embed.weight").shape, (std::vector<int64_t>{50257, 768}));
  EXPECT_EQ(layout.at("value_embeds.embed.2.weight").shape, (std::vector<int64_t>{50257, 768}));
  EXPECT_EQ(layout.at("blocks.0.attn.qkv_w").shape, (std::vector<int64_t>{3, 768, 768}));
  EXPECT_EQ(layout.at("blocks.11.mlp.c_fc.weight").shape, (std::vector<int64_t>{3072, 768}));
  EXPECT_EQ(layout.at("blocks.11.mlp.c_proj.weight").shape, (std::vector<int64_t>{768, 3072}));
  EXPECT_EQ(layout.at("skip_weights").shape, (std::vector<int64_t>{6}));
  EXPECT_EQ(layout.at("lm_head.weight").shape, (std::vector<int64_t>{50304, 768}));
  EXPECT_FALSE(layout.contains("blocks.7.attn.qkv_w"));
  EXPECT_FALSE(layout.contains("blocks.7.attn.lambdas"));
  EXPECT_TRUE(layout.contains("blocks.7.lambdas"));
  // Matrix parameters of the blocks: 12 MLPs + 11 attentions.
  size_t matrix_params = 0;
  for (const ParamSpec& s : layout.specs()) {
    if (s.group == ParamGroup::kMuon) matrix_params += s.count;
  }
  EXPECT_EQ(matrix_params, 12u * 2 * 768 * 3072 + 11u * 4 * 768 * 768);
}

// Every tensor starts 256 bytes into the buffer (its gradient is a product's output, for
// cuBLASLt's TMA kernels), in state-dict order, with less than 64 floats of padding before
// it; the padding is not counted as parameters.
TEST(GPT, ParameterTensorsStartAligned) {
  const ParamLayout layout(Config::preset("speedrun-124m"));
  size_t end = 0, parameters = 0;
  for (const ParamSpec& s : layout.specs()) {
    EXPECT_EQ(s.offset % ParamLayout::kAlignFloats, 0u) << s.name;
    EXPECT_GE(s.offset, end) << s.name;
    EXPECT_LT(s.offset - end, ParamLayout::kAlignFloats) << s.name;
    end = s.offset + s.count;
    parameters += s.count;
  }
  EXPECT_EQ(layout.total(), end);
  EXPECT_EQ(layout.parameter_count(), parameters);
  EXPECT_EQ(layout.parameter_count(), 275598388u);  // SPEC §2's state dict (the padded head included)
  EXPECT_LT(layout.total() - layout.parameter_count(), ParamLayout::kAlignFloats * layout.specs().size());
}

// The padding between tensors is no parameter: NaN there changes no loss or gradient.
TEST(GPT, PaddingBetweenTensorsIsNeverRead) {
  const Config c = Config::preset("micro");
  auto be = make_cpu_backend();
  GPT model(c, *be, 64, 64);
  const ParamLayout& layout = model.layout();
  std::vector<float> params = random_vector(layout.total(), 5, 0.5f), poisoned(layout.total(), NAN);
  for (const ParamSpec& s : layout.specs()) {
    std::copy_n(params.begin() + s.offset, s.count, poisoned.begin() + s.offset);
  }
  ASSERT_LT(layout.parameter_count(), layout.total()) << "micro's layout has padding to poison";
  const auto inputs = tokens_with_documents(64, c, 3, 11), targets = random_tokens(64, c.vocab_size, 4);
  auto loss_and_gradients = [&](const std::vector<float>& p) {
    model.load_parameters(p);
    model.zero_grad();
    const double loss = model.forward_backward(inputs, targets, 2, 1.f);
    std::vector<float> g = model.gradients_to_host(), by_tensor;
    for (const ParamSpec& s : layout.specs()) {
      by_tensor.insert(by_tensor.end(), g.begin() + s.offset, g.begin() + s.offset + s.count);
    }
    return std::make_pair(loss, by_tensor);
  };
  const auto [clean_loss, clean_grads] = loss_and_gradients(params);
  const auto [loss, grads] = loss_and_gradients(poisoned);
  ASSERT_TRUE(std::isfinite(clean_loss));
  EXPECT_EQ(loss, clean_loss);
  EXPECT_EQ(grads, clean_grads);
}

// SPEC §2's table, tensor by tensor: the distribution (checked by its range and moments)
// or the exact values of every initial parameter.
TEST(GPT, EveryTensorStartsAsTheSpecsTable) {
  const Config c = Config::preset("micro");
  const ParamLayout layout(c);
  std::vector<float> p;
  initialize_parameters(c, layout, p);
  auto ends_with = [](const std::string& name, const std::string& end) {
    return name.size() >= end.size() && name.compare(name.size() - end.size(), end.size(), end) == 0;
  };
  const double bound = std::sqrt(3.0) * 0.5 / std::sqrt(static_cast<double>(c.model_dim));
  for (const ParamSpec& spec : layout.specs()) {
    SCOPED_TRACE(spec.name);
    const std::vector<float> v(p.begin() + spec.offset, p.begin() + spec.offset + spec.count);
    double sum = 0, squares = 0, largest = 0;
    for (float x : v) sum += x, squares += double{x} * x, largest = std::max(largest, std::abs(double{x}));
    const double mean = sum / v.size(), mean_square = squares / v.size();
    if (spec.name == "embed.weight" || spec.name.rfind("value_embeds.embed.", 0) == 0) {  // N(0, 1)
      EXPECT_NEAR(mean, 0.0, 0.06);
      EXPECT_NEAR(mean_square, 1.0, 0.08);
    } else if (ends_with(spec.name, "attn.qkv_w") || ends_with(spec.name, "mlp.c_fc.weight")) {  // U(+-bound)
      EXPECT_LE(largest, bound);
      EXPECT_GE(largest, 0.95 * bound);
      EXPECT_NEAR(mean_square, bound * bound / 3, 0.12 * bound * bound / 3);
    } else if (ends_with(spec.name, "c_proj.weight") || spec.name == "lm_head.weight") {
      EXPECT_EQ(largest, 0.0);
    } else if (ends_with(spec.name, "attn.lambdas")) {
      EXPECT_EQ(v, (std::vector<float>{0.5f, 0.5f}));
    } else if (ends_with(spec.name, "lambdas")) {
      EXPECT_EQ(v, (std::vector<float>{1.f, 0.f}));
    } else if (spec.name == "skip_weights") {
      EXPECT_EQ(v, std::vector<float>(c.num_layers / 2, 1.f));
    } else {
      ADD_FAILURE() << "a tensor SPEC §2's table does not name";
    }
  }
}

TEST(GPT, InitialisationFollowsSpec) {
  Config c = Config::preset("micro");
  const ParamLayout layout(c);
  std::vector<float> p;
  initialize_parameters(c, layout, p);
  const ParamSpec& qkv = layout.at("blocks.0.attn.qkv_w");
  const double bound = std::sqrt(3.0) * 0.5 / std::sqrt(16.0);
  double mean = 0;
  for (size_t i = 0; i < qkv.count; ++i) {
    ASSERT_LE(std::abs(p[qkv.offset + i]), bound);
    mean += p[qkv.offset + i];
  }
  EXPECT_NEAR(mean / qkv.count, 0.0, 0.05);
  const ParamSpec& emb = layout.at("embed.weight");
  double sq = 0;
  for (size_t i = 0; i < emb.count; ++i) sq += p[emb.offset + i] * p[emb.offset + i];
  EXPECT_NEAR(sq / emb.count, 1.0, 0.05);
  EXPECT_EQ(p[layout.at("blocks.1.lambdas").offset], 1.f);
  EXPECT_EQ(p[layout.at("blocks.1.lambdas").offset + 1], 0.f);
  EXPECT_EQ(p[layout.at("blocks.1.attn.lambdas").offset], 0.5f);
  EXPECT_EQ(p[layout.at("skip_weights").offset + 1], 1.f);
  EXPECT_EQ(p[layout.at("lm_head.weight").offset + 5], 0.f);
  EXPECT_EQ(p[layout.at("blocks.3.mlp.c_proj.weight").offset], 0.f);
  std::vector<float> again;
  initialize_parameters(c, layout, again);
  EXPECT_EQ(p, again);
  c.seed = 1;
  initialize_parameters(c, layout, again);
  EXPECT_NE(p, again);
}

// A model whose every parameter is random (no zero head or projections), so every
// gradient path carries signal.
struct RandomModel {
  std::unique_ptr<Backend> be = make_cpu_backend();
  Config config = Config::preset("micro");
  std::unique_ptr<GPT> model;
  std::vector<float> params;
  std::vector<int32_t> inputs, targets;
  int window = 2;

  explicit RandomModel(ActivationOptions activations = {}, const BackendOptions& backend = {}) {
    be = make_cpu_backend(backend);
    model = std::make_unique<GPT>(config, *be, 64, 64, activations);
    params = random_vector(model->layout().total(), 42, 0.5f);
    for (const ParamSpec& s : model->layout().specs()) {
      if (s.name.find("lambdas") != std::string::npos || s.name == "skip_weights") {
        for (size_t i = 0; i < s.count; ++i) params[s.offset + i] = 0.6f + 0.3f * params[s.offset + i];
      }
    }
    inputs = tokens_with_documents(64, config, 3, 11);
    inputs[5] = config.document_separator;
    targets = random_tokens(64, config.vocab_size, 4);
  }
  double loss(const std::vector<float>& p) {
    model->load_parameters(p);
    return model->forward(inputs, targets, window);
  }
};

// Two training passes (accumulating) and a forward-only pass give the same losses and
// gradients, bit for bit, in both models.
void expect_same_passes(RandomModel& a, RandomModel& b) {
  std::vector<std::vector<float>> grads;
  std::vector<double> losses;
  for (RandomModel* m : {&a, &b}) {
    m->model->load_parameters(m->params);
    m->model->zero_grad();
    losses.push_back(m->model->forward_backward(m->inputs, m->targets, m->window, 1.f));
    losses.push_back(m->model->forward_backward(m->inputs, m->targets, m->window + 1, 0.5f));
    losses.push_back(m->model->forward(m->inputs, m->targets, m->window));
    grads.push_back(m->model->gradients_to_host());
  }
  EXPECT_EQ(losses[3], losses[0]);
  EXPECT_EQ(losses[4], losses[1]);
  EXPECT_EQ(losses[5], losses[2]);
  EXPECT_EQ(grads[1], grads[0]);
}


TEST(GPT, GradientMatchesFiniteDifferencesForEveryTensor) {
  RandomModel m;
  m.model->load_parameters(m.params);
  m.model->zero_grad();
  const double loss = m.model->forward_backward(m.inputs, m.targets, m.window, 1.f);
  EXPECT_NEAR(loss, m.loss(m.params), 1e-6);
  m.model->load_parameters(m.params);
  m.model->zero_grad();
  m.model->forward_backward(m.inputs, m.targets, m.window, 1.f);
  const std::vector<float> grad = m.model->gradients_to_host();
  int checked = 0;
  for (const ParamSpec& spec : m.model->layout().specs()) {
    // Direction: the tensor's own gradient plus noise, unit norm: a wrong scale, sign or
    // direction of the tensor's gradient shows. An error on a few entries only is diluted
    // here; GradientMatchesFiniteDifferencesRowByRow catches those.
    std::vector<float> u(m.params.size(), 0.f);
    const auto noise = random_vector(spec.count, 1000 + checked);
    double g_norm = 0, n_norm = 0;
    for (size_t i = 0; i < spec.count; ++i) {
      g_norm += grad[spec.offset + i] * grad[spec.offset + i];
      n_norm += noise[i] * noise[i];
    }
    g_norm = std::sqrt(g_norm);
    n_norm = std::sqrt(n_norm);
    ASSERT_GT(g_norm, 1e-6) << spec.name << " has no gradient";
    double norm = 0;
    for (size_t i = 0; i < spec.count; ++i) {
      u[spec.offset + i] = static_cast<float>(grad[spec.offset + i] / g_norm + 0.5 * noise[i] / n_norm);
      norm += u[spec.offset + i] * u[spec.offset + i];
    }
    for (float& x : u) x = static_cast<float>(x / std::sqrt(norm));
    const double analytic = dot(grad, u);
    const double numeric =
        testing::directional_derivative([&](const std::vector<float>& p) { return m.loss(p); }, m.params, u, 1e-2);
    EXPECT_NEAR(analytic, numeric, 1e-3 + 1e-2 * std::abs(numeric)) << spec.name;
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(m.model->layout().specs().size()));
}

// The same, row by row: directions drawn independently of the analytic gradient, each on
// one row of a tensor (a row of a matrix, an embedding row, one scalar), so a gradient that
// is wrong or missing on a few entries only (one token's embedding row, one head's rows)
// cannot hide among the rest of the tensor. Embedding rows: the inputs' first tokens, one
// token that occurs nowhere (its gradient must be zero) and the last position's token.
TEST(GPT, GradientMatchesFiniteDifferencesRowByRow) {
  RandomModel m;
  m.model->load_parameters(m.params);
  m.model->zero_grad();
  m.model->forward_backward(m.inputs, m.targets, m.window, 1.f);
  const std::vector<float> grad = m.model->gradients_to_host();
  int absent = 0;
  while (std::find(m.inputs.begin(), m.inputs.end(), absent) != m.inputs.end()) ++absent;
  int checked = 0, seed = 5000;
  for (const ParamSpec& spec : m.model->layout().specs()) {
    const size_t row = spec.shape.size() == 1 ? 1 : static_cast<size_t>(spec.shape.back());
    const size_t rows = spec.count / row;
    std::vector<size_t> picks;
    if (spec.group == ParamGroup::kEmbedding) {
      picks = {static_cast<size_t>(m.inputs[0]), static_cast<size_t>(m.inputs[1]),
               static_cast<size_t>(m.inputs.back()), static_cast<size_t>(absent)};
    } else {
      picks = {0, rows / 2, rows - 1};
    }
    picks.erase(std::unique(picks.begin(), picks.end()), picks.end());  // a 2-float tensor has 2 rows
    for (size_t r : picks) {
      std::vector<float> u(m.params.size(), 0.f);
      const auto noise = random_vector(row, ++seed);
      double norm = 0;
      for (float x : noise) norm += double{x} * x;
      for (size_t i = 0; i < row; ++i) u[spec.offset + r * row + i] = static_cast<float>(noise[i] / std::sqrt(norm));
      const double analytic = dot(grad, u);
      const double numeric =
          testing::directional_derivative([&](const std::vector<float>& p) { return m.loss(p); }, m.params, u, 1e-2);
      EXPECT_NEAR(analytic, numeric, 1e-4 + 1e-2 * std::abs(numeric)) << spec.name << " row " << r;
      ++checked;
    }
  }
  EXPECT_GT(checked, 2 * static_cast<int>(m.model->layout().specs().size()));
}

// --head-chunk-rows: the head's logits computed 8 rows at a time, 24 (the last chunk 16), or
// all 64 at once give the same loss and gradients up to float32 rounding: the chunks change
// only sums' order (the loss over rows, the head's weight gradient over chunks, and OpenBLAS's
// blocking of products of another height).
TEST(GPT, TheHeadsChunkHeightChangesOnlyTheOrderOfSums) {
  std::vector<std::vector<float>> grads;
  std::vector<double> losses;
  for (int rows : {64, 8, 24}) {
    BackendOptions options;
    options.head_chunk_rows = rows;
    RandomModel m({}, options);
    ASSERT_EQ(m.be->head_chunk_rows(), rows);
    m.model->load_parameters(m.params);
    m.model->zero_grad();
    losses.push_back(m.model->forward_backward(m.inputs, m.targets, m.window, 1.f));
    grads.push_back(m.model->gradients_to_host());
  }
  for (size_t k = 1; k < grads.size(); ++k) {
    EXPECT_NEAR(losses[k], losses[0], 1e-6 * std::abs(losses[0]));
    double worst = 0;
    for (size_t i = 0; i < grads[0].size(); ++i) {
      const double error = std::abs(grads[k][i] - grads[0][i]) / (1e-6 + std::abs(grads[0][i]));
      worst = std::max(worst, error);
      ASSERT_NEAR(grads[k][i], grads[0][i], 1e-4 * std::abs(grads[0][i]) + 1e-7) << i;
    }
    std::printf("chunks of %d rows: loss %.9g against %.9g, worst gradient error %.3g (relative to 1e-6 + |g|)\n",
                k == 1 ? 8 : 24, losses[k], losses[0], worst);
  }
}

TEST(GPT, GradientAccumulatesScaledOverSequences) {
  RandomModel m;
  m.model->load_parameters(m.params);
  m.model->zero_grad();
  m.model->forward_backward(m.inputs, m.targets, m.window, 1.f);
  const auto once = m.model->gradients_to_host();
  m.model->zero_grad();
  m.model->forward_backward(m.inputs, m.targets, m.window, 0.5f);
  m.model->forward_backward(m.inputs, m.targets, m.window, 0.5f);
  const auto twice_half = m.model->gradients_to_host();
  for (size_t i = 0; i < once.size(); i += 7) ASSERT_NEAR(once[i], twice_half[i], 1e-5 + 1e-4 * std::abs(once[i]));
}

TEST(GPT, ForwardIsDeterministicAndIndependentOfTrainingMode) {
  RandomModel m;
  m.model->load_parameters(m.params);
  const double a = m.model->forward(m.inputs, m.targets, m.window);
  m.model->zero_grad();
  const double b = m.model->forward_backward(m.inputs, m.targets, m.window, 1.f);
  const double c = m.model->forward(m.inputs, m.targets, m.window);
  EXPECT_EQ(a, b);
  EXPECT_EQ(a, c);
}

// Recomputing in the backward runs the same ops on the same inputs: the same bits, in the
// memory the recomputed buffers no longer take per layer (micro's layer 2 has no attention),
// whether the largest activations are kept in float32 or as bf16 codes.
void expect_recomputation_is_exact(ActivationPrecision precision);

TEST(GPT, RecomputedActivationsGiveBitIdenticalGradientsInLessMemory) {
  for (ActivationPrecision precision : {ActivationPrecision::kFloat32, ActivationPrecision::kBfloat16}) {
    SCOPED_TRACE(precision == ActivationPrecision::kBfloat16 ? "bf16" : "fp32");
    expect_recomputation_is_exact(precision);
  }
}

void expect_recomputation_is_exact(ActivationPrecision precision) {
  RandomModel kept({ActivationMemory::kStore, precision}), recomputed({ActivationMemory::kRecompute, precision});
  expect_same_passes(kept, recomputed);
  const Config& c = kept.config;
  const size_t T = 64, d = c.model_dim, hd = c.hidden_dim(), mlp = c.mlp_dim();
  // Mixed v per layer: floats, or with bf16 activations codes (whose floats are one shared
  // buffer in both modes). Rotated q and k are one buffer each in both modes.
  const bool bf16 = precision == ActivationPrecision::kBfloat16;
  const size_t v = bf16 ? hd / 2 : hd;
  const size_t stream = bf16 ? d / 2 : d;  // the residual stream's x1: codes with bf16 activations
  // The block norms and relu(h)^2: floats, or with bf16 activations codes (their floats one
  // buffer in both modes).
  const size_t norm = bf16 ? d / 2 : d, g = bf16 ? mlp / 2 : mlp;
  size_t not_kept = stream;  // floats per token: kept mode's shared x1 buffer
  size_t kept_to_recompute = norm + v + g;  // the recompute buffers, one of each
  for (int i = 0; i < c.num_layers; ++i) {
    not_kept += norm + g;  // mlp_norm, relu(h)^2
    if (c.layer_has_attention(i)) {
      not_kept += norm + v;  // attn_norm, mixed v
      kept_to_recompute += stream;  // x1
    }
  }
  ASSERT_FALSE(c.layer_has_attention(2));
  EXPECT_EQ(kept.model->activation_bytes() - recomputed.model->activation_bytes(),
            T * (not_kept - kept_to_recompute) * sizeof(float));
}

// Recomputing relu(h)^2 alone (from h, kept) gives the same bits as keeping it, in the
// memory of every layer's relu(h)^2 but one: floats, or with bf16 activations codes.
TEST(GPT, RecomputingRelu2AloneGivesBitIdenticalGradientsInLessMemory) {
  for (ActivationPrecision precision : {ActivationPrecision::kFloat32, ActivationPrecision::kBfloat16}) {
    SCOPED_TRACE(precision == ActivationPrecision::kBfloat16 ? "bf16" : "fp32");
    RandomModel kept({ActivationMemory::kStore, precision}), lean({ActivationMemory::kRecomputeRelu2, precision});
    expect_same_passes(kept, lean);
    const Config& c = kept.config;
    const size_t T = 64, g = precision == ActivationPrecision::kBfloat16 ? c.mlp_dim() / 2 : c.mlp_dim();
    EXPECT_EQ(kept.model->activation_bytes() - lean.model->activation_bytes(),
              T * (c.num_layers - 1) * g * sizeof(float));
  }
}

// bf16 storage rounds the residual stream, h, the normalised q and k, attention's inputs
// and its output y where they are computed, in the forward of every pass: a small, real
// change of the loss and the gradients, the same in a training and a forward-only pass, for
// exactly the memory of those buffers halved (the floats of attention's inputs and output
// then one buffer each for all layers).
TEST(GPT, Bf16ActivationsRoundTheLargestBuffersAndHalveTheirMemory) {
  RandomModel exact, rounded({ActivationMemory::kStore, ActivationPrecision::kBfloat16});
  std::vector<double> losses;
  std::vector<std::vector<float>> grads;
  for (RandomModel* m : {&exact, &rounded}) {
    m->model->load_parameters(m->params);
    m->model->zero_grad();
    losses.push_back(m->model->forward_backward(m->inputs, m->targets, m->window, 1.f));
    losses.push_back(m->model->forward(m->inputs, m->targets, m->window));
    grads.push_back(m->model->gradients_to_host());
  }
  EXPECT_EQ(losses[2], losses[3]);  // a forward-only pass rounds as a training pass does
  EXPECT_NE(losses[0], losses[2]);
  EXPECT_NEAR(losses[0], losses[2], 1e-3 * losses[0]);  // measured: 3.5e-4 relative
  // Gradients differ by bf16's rounding (2^-9 relative per value) carried through the
  // backward: measured 1.5% of their norm (0.6% before the residual stream, the norms, q,
  // k, v, relu(h)^2 and two gradients were bf16 too).
  // A backward reading the wrong codes, or the unrounded values, would not stay within this
  // band or would not leave it empty.
  double diff = 0, norm = 0;
  for (size_t i = 0; i < grads[0].size(); ++i) {
    diff += (grads[0][i] - grads[1][i]) * (grads[0][i] - grads[1][i]);
    norm += grads[0][i] * grads[0][i];
  }
  EXPECT_GT(std::sqrt(diff / norm), 1e-4);
  EXPECT_LT(std::sqrt(diff / norm), 2e-2);
  // Tensor by tensor too: a wrong gradient of a small tensor (a lambda pair, the skip
  // weights) would vanish in the norm of the whole.
  for (const ParamSpec& spec : exact.model->layout().specs()) {
    double tensor_diff = 0, tensor_norm = 0;
    for (size_t i = spec.offset; i < spec.offset + spec.count; ++i) {
      tensor_diff += (grads[0][i] - grads[1][i]) * (grads[0][i] - grads[1][i]);
      tensor_norm += grads[0][i] * grads[0][i];
    }
    // Measured: 0.35% (blocks.3.lambdas) to 2.6% for most, 4.7% and 14% for the first
    // block's lambdas (a nearly cancelling gradient); a sign error or a lost term gives ~1.
    EXPECT_LT(std::sqrt(tensor_diff / tensor_norm), 0.3) << spec.name;
  }

  const Config& c = exact.config;
  const size_t T = 64, d = c.model_dim, hd = c.hidden_dim(), mlp = c.mlp_dim();
  // The residual stream: x0, the skip stack, the last output, each decoder layer's input,
  // the shared lambda mix and attention residual.
  size_t halved = d * (1 + c.num_encoder_layers() + 1 + (c.num_layers - c.num_encoder_layers()) + 2);  // per token
  halved += d;  // the value embedding looked up
  halved += 2 * hd;  // rotated q and k, one buffer each for all layers
  size_t as_codes = 0;  // per token: kept as codes, their floats one buffer for all layers or none
  for (int i = 0; i < c.num_layers; ++i) {
    halved += mlp;
    as_codes += d + mlp;  // the MLP's norm, relu(h)^2
    if (c.layer_has_attention(i)) {
      halved += 3 * hd;  // normalised q and k, v before its mix
      as_codes += d + 2 * hd;  // attention's norm; v and y
    }
  }
  // bf16 alone: the norms', relu(h)^2's and y's float buffers, q's and k's codes as their
  // products write them.
  const size_t bf16_only = d + mlp + hd + 2 * hd / 2;
  EXPECT_EQ(exact.model->activation_bytes() - rounded.model->activation_bytes(),
            (T * halved / 2 + T * as_codes / 2 - T * bf16_only) * sizeof(float));
}

// (The head's logits 64 rows at a time: micro's chunk of 256 rows would outweigh all its
// other activations, and a taller one in a longer pass would not fit the training buffers.)
TEST(GPT, ForwardOnlyPassesRunInTheTrainingBuffers) {
  BackendOptions chunk_of_64;
  chunk_of_64.head_chunk_rows = 64;
  auto be = make_cpu_backend(chunk_of_64);
  const Config c = Config::preset("micro");
  GPT short_eval(c, *be, 64, 64), long_eval(c, *be, 64, 256), long_train(c, *be, 256, 256);
  constexpr size_t kPerTokenBuffers = 4;
  EXPECT_EQ(long_eval.activation_bytes() - short_eval.activation_bytes(), (256 - 64) * kPerTokenBuffers * 4);
  const auto params = random_vector(short_eval.layout().total(), 7, 0.5f);
  const auto inputs = tokens_with_documents(256, c, 8, 37), targets = random_tokens(256, c.vocab_size, 9);
  long_eval.load_parameters(params);
  long_train.load_parameters(params);
  long_train.zero_grad();
  const double trained = long_train.forward_backward(inputs, targets, 3, 1.f);
  EXPECT_EQ(long_eval.forward(inputs, targets, 3), trained);
  // A forward-only pass between training passes leaves their gradients alone.
  long_train.zero_grad();
  long_train.forward_backward(inputs, targets, 3, 1.f);
  const auto once = long_train.gradients_to_host();
  long_train.zero_grad();
  long_train.forward_backward(inputs, targets, 3, 0.5f);
  EXPECT_EQ(long_train.forward(inputs, targets, 2), long_eval.forward(inputs, targets, 2));
  long_train.forward_backward(inputs, targets, 3, 0.5f);
  const auto halves = long_train.gradients_to_host();
  for (size_t i = 0; i < once.size(); ++i) ASSERT_NEAR(once[i], halves[i], 1e-5 + 1e-4 * std::abs(once[i])) << i;
}

// A forward-only pass runs its MLPs a slice of rows at a time (the last slice shorter),
// with h and relu(h)^2 sized to the slice: the same loss in every activation mode and with
// bf16 matmuls (whose held codes then cover a slice). Not bit for bit: OpenBLAS sums a
// product's terms in an order that depends on its row count (as cuBLASLt's algorithm
// choice does), so float32 rounding differs (~2e-8 here), and with bf16 operands or
// activations an activation then and again rounds the other way: ~4e-6, and with both, where
// attention's inputs are rounded too, a flipped q, k or v code moves this random-parameter
// model's loss by up to 1.6e-4 (measured over seeds 7-12: 1.6e-4 once, 0 five times). A
// slice misplaced or skipped moves the loss by 0.33.
TEST(GPT, ForwardOnlyMlpRunsInSlicesOfRowsWithTheSameLoss) {
  const Config c = Config::preset("micro");
  constexpr int kT = 320, kSlice = 128;  // slices of 128, 128 and 64 rows
  const auto inputs = tokens_with_documents(kT, c, 8, 37), targets = random_tokens(kT, c.vocab_size, 9);
  for (MatmulPrecision matmul : {MatmulPrecision::kFloat32, MatmulPrecision::kBfloat16}) {
    for (ActivationPrecision precision : {ActivationPrecision::kFloat32, ActivationPrecision::kBfloat16}) {
      BackendOptions options;
      options.matmul = matmul;
      auto be = make_cpu_backend(options);
      ActivationOptions whole{ActivationMemory::kRecompute, precision}, sliced = whole;
      whole.forward_mlp_rows = kT;
      sliced.forward_mlp_rows = kSlice;
      GPT a(c, *be, 64, kT, whole), b(c, *be, 64, kT, sliced);
      const auto params = random_vector(a.layout().total(), 7, 0.5f);
      a.load_parameters(params);
      b.load_parameters(params);
      const double loss = a.forward(inputs, targets, 3);
      EXPECT_TRUE(std::isfinite(loss));
      const bool bf16_matmul = matmul == MatmulPrecision::kBfloat16;
      const bool bf16_activations = precision == ActivationPrecision::kBfloat16;
      // Float32 throughout, slicing changes only the products' summation order (OpenBLAS
      // blocks a 128-row product unlike a 320-row one). Where anything is rounded to bf16, such
      // a last-bit difference can move one element to the neighbouring bf16 code, a 2^-8 step
      // that moves its token's loss: measured over 8 parameter draws, up to 3.2e-4 with bf16
      // activations alone, 2.4e-5 with bf16 products alone, often exactly 0.
      const double band = bf16_matmul || bf16_activations ? 5e-4 : 2e-7;
      EXPECT_NEAR(b.forward(inputs, targets, 3), loss, band);
      // h and relu(h)^2's floats, and with bf16 activations relu(h)^2's codes.
      EXPECT_EQ(a.activation_bytes() - b.activation_bytes(),
                static_cast<size_t>(kT - kSlice) * c.mlp_dim() * (sizeof(float) + (bf16_activations ? 2 : 0)));
      EXPECT_EQ(GPT::plan_memory(c, 64, kT, sliced, be->head_chunk_rows()).activation_bytes(), b.activation_bytes());
    }
  }
  auto be = make_cpu_backend();
  ActivationOptions none;
  none.forward_mlp_rows = 0;
  EXPECT_THROW(GPT(c, *be, 64, kT, none), Error);
}

// A forward-only pass lends the arena it leaves unused (MemoryPlan::forward_spare_bytes) to
// the backend's scratch, and reads none of it: with the loan filled with NaN the loss is
// the same bits; a training pass afterwards overwrites it before reading it. A pass that
// fills the arena lends nothing.
TEST(GPT, AForwardOnlyPassLendsTheArenaItLeavesUnusedAndReadsNoneOfIt) {
  const Config c = Config::preset("micro");
  for (ActivationOptions activations : {ActivationOptions{ActivationMemory::kStore, ActivationPrecision::kFloat32},
                                        ActivationOptions{ActivationMemory::kRecompute, ActivationPrecision::kBfloat16}}) {
    BackendOptions clean_options, poisoned;
    clean_options.head_chunk_rows = poisoned.head_chunk_rows = 32;  // as above: micro's logits outweigh the rest
    poisoned.poison_lent_scratch = true;
    auto clean_be = make_cpu_backend(clean_options), poisoned_be = make_cpu_backend(poisoned);
    std::map<std::string, OpStats> stats;
    auto counted = make_profiling_backend(*poisoned_be, stats);
    GPT clean(c, *clean_be, 256, 128, activations), lender(c, *counted, 256, 128, activations);
    const GPT::MemoryPlan plan = GPT::plan_memory(c, 256, 128, activations, clean_be->head_chunk_rows());
    EXPECT_GT(plan.forward_spare_bytes(), plan.training_bytes / 2);  // a long training sequence, a short one here
    const auto params = random_vector(clean.layout().total(), 7, 0.5f);
    clean.load_parameters(params);
    lender.load_parameters(params);
    const auto short_in = tokens_with_documents(128, c, 8, 37), short_out = random_tokens(128, c.vocab_size, 9);
    const double loss = clean.forward(short_in, short_out, 3);
    ASSERT_TRUE(std::isfinite(loss));
    EXPECT_EQ(lender.forward(short_in, short_out, 3), loss);
    EXPECT_EQ(stats["lend_scratch"].calls, 1);
    const auto in = tokens_with_documents(256, c, 10, 37), out = random_tokens(256, c.vocab_size, 11);
    clean.zero_grad();
    lender.zero_grad();
    EXPECT_EQ(lender.forward_backward(in, out, 3, 1.f), clean.forward_backward(in, out, 3, 1.f));
    EXPECT_EQ(lender.gradients_to_host(), clean.gradients_to_host());
    EXPECT_EQ(stats["lend_scratch"].calls, 1);  // training lends nothing
  }
  const GPT::MemoryPlan full = GPT::plan_memory(c, 64, 4096, {}, kCpuHeadChunkRows);
  EXPECT_EQ(full.forward_spare_bytes(), 0u);
}

// The plan `speedrun memory` prints is what the model and the optimiser allocate, in
// both activation modes, whether the training or the forward-only buffers fill the arena.
// The head's logits chunk takes no memory of its own while it fits the training pass's
// block-gradient buffer (micro at T = 64: max(T x 4d, 4 T hd) = 4096 floats, 10 rows of its
// padded vocabulary of 384), and beyond that only what it adds to that buffer. A forward-only
// pass holds it beside its own buffers where y's floats are too small for it.
TEST(GPT, TheLogitsChunkLivesInTheBlockGradientsBuffer) {
  const Config c = Config::preset("micro");
  const size_t V = c.padded_vocab(), block_gradients = 64 * c.mlp_dim();
  ASSERT_EQ(V, 384u);
  ASSERT_EQ(block_gradients, 4u * 64 * c.hidden_dim());
  auto training_bytes = [&](int rows) { return GPT::plan_memory(c, 64, 64, {}, rows).training_bytes; };
  EXPECT_EQ(training_bytes(10), training_bytes(1));
  EXPECT_EQ(training_bytes(32) - training_bytes(1), (32 * V - block_gradients) * sizeof(float));
  // Rows beyond the pass's sequence are never computed: a chunk taller than it holds its T rows.
  EXPECT_EQ(training_bytes(256), training_bytes(64));
  auto forward_bytes = [&](int rows) { return GPT::plan_memory(c, 64, 256, {}, rows).forward_only_bytes; };
  EXPECT_EQ(forward_bytes(32) - forward_bytes(16), 16 * V * sizeof(float));
}

// (mlp_ratio 1: h too small to hold the skip and value-embedding gradients as bf16 codes.)
void expect_plan_is_allocated(const Config& c, ActivationOptions activations, int eval_T) {
  auto be = make_cpu_backend();
  const GPT::MemoryPlan plan = GPT::plan_memory(c, 64, eval_T, activations, be->head_chunk_rows());
  GPT model(c, *be, 64, eval_T, activations);
  Optimizer optimizer(c, model.layout(), *be);
  EXPECT_EQ(model.activation_bytes(), plan.activation_bytes()) << eval_T;
  EXPECT_EQ(be->peak_memory_bytes(), plan.total_bytes() + Optimizer::memory_bytes(model.layout())) << eval_T;
  EXPECT_EQ(plan.arena_bytes(), eval_T == 4096 ? plan.forward_only_bytes : plan.training_bytes) << eval_T;
}

TEST(GPT, MemoryPlanIsWhatTheModelAndTheOptimizerAllocate) {
  Config narrow = Config::preset("micro");
  narrow.mlp_ratio = 1;
  for (const Config& c : {Config::preset("micro"), narrow}) {
    for (ActivationMemory memory :
         {ActivationMemory::kStore, ActivationMemory::kRecompute, ActivationMemory::kRecomputeRelu2}) {
      for (ActivationPrecision precision : {ActivationPrecision::kFloat32, ActivationPrecision::kBfloat16}) {
        for (int eval_T : {64, 4096}) expect_plan_is_allocated(c, {memory, precision}, eval_T);
      }
    }
  }
}

TEST(GPT, RejectsSequencesThatDoNotFit) {
  auto be = make_cpu_backend();
  GPT model(Config::preset("micro"), *be, 64, 128);
  std::vector<int32_t> t(60, 1);
  EXPECT_THROW(model.forward(t, t, 1), Error);
  std::vector<int32_t> big(128, 1);
  EXPECT_NO_THROW(model.forward(big, big, 1));
  EXPECT_THROW(model.forward_backward(big, big, 1, 1.f), Error);
  std::vector<int32_t> bad(64, 1);
  bad[3] = 300;
  EXPECT_THROW(model.forward(bad, bad, 1), Error);
}

}  // namespace
}  // namespace speedrun
