// The GPT of SPEC §2: explicit forward and backward passes written once over the
// Backend interface, with activations preallocated for sequences of up to max_T tokens.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "backends/backend.h"
#include "model/arena_carver.h"
#include "model/config.h"
#include "model/params.h"
#include "model/residual_stream.h"

namespace speedrun {

// What the forward keeps for the backward. Every mode keeps q and k normalised but not
// rotated: the backward rotates them again, one rotary pass for 2 hd values per token and
// attention layer (1.41 GiB less at speedrun-124m with bf16 activations; bit-identical
// gradients). kRecompute keeps neither the rmsnorm outputs nor the mixed v nor relu(h)^2
// but the attention residual x1, and recomputes them in the backward from what it does keep
// (bit-identical gradients): with float32 activations a decoder layer with attention keeps
// 10 d floats per token instead of 16 d at the speedrun's shapes, for one more pass of the
// lambda mixes, rmsnorm and relu^2. kRecomputeRelu2 keeps everything but relu(h)^2, the
// largest piece with h (4 d per token), and recomputes it from h in the backward: one more
// relu^2 pass; with bf16 activations 3.1 GiB less for speedrun-124m (bit-identical
// gradients).
enum class ActivationMemory { kStore, kRecompute, kRecomputeRelu2 };

// How activations are stored. kBfloat16 is SPEC §6's reference precision: the residual
// stream (x0, block inputs and outputs, lambda mixes, attention residuals, the skip stack;
// ResidualStream), the block norms' outputs, q, k and v as their products compute them, the
// normalised and rotated q and k, the value embeddings, the mixed v, attention's output y,
// the MLP's h and relu(h)^2 are rounded to bf16 where they are computed (so the forward
// itself uses the rounded values, in every pass) and kept as 16-bit codes, which the ops,
// the products and attention read (the flash kernel then rounds no copies of its own).
// Floats remain only as one buffer shared by all layers where float32 products read them
// (the norms, relu(h)^2, y); q, k and v have none. Gradients stay float32 but for two
// computed as codes by their products, as the reference's bf16 ones: relu(h)^2's and y's.
// The residual adds round once (bf16(stream + product), in the product's epilogue) where
// the reference rounds the product first. kFloat32 keeps everything exact (the CPU default,
// and what finite-difference gradient checks need).
enum class ActivationPrecision { kFloat32, kBfloat16 };

struct ActivationOptions {
  ActivationMemory memory = ActivationMemory::kStore;
  ActivationPrecision precision = ActivationPrecision::kFloat32;
  // Rows a forward-only pass runs its MLPs on at once. Every MLP op is row-wise, so the
  // result is the same; what changes is that the widest activations, h and relu(h)^2
  // ([rows, 4 d]), exist for this many rows instead of the whole sequence: 1.2 GB less at
  // SPEC §5's 262144-token validation, and its bf16 operand codes shrink alike.
  int forward_mlp_rows = 16384;
};

class GPT {
 public:
  // Allocates parameters, gradients and activations in the backend's memory for
  // training sequences of up to max_train_T tokens and forward-only ones of up to
  // max_eval_T. A forward-only pass keeps no activations for a backward: it runs every
  // layer in one set of buffers, in place where an op allows, and that set shares one
  // arena with the training buffers (no pass needs both). So a long validation sequence
  // costs no memory beyond the training step's while it fits in that arena.
  GPT(const Config& config, Backend& backend, int max_train_T, int max_eval_T, ActivationOptions activations = {});
  ~GPT();
  GPT(const GPT&) = delete;
  GPT& operator=(const GPT&) = delete;

  // The bytes a model of these sizes holds in its backend's memory, computed without
  // allocating (the constructor allocates exactly this): for `speedrun memory`, and to see
  // whether a configuration fits a device before launching it.
  struct MemoryPlan {
    size_t parameter_bytes = 0;
    size_t gradient_bytes = 0;
    size_t training_bytes = 0;      // a training pass's activations and gradient scratch
    size_t forward_only_bytes = 0;  // a forward-only pass's, in the same arena
    size_t sequence_bytes = 0;      // inputs, targets, document ids, token losses
    // One chunk of the head's logits (the longer pass's), inside each pass's share of the
    // arena: counted in training_bytes and forward_only_bytes, not on top of them.
    size_t logits_bytes = 0;
    size_t arena_bytes() const { return std::max(training_bytes, forward_only_bytes); }
    // The arena a forward-only pass leaves unused, lent to the backend's scratch meanwhile.
    size_t forward_spare_bytes() const { return arena_bytes() - forward_only_bytes; }
    size_t activation_bytes() const { return arena_bytes() + sequence_bytes; }
    size_t total_bytes() const { return parameter_bytes + gradient_bytes + activation_bytes(); }
  };
  static MemoryPlan plan_memory(const Config& config, int max_train_T, int max_eval_T, ActivationOptions activations,
                                int head_chunk_rows);

