// The model's forward pass against SPEC §2-§3 transcribed literally: a float64 reference
// written from the spec's text alone (its constants are the spec's numbers, not the
// config's), loop by loop, with no code shared with src/model or the backends. Every
// other model test compares the model with itself (finite differences, recomputation,
// chunking); this one says that what it computes is the recipe.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "model/config.h"
#include "model/gpt.h"
#include "model/params.h"

namespace speedrun {
namespace {

// A change to one detail of the spec: the test shows that each would be seen.
enum class Deviation {
  kNone,
  kScaleOneOverSqrtD,           // §2.5: the scale is 0.12, not 1/sqrt(D)
  kSoftcap30,                   // §2.8: softcap 15
  kRotaryBase10000,             // §2.6: (1/1024)^(i/(D/4-1))
  kRotaryInterleaved,           // §2.6: rotate the halves [x1 | x2], not pairs (2i, 2i+1)
  kDecoderValueTablesReversed,  // §2.2: layers L-k..L-1 use tables 0..k-1 in that order
  kSkipsFirstInFirstOut,        // §2.3: the decoder pops the encoder's stack
  kDecoderWindowsNotReversed,   // §3: the decoder's window pattern is the encoder's reversed
  kNoDocumentMask,              // §3: a key of another document is never visible
};

constexpr double kRmsnormEps = 1.1920929e-07;  // §2: float32 machine epsilon

class SpecModel {
 public:
  SpecModel(const Config& c, const ParamLayout& layout, const std::vector<float>& params, Deviation deviation)
      : c_(c), layout_(layout), params_(params), deviation_(deviation) {}

  // Mean cross-entropy of one packed sequence with a long window of N blocks (§2.1-§2.8).
  double loss(const std::vector<int32_t>& tok, const std::vector<int32_t>& targets, int long_window) {
    const int T = static_cast<int>(tok.size()), d = c_.model_dim, L = c_.num_layers;
    doc_.assign(T, 0);
    for (int t = 0, count = 0; t < T; ++t) doc_[t] = count += tok[t] == c_.document_separator;
    Rows x0 = embed("embed.weight", tok);
    for (auto& row : x0) row = rmsnorm(row);
    Rows x = x0;
    std::vector<Rows> stack;
    for (int i = 0; i < L; ++i) {
      if (i >= L / 2) {
        const float skip = tensor("skip_weights")[i - L / 2];
        const Rows popped = deviation_ == Deviation::kSkipsFirstInFirstOut ? stack.front() : stack.back();
        stack.erase(deviation_ == Deviation::kSkipsFirstInFirstOut ? stack.begin() : stack.end() - 1);
        for (int t = 0; t < T; ++t) {
          for (int e = 0; e < d; ++e) x[t][e] += skip * popped[t][e];
        }
      }
      x = block(i, x, x0, tok, long_window);
      if (i < L / 2) stack.push_back(x);
    }
    return head(x, targets);
  }

 private:
  using Rows = std::vector<std::vector<double>>;  // [T][width]

  const float* tensor(const std::string& name) const { return params_.data() + layout_.at(name).offset; }
  std::string layer(int i) const { return "blocks." + std::to_string(i) + "."; }

  Rows embed(const std::string& table, const std::vector<int32_t>& tok) const {
    const float* w = tensor(table);
    Rows out(tok.size(), std::vector<double>(c_.model_dim));
    for (size_t t = 0; t < tok.size(); ++t) {
      for (int e = 0; e < c_.model_dim; ++e) out[t][e] = w[static_cast<size_t>(tok[t]) * c_.model_dim + e];
    }
    return out;
  }

  static std::vector<double> rmsnorm(const std::vector<double>& x) {
    double sum = 0;
    for (double v : x) sum += v * v;
    const double scale = 1.0 / std::sqrt(sum / static_cast<double>(x.size()) + kRmsnormEps);
    std::vector<double> y(x.size());
    for (size_t e = 0; e < x.size(); ++e) y[e] = x[e] * scale;
    return y;
  }

  // x @ W^T with W stored [out, in] (the PyTorch convention, §0).
  static Rows linear(const Rows& x, const float* w, int out, int in) {
    Rows y(x.size(), std::vector<double>(out));
    for (size_t t = 0; t < x.size(); ++t) {
      for (int o = 0; o < out; ++o) {
        double sum = 0;
        for (int e = 0; e < in; ++e) sum += static_cast<double>(w[static_cast<size_t>(o) * in + e]) * x[t][e];
        y[t][o] = sum;
      }
    }
    return y;
  }

