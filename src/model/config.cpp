#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/input_file.h"

namespace speedrun {
namespace {

using nlohmann::json;

// A JSON value for an error message; invalid UTF-8 in strings is shown replaced rather
// than thrown over.
std::string show(const json& v) { return v.dump(-1, ' ', false, json::error_handler_t::replace); }

// Strict JSON -> field conversions: a wrong type is an error naming the key.
void read_field(const json& v, int64_t& out, const std::string& key, const std::string& origin) {
  // JSON reads an integer below int64's range as a float, above it as unsigned (which
  // get<int64_t> would wrap).
  const bool whole_float = v.is_number_float() && std::floor(v.get<double>()) == v.get<double>();
  if (whole_float && std::fabs(v.get<double>()) >= 9.2e18) {
    throw UsageError(origin + ": '" + key + "' is out of range: " + show(v));
  }
  if (!v.is_number_integer()) throw UsageError(origin + ": '" + key + "' must be an integer, got " + show(v));
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    throw UsageError(origin + ": '" + key + "' is out of range: " + show(v));
  }
  out = v.get<int64_t>();
}
void read_field(const json& v, int& out, const std::string& key, const std::string& origin) {
  int64_t x = 0;
  read_field(v, x, key, origin);
  if (x < INT32_MIN || x > INT32_MAX) throw UsageError(origin + ": '" + key + "' is out of range: " + show(v));
  out = static_cast<int>(x);
}
void read_field(const json& v, double& out, const std::string& key, const std::string& origin) {
  if (!v.is_number()) throw UsageError(origin + ": '" + key + "' must be a number, got " + show(v));
  out = v.get<double>();
  if (!std::isfinite(out)) throw UsageError(origin + ": '" + key + "' must be finite");
}
void read_field(const json& v, std::string& out, const std::string& key, const std::string& origin) {
  if (!v.is_string()) throw UsageError(origin + ": '" + key + "' must be a string, got " + show(v));
  out = v.get<std::string>();
}
void read_field(const json& v, std::vector<int>& out, const std::string& key, const std::string& origin) {
  if (!v.is_array()) throw UsageError(origin + ": '" + key + "' must be a list of integers, got " + show(v));
  std::vector<int> values;
  for (const json& item : v) {
    int x = 0;
    read_field(item, x, key, origin);
    values.push_back(x);
  }
  out = std::move(values);
}

// nlohmann's exception text without its "[json.exception.parse_error.101] " tag: "parse
// error at line L, column C: ...".
std::string json_error_detail(const std::string& what) {
  const size_t tag_end = what.find("] ");
  return tag_end == std::string::npos ? what : what.substr(tag_end + 2);
}

// Within float32's normal range: neither 0 nor infinite (nor subnormal) once rounded.
bool positive_float32(double x) {
  return x >= std::numeric_limits<float>::min() && x <= std::numeric_limits<float>::max();
}
std::string float32_range() {
  return "from " + show(std::numeric_limits<float>::min()) + " to " + show(std::numeric_limits<float>::max());
}

void require(bool ok, const std::string& message) {
  if (!ok) throw UsageError("config: " + message);
}

std::string str(int64_t v) { return std::to_string(v); }

// tiny: SPEC's structure scaled so a 2-core CPU trains a few hundred steps in minutes.
Config tiny_preset() {
  Config c;
  c.num_layers = 6;
  c.model_dim = 64;
  c.num_heads = 2;
  c.head_dim = 32;
  c.no_attn_layers = {4};
  c.encoder_windows = "LSS";
  c.attn_block_size = 64;
  c.world_size = 2;
  // 1024, then 768, took 4 minutes in CI on slower machines of its kind (2026-11-30, 12-01)
  c.seq_len = 512;
  c.val_seq_len = 4096;
  c.val_tokens = 16384;
  c.num_iterations = 300;
  c.val_every = 100;
  c.window_final_tokens = 512;
  c.lm_head_fp8 = 0;  // the CPU's exact FP8 emulation is slower than its float head
  return c;
}

// micro: the smallest model with every structural part, for gradient and resume tests.
Config micro_preset() {
  Config c;
  c.vocab_size = 300;
  c.vocab_pad_multiple = 128;
  c.document_separator = 299;  // the vocabulary's last token, as 50256 is GPT-2's: micro data has documents
  c.num_layers = 4;
  c.model_dim = 16;
  c.num_heads = 2;
  c.head_dim = 8;
  c.no_attn_layers = {2};
  c.num_value_embeds = 2;
  c.encoder_windows = "LS";
  c.attn_block_size = 8;
  c.world_size = 2;
  c.seq_len = 64;
  c.val_seq_len = 64;
  c.val_tokens = 256;
  c.num_iterations = 20;
  c.val_every = 10;
  c.window_final_tokens = 32;
  c.muon_momentum_warmup = 10;
  c.lm_head_fp8 = 0;  // gradient tests compare against finite differences of the float head
  return c;
}

}  // namespace