  const Config& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  Backend& backend() { return backend_; }
  // Bytes of the backend's memory held for activations and gradient scratch (everything
  // but parameters and gradients).
  size_t activation_bytes() const { return activation_bytes_; }
  float* params() { return params_; }
  float* grads() { return grads_; }
  float* param(const std::string& name) { return params_ + layout_.at(name).offset; }
  float* grad(const std::string& name) { return grads_ + layout_.at(name).offset; }

  void load_parameters(std::span<const float> host);  // layout_.total() floats
  std::vector<float> parameters_to_host();
  std::vector<float> gradients_to_host();
  void zero_grad();
  // Called during the backward pass with [offset, offset + count) of the flat layout as
  // soon as those gradients are final for this sequence (queued on the backend, not yet
  // computed): the lm_head first, then each block's tensors from the last block down,
  // then the rest (skip weights and embeddings). Every parameter exactly once, adjacent
  // ranges in descending order. Empty function: no calls. Used to overlap the gradient
  // all-reduce with the rest of the backward.
  using GradientReadyHook = std::function<void(size_t offset, size_t count)>;
  void set_gradient_ready_hook(GradientReadyHook hook) { gradient_ready_ = std::move(hook); }
  // A backend int32 that every later forward sets to 1 when a token loss is not finite
  // (nullptr: no check). The caller clears it.
  void set_fault_flag(int32_t* flag) { fault_flag_ = flag; }

  // Mean cross-entropy of one packed sequence (host tokens, T a multiple of the block
  // size, T <= max_train_T, or <= max(max_train_T, max_eval_T) when grad_scale == 0) with
  // the given long window (blocks). When grad_scale != 0, also
  // adds grad_scale * d(mean loss)/d(params) to the gradients.
  double forward_backward(std::span<const int32_t> inputs, std::span<const int32_t> targets, int long_window,
                          float grad_scale);
  // The same without waiting: queues the work and the float64 sum of the sequence's token
  // losses into *loss_sum (memory from Backend::alloc_host), valid after the backend's
  // next synchronize(). `inputs` and `targets` must stay unchanged until then (they may be
  // pinned memory the upload reads asynchronously).
  void forward_backward_async(std::span<const int32_t> inputs, std::span<const int32_t> targets, int long_window,
                              float grad_scale, double* loss_sum);
  double forward(std::span<const int32_t> inputs, std::span<const int32_t> targets, int long_window) {
    return forward_backward(inputs, targets, long_window, 0.f);
  }

