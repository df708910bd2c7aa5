#include "model/gpt.h"

#include <algorithm>
#include <cmath>

#include "model/attention_mask.h"
#include "util/error.h"

namespace speedrun {

// What one block saves in its forward pass for its backward pass. In the forward-only
// set some of these are one buffer: an op that allows it then runs in place.
struct GPT::LayerActivations {
  StreamTensor x_in;         // a decoder layer's input (after the skip add) [T, d]
  StreamTensor xm;           // lambda mix of x and x0 [T, d] (shared by all layers)
  StreamTensor x1;           // after the attention residual [T, d] (kept only to recompute)
  float* attn_norm = nullptr;  // rmsnorm(xm) [T, d] (bf16: one buffer all layers share)
  uint16_t* attn_norm_codes = nullptr;  // bf16: rmsnorm(xm) rounded, kept as codes [T, d]
  float* attn_rstd = nullptr;  // [T]
  float* qn = nullptr;       // rmsnorm(q) per head, before rotary [T, hd] (float32 only)
  float* kn = nullptr;
  uint16_t* q_pre_codes = nullptr;  // bf16: q and k as their product computed them, codes [T, hd]
  uint16_t* k_pre_codes = nullptr;  // (one buffer each, all layers: read at once by their norm)
  uint16_t* qn_codes = nullptr;  // bf16: rmsnorm(q) kept for the backward, as codes [T, hd]
  uint16_t* kn_codes = nullptr;
  float* q_rstd = nullptr;   // [T * H]
  float* k_rstd = nullptr;
  float* q_rot = nullptr;    // rotary(qn) [T, hd] (float32 only, one buffer all layers share)
  float* k_rot = nullptr;
  float* v_raw = nullptr;    // v before the value-embedding mix [T, hd] (float32 only)
  uint16_t* v_raw_codes = nullptr;  // bf16: v_raw as codes [T, hd]
  float* v = nullptr;        // attention's v [T, hd] (float32 only)
  float* y = nullptr;        // attention output [T, hd] (bf16: one buffer all layers share)
  uint16_t* y_codes = nullptr;  // bf16: y kept for the backward, as codes [T, hd]
  float* lse = nullptr;      // [H, T]
  // bf16: q_rot, k_rot and v as codes [T, hd] (rotated q and k one buffer each all layers
  // share, rotated again in the backward; v too when recomputed).
  AttentionInputCodes input_codes(bool floats_current) const {
    AttentionInputCodes codes{q_codes, k_codes, v_codes};
    codes.floats_current = floats_current;
    return codes;
  }
  uint16_t* q_codes = nullptr;
  uint16_t* k_codes = nullptr;
  uint16_t* v_codes = nullptr;
  float* mlp_norm = nullptr;   // rmsnorm(x1) [T, d] (bf16: one buffer all layers share)
  uint16_t* mlp_norm_codes = nullptr;  // bf16: rmsnorm(x1) rounded, kept as codes [T, d]
  float* mlp_rstd = nullptr;   // [T]
  float* h = nullptr;        // c_fc output [T, mlp] (bf16: g's buffer)
  float* g = nullptr;        // relu(h)^2 [T, mlp] (bf16: one buffer all layers share)
  uint16_t* g_codes = nullptr;  // bf16: relu(h)^2 rounded, as codes [T, mlp] (kept per layer or shared)
  uint16_t* h_codes = nullptr;  // bf16: h kept for the backward, as codes [T, mlp]
  // Training: the layer's value-embedding gradient [T, d], scattered into its table's at once
  // (in its h where that has room: carve_gradients_in_dead_h).
  float* dve = nullptr;
};

// The activations of a whole pass outside the blocks.
struct GPT::ModelActivations {
  StreamTensor x0;               // rmsnorm(embed[tok]) [T, d]
  float* embedded = nullptr;     // embed[tok] [T, d] before its norm: x0's floats (float32
                                 // stream) or a buffer the pass uses only later (bf16)
  float* x0_rstd = nullptr;      // [T]
  float* ve = nullptr;           // the value embedding of the layer at hand [T, d]: looked
                                 // up for each layer that reads it, again for its backward
  uint16_t* ve_codes = nullptr;  // bf16: the same as codes (ve null)
  std::vector<StreamTensor> skip_in;  // encoder outputs pushed on the U-net stack [T, d]
  StreamTensor final_x;          // last block's output [T, d]
  float* final_norm = nullptr;   // rmsnorm(final_x) [T, d]
  float* final_rstd = nullptr;   // [T]
  // One chunk of the head's logits [min(head chunk, T), padded vocab], in a buffer the pass
  // has no other use for while the head runs (carve_training_buffers, carve_forward_buffers).
  float* logits = nullptr;
};

// Everything a training pass uses besides parameters, gradients and the sequence itself.
struct GPT::TrainingBuffers {
  ModelActivations m;
  std::vector<LayerActivations> layers;  // one per layer
  // Gradient scratch.
  float* dx = nullptr;    // [T, d]
  float* dx0 = nullptr;   // [T, d]
  float* dtmp = nullptr;  // [T, d]
  float* dwide = nullptr;  // [T, mlp]
  float* dq = nullptr;    // [T, hd]
  float* dk = nullptr;
  float* dv = nullptr;
  float* dy = nullptr;
  std::vector<float*> dskip_in;  // [T, d] per encoder output (in its decoder's h, where that
                                 // has room: carve_gradients_in_dead_h)
};

// What a forward-only pass uses: one set of layer buffers for every layer.
struct GPT::ForwardBuffers {
  ModelActivations m;
  LayerActivations slot;
};

namespace {

// bf16 activations: attention's inputs q, k, v as codes.
struct AttentionCodeBuffers {
  uint16_t* q = nullptr;
  uint16_t* k = nullptr;
  uint16_t* v = nullptr;
  template <typename Layer>
  void assign_to(Layer& a) const {
    a.q_codes = q;
    a.k_codes = k;
    a.v_codes = v;
  }
};

// The value-embedding buffer of a pass [T, d], floats or (bf16) codes; none without tables.
template <typename Activations>
void carve_value_embedding(const Config& config, bool bf16, ArenaCarver& arena, size_t T, Activations& m) {
  if (config.num_value_embeds == 0) return;
  const size_t n = T * config.model_dim;
  if (bf16) {
    m.ve_codes = arena.take_codes(n);
  } else {
    m.ve = arena.take(n);
  }
}

AttentionCodeBuffers carve_attention_codes(const ActivationOptions& activations, ArenaCarver& arena, size_t count,
                                           bool with_v = true) {
  if (activations.precision != ActivationPrecision::kBfloat16) return {};
  AttentionCodeBuffers codes;
  codes.q = arena.take_codes(count);
  codes.k = arena.take_codes(count);
  if (with_v) codes.v = arena.take_codes(count);
  return codes;
}

// The floats of one chunk of the head's logits in a pass of sequences up to T tokens.
size_t logits_floats(const Config& config, size_t T, int head_chunk_rows) {
  return std::min(T, static_cast<size_t>(std::max(1, head_chunk_rows))) * config.padded_vocab();
}

// Backend::lend_scratch for a scope.
class ScratchLoan {
 public:
  ScratchLoan(Backend& backend, float* memory, size_t bytes) : backend_(backend), lent_(memory && bytes > 0) {
    if (lent_) backend_.lend_scratch(memory, bytes);
  }
  ~ScratchLoan() {
    if (lent_) backend_.withdraw_scratch();
  }
  ScratchLoan(const ScratchLoan&) = delete;
  ScratchLoan& operator=(const ScratchLoan&) = delete;

