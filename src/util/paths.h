// Where speedrun finds the files that scripts/setup.sh downloads and prepares.
// Each can be moved with an environment variable; the defaults are the source tree's.
#pragma once

#include <string>

namespace speedrun {

// $SPEEDRUN_CACHE, else <source>/.cache.
std::string cache_dir();
// $SPEEDRUN_TOKENIZER_DIR, else <cache>/gpt2 (encoder.json and vocab.bpe).
std::string tokenizer_dir();
// $SPEEDRUN_DATA_DIR, else <source>/data/default (train_*.bin and val_*.bin).
std::string default_data_dir();

}  // namespace speedrun