int Config::padded_vocab() const {
  return (vocab_size + vocab_pad_multiple - 1) / vocab_pad_multiple * vocab_pad_multiple;
}

bool Config::layer_has_attention(int layer) const {
  return std::find(no_attn_layers.begin(), no_attn_layers.end(), layer) == no_attn_layers.end();
}

int Config::value_embed_of_layer(int layer) const {
  if (layer < num_value_embeds) return layer;
  if (layer >= num_layers - num_value_embeds) return layer - (num_layers - num_value_embeds);
  return -1;
}

bool Config::layer_uses_long_window(int layer) const {
  int half = num_encoder_layers();
  int index = layer < half ? layer : num_layers - 1 - layer;  // decoder mirrors the encoder
  return encoder_windows[index] == 'L';
}

void Config::validate() const {
  require(vocab_size >= 1 && vocab_size <= 65536, "vocab_size must be in [1, 65536] (tokens are uint16), got " + str(vocab_size));
  require(vocab_pad_multiple >= 1 && vocab_pad_multiple <= 65536,
          "vocab_pad_multiple must be in [1, 65536], got " + str(vocab_pad_multiple));
  require(document_separator >= 0 && document_separator <= 65535,
          "document_separator must be a token id in [0, 65535], got " + str(document_separator));
  require(num_layers >= 2 && num_layers % 2 == 0, "num_layers must be even and >= 2, got " + str(num_layers));
  require(model_dim >= 1, "model_dim must be >= 1, got " + str(model_dim));
  // Bounds that keep every derived size (products of these) far inside int.
  require(model_dim >= 1 && model_dim <= 65536, "model_dim must be in [1, 65536], got " + str(model_dim));
  require(num_heads >= 1 && num_heads <= 65536, "num_heads must be in [1, 65536], got " + str(num_heads));
  require(head_dim >= 4 && head_dim <= 65536, "head_dim must be in [4, 65536], got " + str(head_dim));
  require(head_dim % 4 == 0, "head_dim must be divisible by 4, got " + str(head_dim));
  require(static_cast<int64_t>(num_heads) * head_dim == model_dim,
          "num_heads * head_dim must equal model_dim (value embeddings are added to v), got " + str(num_heads) +
              " * " + str(head_dim) + " != " + str(model_dim));
  require(mlp_ratio >= 1 && mlp_ratio <= 64, "mlp_ratio must be in [1, 64], got " + str(mlp_ratio));
  for (int layer : no_attn_layers) {
    require(layer >= 0 && layer < num_layers,
            "no_attn_layers holds layer " + str(layer) + ", outside 0.." + str(num_layers - 1));
  }
  require(num_value_embeds >= 0 && 2 * static_cast<int64_t>(num_value_embeds) <= num_layers,
          "num_value_embeds must be in [0, num_layers/2], got " + str(num_value_embeds));
  require(static_cast<int>(encoder_windows.size()) == num_encoder_layers(),
          "encoder_windows must have num_layers/2 = " + str(num_encoder_layers()) + " letters, got '" +
              encoder_windows + "'");
  require(encoder_windows.find_first_not_of("LS") == std::string::npos,
          "encoder_windows may hold only 'L' and 'S', got '" + encoder_windows + "'");
  require(attn_block_size >= 1, "attn_block_size must be >= 1");
  require(seq_len >= 1 && seq_len % attn_block_size == 0,
          "seq_len must be a positive multiple of attn_block_size (" + str(attn_block_size) + "), got " + str(seq_len));
  require(val_seq_len >= 1 && val_seq_len % attn_block_size == 0,
          "val_seq_len must be a positive multiple of attn_block_size (" + str(attn_block_size) + "), got " +
              str(val_seq_len));
  require(world_size >= 1, "world_size must be >= 1, got " + str(world_size));
  require(val_tokens >= 1, "val_tokens must be >= 1, got " + str(val_tokens));
  int64_t val_window = static_cast<int64_t>(world_size) * val_seq_len;
  require(val_tokens % val_window == 0, "val_tokens (" + str(val_tokens) + ") must be divisible by world_size * val_seq_len (" +
                                            str(world_size) + " * " + str(val_seq_len) + " = " + str(val_window) + ")");
  require(num_iterations >= 1, "num_iterations must be >= 1, got " + str(num_iterations));
  require(val_every >= 1, "val_every must be >= 1, got " + str(val_every));
  require(window_final_tokens >= 0, "window_final_tokens must be >= 0");
  // The model's constants are float32 on every backend: one that rounds to 0 or infinity
  // there makes every loss NaN, whatever the weights.
  require(positive_float32(logit_softcap),
          "logit_softcap must be > 0 and a normal float32 (" + float32_range() + "), got " + show(logit_softcap));
  require(positive_float32(attn_scale),
          "attn_scale must be > 0 and a normal float32 (" + float32_range() + "), got " + show(attn_scale));
  // q and k are normalised per head (|q.k| <= head_dim): the largest logit must stay finite.
  require(attn_scale * head_dim <= std::numeric_limits<float>::max(),
          "attn_scale * head_dim (the largest attention logit, q and k being normalised) must be at most " +
              show(std::numeric_limits<float>::max()) + ", got " + show(attn_scale) + " * " + str(head_dim));
  require(rotary_base > 1 && positive_float32(rotary_base),
          "rotary_base must be > 1 (frequencies (1/base)^(i/(D/4-1)) fall with i) and at most " +
              show(std::numeric_limits<float>::max()) + ", got " + show(rotary_base));
  require(rmsnorm_eps <= std::numeric_limits<float>::max(), "rmsnorm_eps must be a float32, got " + show(rmsnorm_eps));
  require(lr_lm_head >= 0 && lr_embed >= 0 && lr_scalar >= 0 && lr_muon >= 0,
          "learning rates (lr_lm_head, lr_embed, lr_scalar, lr_muon) must be >= 0");
  require(adam_eps > 0, "adam_eps must be > 0 (it keeps Adam's update finite where a gradient is 0)");
  require(final_lr_frac >= 0, "final_lr_frac must be >= 0");
  require(embed_init_std >= 0 && matrix_init_scale >= 0, "embed_init_std and matrix_init_scale must be >= 0");
  require(muon_momentum_start >= 0 && muon_momentum_start < 1 && muon_momentum_end >= 0 && muon_momentum_end < 1,
          "Muon momenta (muon_momentum_start, muon_momentum_end) must be in [0, 1)");
  require(rmsnorm_eps >= 0, "rmsnorm_eps must be >= 0");
  // A zero-initialised table or matrix gives rows of zeros, which rmsnorm with eps 0 turns
  // into 0 / 0.
  require(rmsnorm_eps > 0 || (embed_init_std > 0 && matrix_init_scale > 0),
          "rmsnorm_eps must be > 0 when embed_init_std or matrix_init_scale is 0 (their rows of zeros normalised "
          "with eps 0 are NaN)");
  require(adam_beta1 >= 0 && adam_beta1 < 1 && adam_beta2 >= 0 && adam_beta2 < 1, "Adam betas must be in [0, 1)");
  require(cooldown_frac >= 0 && cooldown_frac <= 1, "cooldown_frac must be in [0, 1]");
  require(muon_momentum_warmup >= 1, "muon_momentum_warmup must be >= 1");
  require(ns_steps >= 0, "ns_steps must be >= 0");
  require(lm_head_fp8 == 0 || lm_head_fp8 == 1, "lm_head_fp8 must be 0 or 1, got " + str(lm_head_fp8));
}

