#include "train/checkpoint.h"

#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "train/safetensors.h"
#include "util/error.h"

namespace speedrun {
namespace {

constexpr const char* kFormat = "speedrun-checkpoint-1";

std::span<const std::byte> as_bytes(const float* data, size_t count) {
  return {reinterpret_cast<const std::byte*>(data), count * sizeof(float)};
}

std::map<std::string, std::string> common_metadata(const Config& config, int step) {
  return {{"format", kFormat}, {"config", config.to_json().dump()}, {"step", std::to_string(step)}};
}

long long parse_int_metadata(const SafetensorsHeader& file, const std::string& key) {
  auto it = file.metadata().find(key);
  if (it == file.metadata().end()) throw Error(file.path() + ": metadata has no '" + key + "'");
  try {
    size_t used = 0;
    long long value = std::stoll(it->second, &used);
    if (used != it->second.size() || value < 0) throw std::invalid_argument("bad");
    return value;
  } catch (const std::exception&) {
    throw Error(file.path() + ": metadata '" + key + "' is not a non-negative integer: '" + it->second + "'");
  }
}

Config config_from_metadata(const SafetensorsHeader& file) {
  const auto format = file.metadata().find("format");
  if (format == file.metadata().end() || format->second != kFormat) {
    throw Error(file.path() + ": not a speedrun checkpoint: its 'format' metadata is " +
                (format == file.metadata().end() ? std::string("missing") : "'" + format->second + "'") +
                ", expected '" + kFormat + "'");
  }
  auto it = file.metadata().find("config");
  if (it == file.metadata().end()) throw Error(file.path() + ": not a speedrun checkpoint (no 'config' metadata)");
  nlohmann::json j = nlohmann::json::parse(it->second, nullptr, false);
  if (j.is_discarded()) throw Error(file.path() + ": the 'config' metadata is not valid JSON");
  Config config;
  try {
    config.update_from_json(j, file.path() + " config");
    config.validate();
  } catch (const Error& e) {
    throw Error(file.path() + ": checkpoint " + e.what());
  }
  return config;
}

// A tensor the model (or optimiser) has no place for means the file is not what its config
// says (an attention layer's weights under a config without that layer): refused, not ignored.
void require_only(const SafetensorsFile& file, const std::set<std::string>& expected) {
  for (const std::string& name : file.names()) {
    if (!expected.count(name)) {
      throw Error(file.path() + ": tensor '" + name + "' has no place in the model its config describes");
    }
  }
}

void read_tensors_into(const SafetensorsFile& file, const ParamLayout& layout, const std::string& prefix,
                       std::vector<float>& out) {
  out.assign(layout.total(), 0.f);
  std::set<std::string> expected;
  for (const ParamSpec& spec : layout.specs()) expected.insert(prefix + spec.name);
  require_only(file, expected);
  for (const ParamSpec& spec : layout.specs()) {
    const std::string name = prefix + spec.name;
    if (!file.contains(name)) throw Error(file.path() + ": missing tensor '" + name + "'");
    std::vector<float> values = file.read_f32(name, spec.shape);
    for (size_t i = 0; i < values.size(); ++i) {
      if (!std::isfinite(values[i])) {
        throw Error(file.path() + ": tensor '" + name + "' holds a non-finite value at index " + std::to_string(i));
      }
    }
    std::copy(values.begin(), values.end(), out.begin() + spec.offset);
  }
}

}  // namespace

std::string optimizer_state_path(const std::string& model_path) {
  const std::string suffix = ".safetensors";
  std::string stem = model_path;
  if (stem.size() > suffix.size() && stem.compare(stem.size() - suffix.size(), suffix.size(), suffix) == 0) {
    stem.resize(stem.size() - suffix.size());
  }
  return stem + ".optim.safetensors";
}

namespace {

// The record as one JSON object in the metadata (none when not recorded).
void add_numerics(std::map<std::string, std::string>& metadata, const RunNumerics& n) {
  if (!n.recorded()) return;
  metadata["numerics"] = nlohmann::json{{"device", n.device},           {"matmul", n.matmul},
                                        {"attention", n.attention},     {"activations", n.activations},
                                        {"grad_reduce", n.grad_reduce}, {"head_chunk_rows", n.head_chunk_rows}}
                             .dump();
}

}  // namespace

void save_model(const std::string& path, GPT& model, int step, const RunNumerics& numerics) {
  const std::vector<float> params = model.parameters_to_host();
  std::vector<TensorView> tensors;
  for (const ParamSpec& spec : model.layout().specs()) {
    tensors.push_back({spec.name, "F32", spec.shape, as_bytes(params.data() + spec.offset, spec.count)});
  }
  auto metadata = common_metadata(model.config(), step);
  add_numerics(metadata, numerics);
  write_safetensors(path, tensors, metadata);
}

void save_checkpoint(const std::string& path, GPT& model, const Optimizer& optimizer, const TrainingState& state,
                     const RunNumerics& numerics) {
  std::vector<std::vector<float>> host;
  std::vector<TensorView> tensors;
  for (const Optimizer::NamedState& s : optimizer.state()) {
    host.emplace_back(s.spec->count);
    model.backend().download(host.back().data(), s.data, s.spec->count);
  }
  for (size_t i = 0; i < optimizer.state().size(); ++i) {
    const Optimizer::NamedState& s = optimizer.state()[i];
    tensors.push_back({s.name, "F32", s.spec->shape, as_bytes(host[i].data(), s.spec->count)});
  }
  auto metadata = common_metadata(model.config(), state.step);
  metadata["data_shard_index"] = std::to_string(state.data_position.shard_index);
  metadata["data_pos"] = std::to_string(state.data_position.pos);
  add_numerics(metadata, numerics);
  // The state first: a model file never exists without the state it resumes from.
  write_safetensors(optimizer_state_path(path), tensors, metadata);
  save_model(path, model, state.step, numerics);
}

// Metadata reads take the header alone: a model file is over a gigabyte at speedrun-124m.
Config read_checkpoint_config(const std::string& path) { return config_from_metadata(SafetensorsHeader::read(path)); }

RunNumerics read_checkpoint_numerics(const std::string& path) {
  const SafetensorsHeader file = SafetensorsHeader::read(path);
  const auto it = file.metadata().find("numerics");
  if (it == file.metadata().end()) return {};
  const auto malformed = [&](const std::string& what) {
    return Error(path + ": the 'numerics' metadata " + what + ": '" + it->second + "'");
  };
  const nlohmann::json j = nlohmann::json::parse(it->second, nullptr, false);
  if (!j.is_object()) throw malformed("is not a JSON object");
  RunNumerics n;
  // Each field and the values the flags accept: a record naming anything else was not written
  // by train, and resuming with it would pass it on to a flag.
  const auto text = [&](const char* key, std::initializer_list<const char*> allowed) {
    const auto field = j.find(key);
    if (field == j.end() || !field->is_string()) throw malformed(std::string("has no text '") + key + "'");
    const std::string value = field->get<std::string>();
    for (const char* a : allowed) {
      if (value == a) return value;
    }
    throw malformed(std::string("has an unknown ") + key + " '" + value + "'");
  };
  n.device = text("device", {"cpu", "cuda"});
  n.matmul = text("matmul", {"fp32", "bf16"});
  n.attention = text("attention", {"reference", "flash"});
  n.activations = text("activations", {"fp32", "bf16"});
  n.grad_reduce = text("grad_reduce", {"exact", "overlap"});
  const auto rows = j.find("head_chunk_rows");
  if (rows == j.end() || !rows->is_number_integer() || rows->get<long long>() < 1 ||
      rows->get<long long>() > std::numeric_limits<int>::max()) {
    throw malformed("has no positive whole 'head_chunk_rows'");
  }
  n.head_chunk_rows = rows->get<int>();
  return n;
}

void require_same_model(const Config& expected, const Config& stored, const std::string& path) {
  static const char* kModelKeys[] = {"vocab_size",      "vocab_pad_multiple", "num_layers",  "model_dim",
                                     "num_heads",       "head_dim",           "mlp_ratio",   "no_attn_layers",
                                     "num_value_embeds"};
  const nlohmann::json a = expected.to_json(), b = stored.to_json();
  for (const char* key : kModelKeys) {
    if (a[key] != b[key]) {
      throw UsageError("checkpoint '" + path + "' was made with " + key + " = " + b[key].dump() +
                       " but the config asks for " + a[key].dump());
    }
  }
}

int load_model(const std::string& path, GPT& model) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  const Config stored = config_from_metadata(file.header());
  require_same_model(model.config(), stored, path);
  const long long step = parse_int_metadata(file.header(), "step");  // before the model changes
  if (step > stored.num_iterations) {
    throw Error(path + ": metadata step " + std::to_string(step) + " is past its config's num_iterations (" +
                std::to_string(stored.num_iterations) + ")");
  }
  std::vector<float> params;
  read_tensors_into(file, model.layout(), "", params);
  model.load_parameters(params);
  return static_cast<int>(step);
}

