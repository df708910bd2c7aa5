// The CPU backend: float32 everywhere, OpenBLAS for matrix products (called only
// outside OpenMP regions, so its own threads are not oversubscribed), OpenMP for the
// rest. Every reduction has a fixed order, so results are bit-identical run to run.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <span>
#include <vector>

#include "backends/allocation_tracker.h"
#include "backends/backend.h"
#include "backends/cpu/cpu_fp8_head.h"
#include "backends/cpu/cpu_gemm.h"
#include "backends/cpu/cpu_kernels.h"
#include "backends/low_precision.h"
#include "util/error.h"

namespace speedrun {
namespace cpu {

constexpr size_t kReductionChunk = 4096;

double deterministic_dot(const float* a, const float* b, size_t n) {
  const size_t chunks = (n + kReductionChunk - 1) / kReductionChunk;
  std::vector<double> partial(chunks);
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks; ++c) {
    const size_t end = std::min(n, (c + 1) * kReductionChunk);
    double acc = 0.0;
    for (size_t i = c * kReductionChunk; i < end; ++i) acc += static_cast<double>(a[i]) * b[i];
    partial[c] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

double deterministic_sum(const float* x, size_t n) {
  const size_t chunks = (n + kReductionChunk - 1) / kReductionChunk;
  std::vector<double> partial(chunks);
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks; ++c) {
    const size_t end = std::min(n, (c + 1) * kReductionChunk);
    double acc = 0.0;
    for (size_t i = c * kReductionChunk; i < end; ++i) acc += x[i];
    partial[c] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

namespace {

// An activation as float32, whether kept as float32 or as a bf16 code.
inline float widened(float x) { return x; }
inline float widened(uint16_t code) { return lowp::decode_bf16(code); }

inline float relu_squared(float h) {
  const float r = h > 0.f ? h : 0.f;
  return r * r;
}

// out = x / sqrt(mean(x^2) + eps) per row, rounded to bf16 when `round`; the codes of out
// into `stored` unless null. out may alias x: a row is read in full before it is written.
void rmsnorm_forward_rows(float* out, uint16_t* stored, bool round, float* rstd, const float* x, int rows, int dim,
                          float eps) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const size_t off = static_cast<size_t>(r) * dim;
    const float* xr = x + off;
    float* yr = out + off;
    float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
    for (int i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
    const float s = 1.f / std::sqrt(sum_sq / dim + eps);
    if (!round) {
      for (int i = 0; i < dim; ++i) yr[i] = xr[i] * s;
      if (stored) {
        for (int i = 0; i < dim; ++i) stored[off + i] = lowp::encode_bf16(yr[i]);
      }
    } else {
      for (int i = 0; i < dim; ++i) {
        const uint16_t code = lowp::encode_bf16(xr[i] * s);
        if (stored) stored[off + i] = code;
        yr[i] = lowp::decode_bf16(code);
      }
    }
    rstd[r] = s;
  }
}

// dx (+)= rstd * (dout - out * mean(dout * out)) per row; dx may alias dout.
template <typename Out>
void rmsnorm_backward_rows(float* dx, const float* dout, const Out* out, const float* rstd, int rows, int dim,
                           bool accumulate) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const size_t off = static_cast<size_t>(r) * dim;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int i = 0; i < dim; ++i) dot += dout[off + i] * widened(out[off + i]);
    const float mean = dot / dim;
    for (int i = 0; i < dim; ++i) {
      const float g = rstd[r] * (dout[off + i] - widened(out[off + i]) * mean);
      dx[off + i] = accumulate ? dx[off + i] + g : g;
    }
  }
}

// out[i] (unless null) = value(i), codes[i] (unless null) = its bf16 code; elementwise, so
// value(i) may read an input that out aliases.
template <typename Value>
void write_values(float* out, uint16_t* codes, size_t n, Value value) {
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) {
    const float y = value(i);
    if (out) out[i] = y;
    if (codes) codes[i] = lowp::encode_bf16(y);
  }
}

// Where an op computes its float output: `out`, or, when out is null (the caller wants the
// codes alone), a temporary of n floats that lives as long as this object.
class FloatsOrTemporary {
 public:
  FloatsOrTemporary(float* out, size_t n) : temporary_(out ? 0 : n), data_(out ? out : temporary_.data()) {}
  float* data() const { return data_; }

 private:
  std::vector<float> temporary_;
  float* data_;
};

