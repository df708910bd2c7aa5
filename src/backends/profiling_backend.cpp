#include "backends/profiling_backend.h"

#include <chrono>

namespace speedrun {
namespace {

class ProfilingBackend final : public Backend {
 public:
  ProfilingBackend(Backend& inner, std::map<std::string, OpStats>& stats, const bool* enabled,
                   std::map<std::string, OpStats>* products)
      : inner_(inner), stats_(stats), enabled_(enabled), products_(products) {}

  std::string name() const override { return inner_.name() + "+profile"; }
  float* alloc(size_t n) override { return inner_.alloc(n); }
  int32_t* alloc_i32(size_t n) override { return inner_.alloc_i32(n); }
  void release(void* p) override { inner_.release(p); }
  void upload(float* d, const float* h, size_t n) override { timed("upload", 0, 0, [&] { inner_.upload(d, h, n); }); }
  void download(float* h, const float* s, size_t n) override { timed("download", 0, 0, [&] { inner_.download(h, s, n); }); }
  void upload_i32(int32_t* d, const int32_t* h, size_t n) override {
    timed("upload", 0, 0, [&] { inner_.upload_i32(d, h, n); });
  }
  void zero(float* d, size_t n) override { timed("zero/copy", 0, 4.0 * n, [&] { inner_.zero(d, n); }); }
  void copy(float* d, const float* s, size_t n) override { timed("zero/copy", 0, 8.0 * n, [&] { inner_.copy(d, s, n); }); }
  void fill_i32(int32_t* d, int32_t value, size_t n) override { inner_.fill_i32(d, value, n); }
  void synchronize() override { inner_.synchronize(); }
  int head_chunk_rows() const override { return inner_.head_chunk_rows(); }
  size_t peak_memory_bytes() const override { return inner_.peak_memory_bytes(); }
  size_t device_memory_in_use() const override { return inner_.device_memory_in_use(); }
  size_t operand_copy_traffic_bytes() const override { return inner_.operand_copy_traffic_bytes(); }
  std::vector<MatmulTuning> matmul_tunings() const override { return inner_.matmul_tunings(); }
  // Its traffic is what the backend counts for the copy it makes: none where products
  // read float32 (the operand is used in place).
  void hold_operand(int slot, const float* x, size_t count) override {
    const size_t copied_before = inner_.operand_copy_traffic_bytes();
    timed_counting_bytes("hold_operand", [&] { inner_.hold_operand(slot, x, count); },
                         [&] { return static_cast<double>(inner_.operand_copy_traffic_bytes() - copied_before); });
  }
  uint16_t* hold_produced_operand(int slot, const float* x, size_t count) override {
    return inner_.hold_produced_operand(slot, x, count);
  }
  bool hold_stored_operand(int slot, const float* x, const uint16_t* codes, size_t count) override {
    return inner_.hold_stored_operand(slot, x, codes, count);
  }
  void release_operand(int slot) override { inner_.release_operand(slot); }
  void lend_scratch(float* memory, size_t bytes) override {
    timed("lend_scratch", 0, 0, [&] { inner_.lend_scratch(memory, bytes); });
  }
  void withdraw_scratch() override { inner_.withdraw_scratch(); }
  void* native_stream() override { return inner_.native_stream(); }
  void* alloc_host(size_t bytes) override { return inner_.alloc_host(bytes); }
  void release_host(void* p) override { inner_.release_host(p); }
  void sum_to_host(double* out, const float* x, size_t n) override {
    timed("sum", 0, 4.0 * n, [&] { inner_.sum_to_host(out, x, n); });
  }
  void download_i32_async(int32_t* h, const int32_t* s, size_t n) override {
    timed("download", 0, 0, [&] { inner_.download_i32_async(h, s, n); });
  }
  void flag_nonfinite(int32_t* flag, const float* x, size_t n) override {
    timed("fault check", 0, 4.0 * n, [&] { inner_.flag_nonfinite(flag, x, n); });
  }
  void document_ids(int32_t* doc, const int32_t* tok, int T, int32_t sep) override {
    timed("document ids", 0, 0, [&] { inner_.document_ids(doc, tok, T, sep); });
  }