 private:
  Backend& backend_;
  const bool lent_;
};

}  // namespace

GPT::ModelActivations& GPT::pass(bool training) { return training ? train_->m : forward_->m; }

GPT::LayerActivations& GPT::slot(int layer, bool training) {
  return training ? train_->layers[layer] : forward_->slot;
}

GPT::MemoryPlan GPT::plan_memory(const Config& config, int max_train_T, int max_eval_T,
                                 ActivationOptions activations, int head_chunk_rows) {
  const size_t T_all = std::max(max_train_T, max_eval_T);
  ArenaCarver training, forward;
  carve_training_buffers(config, activations, training, max_train_T, head_chunk_rows);
  carve_forward_buffers(config, activations, forward, T_all, head_chunk_rows);
  MemoryPlan plan;
  plan.parameter_bytes = ParamLayout(config).total() * sizeof(float);
  plan.gradient_bytes = plan.parameter_bytes;
  plan.training_bytes = training.used() * sizeof(float);
  plan.forward_only_bytes = forward.used() * sizeof(float);
  // inputs, targets, document ids (int32) and token losses
  plan.sequence_bytes = T_all * (3 * sizeof(int32_t) + sizeof(float));
  plan.logits_bytes = logits_floats(config, T_all, head_chunk_rows) * sizeof(float);
  return plan;
}

GPT::GPT(const Config& config, Backend& backend, int max_train_T, int max_eval_T, ActivationOptions activations)
    : config_(config),
      backend_(backend),
      layout_(config),
      max_train_T_(max_train_T),
      max_eval_T_(max_eval_T),
      recompute_(activations.memory == ActivationMemory::kRecompute),
      recompute_relu2_(activations.memory != ActivationMemory::kStore),
      bf16_activations_(activations.precision == ActivationPrecision::kBfloat16),
      stream_(backend, bf16_activations_),
      forward_mlp_rows_(activations.forward_mlp_rows) {
  config_.validate();
  if (forward_mlp_rows_ <= 0) {
    throw Error("forward_mlp_rows must be positive, got " + std::to_string(forward_mlp_rows_));
  }
  const size_t T_all = std::max(max_train_T, max_eval_T);
  auto f = [&](size_t n) {
    float* p = backend_.alloc(n);
    allocations_.push_back(p);
    activation_bytes_ += n * sizeof(float);
    return p;
  };
  auto i32 = [&](size_t n) {
    int32_t* p = backend_.alloc_i32(n);
    allocations_.push_back(p);
    activation_bytes_ += n * sizeof(int32_t);
    return p;
  };
  resolve_offsets();
  params_ = f(layout_.total());
  grads_ = f(layout_.total());
  activation_bytes_ = 0;  // counted from here on
  inputs_ = i32(T_all);
  targets_ = i32(T_all);
  doc_ = i32(T_all);
  row_loss_ = f(T_all);
  head_chunk_ = std::max(1, backend_.head_chunk_rows());
  const MemoryPlan plan = plan_memory(config_, max_train_T, max_eval_T, activations, head_chunk_);
  float* arena = f(plan.arena_bytes() / sizeof(float));
  ArenaCarver training_arena(arena), forward_arena(arena);
  train_ = std::make_unique<TrainingBuffers>(
      carve_training_buffers(config_, activations, training_arena, max_train_T, head_chunk_));
  forward_ = std::make_unique<ForwardBuffers>(
      carve_forward_buffers(config_, activations, forward_arena, T_all, head_chunk_));
  forward_spare_bytes_ = plan.forward_spare_bytes();
  if (forward_spare_bytes_ > 0) forward_spare_ = arena + forward_arena.used();
  loss_sum_host_ = static_cast<double*>(backend_.alloc_host(sizeof(double)));
  std::vector<float> host;
  initialize_parameters(config_, layout_, host);
  load_parameters(host);
}

GPT::TrainingBuffers GPT::carve_training_buffers(const Config& config, ActivationOptions activations,
                                                 ArenaCarver& arena, size_t T, int head_chunk_rows) {
  const size_t d = config.model_dim, hd = config.hidden_dim(), mlp = config.mlp_dim(), H = config.num_heads;
  const bool recompute = activations.memory == ActivationMemory::kRecompute;
  const bool recompute_relu2 = activations.memory != ActivationMemory::kStore;
  const bool bf16 = activations.precision == ActivationPrecision::kBfloat16;
  auto take = [&](size_t n) { return arena.take(n); };
  auto stream = [&](size_t n) { return ResidualStream::take(arena, n, bf16); };
  TrainingBuffers b;
  ModelActivations& m = b.m;
  m.x0 = stream(T * d);
  m.x0_rstd = take(T);
  carve_value_embedding(config, bf16, arena, T, m);
  for (int i = 0; i < config.num_encoder_layers(); ++i) m.skip_in.push_back(stream(T * d));
  m.final_x = stream(T * d);
  m.final_norm = take(T * d);
  m.final_rstd = take(T);
  b.dx = take(T * d);
  b.dx0 = take(T * d);
  b.dtmp = take(T * d);
  m.embedded = bf16 ? b.dtmp : m.x0.floats;  // dtmp's first use is the head's backward
  // The MLP's backward is done with dwide before attention's starts: one buffer serves both,
  // and before them the head's logits (the head's chunks all run before any block's backward).
  float* block_gradients = take(std::max({T * mlp, 4 * T * hd, logits_floats(config, T, head_chunk_rows)}));
  m.logits = block_gradients;
  b.dwide = block_gradients;
  b.dq = block_gradients;  // dq, dk, dv adjacent: one [3, T, hd] operand for qkv_backward
  b.dk = block_gradients + T * hd;
  b.dv = block_gradients + 2 * T * hd;
  b.dy = block_gradients + 3 * T * hd;
  // Recomputed activations live in one buffer each, shared by all layers (both rmsnorm
  // outputs in one: the backward needs the MLP's before attention's). The lambda mix xm
  // is such a buffer in both modes: only recomputation reads it back (it is cheap to
  // redo from the block's input and x0); x1 too unless recomputation needs it for the
  // MLP's rmsnorm. bf16: the rmsnorm outputs live on as codes, their floats (written only
  // for float32 products) one buffer.
  const StreamTensor shared_xm = stream(T * d);
  const StreamTensor shared_x1 = recompute ? StreamTensor{} : stream(T * d);
  const bool one_norm_buffer = recompute || bf16;
  float* shared_norm = one_norm_buffer ? take(T * d) : nullptr;
  uint16_t* shared_norm_codes = recompute && bf16 ? arena.take_codes(T * d) : nullptr;
  // (Not shared_norm's nullness: while an arena is only counted, every piece is null.)
  auto norm_floats = [&] { return one_norm_buffer ? shared_norm : take(T * d); };
  auto norm_codes = [&] { return !bf16 ? nullptr : recompute ? shared_norm_codes : arena.take_codes(T * d); };
  // Rotated q and k, attention's inputs, are one buffer each in every mode: the backward
  // rotates the kept normalised q and k again (one rotary pass, the same bits) instead of
  // keeping both per layer (1.41 GiB less at speedrun-124m with bf16 activations). bf16:
  // attention's inputs and output live on as codes (v recomputed: one set); the inputs have
  // no floats at all, y's are one buffer, only for products that read float32.
  float* shared_q_rot = !bf16 ? take(T * hd) : nullptr;
  float* shared_k_rot = !bf16 ? take(T * hd) : nullptr;
  // relu(h)^2: kept per layer as floats, or with bf16 activations as codes (its floats then
  // one buffer, written only for float32 products), or recomputed into one buffer.
  const bool one_g_buffer = recompute_relu2 || bf16;
  float* shared_g = one_g_buffer ? take(T * mlp) : nullptr;
  uint16_t* shared_g_codes = recompute_relu2 && bf16 ? arena.take_codes(T * mlp) : nullptr;
  float* shared_v = recompute && !bf16 ? take(T * hd) : nullptr;
  uint16_t* q_pre_codes = bf16 ? arena.take_codes(T * hd) : nullptr;
  uint16_t* k_pre_codes = bf16 ? arena.take_codes(T * hd) : nullptr;
  const AttentionCodeBuffers shared_codes = carve_attention_codes(activations, arena, T * hd, recompute);
  float* shared_y = bf16 ? take(T * hd) : nullptr;
  auto attention_input = [&](float* shared, size_t n) { return bf16 ? nullptr : recompute ? shared : take(n); };
  for (int i = 0; i < config.num_layers; ++i) {
    LayerActivations a;
    // An encoder layer reads its input where the previous layer wrote it (x0 or the stack).
    if (i >= config.num_encoder_layers()) a.x_in = stream(T * d);
    a.xm = shared_xm;
    if (config.layer_has_attention(i)) {
      a.x1 = recompute ? stream(T * d) : shared_x1;
      a.attn_norm = norm_floats();
      a.attn_norm_codes = norm_codes();
      a.attn_rstd = take(T);
      a.q_rot = shared_q_rot;
      a.k_rot = shared_k_rot;
      // bf16: q and k from their product as codes, normalised and rotated in one pass; the
      // normalised values live on as codes.
      if (bf16) {
        a.q_pre_codes = q_pre_codes;
        a.k_pre_codes = k_pre_codes;
        a.qn_codes = arena.take_codes(T * hd);
        a.kn_codes = arena.take_codes(T * hd);
        a.v_raw_codes = arena.take_codes(T * hd);
      } else {
        a.qn = take(T * hd);
        a.kn = take(T * hd);
        a.v_raw = take(T * hd);
      }
      a.q_rstd = take(T * H);
      a.k_rstd = take(T * H);
      a.v = attention_input(shared_v, T * hd);
      if (bf16) {
        a.y = shared_y;
        a.y_codes = arena.take_codes(T * hd);
      } else {
        a.y = take(T * hd);
      }
      a.lse = take(T * H);
      shared_codes.assign_to(a);
      if (bf16 && !recompute) a.v_codes = arena.take_codes(T * hd);
    }
    a.mlp_norm = norm_floats();
    a.mlp_norm_codes = norm_codes();
    a.mlp_rstd = take(T);
    a.g = one_g_buffer ? shared_g : take(T * mlp);
    if (bf16) a.g_codes = recompute_relu2 ? shared_g_codes : arena.take_codes(T * mlp);
    // bf16: c_fc writes into g's buffer, relu^2 runs in place, h lives on as codes.
    if (bf16) {
      a.h = a.g;
      a.h_codes = arena.take_codes(T * mlp);
    } else {
      a.h = take(T * mlp);
    }
    b.layers.push_back(a);
  }
  carve_gradients_in_dead_h(config, bf16, arena, T, b);
  return b;
}

// A layer's h (floats, or with bf16 activations codes) is dead once its backward has read it,
// in the MLP's part: where it has room for T x d floats, it then holds two gradients that
// would otherwise take memory of their own.
// - The layer's value-embedding gradient, written and read in attention's part, later.
// - A decoder's skip gradient: written after the decoder's backward, read by the backward of
//   the encoder whose output the decoder added, later still.
void GPT::carve_gradients_in_dead_h(const Config& config, bool bf16, ArenaCarver& arena, size_t T,
                                    TrainingBuffers& b) {
  const size_t d = config.model_dim, mlp = config.mlp_dim();
  const bool h_has_room = (bf16 ? mlp / 2 : mlp) >= d;
  auto dead_h = [&](const LayerActivations& a) { return bf16 ? reinterpret_cast<float*>(a.h_codes) : a.h; };
  // Without room: one buffer for every layer's value-embedding gradient.
  float* shared_dve = !h_has_room && config.num_value_embeds > 0 ? arena.take(T * d) : nullptr;
  for (int i = 0; i < config.num_layers; ++i) {
    if (config.value_embed_of_layer(i) >= 0) b.layers[i].dve = h_has_room ? dead_h(b.layers[i]) : shared_dve;
  }
  const int half = config.num_encoder_layers();
  b.dskip_in.assign(half, nullptr);
  for (int j = 0; j < half; ++j) {
    b.dskip_in[half - 1 - j] = h_has_room ? dead_h(b.layers[half + j]) : arena.take(T * d);
  }
}

// One set for every layer. The rmsnorm outputs share a buffer, as do q before and after
// rotary, k likewise, v before and after its value-embedding mix, and h and relu(h)^2;
// the last block writes its output over its input, and the head normalises into the
// block's norm buffer. That is 8 d floats per token where a training layer keeps 16 d,
// and h for mlp_rows rows (the MLP runs a slice of rows at a time).
GPT::ForwardBuffers GPT::carve_forward_buffers(const Config& config, ActivationOptions activations, ArenaCarver& arena,
                                               size_t T, int head_chunk_rows) {
  const size_t d = config.model_dim, hd = config.hidden_dim(), mlp = config.mlp_dim(), H = config.num_heads;
  const size_t mlp_rows = static_cast<size_t>(std::max(1, activations.forward_mlp_rows));
  const bool bf16 = activations.precision == ActivationPrecision::kBfloat16;
  auto take = [&](size_t n) { return arena.take(n); };
  auto stream = [&](size_t n) { return ResidualStream::take(arena, n, bf16); };
  ForwardBuffers f;
  ModelActivations& m = f.m;
  m.x0 = stream(T * d);
  m.x0_rstd = take(T);
  carve_value_embedding(config, bf16, arena, T, m);
  for (int i = 0; i < config.num_encoder_layers(); ++i) m.skip_in.push_back(stream(T * d));
  LayerActivations& a = f.slot;
  a.x_in = stream(T * d);
  a.xm = stream(T * d);
  a.x1 = stream(T * d);
  a.attn_norm = a.mlp_norm = take(T * d);
  if (bf16) a.attn_norm_codes = a.mlp_norm_codes = arena.take_codes(T * d);
  m.embedded = bf16 ? a.attn_norm : m.x0.floats;  // the norms' buffer is first written after x0
  a.attn_rstd = a.mlp_rstd = take(T);
  if (bf16) {  // q, k and v as codes alone (carve_attention_codes below: rotated, mixed)
    a.q_pre_codes = arena.take_codes(T * hd);
    a.k_pre_codes = arena.take_codes(T * hd);
    a.v_raw_codes = arena.take_codes(T * hd);
  } else {
    a.qn = a.q_rot = take(T * hd);
    a.kn = a.k_rot = take(T * hd);
    a.v_raw = a.v = take(T * hd);
  }
  a.q_rstd = a.k_rstd = take(T * H);
  a.y = take(T * hd);
  if (bf16) a.y_codes = arena.take_codes(T * hd);
  a.lse = take(T * H);
  a.h = a.g = take(std::min(T, mlp_rows) * mlp);
  if (bf16) a.g_codes = arena.take_codes(std::min(T, mlp_rows) * mlp);
  carve_attention_codes(activations, arena, T * hd).assign_to(a);
  m.final_x = a.x_in;
  m.final_norm = a.mlp_norm;
  m.final_rstd = a.mlp_rstd;
  // The head's logits in y's floats, dead once the last block has run, where they fit.
  const size_t logits = logits_floats(config, T, head_chunk_rows);
  m.logits = logits <= T * hd ? a.y : take(logits);
  return f;
}

// Offsets looked up once: a step then builds no names and searches no map.
void GPT::resolve_offsets() {
  auto offset = [&](const std::string& name) { return layout_.at(name).offset; };
  embed_offset_ = offset("embed.weight");
  lm_head_offset_ = offset("lm_head.weight");
  skip_offset_ = offset("skip_weights");
  for (int j = 0; j < config_.num_value_embeds; ++j) {
    value_embed_offsets_.push_back(offset("value_embeds.embed." + std::to_string(j) + ".weight"));
  }
  for (int i = 0; i < config_.num_layers; ++i) {
    const std::string block = "blocks." + std::to_string(i) + ".";
    BlockOffsets b;
    b.lambdas = offset(block + "lambdas");
    b.fc = offset(block + "mlp.c_fc.weight");
    b.mlp_proj = offset(block + "mlp.c_proj.weight");
    if (config_.layer_has_attention(i)) {
      b.qkv = offset(block + "attn.qkv_w");
      b.attn_lambdas = offset(block + "attn.lambdas");
      b.attn_proj = offset(block + "attn.c_proj.weight");
    }
    block_offsets_.push_back(b);
  }
}

GPT::~GPT() {
  backend_.release_host(loss_sum_host_);
  for (void* p : allocations_) backend_.release(p);
}

void GPT::load_parameters(std::span<const float> host) {
  if (host.size() != layout_.total()) {
    throw Error("parameter count mismatch: got " + std::to_string(host.size()) + ", the model has " +
                std::to_string(layout_.total()));
  }
  backend_.upload(params_, host.data(), host.size());
}

std::vector<float> GPT::parameters_to_host() {
  std::vector<float> host(layout_.total());
  backend_.download(host.data(), params_, host.size());
  return host;
}

std::vector<float> GPT::gradients_to_host() {
  std::vector<float> host(layout_.total());
  backend_.download(host.data(), grads_, host.size());
  return host;
}

void GPT::zero_grad() { backend_.zero(grads_, layout_.total()); }

int GPT::layer_window(int layer, int long_window) const {
  return config_.layer_uses_long_window(layer) ? long_window : short_window_blocks(long_window);
}

void GPT::linear_forward(float* out, const float* x, const float* weight, int T, int out_dim, int in_dim) {
  // out [T, out] = x [T, in] @ W^T, W stored [out, in].
  backend_.gemm(false, true, T, out_dim, in_dim, 1.f, x, in_dim, weight, in_dim, 0.f, out, out_dim);
}

void GPT::linear_backward(float* dx, uint16_t* dx_codes, bool accumulate_dx, float* dweight, const float* dout,
                          const float* x, const float* weight, int T, int out_dim, int in_dim) {
  // dW [out, in] += dout^T @ x; dx [T, in] (+)= dout @ W, or its codes alone.
  backend_.gemm(true, false, out_dim, in_dim, T, 1.f, dout, out_dim, x, in_dim, 1.f, dweight, in_dim);
  if (dx_codes) {
    backend_.gemm_to_bf16(false, false, T, in_dim, out_dim, dout, out_dim, weight, in_dim, nullptr, dx_codes, in_dim);
    return;
  }
  backend_.gemm(false, false, T, in_dim, out_dim, 1.f, dout, out_dim, weight, in_dim, accumulate_dx ? 1.f : 0.f,
                dx, in_dim);
}

void GPT::check_sequence(std::span<const int32_t> inputs, std::span<const int32_t> targets, bool training) const {
  const int T = static_cast<int>(inputs.size());
  const int max_T = training ? max_train_T_ : std::max(max_train_T_, max_eval_T_);
  if (targets.size() != inputs.size() || T <= 0 || T > max_T || T % config_.attn_block_size != 0) {
    throw Error("sequence of " + std::to_string(T) + " tokens does not fit the model (max " +
                std::to_string(max_T) + ", a multiple of attn_block_size " +
                std::to_string(config_.attn_block_size) + ")");
  }
  for (size_t t = 0; t < inputs.size(); ++t) {
    if (inputs[t] < 0 || inputs[t] >= config_.vocab_size || targets[t] < 0 || targets[t] >= config_.vocab_size) {
      throw Error("token id out of range at position " + std::to_string(t) + " (vocab_size " +
                  std::to_string(config_.vocab_size) + ")");
    }
  }
}

void GPT::forward_backward_async(std::span<const int32_t> inputs, std::span<const int32_t> targets,
                                 int long_window, float grad_scale, double* loss_sum) {
  const bool training = grad_scale != 0.f;
  check_sequence(inputs, targets, training);
  const int T = static_cast<int>(inputs.size());
  backend_.upload_i32(inputs_, inputs.data(), T);
  backend_.upload_i32(targets_, targets.data(), T);
  backend_.document_ids(doc_, inputs_, T, config_.document_separator);
  {
    // A forward-only pass leaves part of the arena unused: the backend may take its
    // temporaries from there (withdrawn on every way out, exceptions included).
    ScratchLoan loan(backend_, training ? nullptr : forward_spare_, forward_spare_bytes_);
    run_forward(T, long_window, training);
    run_head(T, grad_scale, pass(training));
  }
  // Queued, not awaited: the host learns the loss at the caller's next synchronize().
  backend_.sum_to_host(loss_sum, row_loss_, T);
  if (fault_flag_) backend_.flag_nonfinite(fault_flag_, row_loss_, T);
  if (training) run_backward(T, long_window);
}

double GPT::forward_backward(std::span<const int32_t> inputs, std::span<const int32_t> targets, int long_window,
                             float grad_scale) {
  forward_backward_async(inputs, targets, long_window, grad_scale, loss_sum_host_);
  backend_.synchronize();
  return *loss_sum_host_ / static_cast<double>(inputs.size());
}

void GPT::run_forward(int T, int long_window, bool training) {
  const int d = config_.model_dim;
  const size_t n = static_cast<size_t>(T) * d;
  const float eps = static_cast<float>(config_.rmsnorm_eps);
  ModelActivations& m = pass(training);
  backend_.embedding_forward(m.embedded, params_ + embed_offset_, inputs_, T, d);
  stream_.normalized(m.x0, m.x0_rstd, m.embedded, T, d, eps);  // the backward needs only the output
  const int L = config_.num_layers;
  const int half = config_.num_encoder_layers();
  const float* skip = params_ + skip_offset_;
  layer_input_.assign(L, StreamTensor{});
  StreamTensor x = m.x0;
  for (int i = 0; i < L; ++i) {
    LayerActivations& a = slot(i, training);
    if (i >= half) {  // decoder: x = x + skip_weights[j] * pop()
      const int j = i - half;
      stream_.skip_add(a.x_in, x, m.skip_in[half - 1 - j], skip + j, n);
      x = a.x_in;
    }
    layer_input_[i] = x;
    // Encoder outputs go on the U-net stack; a decoder output is the next layer's input
    // (which is this very buffer in a forward-only pass: block_forward allows that).
    const StreamTensor out = i < half ? m.skip_in[i] : (i == L - 1 ? m.final_x : slot(i + 1, training).x_in);
    block_forward(i, T, layer_window(i, long_window), a, m, x, out,
                  training ? T : std::min(T, forward_mlp_rows_));
    x = out;
  }
}

void GPT::block_forward(int layer, int T, int window, LayerActivations& a, const ModelActivations& m,
                        StreamTensor x_in, StreamTensor x_out, int mlp_rows) {
  const int d = config_.model_dim, hd = config_.hidden_dim(), H = config_.num_heads, D = config_.head_dim;
  const size_t n = static_cast<size_t>(T) * d;
  const BlockOffsets& offsets = block_offsets_[layer];
  // x_in is read only here, so x_out may alias it.
  stream_.mix(a.xm, x_in, m.x0, params_ + offsets.lambdas, n);
  StreamTensor x1 = a.xm;
  if (config_.layer_has_attention(layer)) {
    const float* qkv = params_ + offsets.qkv;
    const size_t w = static_cast<size_t>(hd) * d;
    // One bf16 copy for q, k and v, written by the rmsnorm itself.
    block_norm(a.attn_norm, a.attn_norm_codes, a.attn_rstd, a.xm, T);
    // bf16: q, k and v as codes alone, rounded by their products.
    project(a.qn, a.q_pre_codes, a.attn_norm, qkv, T, hd, d);
    project(a.kn, a.k_pre_codes, a.attn_norm, qkv + w, T, hd, d);
    project(a.v_raw, a.v_raw_codes, a.attn_norm, qkv + 2 * w, T, hd, d);
    backend_.release_operand(kHeldInput);
    normalize_and_rotate_heads(a.qn, a.q_pre_codes, a.qn_codes, a.q_rstd, a.q_rot, a.q_codes, T);
    normalize_and_rotate_heads(a.kn, a.k_pre_codes, a.kn_codes, a.k_rstd, a.k_rot, a.k_codes, T);
    mix_value(layer, a, m, look_up_value_embedding(layer, T, m), T);
    const AttentionShape shape{T, H, D, config_.attn_block_size, window, static_cast<float>(config_.attn_scale)};
    // y's bf16 copy for c_proj written by attention itself: the codes bf16 activations keep,
    // or the held operand's. bf16: attention reads its inputs' codes (q's and k's floats are
    // not even written).
    const size_t nh = static_cast<size_t>(T) * hd;
    if (bf16_activations_) {
      // Held, the codes are all c_proj reads: y's floats are not even written.
      const bool held = backend_.hold_stored_operand(kHeldInput, a.y, a.y_codes, nh);
      backend_.attention_forward_bf16(held ? nullptr : a.y, a.y_codes, a.lse, a.q_rot, a.k_rot, a.v,
                                      a.input_codes(/*floats_current=*/false), doc_, shape);
    } else {
      backend_.attention_forward(a.y, backend_.hold_produced_operand(kHeldInput, a.y, nh), a.lse, a.q_rot, a.k_rot,
                                 a.v, a.input_codes(/*floats_current=*/false), doc_, shape);
    }
    stream_.add_linear(a.x1, a.xm, a.y, params_ + offsets.attn_proj, T, d, hd);
    backend_.release_operand(kHeldInput);
    x1 = a.x1;
  }
  for (int r0 = 0; r0 < T; r0 += mlp_rows) {
    const size_t first = static_cast<size_t>(r0) * d;
    // h and relu(h)^2 (with their codes) hold mlp_rows rows: every slice starts at their start.
    LayerActivations rows = a;
    rows.mlp_norm += first;
    if (rows.mlp_norm_codes) rows.mlp_norm_codes += first;
    rows.mlp_rstd += r0;
    mlp_forward(layer, std::min(mlp_rows, T - r0), rows, x1.at(first), x_out.at(first));
  }
}

void GPT::mlp_forward(int layer, int rows, LayerActivations& a, StreamTensor x1, StreamTensor x_out) {
  const int d = config_.model_dim, mlp = config_.mlp_dim();
  const BlockOffsets& offsets = block_offsets_[layer];
  const bool bf16_products = block_norm(a.mlp_norm, a.mlp_norm_codes, a.mlp_rstd, x1, rows);
  // bf16 activations, training, bf16 products (the product then rounds on the tensor cores'
  // output): h is kept as codes alone, rounded where the product computes it.
  const bool h_as_codes = bf16_activations_ && a.h_codes && bf16_products;
  if (h_as_codes) {
    backend_.gemm_to_bf16(false, true, rows, mlp, d, a.mlp_norm, d, params_ + offsets.fc, d, nullptr, a.h_codes, mlp);
  } else {
    linear_forward(a.h, a.mlp_norm, params_ + offsets.fc, rows, mlp, d);
  }
  backend_.release_operand(kHeldInput);
  relu2(a.g, a.g_codes, a.h_codes, h_as_codes ? nullptr : a.h, rows);
  stream_.add_linear(x_out, x1, a.g, params_ + offsets.mlp_proj, rows, d, mlp);
  backend_.release_operand(kHeldInput);
}

int GPT::look_up_value_embedding(int layer, int T, const ModelActivations& m) {
  const int ve = config_.value_embed_of_layer(layer);
  if (ve < 0) return ve;
  const float* table = params_ + value_embed_offsets_[ve];
  if (bf16_activations_) {
    backend_.embedding_forward_bf16(m.ve_codes, table, inputs_, T, config_.model_dim);
  } else {
    backend_.embedding_forward(m.ve, table, inputs_, T, config_.model_dim);
  }
  return ve;
}

void GPT::project(float* out, uint16_t* out_codes, const float* x, const float* weight, int T, int out_dim,
                  int in_dim) {
  if (out_codes) {
    backend_.gemm_to_bf16(false, true, T, out_dim, in_dim, x, in_dim, weight, in_dim, nullptr, out_codes, out_dim);
  } else {
    linear_forward(out, x, weight, T, out_dim, in_dim);
  }
}

void GPT::mix_value(int layer, LayerActivations& a, const ModelActivations& m, int ve, int T) {
  const float* lambdas = params_ + block_offsets_[layer].attn_lambdas;
  const size_t n = static_cast<size_t>(T) * config_.hidden_dim();
  if (bf16_activations_) {  // v's codes alone, what attention reads
    backend_.mix_forward_bf16(a.v_codes, a.v_raw_codes, ve >= 0 ? m.ve_codes : nullptr, lambdas, n);
  } else {
    backend_.mix_forward(a.v, nullptr, a.v_raw, ve >= 0 ? m.ve : nullptr, lambdas, n);
  }
}

void GPT::mix_value_backward(int layer, LayerActivations& a, const ModelActivations& m, int ve, float* dv,
                             uint16_t* dv_codes, int T) {
  const BlockOffsets& offsets = block_offsets_[layer];
  const size_t n = static_cast<size_t>(T) * config_.hidden_dim();
  float* dlambdas = grads_ + offsets.attn_lambdas;
  const float* lambdas = params_ + offsets.attn_lambdas;
  if (bf16_activations_) {  // held, the codes are all v's products read: dv's floats are not even written
    backend_.mix_backward_bf16(dv_codes ? nullptr : dv, dv_codes, false, ve >= 0 ? a.dve : nullptr, false, dlambdas,
                               dv, a.v_raw_codes, ve >= 0 ? m.ve_codes : nullptr, lambdas, n);
  } else {
    backend_.mix_backward(dv, dv_codes, false, ve >= 0 ? a.dve : nullptr, false, dlambdas, dv, a.v_raw,
                          ve >= 0 ? m.ve : nullptr, lambdas, n);
  }
  if (ve >= 0) backend_.embedding_backward(grads_ + value_embed_offsets_[ve], a.dve, inputs_, T, config_.model_dim);
}

void GPT::rotated_copy(float* out, const float* x, int T) {
  if (out != x) backend_.copy(out, x, static_cast<size_t>(T) * config_.hidden_dim());
  backend_.rotary(out, nullptr, T, config_.num_heads, config_.head_dim, static_cast<float>(config_.rotary_base),
                  false);
}

void GPT::normalize_and_rotate_heads(float* x, const uint16_t* x_codes, uint16_t* normed_codes, float* rstd,
                                     float* rotated, uint16_t* rotated_codes, int T) {
  const int H = config_.num_heads, D = config_.head_dim;
  const float eps = static_cast<float>(config_.rmsnorm_eps), base = static_cast<float>(config_.rotary_base);
  if (bf16_activations_) {
    // One pass, codes alone: attention reads them, the backward reads normed_codes.
    backend_.rmsnorm_rotary_from_bf16(nullptr, normed_codes, rotated_codes, rstd, x_codes, T, H, D, eps, base);
  } else {
    backend_.rmsnorm_forward(x, nullptr, rstd, x, T * H, D, eps);
    rotated_copy(rotated, x, T);
  }
}

void GPT::rotated_heads_backward(float* dx, uint16_t* dx_codes, const float* normed, const uint16_t* normed_codes,
                                 const float* rstd, int T) {
  const int H = config_.num_heads, D = config_.head_dim;
  const float base = static_cast<float>(config_.rotary_base);
  if (bf16_activations_) {
    // Held, the codes are all the products read: dx's floats are not even written.
    backend_.rotary_rmsnorm_backward_bf16(dx_codes ? nullptr : dx, dx_codes, dx, normed_codes, rstd, T, H, D, base);
  } else {
    backend_.rotary(dx, nullptr, T, H, D, base, /*inverse=*/true);
    backend_.rmsnorm_backward(dx, dx_codes, dx, normed, rstd, T * H, D, false);
  }
}

void GPT::relu2(float* g, uint16_t* g_codes, uint16_t* stored, const float* h, int T) {
  const size_t n = static_cast<size_t>(T) * config_.mlp_dim();
  if (bf16_activations_) {
    // g rounded, as codes: the products' operand in place, or widened into g's floats (over
    // h's, read by then) where they read float32.
    const bool held = backend_.hold_stored_operand(kHeldInput, g, g_codes, n);
    if (h) {
      backend_.relu2_forward_bf16(nullptr, g_codes, stored, h, n);
    } else {  // h computed as its codes alone
      backend_.relu2_from_bf16(nullptr, g_codes, stored, n);
    }
    if (!held) backend_.widen_bf16(g, g_codes, n);
  } else {
    backend_.relu2_forward(g, h, n);
  }
}

void GPT::relu2_backward(float* dh, const uint16_t* dg_codes, const float* h, const uint16_t* stored, int T) {
  const size_t n = static_cast<size_t>(T) * config_.mlp_dim();
  if (bf16_activations_) {
    // Held, the codes are all c_fc's products read: dh's floats are not even written.
    uint16_t* codes = backend_.hold_produced_operand(kHeldGradient, dh, n);
    backend_.relu2_backward_from_bf16(codes ? nullptr : dh, codes, dg_codes, stored, n);
  } else {
    backend_.relu2_backward(dh, dh, h, n);
    backend_.hold_operand(kHeldGradient, dh, n);
  }
}

bool GPT::block_norm(float* out, uint16_t* codes, float* rstd, StreamTensor x, int rows) {
  const int d = config_.model_dim;
  const size_t n = static_cast<size_t>(rows) * d;
  const float eps = static_cast<float>(config_.rmsnorm_eps);
  if (codes) {  // bf16 activations: the codes are the products' operand where they read bf16
    const bool held = backend_.hold_stored_operand(kHeldInput, out, codes, n);
    stream_.rmsnorm(held ? nullptr : out, codes, rstd, x, rows, d, eps);
    return held;
  }
  uint16_t* produced = backend_.hold_produced_operand(kHeldInput, out, n);
  stream_.rmsnorm(out, produced, rstd, x, rows, d, eps);
  return produced != nullptr;
}

void GPT::hold_kept_operand(float* floats, const uint16_t* codes, size_t n) {
  if (!codes) {
    backend_.hold_operand(kHeldInput, floats, n);
  } else if (!backend_.hold_stored_operand(kHeldInput, floats, codes, n)) {
    backend_.widen_bf16(floats, codes, n);  // float32 products: the floats are one shared buffer
  }
}

void GPT::block_norm_backward(float* dx, uint16_t* dx_codes, const float* dout, const float* out,
                              const uint16_t* codes, const float* rstd, int rows) {
  const int d = config_.model_dim;
  if (codes) {
    backend_.rmsnorm_backward_bf16(dx, dx_codes, dout, codes, rstd, rows, d, true);
  } else {
    backend_.rmsnorm_backward(dx, dx_codes, dout, out, rstd, rows, d, true);
  }
}

void GPT::mlp_norm_for_backward(LayerActivations& a, StreamTensor x1, int T) {
  if (recompute_) {
    block_norm(a.mlp_norm, a.mlp_norm_codes, a.mlp_rstd, x1, T);
  } else {
    hold_kept_operand(a.mlp_norm, a.mlp_norm_codes, static_cast<size_t>(T) * config_.model_dim);
  }
}

void GPT::relu2_for_backward(LayerActivations& a, int T) {
  const size_t n = static_cast<size_t>(T) * config_.mlp_dim();
  if (!recompute_relu2_) {
    hold_kept_operand(a.g, a.g_codes, n);
  } else if (bf16_activations_) {  // g held for c_proj's backward as in the forward
    relu2(a.g, a.g_codes, a.h_codes, nullptr, T);
  } else {
    backend_.relu2_forward(a.g, a.h, n);
  }
}

void GPT::prepare_attention_inputs_for_backward(int layer, LayerActivations& a, int T) {
  if (recompute_) block_norm(a.attn_norm, a.attn_norm_codes, a.attn_rstd, a.xm, T);
  if (bf16_activations_) {  // from the normalised codes, codes alone as in the forward
    const int H = config_.num_heads, D = config_.head_dim;
    const float base = static_cast<float>(config_.rotary_base);
    backend_.rotary_from_bf16(nullptr, a.q_codes, a.qn_codes, T, H, D, base);
    backend_.rotary_from_bf16(nullptr, a.k_codes, a.kn_codes, T, H, D, base);
  } else {
    rotated_copy(a.q_rot, a.qn, T);
    rotated_copy(a.k_rot, a.kn, T);
  }
  if (recompute_) mix_value(layer, a, train_->m, config_.value_embed_of_layer(layer), T);  // looked up by the caller
}

void GPT::run_head(int T, float grad_scale, const ModelActivations& m) {
  const int d = config_.model_dim, V = config_.padded_vocab();
  const float* W = params_ + lm_head_offset_;
  float* dW = grads_ + lm_head_offset_;
  const bool training = grad_scale != 0.f;
  const bool fp8 = training && config_.lm_head_fp8 != 0;
  stream_.rmsnorm(m.final_norm, nullptr, m.final_rstd, m.final_x, T, d, static_cast<float>(config_.rmsnorm_eps));
  // The bf16 head rounds W once for every chunk (the FP8 head keeps its own copy).
  if (!fp8) backend_.hold_operand(kHeldInput, W, static_cast<size_t>(V) * d);
  // Logits exist only head_chunk_ rows at a time: each chunk's loss gradient is known
  // as soon as its logits are (the loss is the last operation), so the head's backward
  // runs chunk by chunk too.
  const float softcap = static_cast<float>(config_.logit_softcap);
  for (int r0 = 0; r0 < T; r0 += head_chunk_) {
    const int rows = std::min(head_chunk_, T - r0);
    const float* xr = m.final_norm + static_cast<size_t>(r0) * d;
    // SPEC §6: training runs the head in FP8 (lm_head_fp8), forward, loss and backward in
    // one call; evaluation uses the plain head. The FP8 cast sees the sequence's own
    // mean-loss gradient, as on each of the reference's ranks (e5m2's range is tuned to
    // it); grad_scale is applied after the cast.
    if (fp8) {
      backend_.fp8_head_loss(m.logits, row_loss_ + r0, train_->dtmp + static_cast<size_t>(r0) * d, dW, xr, W,
                             targets_ + r0, rows, V, d, softcap, 1.f / T, grad_scale, /*requantize_weight=*/r0 == 0);
      continue;
    }
    backend_.gemm(false, true, rows, V, d, 1.f, xr, d, W, d, 0.f, m.logits, V);
    backend_.softcap_cross_entropy(m.logits, row_loss_ + r0, targets_ + r0, rows, V, softcap, grad_scale / T);
    if (!training) continue;
    backend_.hold_operand(kHeldGradient, m.logits, static_cast<size_t>(rows) * V);
    backend_.gemm(true, false, V, d, rows, 1.f, m.logits, V, xr, d, 1.f, dW, d);
    backend_.gemm(false, false, rows, d, V, 1.f, m.logits, V, W, d, 0.f, train_->dtmp + static_cast<size_t>(r0) * d,
                  d);
    backend_.release_operand(kHeldGradient);
  }
  backend_.release_operand(kHeldInput);
  // The last block's output gradient, held for its MLP's c_proj backward (block_backward).
  if (training) {
    backend_.rmsnorm_backward(train_->dx, hold_output_gradient(T), train_->dtmp, m.final_norm, m.final_rstd, T, d,
                              false);
  }
}

void GPT::run_backward(int T, int long_window) {
  const int d = config_.model_dim;
  const size_t n = static_cast<size_t>(T) * d;
  const int L = config_.num_layers;
  const int half = config_.num_encoder_layers();
  const float* skip = params_ + skip_offset_;
  TrainingBuffers& b = *train_;
  const ModelActivations& m = b.m;
  // dx0 is written by the last block's mix backward, each skip's gradient by its skip's:
  // neither is zeroed first.
  // The head's gradient is final since run_head; each block's after its backward.
  report_gradients_ready(block_params_begin(L), layout_.total());
  for (int i = L - 1; i >= 0; --i) {
    // The stack's share of an encoder output's gradient, the sum held for block_backward.
    if (i < half) backend_.add(b.dx, hold_output_gradient(T), b.dskip_in[i], n);
    // A decoder's input gradient is the previous block's output gradient as it is: held by
    // the op that computes it; an encoder's gets the stack's share added first.
    const bool next_reads_as_is = i - 1 >= half;
    block_backward(i, T, layer_window(i, long_window), slot(i, true), layer_input_[i], next_reads_as_is);
    if (i >= half) {  // x_in = previous output + skip_weights[j] * popped encoder output
      const int j = i - half;
      stream_.skip_add_backward(b.dskip_in[half - 1 - j], grads_ + skip_offset_ + j, b.dx, m.skip_in[half - 1 - j],
                                skip + j, n);
    }
    report_gradients_ready(block_params_begin(i), block_params_begin(i + 1));
  }
  // Layer 0's input is x0 itself.
  backend_.add(b.dx0, nullptr, b.dx, n);
  stream_.normalized_backward(b.dtmp, b.dx0, m.x0, m.x0_rstd, T, d);
  backend_.embedding_backward(grads_ + embed_offset_, b.dtmp, inputs_, T, d);
  report_gradients_ready(0, block_params_begin(0));  // skip weights and embeddings
}

void GPT::qkv_backward(float* dx, float* dqkv, const float* dout, const float* x, const float* qkv, int T) {
  const int d = config_.model_dim, hd = config_.hidden_dim();
  const size_t nh = static_cast<size_t>(T) * hd, w = static_cast<size_t>(hd) * d;
  // The three [hd, d] weight gradients at once: 3 x 36 output tiles of 128^2 at speedrun-124m
  // in one product, where each alone leaves most of an H100's 132 SMs idle.
  backend_.gemm_batched(true, false, hd, d, T, 1.f, dout, hd, nh, x, d, 0, 1.f, dqkv, d, w, 3);
  for (int i = 0; i < 3; ++i) {
    backend_.gemm(false, false, T, d, hd, 1.f, dout + i * nh, hd, qkv + i * w, d, i > 0 ? 1.f : 0.f, dx, d);
  }
}

// The layout (params.cpp) keeps each block's tensors together, between the embeddings
// and the lm_head; layer == num_layers gives the lm_head's offset.
size_t GPT::block_params_begin(int layer) const {
  if (layer >= config_.num_layers) return lm_head_offset_;
  return block_offsets_[layer].lambdas;
}

void GPT::report_gradients_ready(size_t begin, size_t end) {
  if (gradient_ready_ && end > begin) gradient_ready_(begin, end - begin);
}

uint16_t* GPT::hold_output_gradient(int T) {
  return backend_.hold_produced_operand(kHeldGradient, train_->dx, static_cast<size_t>(T) * config_.model_dim);
}

void GPT::block_backward(int layer, int T, int window, LayerActivations& a, StreamTensor x_in,
                         bool hold_input_gradient) {
  const int d = config_.model_dim, hd = config_.hidden_dim(), H = config_.num_heads, D = config_.head_dim;
  const int mlp = config_.mlp_dim();
  const size_t n = static_cast<size_t>(T) * d;
  const BlockOffsets& offsets = block_offsets_[layer];
  const bool has_attention = config_.layer_has_attention(layer);
  TrainingBuffers& b = *train_;
  if (recompute_) stream_.mix(a.xm, x_in, b.m.x0, params_ + offsets.lambdas, n);
  // MLP: out = x1 + c_proj(relu(c_fc(rmsnorm(x1)))^2); b.dx becomes d x1.
  relu2_for_backward(a, T);
  // bf16: relu(h)^2's gradient as codes alone, as the reference's bf16 gradient, in g's buffer
  // (dead once c_proj's weight gradient has read g).
  uint16_t* dg_codes = bf16_activations_ ? reinterpret_cast<uint16_t*>(a.g) : nullptr;
  linear_backward(b.dwide, dg_codes, false, grads_ + offsets.mlp_proj, b.dx, a.g, params_ + offsets.mlp_proj, T, d,
                  mlp);
  backend_.release_operand(kHeldGradient);  // b.dx, held by the op that computed it
  backend_.release_operand(kHeldInput);
  relu2_backward(b.dwide, dg_codes, a.h, a.h_codes, T);
  mlp_norm_for_backward(a, has_attention ? a.x1 : a.xm, T);
  linear_backward(b.dtmp, nullptr, false, grads_ + offsets.fc, b.dwide, a.mlp_norm, params_ + offsets.fc, T, mlp, d);
  backend_.release_operand(kHeldGradient);
  backend_.release_operand(kHeldInput);
  // d x1, held for attention's c_proj backward as the codes the norm's backward writes.
  block_norm_backward(b.dx, has_attention ? hold_output_gradient(T) : nullptr, b.dtmp, a.mlp_norm, a.mlp_norm_codes,
                      a.mlp_rstd, T);
  if (has_attention) {
    // Attention: x1 = xm + c_proj(attn(...)); b.dx becomes d xm.
    const float* qkv = params_ + offsets.qkv;
    float* dqkv = grads_ + offsets.qkv;
    const size_t nh = static_cast<size_t>(T) * hd;
    // bf16: y's kept codes are c_proj's operand, or widened into its floats for float32 products.
    if (bf16_activations_) hold_kept_operand(a.y, a.y_codes, nh);
    // bf16: attention's output gradient as codes alone, as the flash kernel reads it (in dy's
    // buffer, read only through them).
    uint16_t* dy_codes = bf16_activations_ ? reinterpret_cast<uint16_t*>(b.dy) : nullptr;
    linear_backward(b.dy, dy_codes, false, grads_ + offsets.attn_proj, b.dx, a.y, params_ + offsets.attn_proj, T, d,
                    hd);
    backend_.release_operand(kHeldGradient);
    backend_.release_operand(kHeldInput);
    const int ve = look_up_value_embedding(layer, T, b.m);
    prepare_attention_inputs_for_backward(layer, a, T);
    const AttentionShape shape{T, H, D, config_.attn_block_size, window, static_cast<float>(config_.attn_scale)};
    // bf16: attention reads its inputs and y as the codes kept (or recomputed) for this layer.
    AttentionInputCodes codes = a.input_codes(/*floats_current=*/false);
    codes.y = a.y_codes;
    codes.dy = dy_codes;
    backend_.attention_backward(b.dq, b.dk, b.dv, b.dy, a.y, a.lse, a.q_rot, a.k_rot, a.v, codes, doc_, shape);
    // One bf16 copy of the rmsnorm output for q, k and v (recomputed: already held). q's, k's
    // and v's gradients (adjacent in the block-gradient buffer) are held as one operand, the
    // codes their backward ops write, so that their weight gradients are one batched product.
    if (!recompute_) hold_kept_operand(a.attn_norm, a.attn_norm_codes, n);
    uint16_t* dqkv_codes = backend_.hold_produced_operand(kHeldGradient, b.dq, 3 * nh);
    auto codes_of = [&](int i) { return dqkv_codes ? dqkv_codes + i * nh : nullptr; };
    rotated_heads_backward(b.dq, codes_of(0), a.qn, a.qn_codes, a.q_rstd, T);
    rotated_heads_backward(b.dk, codes_of(1), a.kn, a.kn_codes, a.k_rstd, T);
    mix_value_backward(layer, a, b.m, ve, b.dv, codes_of(2), T);
    qkv_backward(b.dtmp, dqkv, b.dq, a.attn_norm, qkv, T);
    backend_.release_operand(kHeldGradient);
    backend_.release_operand(kHeldInput);
    block_norm_backward(b.dx, nullptr, b.dtmp, a.attn_norm, a.attn_norm_codes, a.attn_rstd, T);
  }
  // xm = lambdas[0] * x_in + lambdas[1] * x0; b.dx becomes d x_in, and x0's share goes to
  // dx0 (written by the last block, whose backward comes first).
  const bool first_of_backward = layer == config_.num_layers - 1;
  stream_.mix_backward(b.dx, hold_input_gradient ? hold_output_gradient(T) : nullptr, false, b.dx0,
                       !first_of_backward, grads_ + offsets.lambdas, b.dx, x_in, b.m.x0, params_ + offsets.lambdas, n);
}

}  // namespace speedrun