nlohmann::json Config::to_json() const {
  json j = json::object();
#define SPEEDRUN_FIELD_TO_JSON(type, name, def, help) j[#name] = name;
  SPEEDRUN_CONFIG_FIELDS(SPEEDRUN_FIELD_TO_JSON)
#undef SPEEDRUN_FIELD_TO_JSON
  return j;
}

void Config::update_from_json(const nlohmann::json& object, const std::string& origin) {
  if (!object.is_object()) throw UsageError(origin + ": a config must be a JSON object");
  for (const auto& [key, value] : object.items()) {
    bool known = false;
#define SPEEDRUN_FIELD_FROM_JSON(type, name, def, help) \
  if (key == #name) {                                 \
    read_field(value, name, key, origin);             \
    known = true;                                     \
  }
    SPEEDRUN_CONFIG_FIELDS(SPEEDRUN_FIELD_FROM_JSON)
#undef SPEEDRUN_FIELD_FROM_JSON
    if (!known) throw UsageError(origin + ": unknown config key '" + key + "'");
  }
}

void Config::set_from_string(const std::string& assignment) {
  size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw UsageError("--set expects key=value, got '" + assignment + "'");
  }
  std::string key = assignment.substr(0, eq);
  std::string text = assignment.substr(eq + 1);
  json value = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) value = text;  // a bare word is a string
  update_from_json(json{{key, value}}, "--set " + key);
}

