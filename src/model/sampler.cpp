// Incremental decoding with the same arithmetic as GPT's forward pass (model/gpt.cpp),
// one token at a time on host copies of the parameters, and the sampling rule.
#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "util/error.h"

namespace speedrun {
namespace {

// out[o] = sum_i W[o, i] x[i], W stored [out, in].
void matvec(float* out, const float* W, const float* x, int out_dim, int in_dim) {
  for (int o = 0; o < out_dim; ++o) {
    const float* row = W + static_cast<size_t>(o) * in_dim;
    float sum = 0.f;
    for (int i = 0; i < in_dim; ++i) sum += row[i] * x[i];
    out[o] = sum;
  }
}

void rmsnorm(float* out, const float* x, int dim, float eps) {
  float sum_sq = 0.f;
  for (int i = 0; i < dim; ++i) sum_sq += x[i] * x[i];
  const float s = 1.f / std::sqrt(sum_sq / dim + eps);
  for (int i = 0; i < dim; ++i) out[i] = x[i] * s;
}

std::string block_prefix(int layer) { return "blocks." + std::to_string(layer) + "."; }

}  // namespace

Sampler::Sampler(GPT& model, int long_window_blocks)
    : config_(model.config()), layout_(config_), params_(model.parameters_to_host()), long_window_(long_window_blocks) {
  const int quarter = config_.head_dim / 4;
  rotary_freq_.assign(config_.head_dim / 2, 0.f);
  for (int i = 0; i < quarter; ++i) {
    const double exponent = quarter > 1 ? static_cast<double>(i) / (quarter - 1) : 0.0;
    rotary_freq_[i] = static_cast<float>(std::pow(1.0 / config_.rotary_base, exponent));
  }
  cache_.resize(config_.num_layers);
  ve_.assign(config_.num_value_embeds, std::vector<float>(config_.model_dim));
  x0_.resize(config_.model_dim);
  logits_.resize(config_.padded_vocab());
}

const float* Sampler::param(const std::string& name) const { return params_.data() + layout_.at(name).offset; }

const std::vector<float>& Sampler::feed(int32_t token) {
  if (token < 0 || token >= config_.vocab_size) {
    throw Error("token id " + std::to_string(token) + " is outside the model's vocabulary (vocab_size " +
                std::to_string(config_.vocab_size) + ")");
  }
  const int d = config_.model_dim;
  token_ = token;
  if (token == config_.document_separator) ++doc_now_;
  doc_.push_back(doc_now_);

  // x0 = rmsnorm(embed[tok]); the value embeddings of this token.
  rmsnorm(x0_.data(), param("embed.weight") + static_cast<size_t>(token) * d, d,
          static_cast<float>(config_.rmsnorm_eps));
  for (int j = 0; j < config_.num_value_embeds; ++j) {
    const float* row = param("value_embeds.embed." + std::to_string(j) + ".weight") + static_cast<size_t>(token) * d;
    std::copy(row, row + d, ve_[j].begin());
  }
  // Encoder outputs go on the U-net stack; decoder layer half+j adds skip_weights[j] * pop().
  const int L = config_.num_layers, half = config_.num_encoder_layers();
  const float* skip = param("skip_weights");
  std::vector<std::vector<float>> stack;
  std::vector<float> x = x0_;
  for (int i = 0; i < L; ++i) {
    if (i >= half) {
      const std::vector<float>& popped = stack[half - 1 - (i - half)];
      for (int c = 0; c < d; ++c) x[c] = x[c] + skip[i - half] * popped[c];
    }
    block(i, x);
    if (i < half) stack.push_back(x);
  }
  head(x);
  ++position_;
  drop_invisible_keys();
  return logits_;
}

void Sampler::block(int layer, std::vector<float>& x) {
  const int d = config_.model_dim, mlp = config_.mlp_dim();
  const float eps = static_cast<float>(config_.rmsnorm_eps);
  const std::string prefix = block_prefix(layer);
  const float* lambdas = param(prefix + "lambdas");
  std::vector<float> x1(d), normed(d);
  for (int c = 0; c < d; ++c) x1[c] = lambdas[0] * x[c] + lambdas[1] * x0_[c];
  if (config_.layer_has_attention(layer)) {
    rmsnorm(normed.data(), x1.data(), d, eps);
    std::vector<float> projected(d);
    attention(layer, normed.data(), projected);
    for (int c = 0; c < d; ++c) x1[c] = projected[c] + x1[c];
  }
  rmsnorm(normed.data(), x1.data(), d, eps);
  std::vector<float> h(mlp);
  matvec(h.data(), param(prefix + "mlp.c_fc.weight"), normed.data(), mlp, d);
  for (float& v : h) v = v > 0.f ? v * v : 0.f;
  matvec(x.data(), param(prefix + "mlp.c_proj.weight"), h.data(), d, mlp);
  for (int c = 0; c < d; ++c) x[c] = x[c] + x1[c];
}

void Sampler::attention(int layer, const float* normed, std::vector<float>& out) {
  const int d = config_.model_dim, hd = config_.hidden_dim(), H = config_.num_heads, D = config_.head_dim;
  const float eps = static_cast<float>(config_.rmsnorm_eps);
  const std::string prefix = block_prefix(layer);
  const float* qkv = param(prefix + "attn.qkv_w");
  const size_t w = static_cast<size_t>(hd) * d;
  std::vector<float> q(hd), k(hd), v(hd);
  matvec(q.data(), qkv, normed, hd, d);
  matvec(k.data(), qkv + w, normed, hd, d);
  matvec(v.data(), qkv + 2 * w, normed, hd, d);
  // Per-head q/k norm, then rotary at the absolute position (not reset at documents).
  const int half = D / 2;
  for (int h = 0; h < H; ++h) {
    for (float* head : {q.data() + h * D, k.data() + h * D}) {
      rmsnorm(head, head, D, eps);
      for (int i = 0; i < half; ++i) {
        const float theta = static_cast<float>(position_) * rotary_freq_[i];
        const float c = std::cos(theta), s = std::sin(theta);
        const float x1 = head[i], x2 = head[i + half];
        head[i] = x1 * c + x2 * s;
        head[i + half] = -x1 * s + x2 * c;
      }
    }
  }
  const float* lambdas = param(prefix + "attn.lambdas");
  const int ve = config_.value_embed_of_layer(layer);
  for (int c = 0; c < hd; ++c) v[c] = ve >= 0 ? lambdas[0] * v[c] + lambdas[1] * ve_[ve][c] : lambdas[0] * v[c];
  LayerCache& cache = cache_[layer];
  cache.k.insert(cache.k.end(), k.begin(), k.end());
  cache.v.insert(cache.v.end(), v.begin(), v.end());

  // SPEC §3's per-element rule: k <= q, same document, q/block - k/block < max(N, 1).
  const int block = config_.attn_block_size;
  const int window = std::max(1, config_.layer_uses_long_window(layer) ? long_window_ : short_window_blocks(long_window_));
  const int t = position_;
  const int first = std::max(first_cached_, (t / block - (window - 1)) * block);
  const float scale = static_cast<float>(config_.attn_scale);
  std::vector<float> y(hd, 0.f), scores;
  for (int h = 0; h < H; ++h) {
    const float* qh = q.data() + h * D;
    scores.assign(t - first + 1, -INFINITY);
    float max_score = -INFINITY;
    for (int key = first; key <= t; ++key) {
      if (doc_[key - first_cached_] != doc_now_) continue;
      const float* kh = cache.k.data() + static_cast<size_t>(key - first_cached_) * hd + h * D;
      float dot = 0.f;
      for (int i = 0; i < D; ++i) dot += qh[i] * kh[i];
      scores[key - first] = scale * dot;
      max_score = std::max(max_score, scores[key - first]);
    }
    float total = 0.f;
    for (float& s : scores) total += (s = std::exp(s - max_score));
    float* yh = y.data() + h * D;
    for (int key = first; key <= t; ++key) {
      const float p = scores[key - first] / total;
      if (p == 0.f) continue;
      const float* vh = cache.v.data() + static_cast<size_t>(key - first_cached_) * hd + h * D;
      for (int i = 0; i < D; ++i) yh[i] += p * vh[i];
    }
  }
  matvec(out.data(), param(prefix + "attn.c_proj.weight"), y.data(), d, hd);
}

void Sampler::head(const std::vector<float>& x) {
  const int d = config_.model_dim, V = config_.padded_vocab();
  std::vector<float> normed(d);
  rmsnorm(normed.data(), x.data(), d, static_cast<float>(config_.rmsnorm_eps));
  matvec(logits_.data(), param("lm_head.weight"), normed.data(), V, d);
  const float c = static_cast<float>(config_.logit_softcap);
  for (float& z : logits_) z = 2.f * c / (1.f + std::exp(z * (-2.f / c)));  // 2c sigmoid(z / (c/2))
}

// No later query sees a key before the current document's start or before the long
// window's first block; once enough such keys pile up they are dropped.
void Sampler::drop_invisible_keys() {
  const int block = config_.attn_block_size;
  const int span = std::max(1, long_window_) * block;
  const int t = position_;  // the next query's position
  int keep_from = std::max(first_cached_, (t / block - (std::max(1, long_window_) - 1)) * block);
  while (keep_from < t && doc_[keep_from - first_cached_] != doc_now_) ++keep_from;
  if (keep_from - first_cached_ <= span) return;
  const int drop = keep_from - first_cached_;
  doc_.erase(doc_.begin(), doc_.begin() + drop);
  const size_t hd = config_.hidden_dim();
  for (LayerCache& cache : cache_) {
    if (cache.k.empty()) continue;
    cache.k.erase(cache.k.begin(), cache.k.begin() + drop * hd);
    cache.v.erase(cache.v.begin(), cache.v.begin() + drop * hd);
  }
  first_cached_ = keep_from;
}

TokenChooser::TokenChooser(const SamplingOptions& options, int vocab_size)
    : options_(options), vocab_size_(vocab_size), rng_(options.seed) {
  if (!(options.temperature >= 0) || !std::isfinite(options.temperature)) {
    throw UsageError("--temperature must be >= 0, got " + std::to_string(options.temperature));
  }
  if (options.top_k < 0) throw UsageError("--top-k must be >= 0, got " + std::to_string(options.top_k));
}

double TokenChooser::uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

int32_t TokenChooser::choose(std::span<const float> logits) {
  const int n = std::min<int>(vocab_size_, static_cast<int>(logits.size()));
  // A NaN logit would make any choice arbitrary (argmax over NaN gives token 0).
  for (int i = 0; i < n; ++i) {
    if (!std::isfinite(logits[i])) {
      throw Error("the model's logit for token " + std::to_string(i) + " is not finite (" +
                  std::to_string(logits[i]) + "): its weights have overflowed, so it cannot be sampled");
    }
  }
  if (options_.temperature == 0) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.begin() + n) - logits.begin());
  }
  // Candidates by descending logit (ties by id, so the order is fully determined).
  std::vector<int32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  const int k = options_.top_k > 0 ? std::min(options_.top_k, n) : n;
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), by_logit);
  ids.resize(k);
  std::vector<double> weights(k);
  const double top = logits[ids[0]];
  double total = 0;
  for (int i = 0; i < k; ++i) total += weights[i] = std::exp((logits[ids[i]] - top) / options_.temperature);
  double r = uniform() * total;
  for (int i = 0; i < k; ++i) {
    if ((r -= weights[i]) < 0) return ids[i];
  }
  return ids[k - 1];
}

std::vector<int32_t> generate(Sampler& sampler, std::span<const int32_t> prompt, int max_new_tokens,
                              TokenChooser& chooser, const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) throw UsageError("generation needs at least one prompt token");
  const std::vector<float>* logits = nullptr;
  for (int32_t token : prompt) logits = &sampler.feed(token);
  std::vector<int32_t> generated;
  for (int i = 0; i < max_new_tokens; ++i) {
    const int32_t next = chooser.choose(*logits);
    generated.push_back(next);
    if (on_token) on_token(next);
    if (i + 1 < max_new_tokens) logits = &sampler.feed(next);
  }
  return generated;
}

}  // namespace speedrun