 private:
  struct LayerActivations;
  struct ModelActivations;
  struct TrainingBuffers;
  struct ForwardBuffers;
  // Each pass's buffers, pointing into the arena (counting only, when the carver has no memory).
  // head_chunk_rows: the rows of logits the head computes at a time.
  static TrainingBuffers carve_training_buffers(const Config& config, ActivationOptions activations,
                                                ArenaCarver& arena, size_t T, int head_chunk_rows);
  static ForwardBuffers carve_forward_buffers(const Config& config, ActivationOptions activations, ArenaCarver& arena,
                                              size_t T, int head_chunk_rows);
  static void carve_gradients_in_dead_h(const Config& config, bool bf16, ArenaCarver& arena, size_t T,
                                        TrainingBuffers& b);
  ModelActivations& pass(bool training);
  void run_forward(int T, int long_window, bool training);
  void resolve_offsets();
  void report_gradients_ready(size_t begin, size_t end);
  size_t block_params_begin(int layer) const;  // first float of blocks.<layer>.*
  void check_sequence(std::span<const int32_t> inputs, std::span<const int32_t> targets, bool training) const;
  void run_head(int T, float grad_scale, const ModelActivations& m);
  void run_backward(int T, int long_window);
  LayerActivations& slot(int layer, bool training);
  // The MLP runs mlp_rows rows at a time (the whole sequence in a training pass).
  void block_forward(int layer, int T, int window, LayerActivations& a, const ModelActivations& m,
                     StreamTensor x_in, StreamTensor x_out, int mlp_rows);
  // x_out = x1 + c_proj(relu(c_fc(rmsnorm(x1)))^2) over `rows` rows, a's MLP buffers
  // pointing at those rows.
  void mlp_forward(int layer, int rows, LayerActivations& a, StreamTensor x1, StreamTensor x_out);
  // For the backward's products: the MLP's rmsnorm output (kRecompute) and relu(h)^2
  // (kRecompute, kRecomputeRelu2) recomputed into the shared buffers, else the kept ones;
  // and attention's rotated q and k recomputed from the kept normalised ones (every mode),
  // its rmsnorm output and mixed v too (kRecompute). The MLP's norm and relu(h)^2 are left held as kHeldInput (relu(h)^2 recomputed with float32
  // activations is not), as is attention's norm when recomputed; the caller releases them.
  void mlp_norm_for_backward(LayerActivations& a, StreamTensor x1, int T);
  void relu2_for_backward(LayerActivations& a, int T);
  // A block's rmsnorm of the stream into out (float32 activations) or, with bf16 activations,
  // rounded into `codes` (non-null exactly then; out's floats written only where products
  // read float32), held as kHeldInput for the products that follow. Returns whether those
  // read bf16 codes. block_norm_backward accumulates its gradient into dx, from the codes
  // when given.
  bool block_norm(float* out, uint16_t* codes, float* rstd, StreamTensor x, int rows);
  // A kept activation (a norm, relu(h)^2, y: n floats, or with bf16 activations their codes)
  // held as kHeldInput again for the backward's products: the codes in place, widened into
  // the floats where products read float32, or the floats' bf16 copy.
  void hold_kept_operand(float* floats, const uint16_t* codes, size_t n);
  void block_norm_backward(float* dx, uint16_t* dx_codes, const float* dout, const float* out, const uint16_t* codes,
                           const float* rstd, int rows);
  void prepare_attention_inputs_for_backward(int layer, LayerActivations& a, int T);
  // out = rotary(x) (float32 activations), in place when out == x.
  void rotated_copy(float* out, const float* x, int T);
  // Looks up the value embedding `layer` mixes into v into m.ve (one buffer for all layers,
  // cheaper to look up again than to keep per table); returns its table, -1 for none.
  int look_up_value_embedding(int layer, int T, const ModelActivations& m);
  // out [T, out_dim] = x W^T (float32), or with out_codes bf16 of it as codes alone (bf16
  // activations: q, k and v).
  void project(float* out, uint16_t* out_codes, const float* x, const float* weight, int T, int out_dim, int in_dim);
  // Attention's v = lambdas[0] v_raw + lambdas[1] ve (ve: the table looked up into m, < 0 for
  // none), and its backward: v's gradient dv in place, and its bf16 codes into dv_codes
  // (held by the caller for v's products; null: none), the lambdas' and the table's
  // gradients added (a.dve: scratch for the latter).
  void mix_value(int layer, LayerActivations& a, const ModelActivations& m, int ve, int T);
  void mix_value_backward(int layer, LayerActivations& a, const ModelActivations& m, int ve, float* dv,
                          uint16_t* dv_codes, int T);
  // The precision-dependent steps: q or k -> rmsnorm per head -> rotary, h -> relu(h)^2,
  // and their backwards. float32: x is normalised in place and rotated into `rotated`;
  // bf16: one pass from x's codes (x_codes) writes the codes alone, the normalised ones into
  // normed_codes (kept for the backward) and the rotated ones into rotated_codes
  // (attention's input).
  // rotated_heads_backward turns dx back and through the norm's backward, writing its bf16
  // codes into dx_codes (held by the caller for the products that follow; null: none; with
  // bf16 activations dx's floats are then not even written).
  void normalize_and_rotate_heads(float* x, const uint16_t* x_codes, uint16_t* normed_codes, float* rstd,
                                  float* rotated, uint16_t* rotated_codes, int T);
  void rotated_heads_backward(float* dx, uint16_t* dx_codes, const float* normed, const uint16_t* normed_codes,
                              const float* rstd, int T);
  // dx = dq Wq + dk Wk + dv Wv and the three weight gradients added into dqkv, from dout =
  // [dq; dk; dv] ([3, T, hd], held as one operand) and the attention norm x, as linear_backward.
  void qkv_backward(float* dx, float* dqkv, const float* dout, const float* x, const float* qkv, int T);
  // With bf16 activations, relu2 reads h as `stored` codes when h is null (the product wrote
  // them), else rounds h into `stored`; it writes g rounded into g_codes and leaves them held
  // as kHeldInput for the product that follows (g's floats written, the widened codes, only
  // where the product reads float32); relu2_backward always leaves dh held as kHeldGradient
  // for c_fc's two backward products. The caller releases them.
  void relu2(float* g, uint16_t* g_codes, uint16_t* stored, const float* h, int T);
  void relu2_backward(float* dh, const uint16_t* dg_codes, const float* h, const uint16_t* stored, int T);
  // On entry the training buffers' dx holds d(block output), held as kHeldGradient by the op
  // that computed it (codes written by that op); on return d(block input), held likewise
  // when hold_input_gradient (the next block reads it as it is). Adds parameter and
  // value-embedding gradients; x0's into dx0 (written by the last layer, added by the others).
  void block_backward(int layer, int T, int window, LayerActivations& a, StreamTensor x_in,
                      bool hold_input_gradient);
  // hold_produced_operand(kHeldGradient) for the training buffers' dx: the codes buffer for
  // the op about to compute it, nullptr where nothing is held.
  uint16_t* hold_output_gradient(int T);
  void linear_forward(float* out, const float* x, const float* weight, int T, int out_dim, int in_dim);
  // dW += dout^T x and dx (+)= dout W, or with dx_codes dx = bf16(dout W) as codes alone
  // (nothing accumulated, dx unused): every caller holds dout as kHeldGradient, its codes
  // written by the op that computed it, so that both products read one bf16 copy.
  void linear_backward(float* dx, uint16_t* dx_codes, bool accumulate_dx, float* dweight, const float* dout,
                       const float* x, const float* weight, int T, int out_dim, int in_dim);
  int layer_window(int layer, int long_window) const;

