// Text generation on the CPU: an incremental (one token at a time) forward pass with a
// KV cache that obeys the model's attention mask (SPEC §3: document-causal, sliding
// windows long/short per layer), and the sampling rule (temperature, top-k, seed).
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/gpt.h"

namespace speedrun {

class Sampler {
 public:
  // Copies the model's parameters to host memory (any backend). long_window_blocks is
  // the long window of the step the parameters come from (long_window_blocks(config, step)).
  Sampler(GPT& model, int long_window_blocks);

  // Runs token at the next absolute position (0, 1, ...) and returns the softcapped
  // logits of the next token over all padded_vocab columns. The config's
  // document_separator (50256) starts a document: no earlier key is visible from it or
  // after it.
  const std::vector<float>& feed(int32_t token);
  int position() const { return position_; }
  // Positions whose keys are still cached (old ones no query can see are dropped).
  int cached_positions() const { return static_cast<int>(doc_.size()); }

 private:
  struct LayerCache {
    std::vector<float> k;  // rotated keys [positions, hd]
    std::vector<float> v;  // values after the value-embedding mix [positions, hd]
  };
  const float* param(const std::string& name) const;
  void block(int layer, std::vector<float>& x);
  void attention(int layer, const float* normed, std::vector<float>& out);
  void head(const std::vector<float>& x);
  void drop_invisible_keys();

  Config config_;
  ParamLayout layout_;
  std::vector<float> params_;
  int long_window_;
  int position_ = 0;
  int32_t doc_now_ = 0;
  int first_cached_ = 0;            // absolute position of the cache's first entry
  std::vector<int32_t> doc_;        // per cached position
  std::vector<LayerCache> cache_;   // per layer (empty for layers without attention)
  std::vector<float> rotary_freq_;  // D/2 frequencies (D/4 then zeros)
  // Per-token scratch.
  int32_t token_ = 0;
  std::vector<float> x0_;
  std::vector<std::vector<float>> ve_;
  std::vector<float> logits_;
};

struct SamplingOptions {
  double temperature = 1.0;  // 0: greedy (argmax)
  int top_k = 0;             // 0: all tokens
  uint64_t seed = 0;
};

// Picks tokens from logits: deterministic for a seed. Only ids below vocab_size are
// candidates (the padding columns of the head are no tokens).
class TokenChooser {
 public:
  TokenChooser(const SamplingOptions& options, int vocab_size);
  int32_t choose(std::span<const float> logits);

 private:
  double uniform();  // [0, 1) from the 53 high bits of the generator
  SamplingOptions options_;
  int vocab_size_;
  std::mt19937_64 rng_;
};

// Feeds the prompt, then generates up to max_new_tokens tokens, calling on_token for
// each as it is chosen. Returns the generated tokens.
std::vector<int32_t> generate(Sampler& sampler, std::span<const int32_t> prompt, int max_new_tokens,
                              TokenChooser& chooser, const std::function<void(int32_t)>& on_token = {});

}  // namespace speedrun
