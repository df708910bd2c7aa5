// The small set of operations the model's forward and backward passes and the
// optimisers are written over. Pointers are the backend's memory (host memory for
// the CPU backend, device memory for CUDA). Matrices are row-major. Scalars that are
// parameters (lambdas, skip weights) are passed as pointers so that no backend has
// to read them back to the host. "accumulate" means out += result instead of out =.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backends/backend_options.h"
#include "backends/matmul_sweep.h"
#include "util/error.h"

namespace speedrun {

struct AttentionShape {
  int T;                  // tokens in the packed sequence
  int H;                  // heads
  int D;                  // head size; q, k, v, y are [T, H, D]
  int block_size;         // attention block size (SPEC §3)
  int window_blocks;      // window N; 0 behaves as 1
  float scale;            // logit scale (0.12)
};

// Attention's inputs kept as bf16 activations (SPEC §6): q, k, v [T, H, D] as the codes
// rotary and mix_forward stored (all three or none), and for the backward y as
// attention_forward_bf16 stored it and dy as c_proj's backward product computed it
// (gemm_to_bf16: the gradient as the reference's bf16 one). What is given is read instead of
// the floats (dy's too), which need
// not be current (a kept layer's floats share one buffer with every other layer's) unless
// floats_current says that q's, k's and v's are the codes' widening (just computed or
// recomputed): a backend that reads floats then need not widen the codes itself.
struct AttentionInputCodes {
  const uint16_t* q = nullptr;
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  const uint16_t* y = nullptr;
  const uint16_t* dy = nullptr;
  bool floats_current = false;
  bool given() const { return q != nullptr; }
};

// One tensor of a multi-tensor Adam update: backend memory, n floats each, its own rate.
struct AdamTensor {
  float* param = nullptr;
  const float* grad = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  size_t n = 0;
  float lr = 0.f;
};

// Adam's bias corrections for `step` (updates so far including this one), computed in
// float64 and folded into the rate and the second moment's scale: every backend's, alike.
struct AdamBiasCorrection {
  double bias1;
  float inv_sqrt_bias2;
  AdamBiasCorrection(float beta1, float beta2, int step)
      : bias1(1.0 - std::pow(static_cast<double>(beta1), step)),
        inv_sqrt_bias2(static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(static_cast<double>(beta2), step)))) {}
  float step_size(float lr) const { return static_cast<float>(lr / bias1); }
};

// The contract of the bf16 backward ops that may leave dx unwritten (rmsnorm_backward_bf16,
// relu2_backward_bf16, relu2_backward_from_bf16, rotary_rmsnorm_backward_bf16): only when
// its codes are written and nothing accumulates into it.
inline void require_codes_for_null_output(const float* dx, const uint16_t* dx_codes, bool accumulate,
                                          const char* op) {
  if (!dx && (!dx_codes || accumulate)) throw Error(std::string(op) + ": a null dx needs dx_codes and no accumulation");
}

