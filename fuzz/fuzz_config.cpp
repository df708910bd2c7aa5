// Fuzzes the config parser: JSON objects through Config::update_from_json and
// Config::from_file, then validate(); a config that validates must be usable, so the
// derived sizes and per-step schedules are evaluated over every layer and step.
#include <cmath>
#include <nlohmann/json.hpp>

#include "fuzz_support.h"
#include "model/config.h"
#include "util/error.h"

namespace {

// Everything a trainer computes from a validated config: none of it may overflow (UBSan).
void exercise(const speedrun::Config& config) {
  volatile long long sink = config.padded_vocab() + config.hidden_dim() + config.mlp_dim();
  for (int layer = 0; layer < config.num_layers; ++layer) {
    sink = sink + config.layer_has_attention(layer) + config.value_embed_of_layer(layer) +
           config.layer_uses_long_window(layer);
  }
  const int last = config.num_iterations;
  for (int step : {0, 1, last / 2, last - 1, last}) {
    const double lr = speedrun::lr_multiplier(config, step);
    const double momentum = speedrun::muon_momentum(config, step);
    if (!std::isfinite(lr) || !std::isfinite(momentum)) {
      speedrun::fuzz::invariant_broken("non-finite schedule at step " + std::to_string(step));
    }
    if (speedrun::long_window_blocks(config, step) < 1) speedrun::fuzz::invariant_broken("window < 1 block");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  nlohmann::json object = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!object.is_discarded()) {
    for (const char* preset : {"micro", "speedrun-124m"}) {
      try {
        speedrun::Config config = speedrun::Config::preset(preset);
        config.update_from_json(object, "fuzz");
        config.validate();
        exercise(config);
        speedrun::Config copy;  // what a checkpoint stores must read back the same
        copy.update_from_json(config.to_json(), "round trip");
        if (copy.to_json() != config.to_json()) speedrun::fuzz::invariant_broken("to_json round trip differs");
      } catch (const speedrun::Error&) {
      }
    }
  }
  try {
    speedrun::Config config = speedrun::Config::from_file(speedrun::fuzz::write_scratch(data, size, ".json"));
    config.validate();
    exercise(config);
  } catch (const speedrun::Error&) {
  }
  try {  // the same text as a --set assignment
    speedrun::Config config = speedrun::Config::preset("micro");
    config.set_from_string(text);
    config.validate();
    exercise(config);
  } catch (const speedrun::Error&) {
  }
  return 0;
}
