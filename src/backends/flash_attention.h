// Host API of the bf16 block-sparse flash attention (src/backends/cuda/cuda_flash_attention.cu):
// SPEC §2.5/§3 attention, forward and backward, on device pointers; no CUDA types here.
//
// Layouts: q, k, v, y, dy are [T, H, D] bf16 (raw bit patterns as uint16_t), lse is [H, T]
// fp32 in natural-log units (the CPU backend's convention), dq, dk, dv are [T, H, D] fp32
// (the gradients go on to fp32 rotary / QK-norm backward; writing fp32 costs ~0.15 ms at
// T = 49152 and saves a rounding). doc is the model's per-token document ids, int32 [T];
// adjacent equal ids form one document. Supported head sizes: D = 32, 64, 128 (anything else
// is an Error). Pointers must be 16-byte aligned. All calls are asynchronous on `stream` (a
// cudaStream_t, nullptr = the default stream); `workspace` is device memory of at least
// flash_attention_workspace_bytes(shape) bytes, used by one call at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "util/error.h"

namespace speedrun {

struct FlashAttentionShape {
  int T = 0;               // tokens in the packed sequence
  int H = 0;               // heads
  int D = 0;               // head size: 32, 64 or 128
  int block_size = 128;    // attention block size B (SPEC §3)
  int window_blocks = 1;   // window N in blocks; 0 behaves as 1
  float scale = 0.12f;     // logit scale
  // Forward blocks resident per SM: 2, the kernel measured on the H200; 3, Q's tile kept in
  // K's second stage and registers capped to fit a third (the same bits; not yet measured).
  int forward_blocks_per_sm = 2;
};

// The head sizes the kernel is built for.
inline bool flash_attention_supports_head_size(int D) { return D == 32 || D == 64 || D == 128; }

// Throws Error unless the shape is supported (positive sizes and scale, D in {32, 64, 128}):
// the running maximum of the online softmax assumes scaling keeps the order of the scores.
inline void check_flash_attention_shape(const FlashAttentionShape& s) {
  const bool sizes_ok = s.T > 0 && s.H > 0 && s.block_size > 0 && s.window_blocks >= 0 && s.scale > 0.f &&
                        (s.forward_blocks_per_sm == 2 || s.forward_blocks_per_sm == 3);
  const bool head_ok = flash_attention_supports_head_size(s.D);
  if (!sizes_ok || !head_ok) {
    throw Error("flash attention: unsupported shape T=" + std::to_string(s.T) + " H=" + std::to_string(s.H) +
                " D=" + std::to_string(s.D) + " block_size=" + std::to_string(s.block_size) +
                " window_blocks=" + std::to_string(s.window_blocks) + " scale=" + std::to_string(s.scale) +
                " forward_blocks_per_sm=" + std::to_string(s.forward_blocks_per_sm) +
                " (needs positive T, H, block_size, scale, window_blocks >= 0, D in {32, 64, 128} and "
                "forward_blocks_per_sm 2 or 3)");
  }
}

size_t flash_attention_workspace_bytes(const FlashAttentionShape& shape);

// y = softmax(scale q k^T + mask) v; lse[h, t] = log-sum-exp of the scaled visible scores.
void flash_attention_forward(void* stream, void* workspace, uint16_t* y, float* lse, const uint16_t* q,
                             const uint16_t* k, const uint16_t* v, const int32_t* doc,
                             const FlashAttentionShape& shape);

// dq, dk, dv (overwritten) from dy, recomputing probabilities from the forward's lse, with
// delta = rowsum(dy * y) first. Deterministic: no atomics, every sum in a fixed order.
void flash_attention_backward(void* stream, void* workspace, float* dq, float* dk, float* dv, const uint16_t* dy,
                              const uint16_t* y, const float* lse, const uint16_t* q, const uint16_t* k,
                              const uint16_t* v, const int32_t* doc, const FlashAttentionShape& shape);

// Per-token document ranges [start[t], end[t]) from the ids, on the device (what the calls
// above compute into their workspace first); exposed for tests.
void flash_attention_document_bounds(void* stream, void* workspace, int32_t* start, int32_t* end, const int32_t* doc,
                                     int T);

// Timing of forward and backward on random inputs with documents of about `document_length`
// tokens. TFLOP/s count the visible (query, key) pairs only: forward 4 D pairs per head,
// backward 10 D pairs (2.5x forward, FlashAttention's convention; this backward's separate
// dQ pass executes 14 D pairs, so its real rate is 1.4x the one reported).
struct FlashAttentionBenchmark {
  FlashAttentionShape shape;
  int document_length = 1000;
  int repeats = 20;
  // Results.
  double visible_pairs = 0;  // per head
  double forward_ms = 0, backward_ms = 0;  // medians
  double forward_tflops = 0, backward_tflops = 0;
  double compact_forward_ms = 0, compact_forward_tflops = 0;  // forward_blocks_per_sm = 3
};
void run_flash_attention_benchmark(FlashAttentionBenchmark& bench);

}  // namespace speedrun