// Backend::head_chunk_rows() of each backend, for memory plans made without one.
inline constexpr int kCpuHeadChunkRows = 256;
inline constexpr int kCudaHeadChunkRows = 2048;
// The rows per logits chunk a backend of `device` ("cpu", "cuda") runs with `options`.
inline int head_chunk_rows_for(const std::string& device, const BackendOptions& options) {
  if (options.head_chunk_rows > 0) return options.head_chunk_rows;
  return device == "cuda" ? kCudaHeadChunkRows : kCpuHeadChunkRows;
}

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // --- memory -----------------------------------------------------------------------
  virtual float* alloc(size_t count) = 0;            // zero-filled
  virtual int32_t* alloc_i32(size_t count) = 0;      // zero-filled
  virtual void release(void* pointer) = 0;
  // Most memory held at once by alloc/alloc_i32 (0 where the backend does not track it).
  // The CPU backend's is part of the process's memory: peak RSS says more there.
  virtual size_t peak_memory_bytes() const { return 0; }
  // Bytes of the device's memory in use now by everything on it (total minus free: these
  // allocations, scratch, library workspaces, the CUDA context); 0 where there is no device.
  virtual size_t device_memory_in_use() const { return 0; }
  // Device-memory traffic so far of the bf16 operand copies --matmul bf16 makes before each
  // product and hold_operand makes (4 bytes read and 2 written per element; the CPU's
  // emulated copies are counted alike): what keeping matmul operands in bf16 would save.
  // The codes an op writes of its own output (hold_produced_operand) are no copy and not
  // counted. 0 with float32 matmuls.
  virtual size_t operand_copy_traffic_bytes() const { return 0; }
  // The product plans whose algorithm was chosen by timing (BackendOptions::autotune_matmuls),
  // in the order they were made; empty where nothing was tuned.
  virtual std::vector<MatmulTuning> matmul_tunings() const { return {}; }
  // Lends the backend `bytes` of memory from its alloc() that the caller leaves untouched
  // until withdraw_scratch(): meanwhile an operation may take its temporaries from there
  // instead of growing scratch of its own (a forward-only pass lends the part of the
  // activation arena only training passes use). Work queued after withdraw_scratch() no
  // longer touches it; work queued before may still be running (the owner's later writes
  // are ordered after it).
  virtual void lend_scratch(float* memory, size_t bytes) {}
  virtual void withdraw_scratch() {}
  virtual void upload(float* dst, const float* host, size_t count) = 0;
  virtual void download(float* host, const float* src, size_t count) = 0;
  // Uploads may return before the copy is done when `host` is alloc_host memory: keep such
  // a buffer unchanged until synchronize(). Any other host memory may be reused at once.
  virtual void upload_i32(int32_t* dst, const int32_t* host, size_t count) = 0;
  virtual void zero(float* dst, size_t count) = 0;
  virtual void copy(float* dst, const float* src, size_t count) = 0;
  virtual void fill_i32(int32_t* dst, int32_t value, size_t count) = 0;
  // Waits for every queued operation; the only point where asynchronous results
  // (sum_to_host, download_i32_async, uploads from alloc_host memory) are settled.
  virtual void synchronize() {}
  // The cudaStream_t all of this backend's work runs on, so that a library with its own
  // stream (NCCL) can order its work after it; nullptr for host backends.
  virtual void* native_stream() { return nullptr; }

  // --- host-visible results without synchronisation -------------------------------------
  // Host memory the backend copies into and out of asynchronously (pinned on CUDA), zero-
  // filled; never null (throws speedrun::Error).
  virtual void* alloc_host(size_t bytes) = 0;
  virtual void release_host(void* pointer) = 0;
  // *host_out = float64 sum of x[0..n), once the queued work reaches this point: read it
  // after synchronize(). host_out is alloc_host memory.
  virtual void sum_to_host(double* host_out, const float* x, size_t n) = 0;
  // host[0..count) = src[0..count), likewise queued; host is alloc_host memory.
  virtual void download_i32_async(int32_t* host, const int32_t* src, size_t count) = 0;
  // flag[0] = 1 when any of x[0..n) is NaN or infinite; flag is left alone otherwise. The
  // device-side half of the fault monitor: no host round trip.
  virtual void flag_nonfinite(int32_t* flag, const float* x, size_t n) = 0;
  // doc[t] = how many `separator` tokens tokens[0..t] holds (SPEC §3's document ids).
  virtual void document_ids(int32_t* doc, const int32_t* tokens, int T, int32_t separator) = 0;

  // --- dense linear algebra --------------------------------------------------------
  // C[M,N] = alpha * op(A) op(B) + beta * C; op(A) is [M,K], op(B) is [K,N].
  virtual void gemm(bool transpose_a, bool transpose_b, int M, int N, int K, float alpha, const float* A, int lda,
                    const float* B, int ldb, float beta, float* C, int ldc) = 0;
  // --matmul bf16 (a no-op otherwise): rounds x[0..count) into held operand `slot` (below
  // kHeldOperands) once; until release_operand(slot), a product whose operand lies within
  // those floats (from x or further in) reads that copy instead of rounding its own. For an
  // operand that several products share (x must not change meanwhile); results are unchanged.
  static constexpr int kHeldOperands = 2;
  // Whether held floats [source, source + count) contain an operand [x, x + extent).
  static bool held_floats_cover(const float* source, size_t count, const float* x, size_t extent) {
    const auto begin = reinterpret_cast<uintptr_t>(source), at = reinterpret_cast<uintptr_t>(x);
    if (at < begin || (at - begin) % sizeof(float) != 0) return false;
    const size_t offset = (at - begin) / sizeof(float);
    return offset <= count && extent <= count - offset;
  }
  virtual void hold_operand(int slot, const float* x, size_t count) {}
  // The same for an x not yet computed, whose producing op writes the codes itself: returns
  // the slot's buffer for count bf16 codes, to be passed as that op's `out_codes` (which
  // must then write bf16(x) there before any product reads from x[0..count): ops that make
  // parts of it write theirs, at their offsets, before the first product). The operand never makes
  // the round trip through float32 memory that hold_operand's copy costs. Returns nullptr
  // (the op then writes no codes) when matmuls do not round their operands or holding is off.
  virtual uint16_t* hold_produced_operand(int slot, const float* x, size_t count) { return nullptr; }
  // The same for an x whose bf16 codes exist already (an activation kept as codes, unchanged
  // until release_operand): products whose operand is x read `codes`, and x's floats need not
  // be current. Returns false, holding nothing, when matmuls do not round their operands (or
  // holding is off): the caller must then make x's floats current itself.
  virtual bool hold_stored_operand(int slot, const float* x, const uint16_t* codes, size_t count) { return false; }
  virtual void release_operand(int slot) {}
  // C (bf16 codes [M, N], leading dimension ldc) = bf16(op(A) op(B) + addend), nearest
  // even, in one rounding of the float32 sum: a product whose float32 result is read only
  // rounded (bf16 activations: the MLP's h; a residual add onto the bf16 stream, addend the
  // stream's codes), so its floats never reach memory. addend: bf16 codes laid out as C, or
  // null (nothing added); it may be C itself. Operands as gemm's (rounded to bf16 with
  // --matmul bf16).
  virtual void gemm_to_bf16(bool transpose_a, bool transpose_b, int M, int N, int K, const float* A, int lda,
                            const float* B, int ldb, const uint16_t* addend, uint16_t* C, int ldc) = 0;
  // gemm over `batch` matrices spaced by the given strides (in elements).
  virtual void gemm_batched(bool transpose_a, bool transpose_b, int M, int N, int K, float alpha, const float* A,
                            int lda, size_t stride_a, const float* B, int ldb, size_t stride_b, float beta, float* C,
                            int ldc, size_t stride_c, int batch) = 0;

  // --- embeddings ---------------------------------------------------------------------
  // out[t] = table[tokens[t]]; rows of width dim.
  virtual void embedding_forward(float* out, const float* table, const int32_t* tokens, int T, int dim) = 0;
  // out[t] = bf16(table[tokens[t]]) as codes: a value embedding as a bf16 activation (the
  // reference's tables are bf16; ours are float32 master copies, rounded where looked up).
  virtual void embedding_forward_bf16(uint16_t* out, const float* table, const int32_t* tokens, int T, int dim) = 0;
  // dtable[tokens[t]] += dout[t], in a deterministic order.
  virtual void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int T, int dim) = 0;

  // --- normalisation and position ---------------------------------------------------
  // out = x / sqrt(mean(x^2) + eps) per row (out may be x); rstd saved for the backward;
  // out_codes (unless null) = bf16(out), for a matmul operand held by hold_produced_operand.
  virtual void rmsnorm_forward(float* out, uint16_t* out_codes, float* rstd, const float* x, int rows, int dim,
                               float eps) = 0;
  // dx (+)= rstd * (dout - out * mean(dout * out)), from the forward's out and rstd (dx may
  // be dout when not accumulating); dx_codes (unless null) = bf16 of the final dx, for a matmul operand held by
  // hold_produced_operand.
  virtual void rmsnorm_backward(float* dx, uint16_t* dx_codes, const float* dout, const float* out, const float* rstd,
                                int rows, int dim, bool accumulate) = 0;
  // Half-truncated rotary on x [T, H, D] in place (SPEC §2.6); inverse = rotate by -theta
  // (the backward of the rotation is the inverse rotation of the gradient). stored (unless
  // null): bf16 activations: the rotated x is rounded to bf16 (x = float32 of the codes) and
  // its codes stored, for attention (AttentionInputCodes).
  virtual void rotary(float* x, uint16_t* stored, int T, int H, int D, float base, bool inverse) = 0;

  // --- elementwise --------------------------------------------------------------------
  // out = coef[0] * a + coef[1] * b (b may be null: out = coef[0] * a). out may alias a.
  // stored (unless null): bf16 activations: out is rounded to bf16 and its codes stored, for
  // attention (AttentionInputCodes); out may then be null (the codes alone).
  virtual void mix_forward(float* out, uint16_t* stored, const float* a, const float* b, const float* coef,
                           size_t n) = 0;
  // da (+)= coef[0] * dout; db (+)= coef[1] * dout; dcoef[0] += <dout, a>; dcoef[1] += <dout, b>;
  // da_codes (unless null) = bf16 of the final da, for a matmul operand held by
  // hold_produced_operand. da may alias dout, and may be null when written as da_codes alone
  // (not accumulating). Written, not added to, when not accumulating: a gradient's first
  // contribution needs no zeroed buffer.
  virtual void mix_backward(float* da, uint16_t* da_codes, bool accumulate_da, float* db, bool accumulate_db,
                            float* dcoef, const float* dout, const float* a, const float* b, const float* coef,
                            size_t n) = 0;
  // out += weight[0] * y (a U-net skip).
  virtual void scaled_add_forward(float* out, const float* y, const float* weight, size_t n) = 0;
  // dy (+)= weight[0] * dout; dweight[0] += <dout, y>.
  virtual void scaled_add_backward(float* dy, bool accumulate_dy, float* dweight, const float* dout, const float* y,
                                   const float* weight, size_t n) = 0;
  // out += x; out_codes (unless null) = bf16 of the sum, for a matmul operand held by
  // hold_produced_operand.
  virtual void add(float* out, uint16_t* out_codes, const float* x, size_t n) = 0;
  // out = relu(x)^2.
  virtual void relu2_forward(float* out, const float* x, size_t n) = 0;
  // dx = dout * 2 relu(x); dx may be dout.
  virtual void relu2_backward(float* dx, const float* dout, const float* x, size_t n) = 0;

  // --- bfloat16 activation storage (SPEC §6: the reference keeps activations in bf16) ------
  // uint16_t buffers hold bf16 codes. Every rounding is to nearest even, NaN stays NaN, so
  // a value is the same whether a backend stores it as a code or as its float32 widening.
  // out = bf16(rmsnorm(x)) widened to float32; stored (unless null) = the same values as
  // codes; rstd as rmsnorm_forward. out may alias x, and may be null when stored is given
  // (the codes alone: x0 on the bf16 residual stream).
  virtual void rmsnorm_forward_bf16(float* out, uint16_t* stored, float* rstd, const float* x, int rows, int dim,
                                    float eps) = 0;
  // rmsnorm_backward from the forward's output kept as codes; dx_codes (unless null) = bf16
  // of the final dx, for a matmul operand held by hold_produced_operand. dx may be null when
  // dx_codes is given and nothing is accumulated: the codes alone, where nothing reads the
  // floats.
  virtual void rmsnorm_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* out,
                                     const float* rstd, int rows, int dim, bool accumulate) = 0;
  // In the four relu^2 ops below, out_codes / dx_codes (unless null) = bf16 of the float
  // output as well: a matmul operand held by hold_produced_operand. The two forward ones
  // take a null out when out_codes is given: the codes alone, where nothing reads the floats.
  // stored (unless null) = bf16(x); out = relu(bf16(x))^2. out may alias x.
  virtual void relu2_forward_bf16(float* out, uint16_t* out_codes, uint16_t* stored, const float* x, size_t n) = 0;
  // out = relu(x)^2 for x given as codes: relu2_forward_bf16's out again, from what it stored.
  virtual void relu2_from_bf16(float* out, uint16_t* out_codes, const uint16_t* x, size_t n) = 0;
  // relu2_backward for x given as codes; dx may be null when dx_codes is given (the codes
  // alone).
  virtual void relu2_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* x,
                                   size_t n) = 0;
  // The same with dout given as codes too (c_proj's input gradient, computed as bf16 by its
  // product): relu2_backward_bf16 of the widened dout. dx may be null when dx_codes is given.
  virtual void relu2_backward_from_bf16(float* dx, uint16_t* dx_codes, const uint16_t* dout, const uint16_t* x,
                                        size_t n) = 0;
  // out = float32(x).
  virtual void widen_bf16(float* out, const uint16_t* x, size_t n) = 0;
  // Attention's q or k [T, H, D] as bf16 activations, normalised and rotated in one pass:
  // normed (unless null: a pass without a backward) = the codes of rmsnorm_forward_bf16(x)
  // per head (rstd [T H] saved), rotated = the codes of rotary(float32 of those) rounded to
  // bf16, and out (unless null) = float32(rotated).
  // Exactly rmsnorm_forward_bf16 then rotary with `stored`; out may alias x.
  virtual void rmsnorm_rotary_bf16(float* out, uint16_t* normed, uint16_t* rotated, float* rstd, const float* x, int T,
                                   int H, int D, float eps, float base) = 0;
  // rmsnorm_rotary_bf16 of x given as codes (the q or k a product computed as bf16):
  // exactly rmsnorm_rotary_bf16 of the widened codes. out (unless null) may not alias x.
  virtual void rmsnorm_rotary_from_bf16(float* out, uint16_t* normed, uint16_t* rotated, float* rstd,
                                        const uint16_t* x, int T, int H, int D, float eps, float base) = 0;
  // The rotation alone from the normalised codes (a recomputation): rotated and out (unless
  // null) as rmsnorm_rotary_bf16 wrote them.
  virtual void rotary_from_bf16(float* out, uint16_t* rotated, const uint16_t* normed, int T, int H, int D,
                                float base) = 0;
  // Their backward: dx = rmsnorm_backward_bf16 (from normed and rstd) of the inversely
  // rotated dout, with dx_codes (unless null) = bf16(dx); dx may be null when dx_codes is
  // given, and may alias dout. Exactly rotary(dout, inverse) then rmsnorm_backward_bf16.
  virtual void rotary_rmsnorm_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* normed,
                                            const float* rstd, int T, int H, int D, float base) = 0;

  // --- the bf16 residual stream (SPEC §6: the reference's x0, lambda mixes, residual and
  // skip adds are bf16) ----------------------------------------------------------------------
  // With bf16 activations the stream between and through the blocks is kept as bf16 codes:
  // these ops read it as codes and write it rounded to bf16 (nearest even) after float32
  // arithmetic; the gradients flowing back stay float32. (rmsnorm_forward_bf16 with a null
  // out makes x0's codes; gemm_to_bf16 with an addend makes the residual adds.)
  // out = bf16(coef[0] a + coef[1] b) (b may be null: bf16(coef[0] a)); out may alias a or b.
  virtual void mix_forward_bf16(uint16_t* out, const uint16_t* a, const uint16_t* b, const float* coef,
                                size_t n) = 0;
  // mix_backward with a and b given as codes.
  virtual void mix_backward_bf16(float* da, uint16_t* da_codes, bool accumulate_da, float* db, bool accumulate_db,
                                 float* dcoef, const float* dout, const uint16_t* a, const uint16_t* b,
                                 const float* coef, size_t n) = 0;
  // out = bf16(x + weight[0] y): a U-net skip added onto the stream; out may alias x.
  virtual void scaled_add_forward_bf16(uint16_t* out, const uint16_t* x, const uint16_t* y, const float* weight,
                                       size_t n) = 0;
  // scaled_add_backward with y given as codes.
  virtual void scaled_add_backward_bf16(float* dy, bool accumulate_dy, float* dweight, const float* dout,
                                        const uint16_t* y, const float* weight, size_t n) = 0;
  // rmsnorm_forward_bf16 of x given as codes: out = bf16(rmsnorm(x)) widened (a block's
  // norm, the final norm), out_codes (unless null) = the same values as codes. out may be
  // null when out_codes is given: the codes alone.
  virtual void rmsnorm_forward_from_bf16(float* out, uint16_t* out_codes, float* rstd, const uint16_t* x, int rows,
                                         int dim, float eps) = 0;

  // --- attention (SPEC §2.5, §3) -------------------------------------------------------
  // y = softmax(scale q k^T + mask) v per head, visiting only the blocks the mask keeps;
  // lse [H, T] saved. doc = per-token document ids. y_codes (unless null) = bf16(y), for
  // the output projection's operand held by hold_produced_operand. codes: q, k, v kept as
  // bf16 activations (read instead of the floats), or none.
  virtual void attention_forward(float* y, uint16_t* y_codes, float* lse, const float* q, const float* k,
                                 const float* v, const AttentionInputCodes& codes, const int32_t* doc,
                                 const AttentionShape& shape) = 0;
  // attention_forward with y rounded to bf16 where it is computed (SPEC §6's bf16 activations):
  // y = float32(bf16(attention)) and stored = its codes, kept for c_proj's backward and this
  // op's backward (AttentionInputCodes::y). y may be null: the codes alone, where nothing
  // reads y's floats (c_proj reading the codes through hold_stored_operand).
  virtual void attention_forward_bf16(float* y, uint16_t* stored, float* lse, const float* q, const float* k,
                                      const float* v, const AttentionInputCodes& codes, const int32_t* doc,
                                      const AttentionShape& shape) = 0;
  // dq, dk, dv (overwritten) from dy, recomputing probabilities from lse; y's codes read
  // instead of y when codes.y is given.
  virtual void attention_backward(float* dq, float* dk, float* dv, const float* dy, const float* y,
                                  const float* lse, const float* q, const float* k, const float* v,
                                  const AttentionInputCodes& codes, const int32_t* doc,
                                  const AttentionShape& shape) = 0;

  // --- head ----------------------------------------------------------------------------
  // Rows of logits the model materialises at once: enough to keep the device busy, few
  // enough that [rows, padded vocab] floats stay small (256 rows = 51 MB at V = 50304).
  virtual int head_chunk_rows() const { return kCpuHeadChunkRows; }
  // In place over logits [rows, V]: z -> y = 2c sigmoid(z / (c/2)); row_loss[r] =
  // logsumexp(y_r) - y_r[target_r]; when grad_scale != 0 the logits are replaced by
  // dloss/dz * grad_scale (the gradient of grad_scale * sum of row losses).
  virtual void softcap_cross_entropy(float* logits, float* row_loss, const int32_t* targets, int rows, int V,
                                     float softcap, float grad_scale) = 0;

  // --- FP8 lm_head for training (SPEC §6) ------------------------------------------------
  // Casts round to nearest even and saturate at the format's largest finite value (NaN
  // stays NaN); products accumulate in float32 (the forward may use fast accumulation).
  // logits[rows, V] = bf16((e4m3(2 x) e4m3(2^9 W)^T) / 2^10), x [rows, d], W [V, d].
  // The backend keeps e4m3(2^9 W) between calls: pass requantize_weight = true whenever W
  // may have changed since the last call (a step's first chunk); a different W pointer or
  // shape requantises anyway.
  virtual void fp8_head_forward(float* logits, const float* x, const float* W, int rows, int V, int d,
                                bool requantize_weight) = 0;
  // With g = e5m2(2^19 dlogits) and s = output_scale (applied after the cast, so that the
  // cast sees the per-sequence gradient as in the reference):
  // dx[rows, d] = bf16(s (g e4m3(2^9 W)) / 2^28) (overwritten) and
  // dW[V, d] += s (g^T e4m3(2 x)) / 2^20 in float32. Uses the weight kept by the forward.
  virtual void fp8_head_backward(float* dx, float* dW, const float* dlogits, const float* x, const float* W,
                                 int rows, int V, int d, float output_scale) = 0;
  // One chunk of the training head in one call: fp8_head_forward into `logits`, then
  // softcap_cross_entropy (row_loss, the gradient scaled by loss_scale), then
  // fp8_head_backward with output_scale. `logits` is rows x V floats of the caller's memory
  // the op may use for its intermediates in any form (contents undefined afterwards): a
  // GPU keeps the logits in bf16 and the gradient as its e5m2 cast, never as float32.
  virtual void fp8_head_loss(float* logits, float* row_loss, float* dx, float* dW, const float* x, const float* W,
                             const int32_t* targets, int rows, int V, int d, float softcap, float loss_scale,
                             float output_scale, bool requantize_weight) = 0;

  // --- optimisers (SPEC §4) -------------------------------------------------------------
  // The operations that change parameters or optimiser state take `skip`: a backend int32
  // (or nullptr); when *skip != 0 they change nothing. A step found faulty on the device
  // (flag_nonfinite) is thus skipped without the host waiting for the verdict.
  // Adam with bias correction, PyTorch's form, on every tensor given at once (one launch on
  // CUDA for all of a step's Adam parameters); step = updates so far including this one.
  virtual void adam_update(const AdamTensor* tensors, size_t count, float beta1, float beta2, float eps, int step,
                           const int32_t* skip) = 0;
  // buf = m*buf + (1-m)*g; out = (1-m)*g + m*buf (Nesterov). out may alias g.
  virtual void muon_momentum(float* out, float* buf, const float* grad, size_t n, float momentum,
                             const int32_t* skip) = 0;
  // x[b] /= (||x[b]||_F + eps) for each of `batch` contiguous matrices of `count` elements.
  virtual void normalize_frobenius(float* x, size_t count, int batch, float eps) = 0;
  // param -= scale * update.
  virtual void apply_update(float* param, const float* update, size_t n, float scale, const int32_t* skip) = 0;
  // x[b] (rows x cols) -> out[b] (cols x rows) for `batch` matrices.
  virtual void transpose(float* out, const float* x, int rows, int cols, int batch) = 0;
};

// The CPU backend (float32, OpenMP + OpenBLAS): the reference all others are tested against.
// MatmulPrecision::kBfloat16 emulates bf16 matmul inputs (rounded copies, float32 sgemm);
// AttentionKernel::kFlash is a UsageError (the flash kernel is CUDA's).
std::unique_ptr<Backend> make_cpu_backend(const BackendOptions& options = {});

// The CUDA backend (float32 storage, cuBLASLt + own kernels) on the given device. Throws
// speedrun::Error when the build has no CUDA backend or the device cannot be used.
std::unique_ptr<Backend> make_cuda_backend(int device = 0, const BackendOptions& options = {});

// "cpu" or "cuda" (GPU `device_index`, e.g. the process's local rank); UsageError otherwise.
std::unique_ptr<Backend> make_backend(const std::string& device, int device_index = 0,
                                      const BackendOptions& options = {});

}  // namespace speedrun