std::vector<std::string> Config::preset_names() { return {"speedrun-124m", "tiny", "micro"}; }

Config Config::preset(const std::string& name) {
  if (name == "speedrun-124m") return Config{};
  if (name == "tiny") return tiny_preset();
  if (name == "micro") return micro_preset();
  std::string names;
  for (const std::string& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
  throw UsageError("unknown preset '" + name + "' (presets: " + names + ")");
}

Config Config::from_file(const std::string& path) {
  if (const std::string problem = input_file_problem(path); !problem.empty()) {
    throw UsageError("config file '" + path + "' " + problem);
  }
  std::ifstream in(path);
  if (!in) throw UsageError("cannot read config file '" + path + "'");
  json object;
  // A key given twice in one object would silently take its last value.
  std::vector<std::set<std::string>> keys;  // per open object
  std::string repeated;
  const json::parser_callback_t note_keys = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    if (event == json::parse_event_t::object_end) keys.pop_back();
    if (event == json::parse_event_t::key && !keys.back().insert(parsed.get<std::string>()).second &&
        repeated.empty()) {
      repeated = parsed.get<std::string>();
    }
    return true;
  };
  try {
    object = json::parse(in, note_keys);
  } catch (const json::exception& e) {
    throw UsageError("config file '" + path + "' is not valid JSON: " + json_error_detail(e.what()));
  }
  if (!repeated.empty()) throw UsageError("config file '" + path + "' gives key '" + repeated + "' twice");
  if (!object.is_object()) throw UsageError("config file '" + path + "' must hold a JSON object");
  Config config;
  if (object.contains("preset")) {
    if (!object["preset"].is_string()) throw UsageError(path + ": 'preset' must be a string");
    config = preset(object["preset"].get<std::string>());
    object.erase("preset");
  }
  config.update_from_json(object, path);
  return config;
}

double lr_multiplier(const Config& config, int step) {
  double t = 1.0 - static_cast<double>(step) / config.num_iterations;
  double w = config.cooldown_frac > 0 ? std::min(t / config.cooldown_frac, 1.0) : 1.0;
  return w + (1.0 - w) * config.final_lr_frac;
}

double muon_momentum(const Config& config, int step) {
  double frac = std::min(static_cast<double>(step) / config.muon_momentum_warmup, 1.0);
  return config.muon_momentum_start + (config.muon_momentum_end - config.muon_momentum_start) * frac;
}

int long_window_blocks(const Config& config, int step) {
  int64_t numerator = static_cast<int64_t>(config.window_final_tokens) * step;
  int64_t denominator = static_cast<int64_t>(config.attn_block_size) * config.num_iterations;
  int64_t blocks = (numerator + denominator - 1) / denominator;
  return static_cast<int>(std::max<int64_t>(1, blocks));
}

}  // namespace speedrun
