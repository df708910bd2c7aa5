#include "util/paths.h"

#include <cstdlib>

namespace speedrun {
namespace {

std::string env_or(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return (value && *value) ? std::string(value) : fallback;
}

}  // namespace

std::string cache_dir() { return env_or("SPEEDRUN_CACHE", SPEEDRUN_CACHE_DIR); }
std::string tokenizer_dir() { return env_or("SPEEDRUN_TOKENIZER_DIR", cache_dir() + "/gpt2"); }
std::string default_data_dir() { return env_or("SPEEDRUN_DATA_DIR", SPEEDRUN_DEFAULT_DATA_DIR); }

}  // namespace speedrun
