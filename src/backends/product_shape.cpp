#include "backends/product_shape.h"

#include <sstream>

#include "util/error.h"

namespace speedrun {

std::string product_shape_name(const ProductShape& s) {
  std::string name;
  name += s.transpose_a ? 'T' : 'N';
  name += s.transpose_b ? 'T' : 'N';
  name += ' ' + std::to_string(s.M) + 'x' + std::to_string(s.N) + 'x' + std::to_string(s.K);
  name += s.bf16_output ? " bf16" : " f32";
  if (s.adds_to_c) name += " +C";
  if (s.batch != 1) name += " x" + std::to_string(s.batch);
  return name;
}

namespace {

bool parse_transposes(const std::string& word, ProductShape& s) {
  if (word.size() != 2) return false;
  for (char c : word) {
    if (c != 'N' && c != 'T') return false;
  }
  s.transpose_a = word[0] == 'T';
  s.transpose_b = word[1] == 'T';
  return true;
}

// "MxNxK" with three positive ints and nothing else.
bool parse_dimensions(const std::string& word, ProductShape& s) {
  std::istringstream in(word);
  char x1 = 0, x2 = 0;
  if (!(in >> s.M >> x1 >> s.N >> x2 >> s.K) || x1 != 'x' || x2 != 'x') return false;
  in.peek();
  return in.eof() && s.M > 0 && s.N > 0 && s.K > 0;
}

// The optional words after the output type: "+C", then "xB" (B >= 2).
bool parse_options(std::istringstream& in, ProductShape& s) {
  std::string word;
  if (!(in >> word)) return true;
  if (word == "+C") {
    s.adds_to_c = true;
    if (!(in >> word)) return true;
  }
  if (word.size() < 2 || word[0] != 'x') return false;
  size_t used = 0;
  try {
    s.batch = std::stoi(word.substr(1), &used);
  } catch (const std::exception&) {
    return false;
  }
  return used == word.size() - 1 && s.batch >= 2 && !(in >> word);
}

}  // namespace

ProductShape parse_product_shape(const std::string& name) {
  ProductShape s;
  std::istringstream in(name);
  std::string transposes, dimensions, output;
  bool ok = (in >> transposes >> dimensions >> output) && parse_transposes(transposes, s) &&
            parse_dimensions(dimensions, s) && (output == "f32" || output == "bf16");
  if (ok) {
    s.bf16_output = output == "bf16";
    ok = parse_options(in, s);
  }
  // Only the spelling product_shape_name writes (no "x1", single spaces).
  if (!ok || product_shape_name(s) != name) {
    throw Error("'" + name +
                "' is not a product shape (expected e.g. 'NT 49152x2304x768 bf16' or 'TN 768x768x49152 f32 +C')");
  }
  return s;
}

}  // namespace speedrun