  // §2.4: the lambda mix, then attention and the MLP, each on the rmsnorm of the stream.
  Rows block(int i, Rows x, const Rows& x0, const std::vector<int32_t>& tok, int long_window) {
    const float* lambdas = tensor(layer(i) + "lambdas");
    for (size_t t = 0; t < x.size(); ++t) {
      for (int e = 0; e < c_.model_dim; ++e) x[t][e] = lambdas[0] * x[t][e] + lambdas[1] * x0[t][e];
    }
    if (layout_.contains(layer(i) + "attn.qkv_w")) add(x, attention(i, normed(x), tok, long_window));
    add(x, mlp(i, normed(x)));
    return x;
  }

  static Rows normed(const Rows& x) {
    Rows y;
    for (const auto& row : x) y.push_back(rmsnorm(row));
    return y;
  }
  static void add(Rows& x, const Rows& y) {
    for (size_t t = 0; t < x.size(); ++t) {
      for (size_t e = 0; e < x[t].size(); ++e) x[t][e] += y[t][e];
    }
  }

  // §2.2: layers 0..k-1 use tables 0..k-1, layers L-k..L-1 tables 0..k-1, the rest none.
  int value_table(int i) const {
    const int L = c_.num_layers, k = c_.num_value_embeds;
    if (i < k) return i;
    if (i < L - k) return -1;
    return deviation_ == Deviation::kDecoderValueTablesReversed ? L - 1 - i : i - (L - k);
  }

  // §3: the encoder's pattern per layer, reversed for the decoder; long N, short N / 2.
  int window_of(int i, int long_window) const {
    const int L = c_.num_layers;
    const bool reversed = deviation_ != Deviation::kDecoderWindowsNotReversed;
    const int index = i < L / 2 ? i : (reversed ? L - 1 - i : i - L / 2);
    return c_.encoder_windows[index] == 'L' ? long_window : long_window / 2;
  }

  // §3's equivalent rule: k <= q, the same document, fewer than max(N, 1) blocks apart.
  bool visible(int q, int k, int window) const {
    const int block = c_.attn_block_size;
    const bool same_document = deviation_ == Deviation::kNoDocumentMask || doc_[q] == doc_[k];
    return k <= q && same_document && q / block - k / block < std::max(window, 1);
  }

  // §2.6: half-truncated rotary at absolute position t, angles in float32.
  std::vector<double> rotary(const std::vector<double>& x, int t) const {
    const int D = static_cast<int>(x.size()), quarter = D / 4, half = D / 2;
    const float base = deviation_ == Deviation::kRotaryBase10000 ? 10000.f : 1024.f;
    std::vector<double> y(D);
    for (int i = 0; i < half; ++i) {
      const float f = i < quarter ? std::pow(1.f / base, static_cast<float>(i) / static_cast<float>(quarter - 1)) : 0.f;
      const float theta = static_cast<float>(t) * f;
      const double cos = std::cos(static_cast<double>(theta)), sin = std::sin(static_cast<double>(theta));
      const bool pairs = deviation_ == Deviation::kRotaryInterleaved;
      const int a = pairs ? 2 * i : i, b = pairs ? 2 * i + 1 : i + half;
      y[a] = x[a] * cos + x[b] * sin;
      y[b] = -x[a] * sin + x[b] * cos;
    }
    return y;
  }

  // §2.5.
  Rows attention(int i, const Rows& xn, const std::vector<int32_t>& tok, int long_window) {
    const int T = static_cast<int>(xn.size()), d = c_.model_dim, H = c_.num_heads, D = c_.head_dim, hdim = H * D;
    const float* qkv = tensor(layer(i) + "attn.qkv_w");
    const Rows q = linear(xn, qkv, hdim, d), k = linear(xn, qkv + static_cast<size_t>(hdim) * d, hdim, d);
    Rows v = linear(xn, qkv + 2 * static_cast<size_t>(hdim) * d, hdim, d);
    const float* lambdas = tensor(layer(i) + "attn.lambdas");
    const int table = value_table(i);
    const Rows ve = table >= 0 ? embed("value_embeds.embed." + std::to_string(table) + ".weight", tok) : Rows();
    for (int t = 0; t < T; ++t) {
      for (int e = 0; e < hdim; ++e) v[t][e] = lambdas[0] * v[t][e] + (table >= 0 ? lambdas[1] * ve[t][e] : 0.0);
    }
    const double scale = deviation_ == Deviation::kScaleOneOverSqrtD ? 1.0 / std::sqrt(D) : 0.12;
    const int window = window_of(i, long_window);
    Rows y(T, std::vector<double>(hdim, 0.0));
    for (int h = 0; h < H; ++h) {
      auto head_of = [&](const Rows& m, int t) {
        std::vector<double> part(m[t].begin() + h * D, m[t].begin() + (h + 1) * D);
        return rotary(rmsnorm(part), t);
      };
      std::vector<std::vector<double>> qh(T), kh(T);
      for (int t = 0; t < T; ++t) qh[t] = head_of(q, t), kh[t] = head_of(k, t);
      for (int tq = 0; tq < T; ++tq) {
        std::vector<double> score(T, -INFINITY);
        double top = -INFINITY;
        for (int tk = 0; tk <= tq; ++tk) {
          if (!visible(tq, tk, window)) continue;
          double dot = 0;
          for (int e = 0; e < D; ++e) dot += qh[tq][e] * kh[tk][e];
          score[tk] = scale * dot;
          top = std::max(top, score[tk]);
        }
        double total = 0;
        for (int tk = 0; tk <= tq; ++tk) total += std::isinf(score[tk]) ? 0.0 : std::exp(score[tk] - top);
        for (int tk = 0; tk <= tq; ++tk) {
          if (std::isinf(score[tk])) continue;
          const double p = std::exp(score[tk] - top) / total;
          for (int e = 0; e < D; ++e) y[tq][h * D + e] += p * v[tk][h * D + e];
        }
      }
    }
    return linear(y, tensor(layer(i) + "attn.c_proj.weight"), d, hdim);
  }