  // Backend::hold_operand slots: a matmul input shared by several products, and the output
  // gradient a linear layer's two backward products share.
  static constexpr int kHeldInput = 0;
  static constexpr int kHeldGradient = 1;

  Config config_;
  Backend& backend_;
  ParamLayout layout_;
  int max_train_T_;
  int max_eval_T_;
  const bool recompute_;
  const bool recompute_relu2_;  // kRecompute or kRecomputeRelu2
  const bool bf16_activations_;
  ResidualStream stream_;  // bf16 with bf16 activations
  const int forward_mlp_rows_;
  size_t activation_bytes_ = 0;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  std::vector<void*> allocations_;

  // Sequence inputs.
  int32_t* inputs_ = nullptr;
  int32_t* targets_ = nullptr;
  int32_t* doc_ = nullptr;
  float* row_loss_ = nullptr;     // [T]
  // Activations of a training pass and of a forward-only one, carved from one arena.
  std::unique_ptr<TrainingBuffers> train_;
  std::unique_ptr<ForwardBuffers> forward_;
  float* forward_spare_ = nullptr;  // MemoryPlan::forward_spare_bytes() from here
  size_t forward_spare_bytes_ = 0;
  std::vector<StreamTensor> layer_input_;  // where each layer's input lives in this pass
  int head_chunk_ = 0;
  GradientReadyHook gradient_ready_;
  // Where each parameter lives in the flat layout (params_/grads_ + offset).
  struct BlockOffsets {
    size_t lambdas = 0, qkv = 0, attn_lambdas = 0, attn_proj = 0, fc = 0, mlp_proj = 0;
  };
  std::vector<BlockOffsets> block_offsets_;
  std::vector<size_t> value_embed_offsets_;
  size_t embed_offset_ = 0, lm_head_offset_ = 0, skip_offset_ = 0;
  double* loss_sum_host_ = nullptr;  // Backend::alloc_host: forward_backward's loss
  int32_t* fault_flag_ = nullptr;
};

}  // namespace speedrun