// Codes widened into float32 (a temporary), for an op that reads the bf16 residual stream
// through its float32 twin: the same arithmetic on the same values. Null stays null.
class Widened {
 public:
  // (At least one float when codes are given: data() is null exactly for null codes.)
  Widened(const uint16_t* codes, size_t n) : floats_(codes ? std::max<size_t>(n, 1) : 0) {
    if (!codes) return;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) floats_[i] = lowp::decode_bf16(codes[i]);
  }
  const float* data() const { return floats_.empty() ? nullptr : floats_.data(); }
  float* mutable_data() { return floats_.empty() ? nullptr : floats_.data(); }

 private:
  std::vector<float> floats_;
};

// codes[i] = bf16(values[i]) for an op's out_codes (nothing when null).
void encode_outputs(uint16_t* codes, const float* values, size_t n) {
  if (codes) write_values(nullptr, codes, n, [values](size_t i) { return values[i]; });
}

// x rounded to bf16 in place, its codes into `stored` (bf16 activations); nothing when null.
void round_and_store(float* x, uint16_t* stored, size_t n) {
  if (stored) write_values(x, stored, n, [x](size_t i) { return lowp::decode_bf16(lowp::encode_bf16(x[i])); });
}

// out (+)= scale * x: a gradient's contribution, added or (its first) written.
void scale_into(float* out, bool accumulate, float scale, const float* x, size_t n) {
  if (accumulate) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) out[i] += scale * x[i];
  } else {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) out[i] = scale * x[i];
  }
}

// Attention's inputs as floats: the given codes widened (AttentionInputCodes), else as passed.
struct AttentionInputs {
  AttentionInputs(const AttentionInputs&) = delete;  // points into its own storage
  AttentionInputs& operator=(const AttentionInputs&) = delete;
  std::vector<float> widened;
  const float* q;
  const float* k;
  const float* v;
  const float* y;
  const float* dy;
  AttentionInputs(const AttentionInputCodes& codes, const float* q_, const float* k_, const float* v_, const float* y_,
                  size_t n, const float* dy_ = nullptr)
      : q(q_), k(k_), v(v_), y(y_), dy(dy_) {
    const bool widen_qkv = codes.given() && !codes.floats_current;
    widened.resize((widen_qkv ? 3 * n : 0) + (codes.y ? n : 0) + (codes.dy ? n : 0));
    float* next = widened.data();
    auto widen = [&](const uint16_t* codes_of, const float*& into) {
      write_values(next, nullptr, n, [codes_of](size_t i) { return lowp::decode_bf16(codes_of[i]); });
      into = next;
      next += n;
    };
    if (widen_qkv) {
      widen(codes.q, q);
      widen(codes.k, k);
      widen(codes.v, v);
    }
    if (codes.y) widen(codes.y, y);
    if (codes.dy) widen(codes.dy, dy);
  }
};

// out = relu(x)^2.
template <typename X>
void relu2_values(float* out, const X* x, size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; ++i) out[i] = relu_squared(widened(x[i]));
}