  // §2.7: c_proj(relu(c_fc x)^2).
  Rows mlp(int i, const Rows& xn) const {
    const int d = c_.model_dim, hidden = c_.mlp_ratio * d;
    Rows h = linear(xn, tensor(layer(i) + "mlp.c_fc.weight"), hidden, d);
    for (auto& row : h) {
      for (double& value : row) value = value > 0 ? value * value : 0.0;
    }
    return linear(h, tensor(layer(i) + "mlp.c_proj.weight"), d, hidden);
  }

  // §2.8: softcapped logits over every padded row, mean cross-entropy.
  double head(const Rows& x, const std::vector<int32_t>& targets) const {
    const int rows = static_cast<int>(layout_.at("lm_head.weight").shape[0]);
    const double cap = deviation_ == Deviation::kSoftcap30 ? 30.0 : 15.0;
    const Rows logits = linear(normed(x), tensor("lm_head.weight"), rows, c_.model_dim);
    double total = 0;
    for (size_t t = 0; t < x.size(); ++t) {
      std::vector<double> z(rows);
      double top = -INFINITY;
      for (int r = 0; r < rows; ++r) top = std::max(top, z[r] = 2 * cap / (1 + std::exp(-logits[t][r] / (cap / 2))));
      double sum = 0;
      for (double value : z) sum += std::exp(value - top);
      total += top + std::log(sum) - z[targets[t]];
    }
    return total / static_cast<double>(x.size());
  }

  const Config& c_;
  const ParamLayout& layout_;
  const std::vector<float>& params_;
  Deviation deviation_;
  std::vector<int32_t> doc_;
};

// Every parameter random (no zero head or projections) so that every path carries signal;
// lambdas and skip weights near their working range.
std::vector<float> random_parameters(const ParamLayout& layout, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 0.5f);
  std::vector<float> p(layout.total(), 0.f);
  for (const ParamSpec& s : layout.specs()) {
    const bool mix = s.name.find("lambdas") != std::string::npos || s.name == "skip_weights";
    for (size_t i = 0; i < s.count; ++i) p[s.offset + i] = mix ? 0.6f + 0.15f * normal(rng) : normal(rng);
  }
  return p;
}

// Tokens with the config's separator at random places, about one in `every`.
std::vector<int32_t> tokens(const Config& c, int T, uint64_t seed, int every) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(T);
  for (int32_t& x : t) x = rng() % every == 0 ? c.document_separator : static_cast<int32_t>(rng() % c.vocab_size);
  return t;
}

// micro (D = 8: two rotary frequencies) and micro with one head of 16 (four frequencies).
std::vector<Config> configs() {
  Config micro = Config::preset("micro");
  Config one_head = micro;
  one_head.num_heads = 1;
  one_head.head_dim = 16;
  return {micro, one_head};
}

constexpr double kTolerance = 5e-7;  // relative: float32 model against float64 reference (4e-8 seen)

TEST(SpecModel, ForwardLossIsSpecSection2ForEveryWindow) {
  for (const Config& c : configs()) {
    auto backend = make_cpu_backend();
    const int T = 64;  // 8 blocks of 8
    GPT model(c, *backend, T, T);
    const std::vector<float> params = random_parameters(model.layout(), 7);
    model.load_parameters(params);
    const std::vector<int32_t> in = tokens(c, T, 11, 13), out = tokens(c, T, 12, 1 << 30);
    for (int window : {0, 1, 2, 3, 8}) {
      SCOPED_TRACE("head_dim " + std::to_string(c.head_dim) + ", window " + std::to_string(window));
      const double expected = SpecModel(c, model.layout(), params, Deviation::kNone).loss(in, out, window);
      const double got = model.forward(in, out, window);
      EXPECT_NEAR(got, expected, kTolerance * expected);
      model.zero_grad();
      EXPECT_NEAR(model.forward_backward(in, out, window, 1.f), expected, kTolerance * expected);
    }
  }
}