  void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
            float beta, float* C, int ldc) override {
    const auto shape = [&] { return product_shape_name({ta, tb, M, N, K, false, beta != 0.f}); };
    timed_product("matmul", shape, 2.0 * M * N * K,
                  [&] { inner_.gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc); });
  }
  void gemm_to_bf16(bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                    const uint16_t* addend, uint16_t* C, int ldc) override {
    const auto shape = [&] { return product_shape_name({ta, tb, M, N, K, true, addend != nullptr}); };
    timed_product("matmul", shape, 2.0 * M * N * K,
                  [&] { inner_.gemm_to_bf16(ta, tb, M, N, K, A, lda, B, ldb, addend, C, ldc); });
  }
  void gemm_batched(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, size_t sa,
                    const float* B, int ldb, size_t sb, float beta, float* C, int ldc, size_t sc, int batch) override {
    const auto shape = [&] { return product_shape_name({ta, tb, M, N, K, false, beta != 0.f, batch}); };
    timed_product("matmul (batched)", shape, 2.0 * M * N * K * batch, [&] {
      inner_.gemm_batched(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
    });
  }
  void embedding_forward(float* o, const float* t, const int32_t* tok, int T, int d) override {
    timed("embedding lookup", 0, 8.0 * T * d + 4.0 * T, [&] { inner_.embedding_forward(o, t, tok, T, d); });
  }
  void embedding_forward_bf16(uint16_t* o, const float* t, const int32_t* tok, int T, int d) override {
    timed("embedding lookup", 0, 6.0 * T * d + 4.0 * T, [&] { inner_.embedding_forward_bf16(o, t, tok, T, d); });
  }
  void embedding_backward(float* dt, const float* dout, const int32_t* tok, int T, int d) override {
    timed("embedding backward", 0, 12.0 * T * d + 4.0 * T, [&] { inner_.embedding_backward(dt, dout, tok, T, d); });
  }
  void rmsnorm_forward(float* o, uint16_t* o_codes, float* r, const float* x, int rows, int dim, float eps) override {
    timed("rmsnorm forward", 0, elements(rows, dim) * (8.0 + code_bytes(o_codes)),
          [&] { inner_.rmsnorm_forward(o, o_codes, r, x, rows, dim, eps); });
  }
  void rmsnorm_backward(float* dx, uint16_t* dx_codes, const float* dout, const float* out, const float* rstd,
                        int rows, int dim, bool acc) override {
    timed("rmsnorm backward", 0, elements(rows, dim) * (12.0 + (acc ? 4 : 0) + code_bytes(dx_codes)),
          [&] { inner_.rmsnorm_backward(dx, dx_codes, dout, out, rstd, rows, dim, acc); });
  }
  void rotary(float* x, uint16_t* stored, int T, int H, int D, float base, bool inverse) override {
    timed("rotary", 0, elements(T, H) * D * (8.0 + code_bytes(stored)),
          [&] { inner_.rotary(x, stored, T, H, D, base, inverse); });
  }
  void mix_forward(float* o, uint16_t* stored, const float* a, const float* b, const float* c, size_t n) override {
    timed("mix/residual forward", 0, n * (4.0 + (o ? 4 : 0) + (b ? 4 : 0) + code_bytes(stored)),
          [&] { inner_.mix_forward(o, stored, a, b, c, n); });
  }
  void mix_backward(float* da, uint16_t* da_codes, bool acc, float* db, bool acc_db, float* dc, const float* dout,
                    const float* a, const float* b, const float* c, size_t n) override {
    // dout and a read, da written unless null (read too when accumulating), b read, db
    // written (read too when accumulating).
    timed("mix/residual backward", 0,
          n * (8.0 + (da ? 4 : 0) + (acc ? 4 : 0) + (b ? 4 : 0) + db_bytes(db, acc_db) + code_bytes(da_codes)),
          [&] { inner_.mix_backward(da, da_codes, acc, db, acc_db, dc, dout, a, b, c, n); });
  }
  void scaled_add_forward(float* o, const float* y, const float* w, size_t n) override {
    timed("mix/residual forward", 0, 12.0 * n, [&] { inner_.scaled_add_forward(o, y, w, n); });
  }
  void scaled_add_backward(float* dy, bool acc, float* dw, const float* dout, const float* y, const float* w,
                           size_t n) override {
    timed("mix/residual backward", 0, (acc ? 16.0 : 12.0) * n,
          [&] { inner_.scaled_add_backward(dy, acc, dw, dout, y, w, n); });
  }
  void mix_forward_bf16(uint16_t* o, const uint16_t* a, const uint16_t* b, const float* c, size_t n) override {
    timed("mix/residual forward", 0, n * (4.0 + (b ? 2 : 0)), [&] { inner_.mix_forward_bf16(o, a, b, c, n); });
  }
  void mix_backward_bf16(float* da, uint16_t* da_codes, bool acc, float* db, bool acc_db, float* dc,
                         const float* dout, const uint16_t* a, const uint16_t* b, const float* c, size_t n) override {
    // As mix_backward's, a and b read as 2-byte codes.
    timed("mix/residual backward", 0,
          n * (6.0 + (da ? 4 : 0) + (acc ? 4 : 0) + (b ? 2 : 0) + db_bytes(db, acc_db) + code_bytes(da_codes)),
          [&] { inner_.mix_backward_bf16(da, da_codes, acc, db, acc_db, dc, dout, a, b, c, n); });
  }
  void scaled_add_forward_bf16(uint16_t* o, const uint16_t* x, const uint16_t* y, const float* w,
                               size_t n) override {
    timed("mix/residual forward", 0, 6.0 * n, [&] { inner_.scaled_add_forward_bf16(o, x, y, w, n); });
  }
  void scaled_add_backward_bf16(float* dy, bool acc, float* dw, const float* dout, const uint16_t* y, const float* w,
                                size_t n) override {
    timed("mix/residual backward", 0, (acc ? 14.0 : 10.0) * n,
          [&] { inner_.scaled_add_backward_bf16(dy, acc, dw, dout, y, w, n); });
  }
  void rmsnorm_forward_from_bf16(float* o, uint16_t* o_codes, float* r, const uint16_t* x, int rows, int dim,
                                 float eps) override {
    timed("rmsnorm forward", 0, elements(rows, dim) * (2.0 + (o ? 4 : 0) + code_bytes(o_codes)),
          [&] { inner_.rmsnorm_forward_from_bf16(o, o_codes, r, x, rows, dim, eps); });
  }
  void add(float* o, uint16_t* out_codes, const float* x, size_t n) override {
    timed("mix/residual forward", 0, n * (12.0 + code_bytes(out_codes)), [&] { inner_.add(o, out_codes, x, n); });
  }
  void relu2_forward(float* o, const float* x, size_t n) override {
    timed("relu2 forward", 0, 8.0 * n, [&] { inner_.relu2_forward(o, x, n); });
  }
  void relu2_backward(float* dx, const float* dout, const float* x, size_t n) override {
    timed("relu2 backward", 0, 12.0 * n, [&] { inner_.relu2_backward(dx, dout, x, n); });
  }
  void rmsnorm_forward_bf16(float* o, uint16_t* stored, float* r, const float* x, int rows, int dim,
                            float eps) override {
    timed("rmsnorm forward", 0, elements(rows, dim) * (4.0 + (o ? 4 : 0) + code_bytes(stored)),
          [&] { inner_.rmsnorm_forward_bf16(o, stored, r, x, rows, dim, eps); });
  }
  void rmsnorm_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* out, const float* rstd,
                             int rows, int dim, bool acc) override {
    timed("rmsnorm backward", 0, elements(rows, dim) * (6.0 + (dx ? 4 : 0) + (acc ? 4 : 0) + code_bytes(dx_codes)),
          [&] { inner_.rmsnorm_backward_bf16(dx, dx_codes, dout, out, rstd, rows, dim, acc); });
  }
  void relu2_forward_bf16(float* o, uint16_t* o_codes, uint16_t* stored, const float* x, size_t n) override {
    timed("relu2 forward", 0, n * (4.0 + (o ? 4 : 0) + code_bytes(o_codes) + code_bytes(stored)),
          [&] { inner_.relu2_forward_bf16(o, o_codes, stored, x, n); });
  }
  void relu2_from_bf16(float* o, uint16_t* o_codes, const uint16_t* x, size_t n) override {
    timed("relu2 forward", 0, n * (2.0 + (o ? 4 : 0) + code_bytes(o_codes)), [&] { inner_.relu2_from_bf16(o, o_codes, x, n); });
  }
  void relu2_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* x, size_t n) override {
    timed("relu2 backward", 0, n * (6.0 + (dx ? 4 : 0) + code_bytes(dx_codes)),
          [&] { inner_.relu2_backward_bf16(dx, dx_codes, dout, x, n); });
  }
  void relu2_backward_from_bf16(float* dx, uint16_t* dx_codes, const uint16_t* dout, const uint16_t* x,
                                size_t n) override {
    timed("relu2 backward", 0, n * (4.0 + (dx ? 4 : 0) + code_bytes(dx_codes)),
          [&] { inner_.relu2_backward_from_bf16(dx, dx_codes, dout, x, n); });
  }
  void widen_bf16(float* o, const uint16_t* x, size_t n) override {
    timed("widen_bf16", 0, 6.0 * n, [&] { inner_.widen_bf16(o, x, n); });
  }
  void rmsnorm_rotary_bf16(float* o, uint16_t* normed, uint16_t* rotated, float* r, const float* x, int T, int H, int D,
                           float eps, float base) override {
    // x read; normed and rotated codes written, and out when given.
    timed("rmsnorm + rotary", 0, elements(T, H) * D * (4.0 + code_bytes(normed) + 2 + (o ? 4 : 0)),
          [&] { inner_.rmsnorm_rotary_bf16(o, normed, rotated, r, x, T, H, D, eps, base); });
  }
  void rmsnorm_rotary_from_bf16(float* o, uint16_t* normed, uint16_t* rotated, float* r, const uint16_t* x, int T,
                                int H, int D, float eps, float base) override {
    // x read as codes; normed and rotated codes written, and out when given.
    timed("rmsnorm + rotary", 0, elements(T, H) * D * (2.0 + code_bytes(normed) + 2 + (o ? 4 : 0)),
          [&] { inner_.rmsnorm_rotary_from_bf16(o, normed, rotated, r, x, T, H, D, eps, base); });
  }
  void rotary_from_bf16(float* o, uint16_t* rotated, const uint16_t* normed, int T, int H, int D,
                        float base) override {
    timed("rmsnorm + rotary", 0, elements(T, H) * D * (2.0 + 2 + (o ? 4 : 0)),
          [&] { inner_.rotary_from_bf16(o, rotated, normed, T, H, D, base); });
  }
  void rotary_rmsnorm_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* normed,
                                    const float* rstd, int T, int H, int D, float base) override {
    timed("rmsnorm + rotary backward", 0, elements(T, H) * D * (6.0 + (dx ? 4 : 0) + code_bytes(dx_codes)),
          [&] { inner_.rotary_rmsnorm_backward_bf16(dx, dx_codes, dout, normed, rstd, T, H, D, base); });
  }
  void attention_forward(float* y, uint16_t* y_codes, float* lse, const float* q, const float* k, const float* v,
                         const AttentionInputCodes& codes, const int32_t* doc, const AttentionShape& s) override {
    timed("attention forward", 0, 0, [&] { inner_.attention_forward(y, y_codes, lse, q, k, v, codes, doc, s); });
  }
  void attention_forward_bf16(float* y, uint16_t* stored, float* lse, const float* q, const float* k, const float* v,
                              const AttentionInputCodes& codes, const int32_t* doc, const AttentionShape& s) override {
    timed("attention forward", 0, 0,
          [&] { inner_.attention_forward_bf16(y, stored, lse, q, k, v, codes, doc, s); });
  }
  void attention_backward(float* dq, float* dk, float* dv, const float* dy, const float* y, const float* lse,
                          const float* q, const float* k, const float* v, const AttentionInputCodes& codes,
                          const int32_t* doc, const AttentionShape& s) override {
    timed("attention backward", 0, 0,
          [&] { inner_.attention_backward(dq, dk, dv, dy, y, lse, q, k, v, codes, doc, s); });
  }
  void softcap_cross_entropy(float* logits, float* loss, const int32_t* t, int rows, int V, float c,
                             float g) override {
    // The logits read once and overwritten once (by the loss's y, or the gradient).
    timed("softcap cross-entropy", 0, elements(rows, V) * 8.0,
          [&] { inner_.softcap_cross_entropy(logits, loss, t, rows, V, c, g); });
  }
  void fp8_head_forward(float* logits, const float* x, const float* W, int rows, int V, int d,
                        bool requantize_weight) override {
    timed(kFp8HeadOp, 2.0 * rows * V * d, 0,
          [&] { inner_.fp8_head_forward(logits, x, W, rows, V, d, requantize_weight); });
  }
  void fp8_head_backward(float* dx, float* dW, const float* dlogits, const float* x, const float* W, int rows, int V,
                         int d, float output_scale) override {
    timed(kFp8HeadOp, 4.0 * rows * V * d, 0,
          [&] { inner_.fp8_head_backward(dx, dW, dlogits, x, W, rows, V, d, output_scale); });
  }
  void fp8_head_loss(float* logits, float* loss, float* dx, float* dW, const float* x, const float* W,
                     const int32_t* t, int rows, int V, int d, float c, float loss_scale, float output_scale,
                     bool requantize_weight) override {
    // Its three products; the loss between them is timed with them.
    timed(kFp8HeadOp, 6.0 * rows * V * d, 0, [&] {
      inner_.fp8_head_loss(logits, loss, dx, dW, x, W, t, rows, V, d, c, loss_scale, output_scale, requantize_weight);
    });
  }
  void adam_update(const AdamTensor* tensors, size_t count, float b1, float b2, float eps, int step,
                   const int32_t* skip) override {
    timed("adam", 0, 28.0 * adam_elements(tensors, count),
          [&] { inner_.adam_update(tensors, count, b1, b2, eps, step, skip); });
  }
  void muon_momentum(float* o, float* buf, const float* g, size_t n, float m, const int32_t* skip) override {
    timed("muon (elementwise)", 0, 16.0 * n, [&] { inner_.muon_momentum(o, buf, g, n, m, skip); });
  }
  void normalize_frobenius(float* x, size_t count, int batch, float eps) override {
    timed("muon (elementwise)", 0, 8.0 * count * batch, [&] { inner_.normalize_frobenius(x, count, batch, eps); });
  }
  void apply_update(float* p, const float* u, size_t n, float s, const int32_t* skip) override {
    timed("muon (elementwise)", 0, 12.0 * n, [&] { inner_.apply_update(p, u, n, s, skip); });
  }
  void transpose(float* o, const float* x, int rows, int cols, int batch) override {
    timed("muon (elementwise)", 0, 8.0 * elements(rows, cols) * batch,
          [&] { inner_.transpose(o, x, rows, cols, batch); });
  }

 private:
  static double elements(int rows, int cols) { return static_cast<double>(rows) * cols; }
  // Bytes per element of an optional bf16 code output.
  static double code_bytes(const uint16_t* out) { return out ? 2.0 : 0.0; }
  // A second output gradient: written (4 bytes), read first when added to.
  static double db_bytes(const float* db, bool accumulate) { return db ? (accumulate ? 8.0 : 4.0) : 0.0; }
  static double adam_elements(const AdamTensor* tensors, size_t count) {
    double n = 0;
    for (size_t i = 0; i < count; ++i) n += static_cast<double>(tensors[i].n);
    return n;
  }

  // `bytes`: the floor of device-memory traffic the call must move (each input read once,
  // each output written once), against which bench reports GB/s; 0 where not counted.
  template <typename F>
  void timed(const char* op, double flops, double bytes, F&& f) {
    if (enabled_ && !*enabled_) {
      f();
      return;
    }
    add(stats_[op], seconds_of(f), flops, bytes);
  }

  // An op whose traffic is known only once it has run.
  template <typename F, typename Bytes>
  void timed_counting_bytes(const char* op, F&& f, Bytes&& bytes) {
    if (enabled_ && !*enabled_) {
      f();
      return;
    }
    const double seconds = seconds_of(f);
    add(stats_[op], seconds, 0, bytes());
  }

  // A product: under its op and, when asked, under its shape (named only when profiling).
  template <typename Name, typename F>
  void timed_product(const char* op, Name&& shape, double flops, F&& f) {
    if (enabled_ && !*enabled_) {
      f();
      return;
    }
    const double seconds = seconds_of(f);
    add(stats_[op], seconds, flops, 0);
    if (products_) add((*products_)[shape()], seconds, flops, 0);
  }

  template <typename F>
  double seconds_of(F&& f) {
    const auto start = std::chrono::steady_clock::now();
    f();
    inner_.synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  static void add(OpStats& s, double seconds, double flops, double bytes) {
    s.calls += 1;
    s.seconds += seconds;
    s.flops += flops;
    s.bytes += bytes;
  }

  Backend& inner_;
  std::map<std::string, OpStats>& stats_;
  const bool* enabled_;
  std::map<std::string, OpStats>* products_;
};

}  // namespace

std::unique_ptr<Backend> make_profiling_backend(Backend& inner, std::map<std::string, OpStats>& stats,
                                                const bool* enabled, std::map<std::string, OpStats>* products) {
  return std::make_unique<ProfilingBackend>(inner, stats, enabled, products);
}

}  // namespace speedrun
