// The run configuration: every number of SPEC §2-§5 is a key whose default is SPEC's
// value. One table of fields drives JSON parsing, --set overrides, validation messages
// and the copy stored in checkpoints, so they cannot disagree.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace speedrun {

// X(type, name, default, help)
#define SPEEDRUN_CONFIG_FIELDS(X)                                                                 \
  /* model (SPEC §2) */                                                                           \
  X(int, vocab_size, 50257, "rows of the embedding tables")                                       \
  X(int, vocab_pad_multiple, 128, "lm_head rows are vocab_size rounded up to this")               \
  X(int, document_separator, 50256, "token starting each document (GPT-2's <|endoftext|>; >= vocab_size: none)") \
  X(int, num_layers, 12, "transformer blocks (even; first half encoder, second half decoder)")    \
  X(int, model_dim, 768, "residual width d")                                                      \
  X(int, num_heads, 6, "attention heads H (H * head_dim == model_dim)")                           \
  X(int, head_dim, 128, "head size D (divisible by 4)")                                           \
  X(int, mlp_ratio, 4, "MLP hidden width / model_dim")                                            \
  X(std::vector<int>, no_attn_layers, (std::vector<int>{7}), "layers without attention")          \
  X(int, num_value_embeds, 3, "value-embedding tables k (layers 0..k-1 and L-k..L-1)")            \
  X(std::string, encoder_windows, "LSSSLS", "long/short window per encoder layer (decoder reversed)") \
  X(int, attn_block_size, 128, "attention block size in tokens (divides seq_len)")                \
  X(double, attn_scale, 0.12, "attention logit scale (a constant, not 1/sqrt(D))")                \
  X(double, logit_softcap, 15.0, "logits = 2c * sigmoid(z / (c/2)) with c = logit_softcap")       \
  X(double, rotary_base, 1024.0, "rotary frequencies (1/base)^(i/(D/4-1))")                       \
  X(double, rmsnorm_eps, 1.1920928955078125e-07, "rmsnorm epsilon (float32 machine epsilon)")     \
  X(double, embed_init_std, 1.0, "std of the normal init of embedding tables")                    \
  X(double, matrix_init_scale, 0.5, "block matrices init U(+-sqrt(3)*scale/sqrt(d))")             \
  X(int, lm_head_fp8, 1, "1: training runs lm_head in FP8 (SPEC §6; evaluation uses the plain head); 0: never") \
  /* data and schedule (SPEC §1, §3, §5) */                                                       \
  X(int, world_size, 8, "logical number of ranks (sequences per step)")                           \
  X(int, seq_len, 49152, "training tokens per rank per step")                                     \
  X(int, val_seq_len, 262144, "validation tokens per rank per window")                            \
  X(int64_t, val_tokens, 10485760, "validation tokens (divisible by world_size * val_seq_len)")   \
  X(int, num_iterations, 1770, "training steps; the schedules follow it")                         \
  X(int, val_every, 125, "validate every this many steps (and at the end)")                       \
  X(double, target_val_loss, 3.28, "validation loss the run aims for (SPEC §5; reported, not enforced)") \
  X(int, window_final_tokens, 1728, "long window at the last step, in tokens (SPEC §3)")          \
  /* optimisation (SPEC §4) */                                                                    \
  X(double, lr_lm_head, 0.008, "Adam lr of lm_head.weight")                                       \
  X(double, lr_embed, 0.6, "Adam lr of the embedding tables")                                     \
  X(double, lr_scalar, 0.04, "Adam lr of lambdas and skip_weights")                               \
  X(double, lr_muon, 0.05, "Muon lr of the block matrices")                                       \
  X(double, adam_beta1, 0.8, "Adam beta1")                                                        \
  X(double, adam_beta2, 0.95, "Adam beta2")                                                       \
  X(double, adam_eps, 1e-10, "Adam epsilon")                                                      \
  X(double, cooldown_frac, 0.4, "fraction of steps over which the lr decays")                     \
  X(double, final_lr_frac, 0.1, "lr multiplier at the last step")                                 \
  X(double, muon_momentum_start, 0.85, "Muon momentum at step 0")                                 \
  X(double, muon_momentum_end, 0.95, "Muon momentum after the warmup")                            \
  X(int, muon_momentum_warmup, 300, "steps of Muon momentum warmup")                              \
  X(int, ns_steps, 5, "Newton-Schulz iterations")                                                 \
  X(double, ns_a, 3.4445, "Newton-Schulz coefficient a")                                          \
  X(double, ns_b, -4.7750, "Newton-Schulz coefficient b")                                         \
  X(double, ns_c, 2.0315, "Newton-Schulz coefficient c")                                          \
  X(int64_t, seed, 0, "seed of the parameter initialisation")

struct Config {
#define SPEEDRUN_DECLARE_FIELD(type, name, def, help) type name = def;
  SPEEDRUN_CONFIG_FIELDS(SPEEDRUN_DECLARE_FIELD)
#undef SPEEDRUN_DECLARE_FIELD

  // Derived sizes.
  int padded_vocab() const;
  int hidden_dim() const { return num_heads * head_dim; }
  int mlp_dim() const { return mlp_ratio * model_dim; }
  int num_encoder_layers() const { return num_layers / 2; }
  bool layer_has_attention(int layer) const;
  // Value-embedding table used by a layer, or -1.
  int value_embed_of_layer(int layer) const;
  // Whether a layer uses the long window (else the short one).
  bool layer_uses_long_window(int layer) const;

  // Throws UsageError naming the key and the rule it breaks.
  void validate() const;

  nlohmann::json to_json() const;
  // Overrides fields from a JSON object; unknown keys and wrong types are UsageErrors.
  void update_from_json(const nlohmann::json& object, const std::string& origin);
  // Applies "key=value" where value is JSON (a bare word is taken as a string).
  void set_from_string(const std::string& assignment);

  // Names of the presets, and a preset by name (UsageError listing the names if unknown).
  static std::vector<std::string> preset_names();
  static Config preset(const std::string& name);
  // Reads a JSON config file: {"preset": optional base preset, ...keys}.
  static Config from_file(const std::string& path);
};

// The per-step schedules of SPEC §3-§4.
double lr_multiplier(const Config& config, int step);
double muon_momentum(const Config& config, int step);
// Long window at a step, in blocks: max(1, ceil(window_final_tokens * s / (block * n))).
int long_window_blocks(const Config& config, int step);
// Short window: long / 2 (0 behaves as 1 in the mask).
inline int short_window_blocks(int long_blocks) { return long_blocks / 2; }

}  // namespace speedrun