// The comparison is sharp enough to see each detail: a reference that changes one of them
// misses the model's loss by far more than the tolerance.
TEST(SpecModel, EachDeviationFromTheSpecIsSeen) {
  const Config c = configs()[1];
  auto backend = make_cpu_backend();
  const int T = 64;
  GPT model(c, *backend, T, T);
  const std::vector<float> params = random_parameters(model.layout(), 7);
  model.load_parameters(params);
  const std::vector<int32_t> in = tokens(c, T, 11, 13), out = tokens(c, T, 12, 1 << 30);
  const int window = 3;  // long 3, short 1: the two differ
  const double got = model.forward(in, out, window);
  for (Deviation deviation :
       {Deviation::kScaleOneOverSqrtD, Deviation::kSoftcap30, Deviation::kRotaryBase10000,
        Deviation::kRotaryInterleaved, Deviation::kDecoderValueTablesReversed, Deviation::kSkipsFirstInFirstOut,
        Deviation::kDecoderWindowsNotReversed, Deviation::kNoDocumentMask}) {
    const double deviated = SpecModel(c, model.layout(), params, deviation).loss(in, out, window);
    EXPECT_GT(std::abs(deviated - got), 20 * kTolerance * got) << "deviation " << static_cast<int>(deviation);
  }
}

// The presets' numbers are SPEC's (§2-§5); the tests above see them used.
TEST(SpecModel, DefaultsAreTheSpecsNumbers) {
  const Config c = Config::preset("speedrun-124m");
  EXPECT_EQ(c.vocab_size, 50257);
  EXPECT_EQ(c.padded_vocab(), 50304);
  EXPECT_EQ(c.document_separator, 50256);
  EXPECT_EQ(c.num_layers, 12);
  EXPECT_EQ(c.model_dim, 768);
  EXPECT_EQ(c.num_heads, 6);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.mlp_dim(), 3072);
  EXPECT_EQ(c.no_attn_layers, std::vector<int>{7});
  EXPECT_EQ(c.num_value_embeds, 3);
  EXPECT_EQ(c.encoder_windows, "LSSSLS");
  EXPECT_EQ(c.attn_block_size, 128);
  EXPECT_EQ(c.attn_scale, 0.12);
  EXPECT_EQ(c.logit_softcap, 15.0);
  EXPECT_EQ(c.rotary_base, 1024.0);
  EXPECT_EQ(static_cast<float>(c.rmsnorm_eps), 1.1920929e-07f);
  EXPECT_EQ(c.world_size, 8);
  EXPECT_EQ(c.seq_len, 49152);
  EXPECT_EQ(c.val_seq_len, 262144);
  EXPECT_EQ(c.val_tokens, 10485760);
  EXPECT_EQ(c.num_iterations, 1770);
  EXPECT_EQ(c.val_every, 125);
  EXPECT_EQ(c.window_final_tokens, 1728);
  EXPECT_EQ(c.lr_lm_head, 0.008);
  EXPECT_EQ(c.lr_embed, 0.6);
  EXPECT_EQ(c.lr_scalar, 0.04);
  EXPECT_EQ(c.lr_muon, 0.05);
  EXPECT_EQ(c.adam_beta1, 0.8);
  EXPECT_EQ(c.adam_beta2, 0.95);
  EXPECT_EQ(c.adam_eps, 1e-10);
  EXPECT_EQ(c.cooldown_frac, 0.4);
  EXPECT_EQ(c.final_lr_frac, 0.1);
  EXPECT_EQ(c.muon_momentum_start, 0.85);
  EXPECT_EQ(c.muon_momentum_end, 0.95);
  EXPECT_EQ(c.muon_momentum_warmup, 300);
  EXPECT_EQ(c.ns_steps, 5);
  EXPECT_EQ(c.ns_a, 3.4445);
  EXPECT_EQ(c.ns_b, -4.7750);
  EXPECT_EQ(c.ns_c, 2.0315);
  // The small presets change sizes, never the recipe's constants.
  for (const std::string& name : {"tiny", "micro"}) {
    const Config small = Config::preset(name);
    EXPECT_EQ(small.attn_scale, c.attn_scale) << name;
    EXPECT_EQ(small.logit_softcap, c.logit_softcap) << name;
    EXPECT_EQ(small.rotary_base, c.rotary_base) << name;
    EXPECT_EQ(small.rmsnorm_eps, c.rmsnorm_eps) << name;
    EXPECT_EQ(small.adam_eps, c.adam_eps) << name;
  }
}

}  // namespace
}  // namespace speedrun