TrainingState load_checkpoint(const std::string& path, GPT& model, Optimizer& optimizer) {
  const std::string state_path = optimizer_state_path(path);
  if (!std::filesystem::exists(state_path)) {
    throw Error("cannot resume from '" + path + "': its optimiser state '" + state_path + "' is missing");
  }
  TrainingState state;
  state.step = load_model(path, model);
  const SafetensorsFile file = SafetensorsFile::open(state_path);
  // The files disagree with each other, not with the command line: bad data, not usage.
  try {
    require_same_model(model.config(), config_from_metadata(file.header()), state_path);
  } catch (const UsageError& e) {
    throw Error(std::string(e.what()) + " (the config of its model checkpoint '" + path + "')");
  }
  if (parse_int_metadata(file.header(), "step") != state.step) {
    throw Error("'" + path + "' and '" + state_path + "' are from different steps");
  }
  std::set<std::string> expected;
  for (const Optimizer::NamedState& s : optimizer.state()) expected.insert(s.name);
  require_only(file, expected);
  for (const Optimizer::NamedState& s : optimizer.state()) {
    if (!file.contains(s.name)) throw Error(state_path + ": missing tensor '" + s.name + "'");
    const std::vector<float> values = file.read_f32(s.name, s.spec->shape);
    model.backend().upload(s.data, values.data(), values.size());
  }
  state.data_position.shard_index = parse_int_metadata(file.header(), "data_shard_index");
  state.data_position.pos = parse_int_metadata(file.header(), "data_pos");
  return state;
}

}  // namespace speedrun