// dx = dout * 2 relu(x); dx may alias dout.
template <typename X>
void relu2_backward_values(float* dx, const float* dout, const X* x, size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; ++i) {
    const float h = widened(x[i]);
    dx[i] = h > 0.f ? 2.f * h * dout[i] : 0.f;
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const BackendOptions& options)
      : bf16_matmul_(options.matmul == MatmulPrecision::kBfloat16),
        hold_operands_(options.hold_operands),
        poison_lent_scratch_(options.poison_lent_scratch),
        head_chunk_rows_(head_chunk_rows_for("cpu", options)) {
    if (options.attention == AttentionKernel::kFlash) {
      throw UsageError("--attention-kernel flash is the CUDA backend's kernel; the CPU backend has reference only");
    }
  }

  std::string name() const override { return "cpu"; }
  int head_chunk_rows() const override { return head_chunk_rows_; }
  size_t operand_copy_traffic_bytes() const override { return operand_copy_traffic_; }

  // The CPU's temporaries are few and small: it borrows nothing, but with
  // poison_lent_scratch it scribbles NaN over the loan where CUDA's ops take temporaries
  // from it (copy, embedding_backward, attention, the fused q/k norm and rotary ops) and
  // after every product, so that a loan overlapping a live buffer shows.
  void lend_scratch(float* memory, size_t bytes) override {
    loan_ = memory;
    loan_floats_ = bytes / sizeof(float);
    scribble_on_loan();
  }
  void withdraw_scratch() override {
    loan_ = nullptr;
    loan_floats_ = 0;
  }

  float* alloc(size_t count) override { return static_cast<float*>(tracked(count * sizeof(float))); }
  int32_t* alloc_i32(size_t count) override { return static_cast<int32_t*>(tracked(count * sizeof(int32_t))); }
  void release(void* pointer) override {
    allocations_.released(pointer);
    std::free(pointer);
  }
  size_t peak_memory_bytes() const override { return allocations_.peak(); }
  void upload(float* dst, const float* host, size_t count) override { move_bytes(dst, host, count * sizeof(float)); }
  void download(float* host, const float* src, size_t count) override {
    move_bytes(host, src, count * sizeof(float));
  }
  void upload_i32(int32_t* dst, const int32_t* host, size_t count) override {
    move_bytes(dst, host, count * sizeof(int32_t));
  }
  void zero(float* dst, size_t count) override {
    auto* bytes = reinterpret_cast<char*>(dst);
    over_pieces(count * sizeof(float), [&](size_t at, size_t n) { std::memset(bytes + at, 0, n); });
  }
  void copy(float* dst, const float* src, size_t count) override {
    const size_t size = count * sizeof(float);
    if (ranges_overlap(dst, src, size)) {
      move_bytes(dst, src, size);
    } else {
      auto* to = reinterpret_cast<char*>(dst);
      const auto* from = reinterpret_cast<const char*>(src);
      over_pieces(size, [&](size_t at, size_t n) { std::memcpy(to + at, from + at, n); });
    }
    scribble_on_loan();
  }
  void fill_i32(int32_t* dst, int32_t value, size_t count) override { std::fill(dst, dst + count, value); }

  // Every operation has finished when it returns, so the asynchronous ones are plain.
  void* alloc_host(size_t bytes) override { return zeroed(bytes); }
  void release_host(void* pointer) override { std::free(pointer); }
  void sum_to_host(double* host_out, const float* x, size_t n) override { *host_out = deterministic_sum(x, n); }
  void download_i32_async(int32_t* host, const int32_t* src, size_t count) override {
    move_bytes(host, src, count * sizeof(int32_t));
  }
  void flag_nonfinite(int32_t* flag, const float* x, size_t n) override {
    int bad = 0;
#pragma omp parallel for simd schedule(static) reduction(| : bad)
    for (size_t i = 0; i < n; ++i) bad |= !(std::fabs(x[i]) <= std::numeric_limits<float>::max());
    if (bad) flag[0] = 1;
  }
  void document_ids(int32_t* doc, const int32_t* tokens, int T, int32_t separator) override {
    int32_t count = 0;
    for (int t = 0; t < T; ++t) doc[t] = count += tokens[t] == separator;
  }

  void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
            float beta, float* C, int ldc) override {
    if (M == 0 || N == 0) return;
    if (bf16_matmul_) {
      // The stored extents of op(A) [M, K] and op(B) [K, N] (ta/tb store the transposes).
      A = rounded_to_bf16(bf16_a_, A, ta ? K : M, ta ? M : K, lda);
      B = rounded_to_bf16(bf16_b_, B, tb ? N : K, tb ? K : N, ldb);
    }
    sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    scribble_on_loan();
  }

  // A held copy is a produced operand whose producer is the copy itself.
  void hold_operand(int slot, const float* x, size_t count) override {
    uint16_t* codes = hold_produced_operand(slot, x, count);
    if (!codes) return;
    encode_outputs(codes, x, count);
    operand_copy_traffic_ += count * (sizeof(float) + sizeof(uint16_t));  // x read, its copy written
  }

  uint16_t* hold_produced_operand(int slot, const float* x, size_t count) override {
    HeldOperand& held = held_.at(static_cast<size_t>(slot));
    if (!bf16_matmul_ || !hold_operands_) return nullptr;
    held.codes.resize(count);
    held.source = x;
    held.count = count;
    held.stored = nullptr;
    held.codes_pending = true;  // widened into `rounded` by the first product that reads them
    return held.codes.data();
  }

  // The codes are read where they are, by the first product (as a GPU's product reads them
  // when it runs): written after the hold but before that product, they still count.
  bool hold_stored_operand(int slot, const float* x, const uint16_t* codes, size_t count) override {
    HeldOperand& held = held_.at(static_cast<size_t>(slot));
    if (!bf16_matmul_ || !hold_operands_) return false;
    held.source = x;
    held.count = count;
    held.stored = codes;
    held.codes_pending = true;
    return true;
  }

  void release_operand(int slot) override {
    HeldOperand& held = held_.at(static_cast<size_t>(slot));
    held.source = nullptr;
    held.count = 0;
    held.stored = nullptr;
    held.codes_pending = false;
  }

  void gemm_to_bf16(bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                    const uint16_t* addend, uint16_t* C, int ldc) override {
    if (M <= 0 || N <= 0) return;
    const size_t count = static_cast<size_t>(M - 1) * ldc + N;
    std::vector<float> result(count);
    gemm(ta, tb, M, N, K, 1.f, A, lda, B, ldb, 0.f, result.data(), ldc);
    // Row by row: padding between rows is not the product's to write.
    for (int r = 0; r < M; ++r) {
      const size_t row = static_cast<size_t>(r) * ldc;
      float* values = result.data() + row;
      if (addend) {
        for (int j = 0; j < N; ++j) values[j] += lowp::decode_bf16(addend[row + j]);
      }
      encode_outputs(C + row, values, N);
    }
  }

  void gemm_batched(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, size_t stride_a,
                    const float* B, int ldb, size_t stride_b, float beta, float* C, int ldc, size_t stride_c,
                    int batch) override {
    for (int i = 0; i < batch; ++i) {
      gemm(ta, tb, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, beta, C + i * stride_c, ldc);
    }
  }

  void embedding_forward(float* out, const float* table, const int32_t* tokens, int T, int dim) override {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
      std::memcpy(out + static_cast<size_t>(t) * dim, table + static_cast<size_t>(tokens[t]) * dim,
                  dim * sizeof(float));
    }
  }

  void embedding_forward_bf16(uint16_t* out, const float* table, const int32_t* tokens, int T, int dim) override {
    const size_t n = static_cast<size_t>(T) * dim;
    std::vector<float> rows(n);
    embedding_forward(rows.data(), table, tokens, T, dim);
    encode_outputs(out, rows.data(), n);
  }

  void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int T, int dim) override {
    // Threads own column ranges, tokens go in order: deterministic for any thread count.
    constexpr int kColumns = 16;
    const int column_blocks = (dim + kColumns - 1) / kColumns;
#pragma omp parallel for schedule(static)
    for (int cb = 0; cb < column_blocks; ++cb) {
      const int c0 = cb * kColumns;
      const int c1 = std::min(dim, c0 + kColumns);
      for (int t = 0; t < T; ++t) {
        float* dst = dtable + static_cast<size_t>(tokens[t]) * dim;
        const float* src = dout + static_cast<size_t>(t) * dim;
        for (int c = c0; c < c1; ++c) dst[c] += src[c];
      }
    }
    scribble_on_loan();
  }

  void rmsnorm_forward(float* out, uint16_t* out_codes, float* rstd, const float* x, int rows, int dim,
                       float eps) override {
    rmsnorm_forward_rows(out, out_codes, /*round=*/false, rstd, x, rows, dim, eps);
  }

  void rmsnorm_backward(float* dx, uint16_t* dx_codes, const float* dout, const float* out, const float* rstd,
                        int rows, int dim, bool accumulate) override {
    rmsnorm_backward_rows(dx, dout, out, rstd, rows, dim, accumulate);
    encode_outputs(dx_codes, dx, static_cast<size_t>(rows) * dim);
  }

  void rmsnorm_forward_bf16(float* out, uint16_t* stored, float* rstd, const float* x, int rows, int dim,
                            float eps) override {
    if (!out && !stored) throw Error("rmsnorm_forward_bf16: a null out needs stored codes");
    const FloatsOrTemporary values(out, static_cast<size_t>(rows) * dim);
    rmsnorm_forward_rows(values.data(), stored, /*round=*/true, rstd, x, rows, dim, eps);
  }

  void rmsnorm_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* out, const float* rstd,
                             int rows, int dim, bool accumulate) override {
    const size_t n = static_cast<size_t>(rows) * dim;
    require_codes_for_null_output(dx, dx_codes, accumulate, "rmsnorm_backward_bf16");
    const FloatsOrTemporary result(dx, n);
    rmsnorm_backward_rows(result.data(), dout, out, rstd, rows, dim, accumulate);
    encode_outputs(dx_codes, result.data(), n);
  }

  void rotary(float* x, uint16_t* stored, int T, int H, int D, float base, bool inverse) override {
    const int half = D / 2;
    const int quarter = D / 4;
    std::vector<float> freq(half, 0.f);  // D/4 frequencies then D/4 zeros
    for (int i = 0; i < quarter; ++i) {
      const double exponent = quarter > 1 ? static_cast<double>(i) / (quarter - 1) : 0.0;
      freq[i] = static_cast<float>(std::pow(1.0 / base, exponent));
    }
    const float sign = inverse ? -1.f : 1.f;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
      for (int i = 0; i < half; ++i) {
        const float theta = static_cast<float>(t) * freq[i];
        const float c = std::cos(theta);
        const float s = sign * std::sin(theta);
        for (int h = 0; h < H; ++h) {
          float* row = x + (static_cast<size_t>(t) * H + h) * D;
          const float x1 = row[i];
          const float x2 = row[i + half];
          row[i] = x1 * c + x2 * s;
          row[i + half] = -x1 * s + x2 * c;
        }
      }
    }
    round_and_store(x, stored, static_cast<size_t>(T) * H * D);
  }

  void mix_forward(float* out, uint16_t* stored, const float* a, const float* b, const float* coef,
                   size_t n) override {
    if (!out && !stored) throw Error("mix_forward: a null out needs stored codes");
    const FloatsOrTemporary values(out, n);
    out = values.data();
    const float c0 = coef[0];
    if (b) {
      const float c1 = coef[1];
#pragma omp parallel for simd schedule(static)
      for (size_t i = 0; i < n; ++i) out[i] = c0 * a[i] + c1 * b[i];
    } else {
#pragma omp parallel for simd schedule(static)
      for (size_t i = 0; i < n; ++i) out[i] = c0 * a[i];
    }
    round_and_store(out, stored, n);
  }

  void mix_backward(float* da, uint16_t* da_codes, bool accumulate_da, float* db, bool accumulate_db, float* dcoef,
                    const float* dout, const float* a, const float* b, const float* coef, size_t n) override {
    // Coefficient gradients first: da may alias dout.
    dcoef[0] += static_cast<float>(deterministic_dot(dout, a, n));
    if (b) dcoef[1] += static_cast<float>(deterministic_dot(dout, b, n));
    if (!da && (!da_codes || accumulate_da)) throw Error("mix_backward: a null da needs da_codes, not accumulating");
    const float c0 = coef[0];
    const float c1 = b ? coef[1] : 0.f;
    if (db) scale_into(db, accumulate_db, c1, dout, n);
    const FloatsOrTemporary result(da, n);
    scale_into(result.data(), accumulate_da, c0, dout, n);  // after db: da may alias dout
    encode_outputs(da_codes, result.data(), n);
  }

  void scaled_add_forward(float* out, const float* y, const float* weight, size_t n) override {
    const float w = weight[0];
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) out[i] += w * y[i];
  }

  void scaled_add_backward(float* dy, bool accumulate_dy, float* dweight, const float* dout, const float* y,
                           const float* weight, size_t n) override {
    dweight[0] += static_cast<float>(deterministic_dot(dout, y, n));
    scale_into(dy, accumulate_dy, weight[0], dout, n);
  }

  // The bf16 residual stream: each op is its float32 twin on the widened codes, its stream
  // output rounded (a GPU computes the same without the float32 round trip).
  void mix_forward_bf16(uint16_t* out, const uint16_t* a, const uint16_t* b, const float* coef,
                        size_t n) override {
    const Widened wa(a, n), wb(b, n);
    mix_forward(nullptr, out, wa.data(), wb.data(), coef, n);
  }

  void mix_backward_bf16(float* da, uint16_t* da_codes, bool accumulate_da, float* db, bool accumulate_db,
                         float* dcoef, const float* dout, const uint16_t* a, const uint16_t* b, const float* coef,
                         size_t n) override {
    const Widened wa(a, n), wb(b, n);
    mix_backward(da, da_codes, accumulate_da, db, accumulate_db, dcoef, dout, wa.data(), wb.data(), coef, n);
  }

  void scaled_add_forward_bf16(uint16_t* out, const uint16_t* x, const uint16_t* y, const float* weight,
                               size_t n) override {
    Widened sum(x, n);
    const Widened wy(y, n);
    scaled_add_forward(sum.mutable_data(), wy.data(), weight, n);
    encode_outputs(out, sum.data(), n);
  }

  void scaled_add_backward_bf16(float* dy, bool accumulate_dy, float* dweight, const float* dout, const uint16_t* y,
                                const float* weight, size_t n) override {
    const Widened wy(y, n);
    scaled_add_backward(dy, accumulate_dy, dweight, dout, wy.data(), weight, n);
  }

  void rmsnorm_forward_from_bf16(float* out, uint16_t* out_codes, float* rstd, const uint16_t* x, int rows, int dim,
                                 float eps) override {
    if (!out && !out_codes) throw Error("rmsnorm_forward_from_bf16: a null out needs out_codes");
    const size_t n = static_cast<size_t>(rows) * dim;
    const FloatsOrTemporary values(out, n);
    widen_bf16(values.data(), x, n);  // then normalised in place
    rmsnorm_forward_rows(values.data(), out_codes, /*round=*/true, rstd, values.data(), rows, dim, eps);
  }

  void add(float* out, uint16_t* out_codes, const float* x, size_t n) override {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) out[i] += x[i];
    encode_outputs(out_codes, out, n);
  }

  void relu2_forward(float* out, const float* x, size_t n) override { relu2_values(out, x, n); }

  void relu2_backward(float* dx, const float* dout, const float* x, size_t n) override {
    relu2_backward_values(dx, dout, x, n);
  }

  void relu2_forward_bf16(float* out, uint16_t* out_codes, uint16_t* stored, const float* x, size_t n) override {
    write_values(out, out_codes, n, [&](size_t i) {
      const uint16_t code = lowp::encode_bf16(x[i]);
      if (stored) stored[i] = code;
      return relu_squared(lowp::decode_bf16(code));
    });
  }

  void relu2_from_bf16(float* out, uint16_t* out_codes, const uint16_t* x, size_t n) override {
    write_values(out, out_codes, n, [&](size_t i) { return relu_squared(lowp::decode_bf16(x[i])); });
  }

  void relu2_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* x,
                           size_t n) override {
    require_codes_for_null_output(dx, dx_codes, false, "relu2_backward_bf16");
    const FloatsOrTemporary result(dx, n);
    relu2_backward_values(result.data(), dout, x, n);
    encode_outputs(dx_codes, result.data(), n);
  }

  void relu2_backward_from_bf16(float* dx, uint16_t* dx_codes, const uint16_t* dout, const uint16_t* x,
                                size_t n) override {
    require_codes_for_null_output(dx, dx_codes, false, "relu2_backward_from_bf16");
    const Widened wide_dout(dout, n);
    relu2_backward_bf16(dx, dx_codes, wide_dout.data(), x, n);
  }

  void widen_bf16(float* out, const uint16_t* x, size_t n) override {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) out[i] = lowp::decode_bf16(x[i]);
  }

  // The three fused q/k ops, as the compositions the contract names (a GPU fuses them).
  void rmsnorm_rotary_bf16(float* out, uint16_t* normed, uint16_t* rotated, float* rstd, const float* x, int T, int H,
                           int D, float eps, float base) override {
    const size_t n = static_cast<size_t>(T) * H * D;
    const FloatsOrTemporary values(out, n);
    rmsnorm_forward_bf16(values.data(), normed, rstd, x, T * H, D, eps);
    rotary(values.data(), rotated, T, H, D, base, false);
    if (!out) scribble_on_loan();  // CUDA's values then live in its scratch
  }

  void rmsnorm_rotary_from_bf16(float* out, uint16_t* normed, uint16_t* rotated, float* rstd, const uint16_t* x,
                                int T, int H, int D, float eps, float base) override {
    const Widened wide_x(x, static_cast<size_t>(T) * H * D);
    rmsnorm_rotary_bf16(out, normed, rotated, rstd, wide_x.data(), T, H, D, eps, base);
  }

  void rotary_from_bf16(float* out, uint16_t* rotated, const uint16_t* normed, int T, int H, int D,
                        float base) override {
    const size_t n = static_cast<size_t>(T) * H * D;
    const FloatsOrTemporary values(out, n);
    widen_bf16(values.data(), normed, n);
    rotary(values.data(), rotated, T, H, D, base, false);
    if (!out) scribble_on_loan();  // CUDA's values then live in its scratch
  }

  void rotary_rmsnorm_backward_bf16(float* dx, uint16_t* dx_codes, const float* dout, const uint16_t* normed,
                                    const float* rstd, int T, int H, int D, float base) override {
    require_codes_for_null_output(dx, dx_codes, false, "rotary_rmsnorm_backward_bf16");
    std::vector<float> turned(dout, dout + static_cast<size_t>(T) * H * D);
    rotary(turned.data(), nullptr, T, H, D, base, true);
    rmsnorm_backward_bf16(dx, dx_codes, turned.data(), normed, rstd, T * H, D, false);
    scribble_on_loan();  // CUDA turns dout back in its scratch
  }

  void attention_forward(float* y, uint16_t* y_codes, float* lse, const float* q, const float* k, const float* v,
                         const AttentionInputCodes& codes, const int32_t* doc, const AttentionShape& shape) override {
    const AttentionInputs in(codes, q, k, v, nullptr, static_cast<size_t>(shape.T) * shape.H * shape.D);
    cpu::attention_forward(y, lse, in.q, in.k, in.v, doc, shape);
    encode_outputs(y_codes, y, static_cast<size_t>(shape.T) * shape.H * shape.D);
    scribble_on_loan();
  }

  void attention_forward_bf16(float* y, uint16_t* stored, float* lse, const float* q, const float* k, const float* v,
                              const AttentionInputCodes& codes, const int32_t* doc,
                              const AttentionShape& shape) override {
    const size_t n = static_cast<size_t>(shape.T) * shape.H * shape.D;
    const AttentionInputs in(codes, q, k, v, nullptr, n);
    const FloatsOrTemporary unrounded(y, n);  // y null: the codes alone
    float* out = unrounded.data();
    cpu::attention_forward(out, lse, in.q, in.k, in.v, doc, shape);
    write_values(y, stored, n, [out](size_t i) { return lowp::decode_bf16(lowp::encode_bf16(out[i])); });
    scribble_on_loan();
  }

  void attention_backward(float* dq, float* dk, float* dv, const float* dy, const float* y, const float* lse,
                          const float* q, const float* k, const float* v, const AttentionInputCodes& codes,
                          const int32_t* doc, const AttentionShape& shape) override {
    const AttentionInputs in(codes, q, k, v, y, static_cast<size_t>(shape.T) * shape.H * shape.D, dy);
    cpu::attention_backward(dq, dk, dv, in.dy, in.y, lse, in.q, in.k, in.v, doc, shape);
    scribble_on_loan();
  }

  void softcap_cross_entropy(float* logits, float* row_loss, const int32_t* targets, int rows, int V, float softcap,
                             float grad_scale) override {
#pragma omp parallel
    {
      // The row's exp(y - max), which the gradient reuses (softmax = e / total). A row
      // (200 KB at V = 50304) stays in the core's L2.
      std::vector<float> e(V);
#pragma omp for schedule(static)
      for (int r = 0; r < rows; ++r) {
        row_loss[r] = cpu::softcap_cross_entropy_row(logits + static_cast<size_t>(r) * V, e.data(), targets[r], V,
                                                     softcap, grad_scale);
      }
    }
  }

  void fp8_head_forward(float* logits, const float* x, const float* W, int rows, int V, int d,
                        bool requantize_weight) override {
    cpu::fp8_head_forward(*fp8_head_, logits, x, W, rows, V, d, requantize_weight);
  }
  void fp8_head_backward(float* dx, float* dW, const float* dlogits, const float* x, const float* W, int rows, int V,
                         int d, float output_scale) override {
    cpu::fp8_head_backward(*fp8_head_, dx, dW, dlogits, x, W, rows, V, d, output_scale);
  }
  void fp8_head_loss(float* logits, float* row_loss, float* dx, float* dW, const float* x, const float* W,
                     const int32_t* targets, int rows, int V, int d, float softcap, float loss_scale, float output_scale,
                     bool requantize_weight) override {
    fp8_head_forward(logits, x, W, rows, V, d, requantize_weight);
    softcap_cross_entropy(logits, row_loss, targets, rows, V, softcap, loss_scale);
    fp8_head_backward(dx, dW, logits, x, W, rows, V, d, output_scale);
  }

  void adam_update(const AdamTensor* tensors, size_t count, float beta1, float beta2, float eps, int step,
                   const int32_t* skip) override {
    if (skip && *skip) return;
    const AdamBiasCorrection bias(beta1, beta2, step);
    const float inv_sqrt_bias2 = bias.inv_sqrt_bias2;
    for (const AdamTensor& t : std::span(tensors, count)) {
      const float step_size = bias.step_size(t.lr);
      float *param = t.param, *m = t.m, *v = t.v;
      const float* grad = t.grad;
#pragma omp parallel for simd schedule(static)
      for (size_t i = 0; i < t.n; ++i) {
        m[i] = beta1 * m[i] + (1.f - beta1) * grad[i];
        v[i] = beta2 * v[i] + (1.f - beta2) * grad[i] * grad[i];
        param[i] -= step_size * m[i] / (std::sqrt(v[i]) * inv_sqrt_bias2 + eps);
      }
    }
  }

  void muon_momentum(float* out, float* buf, const float* grad, size_t n, float momentum,
                     const int32_t* skip) override {
    if (skip && *skip) return;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) {
      const float g = grad[i];
      buf[i] = momentum * buf[i] + (1.f - momentum) * g;
      out[i] = (1.f - momentum) * g + momentum * buf[i];
    }
  }

  void normalize_frobenius(float* x, size_t count, int batch, float eps) override {
    for (int b = 0; b < batch; ++b) {
      float* xb = x + b * count;
      const float scale = static_cast<float>(1.0 / (std::sqrt(deterministic_dot(xb, xb, count)) + eps));
#pragma omp parallel for simd schedule(static)
      for (size_t i = 0; i < count; ++i) xb[i] *= scale;
    }
  }

  void apply_update(float* param, const float* update, size_t n, float scale, const int32_t* skip) override {
    if (skip && *skip) return;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) param[i] -= scale * update[i];
  }

  void transpose(float* out, const float* x, int rows, int cols, int batch) override {
    for (int b = 0; b < batch; ++b) {
      const float* xb = x + static_cast<size_t>(b) * rows * cols;
      float* ob = out + static_cast<size_t>(b) * rows * cols;
#pragma omp parallel for schedule(static)
      for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) ob[static_cast<size_t>(c) * rows + r] = xb[static_cast<size_t>(r) * cols + c];
      }
    }
  }

 private:
  const bool bf16_matmul_;
  const bool hold_operands_;
  const bool poison_lent_scratch_;
  const int head_chunk_rows_;
  float* loan_ = nullptr;  // Backend::lend_scratch
  size_t loan_floats_ = 0;
  void scribble_on_loan() {
    if (poison_lent_scratch_ && loan_) std::fill_n(loan_, loan_floats_, std::numeric_limits<float>::quiet_NaN());
  }
  std::vector<float> bf16_a_, bf16_b_;  // bf16-rounded copies of the operands (bf16_matmul_)
  size_t operand_copy_traffic_ = 0;     // as a GPU's bf16 copies of them would move
  struct HeldOperand {
    const float* source = nullptr;
    size_t count = 0;
    std::vector<uint16_t> codes;  // bf16(source[0..count)), once written
    const uint16_t* stored = nullptr;  // hold_stored_operand's codes, read instead of `codes`
    std::vector<float> rounded;   // the codes widened, what the emulated products read
    bool codes_pending = false;   // codes not yet widened into `rounded`
  };
  std::array<HeldOperand, kHeldOperands> held_;
  std::unique_ptr<Fp8Head, Fp8HeadDeleter> fp8_head_ = make_fp8_head();

  // A rounded copy of the rows x cols matrix at `x` (leading dimension ld) in `copy`, laid
  // out as the original so that the same ld applies; the gaps between rows are rounded too.
  // (A held operand's copy instead, when one holds this matrix, from its start or inside it.)
  const float* rounded_to_bf16(std::vector<float>& copy, const float* x, int rows, int cols, int ld) {
    const size_t extent = rows > 0 && cols > 0 ? static_cast<size_t>(rows - 1) * ld + cols : 0;
    if (extent == 0) return x;
    for (HeldOperand& held : held_) {
      if (!held.source || !held_floats_cover(held.source, held.count, x, extent)) continue;
      if (held.codes_pending) {  // emulation only: a GPU's product reads the codes themselves
        held.rounded.resize(held.count);
        widen_bf16(held.rounded.data(), held.stored ? held.stored : held.codes.data(), held.count);
        held.codes_pending = false;
      }
      return held.rounded.data() + (x - held.source);
    }
    if (copy.size() < extent) copy.resize(extent);
    lowp::copy_rounded_to_bf16(copy.data(), x, extent);
    operand_copy_traffic_ += extent * (sizeof(float) + sizeof(uint16_t));
    return copy.data();
  }

  // fn(offset, length) over [0, bytes) in 1 MiB pieces shared by the threads: one core
  // alone moves about a third of what two do here (zeroing 65 MB of gradients: 3.2 ms on
  // one thread, 1.2 ms on two).
  template <class Fn>
  static void over_pieces(size_t bytes, const Fn& fn) {
    constexpr size_t kPiece = size_t{1} << 20;
    const size_t pieces = (bytes + kPiece - 1) / kPiece;
#pragma omp parallel for schedule(static) if (pieces > 1)
    for (size_t p = 0; p < pieces; ++p) fn(p * kPiece, std::min(kPiece, bytes - p * kPiece));
  }
  static bool ranges_overlap(const void* a, const void* b, size_t bytes) {
    const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
    return x < y + bytes && y < x + bytes;
  }

  // memmove that accepts the null data() of an empty vector when there is nothing to move.
  static void move_bytes(void* dst, const void* src, size_t bytes) {
    if (bytes > 0) std::memmove(dst, src, bytes);
  }

  static void* zeroed(size_t bytes) {
    void* p = std::calloc(std::max<size_t>(bytes, 1), 1);
    if (!p) throw OutOfMemoryError("out of host memory allocating " + std::to_string(bytes) + " bytes");
    return p;
  }

  void* tracked(size_t bytes) {
    void* p = zeroed(bytes);
    allocations_.allocated(p, bytes);
    return p;
  }

  AllocationTracker allocations_;  // alloc/alloc_i32, as the CUDA backend counts its own
};

}  // namespace
}  // namespace cpu

std::unique_ptr<Backend> make_cpu_backend(const BackendOptions& options) {
  return std::make_unique<cpu::CpuBackend>(options);
}

}  // namespace speedrun
