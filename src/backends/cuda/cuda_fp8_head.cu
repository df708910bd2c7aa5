// The FP8 lm_head of SPEC §6 on the GPU: saturating scaled casts to e4m3/e5m2, transposed
// FP8 copies for the backward, and cuBLASLt FP8 matmuls on GPUs with FP8 tensor cores
// (compute capability >= 8.9). Elsewhere, for shapes cuBLASLt's FP8 kernels refuse (a
// dimension not a multiple of 16, or no algorithm in this cuBLASLt on this GPU for a
// product, e.g. one whose matrix is not 16-byte aligned, or every algorithm turned down at
// run time: a warning, once per product), or
// when BackendOptions::emulate_fp8_head asks, the same casts feed the backend's own
// products instead: FP8 values multiply exactly in float32 (and are exact in bf16, so
// --matmul bf16 leaves them unchanged), so that path computes the CPU backend's emulation
// up to summation order.
//
// cuBLASLt is column-major and its FP8 kernels take only "TN" operands (both contiguous
// along K). Our row-major X [rows, d] is column-major X^T [d, rows]; so, with A stored as
// column-major [K, M] (transposed by the op) and B as column-major [K, N]:
//   logits^T [V, rows]  = W8 (as [d, V])      x X8 (as [d, rows])       K = d
//   dx^T     [d, rows]  = W8^T (as [V, d])    x G8 (as [V, rows])       K = V
//   dW^T     [d, V]     = X8^T (as [rows, d]) x G8^T (as [rows, V])     K = rows
// i.e. the backward needs the transposed copies W8^T [d, V], X8^T [d, rows], G8^T [V, rows].
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "backends/cuda/cuda_check.cuh"
#include "backends/cuda/cuda_common.cuh"
#include "backends/cuda/cuda_gemm.cuh"
#include "backends/cuda/cuda_kernels.cuh"

namespace speedrun::cuda {

// SPEC §6's scales: x by 2, W by 2^9 (both e4m3), the output gradient by 2^19 (e5m2).
constexpr float kXScale = 2.f;
constexpr float kWScale = 512.f;
constexpr float kGradScale = 524288.f;

namespace {

constexpr int kTile = 32;       // transpose tile
constexpr int kTileRows = 8;    // threads per tile column

template <__nv_fp8_interpretation_t F>
__device__ inline __nv_fp8_storage_t to_fp8(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, F);
}

template <__nv_fp8_interpretation_t F>
__device__ inline float fp8_to_float(__nv_fp8_storage_t q) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(q, F)));
}

// out[i] = fp8(in[i] * scale), round to nearest even, saturating. Floor: 5 bytes/element.
template <__nv_fp8_interpretation_t F>
__global__ void scaled_cast_kernel(__nv_fp8_storage_t* out, const float* in, size_t n, float scale) {
  SPEEDRUN_GRID_STRIDE(i, n) out[i] = to_fp8<F>(in[i] * scale);
}

// out_t[c * rows + r] = fp8(in[r * cols + c] * scale), and out[r * cols + c] the same when
// out is not null, through a shared tile. Floor: 4 + 1 (+ 1) bytes/element.
template <__nv_fp8_interpretation_t F>
__global__ void scaled_cast_transpose_kernel(__nv_fp8_storage_t* out_t, __nv_fp8_storage_t* out, const float* in,
                                             int rows, int cols, float scale) {
  __shared__ __nv_fp8_storage_t tile[kTile][kTile + 1];
  const int c0 = blockIdx.x * kTile, r0 = blockIdx.y * kTile;
  for (int dy = threadIdx.y; dy < kTile; dy += kTileRows) {
    const int r = r0 + dy, c = c0 + threadIdx.x;
    if (r < rows && c < cols) {
      const size_t at = static_cast<size_t>(r) * cols + c;
      const __nv_fp8_storage_t q = to_fp8<F>(in[at] * scale);
      tile[dy][threadIdx.x] = q;
      if (out) out[at] = q;
    }
  }
  __syncthreads();
  for (int dx = threadIdx.y; dx < kTile; dx += kTileRows) {
    const int c = c0 + dx, r = r0 + threadIdx.x;
    if (r < rows && c < cols) out_t[static_cast<size_t>(c) * rows + r] = tile[threadIdx.x][dx];
  }
}

// out_t[c * rows + r] = in[r * cols + c] for bytes (FP8 codes), through a shared tile.
// Floor: 2 bytes/element.
__global__ void transpose_bytes_kernel(uint8_t* out_t, const uint8_t* in, int rows, int cols) {
  __shared__ uint8_t tile[kTile][kTile + 1];
  const int c0 = blockIdx.x * kTile, r0 = blockIdx.y * kTile;
  for (int dy = threadIdx.y; dy < kTile; dy += kTileRows) {
    const int r = r0 + dy, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[dy][threadIdx.x] = in[static_cast<size_t>(r) * cols + c];
  }
  __syncthreads();
  for (int dx = threadIdx.y; dx < kTile; dx += kTileRows) {
    const int c = c0 + dx, r = r0 + threadIdx.x;
    if (r < rows && c < cols) out_t[static_cast<size_t>(c) * rows + r] = tile[threadIdx.x][dx];
  }
}

// out[i] = float(fp8(in[i] * scale)): the FP8 value, exactly, as a float. Floor: 8 bytes/element.
template <__nv_fp8_interpretation_t F>
__global__ void scaled_round_kernel(float* out, const float* in, size_t n, float scale) {
  SPEEDRUN_GRID_STRIDE(i, n) out[i] = fp8_to_float<F>(to_fp8<F>(in[i] * scale));
}

// x[i] = bf16(x[i]) (nearest even), kept as float. Floor: 8 bytes/element.
__global__ void round_to_bf16_kernel(float* x, size_t n) {
  SPEEDRUN_GRID_STRIDE(i, n) x[i] = __bfloat162float(__float2bfloat16_rn(x[i]));
}

template <__nv_fp8_interpretation_t F>
void scaled_cast(cudaStream_t s, __nv_fp8_storage_t* out, const float* in, size_t n, float scale) {
  if (n == 0) return;
  scaled_cast_kernel<F><<<grid_for(n), kThreads, 0, s>>>(out, in, n, scale);
  check_launch("scaled_cast_kernel");
}

template <__nv_fp8_interpretation_t F>
void scaled_cast_transpose(cudaStream_t s, __nv_fp8_storage_t* out_t, __nv_fp8_storage_t* out, const float* in,
                           int rows, int cols, float scale) {
  if (rows == 0 || cols == 0) return;
  const dim3 grid((cols + kTile - 1) / kTile, (rows + kTile - 1) / kTile);
  if (grid.y > 65535u) throw Error("scaled_cast_transpose: " + std::to_string(rows) + " rows exceed the grid");
  scaled_cast_transpose_kernel<F><<<grid, dim3(kTile, kTileRows), 0, s>>>(out_t, out, in, rows, cols, scale);
  check_launch("scaled_cast_transpose_kernel");
}

void transpose_bytes(cudaStream_t s, uint8_t* out_t, const uint8_t* in, int rows, int cols) {
  if (rows == 0 || cols == 0) return;
  const dim3 grid((cols + kTile - 1) / kTile, (rows + kTile - 1) / kTile);
  if (grid.y > 65535u) throw Error("transpose_bytes: " + std::to_string(rows) + " rows exceed the grid");
  transpose_bytes_kernel<<<grid, dim3(kTile, kTileRows), 0, s>>>(out_t, in, rows, cols);
  check_launch("transpose_bytes_kernel");
}

template <__nv_fp8_interpretation_t F>
void scaled_round(cudaStream_t s, float* out, const float* in, size_t n, float scale) {
  if (n == 0) return;
  scaled_round_kernel<F><<<grid_for(n), kThreads, 0, s>>>(out, in, n, scale);
  check_launch("scaled_round_kernel");
}

void round_to_bf16(cudaStream_t s, float* x, size_t n) {
  if (n == 0) return;
  round_to_bf16_kernel<<<grid_for(n), kThreads, 0, s>>>(x, n);
  check_launch("round_to_bf16_kernel");
}

int64_t alignment_of(const void* pointer) {
  uint64_t bits = reinterpret_cast<uint64_t>(pointer) | 256u;
  return static_cast<int64_t>(bits & (~bits + 1));
}

bool device_has_fp8() {
  int device = 0, major = 0, minor = 0;
  SPEEDRUN_CUDA_CHECK(cudaGetDevice(&device));
  SPEEDRUN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  SPEEDRUN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major * 10 + minor >= 89;
}

}  // namespace

class Fp8Head {
 public:
  Fp8Head(cudaStream_t stream, LtGemm& gemm, bool emulate)
      : stream_(stream), gemm_(gemm), tensor_cores_(!emulate && device_has_fp8()) {
    if (!tensor_cores_) return;
    SPEEDRUN_CUBLAS_CHECK(cublasLtCreate(&handle_));
    check_cuda(cudaMalloc(&workspace_, LtGemm::kWorkspaceBytes), "cudaMalloc (FP8 cuBLASLt workspace)");
    // Inverse scales, read by cuBLASLt through the A/B scale pointers: each in a slot of its
    // own, as aligned as cudaMalloc's memory (a kernel may load its scales vectorised).
    float inverse[3 * kScaleSlotFloats] = {};
    inverse[kInvX * kScaleSlotFloats] = 1.f / kXScale;
    inverse[kInvW * kScaleSlotFloats] = 1.f / kWScale;
    inverse[kInvGrad * kScaleSlotFloats] = 1.f / kGradScale;
    check_cuda(cudaMalloc(&inverse_scales_, sizeof(inverse)), "cudaMalloc (FP8 scales)");
    SPEEDRUN_CUDA_CHECK(cudaMemcpyAsync(inverse_scales_, inverse, sizeof(inverse), cudaMemcpyHostToDevice, stream_));
    SPEEDRUN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  ~Fp8Head() {
    cudaStreamSynchronize(stream_);
    for (auto& [key, plan] : plans_) destroy(plan);
    if (inverse_scales_) cudaFree(inverse_scales_);
    if (workspace_) cudaFree(workspace_);
    if (handle_) cublasLtDestroy(handle_);
  }
  Fp8Head(const Fp8Head&) = delete;
  Fp8Head& operator=(const Fp8Head&) = delete;

  void forward(float* logits, const float* x, const float* W, int rows, int V, int d, bool requantize) {
    require_shape(rows, V, d, "fp8_head_forward");
    if (requantize || W != source_ || V != V_ || d != d_) invalidate_weight(W, V, d);
    if (rows == 0) return;
    const size_t nx = static_cast<size_t>(rows) * d, nl = static_cast<size_t>(rows) * V;
    const Key key = forward_key(rows, V, d, logits, CUDA_R_32F);
    Plan* plan = fits_tensor_cores(rows, V, d) ? plan_or_refusal(key) : nullptr;
    bool done = false;
    if (plan) {
      const auto* w8 = weight_e4m3();
      auto* x8 = static_cast<__nv_fp8_storage_t*>(x_.get(nx));
      scaled_cast<__NV_E4M3>(stream_, x8, x, nx, kXScale);
      done = matmul(key, *plan, w8, x8, 1.f, 0.f, logits);
    }
    if (!done) {
      const float* wq = weight_emulated();
      float* xq = static_cast<float*>(x_.get(nx * sizeof(float)));
      scaled_round<__NV_E4M3>(stream_, xq, x, nx, kXScale);
      gemm_.run(false, true, rows, V, d, 1.f / (kXScale * kWScale), xq, d, 0, wq, d, 0, 0.f, logits, V, 0, 1);
    }
    round_to_bf16(stream_, logits, nl);
  }

  void backward(float* dx, float* dW, const float* dlogits, const float* x, const float* W, int rows, int V, int d,
                float output_scale) {
    require_shape(rows, V, d, "fp8_head_backward");
    if (W != source_ || V != V_ || d != d_) invalidate_weight(W, V, d);
    if (rows == 0) return;
    const size_t nx = static_cast<size_t>(rows) * d, ng = static_cast<size_t>(rows) * V;
    BackwardPlans plans;
    if (fits_tensor_cores(rows, V, d)) plans = backward_plans(rows, V, d, dx, dW);
    bool done = false;
    if (plans.ready()) {
      auto* g8 = static_cast<__nv_fp8_storage_t*>(g_.get(ng));
      auto* g8t = static_cast<__nv_fp8_storage_t*>(g_t_.get(ng));
      auto* x8t = static_cast<__nv_fp8_storage_t*>(x_t_.get(nx));
      scaled_cast_transpose<__NV_E5M2>(stream_, g8t, g8, dlogits, rows, V, kGradScale);
      scaled_cast_transpose<__NV_E4M3>(stream_, x8t, nullptr, x, rows, d, kXScale);
      // A refused dW product leaves dW alone; dx is overwritten again below.
      done = backward_products(plans, g8, g8t, x8t, output_scale, dx, dW);
    }
    if (!done) {
      const float* wq = weight_emulated();
      float* gq = static_cast<float*>(g_.get(ng * sizeof(float)));
      float* xq = static_cast<float*>(x_.get(nx * sizeof(float)));
      scaled_round<__NV_E5M2>(stream_, gq, dlogits, ng, kGradScale);
      scaled_round<__NV_E4M3>(stream_, xq, x, nx, kXScale);
      gemm_.run(false, false, rows, d, V, output_scale / (kGradScale * kWScale), gq, V, 0, wq, d, 0, 0.f, dx, d, 0,
                1);
      gemm_.run(true, false, V, d, rows, output_scale / (kGradScale * kXScale), gq, V, 0, xq, d, 0, 1.f, dW, d, 0,
                1);
    }
    round_to_bf16(stream_, dx, nx);
  }

 // Backend::fp8_head_loss. On the tensor cores the logits live in `logits` as bf16 codes
  // (cuBLASLt's epilogue rounds them: SPEC §6's "product rescaled to bf16"), the loss kernel
  // writes the gradient's e5m2 cast directly, and a byte transpose makes the dW product's
  // operand: no float32 logits or gradient in memory. Otherwise the three steps in turn.
  void loss(float* logits, float* row_loss, float* dx, float* dW, const float* x, const float* W,
            const int32_t* targets, int rows, int V, int d, float softcap, float loss_scale, float output_scale,
            bool requantize) {
    require_shape(rows, V, d, "fp8_head_loss");
    if (requantize || W != source_ || V != V_ || d != d_) invalidate_weight(W, V, d);
    if (rows == 0) return;
    if (!fits_tensor_cores(rows, V, d) || !fused_loss(logits, row_loss, dx, dW, x, targets, rows, V, d, softcap,
                                                      loss_scale, output_scale)) {
      forward(logits, x, W, rows, V, d, false);
      softcap_cross_entropy(stream_, logits, row_loss, targets, rows, V, softcap, loss_scale);
      backward(dx, dW, logits, x, W, rows, V, d, output_scale);
    }
  }

 private:
  enum InverseScale { kInvX = 0, kInvW = 1, kInvGrad = 2 };

  // The tensor-core loss; false, dW untouched, when cuBLASLt refuses one of its products.
  bool fused_loss(float* logits, float* row_loss, float* dx, float* dW, const float* x, const int32_t* targets,
                  int rows, int V, int d, float softcap, float loss_scale, float output_scale) {
    auto* logits16 = reinterpret_cast<uint16_t*>(logits);  // rows x V codes in the caller's floats
    const Key bf16_forward = forward_key(rows, V, d, logits16, CUDA_R_16BF);
    Plan* forward_plan = plan_or_refusal(bf16_forward);
    if (!forward_plan) return false;
    const BackwardPlans plans = backward_plans(rows, V, d, dx, dW);
    if (!plans.ready()) return false;
    const size_t nx = static_cast<size_t>(rows) * d, ng = static_cast<size_t>(rows) * V;
    auto* x8 = static_cast<__nv_fp8_storage_t*>(x_.get(nx));
    auto* x8t = static_cast<__nv_fp8_storage_t*>(x_t_.get(nx));
    scaled_cast_transpose<__NV_E4M3>(stream_, x8t, x8, x, rows, d, kXScale);
    if (!matmul(bf16_forward, *forward_plan, weight_e4m3(), x8, 1.f, 0.f, logits16)) return false;
    auto* g8 = static_cast<uint8_t*>(g_.get(ng));
    auto* g8t = static_cast<uint8_t*>(g_t_.get(ng));
    softcap_cross_entropy_to_e5m2(stream_, g8, kGradScale, row_loss, logits16, targets, rows, V, softcap, loss_scale);
    transpose_bytes(stream_, g8t, g8, rows, V);
    // A refused dW product leaves dW alone; the caller's fallback then redoes all three.
    if (!backward_products(plans, g8, g8t, x8t, output_scale, dx, dW)) return false;
    round_to_bf16(stream_, dx, nx);
    return true;
  }
  static constexpr int kScaleSlotFloats = 64;  // 256 bytes per inverse scale
  // Heuristic choices kept per product: cuBLASLt may turn one down at run time (seen on an
  // H200 with CUDA 13), and its sample's advice is to try the next.
  static constexpr int kCandidateAlgorithms = 8;

  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    std::vector<cublasLtMatmulAlgo_t> algorithms;  // best first; one that ran is moved to the front
  };
  // m, n, k, A type, A scale, B type, B scale, fast accumulation, beta != 0, alignments of A,
  // B, D, D's type (float32, or bf16 for the fused head's logits).
  using Key = std::array<int64_t, 13>;

  // The forward product (fast accumulation, as the reference's), into float32 or bf16 D.
  static Key forward_key(int rows, int V, int d, const void* logits, cudaDataType_t logits_type) {
    return product_key(V, rows, d, CUDA_R_8F_E4M3, kInvW, CUDA_R_8F_E4M3, kInvX, true, false, logits, logits_type);
  }

  // The backward's two products (exact float32 accumulation, as the reference's): both plans
  // or neither, so that both run on the FP8 tensor cores or neither does.
  struct BackwardPlans {
    Key dx_key{}, dW_key{};
    Plan* dx = nullptr;
    Plan* dW = nullptr;
    bool ready() const { return dx && dW; }
  };
  BackwardPlans backward_plans(int rows, int V, int d, const float* dx, const float* dW) {
    BackwardPlans plans;
    plans.dx_key = product_key(d, rows, V, CUDA_R_8F_E4M3, kInvW, CUDA_R_8F_E5M2, kInvGrad, false, false, dx);
    plans.dW_key = product_key(d, V, rows, CUDA_R_8F_E4M3, kInvX, CUDA_R_8F_E5M2, kInvGrad, false, true, dW);
    plans.dx = plan_or_refusal(plans.dx_key);
    if (plans.dx) plans.dW = plan_or_refusal(plans.dW_key);
    return plans;
  }

  // dx = s g W8 and dW += s g^T x8 from the e5m2 gradient g8 [rows, V], its transpose and
  // x8^T; false (the rest left alone) at the first product cuBLASLt turns down.
  bool backward_products(const BackwardPlans& plans, const void* g8, const void* g8t, const void* x8t, float output_scale,
                         float* dx, float* dW) {
    return matmul(plans.dx_key, *plans.dx, weight_e4m3_transposed(), g8, output_scale, 0.f, dx) &&
           matmul(plans.dW_key, *plans.dW, x8t, g8t, output_scale, 1.f, dW);
  }

  static void require_shape(int rows, int V, int d, const char* op) {
    if (rows < 0 || V <= 0 || d <= 0) {
      throw Error(std::string(op) + ": invalid shape rows=" + std::to_string(rows) + " V=" + std::to_string(V) +
                  " d=" + std::to_string(d));
    }
  }

  // cuBLASLt's FP8 kernels want K and the leading dimensions multiples of 16.
  bool fits_tensor_cores(int rows, int V, int d) const {
    return tensor_cores_ && rows % 16 == 0 && V % 16 == 0 && d % 16 == 0;
  }

  // The FP8 operands A and B always live in this class's scratch (cudaMalloc: 256-byte
  // aligned), so a plan is known before any of it is allocated.
  static Key product_key(int m, int n, int k, cudaDataType_t a_type, InverseScale a_scale, cudaDataType_t b_type,
                         InverseScale b_scale, bool fast_accum, bool accumulate, const void* D,
                         cudaDataType_t d_type = CUDA_R_32F) {
    constexpr int64_t kScratchAlignment = 256;
    return Key{m, n, k, a_type, a_scale, b_type, b_scale, fast_accum, accumulate,
               kScratchAlignment, kScratchAlignment, alignment_of(D), d_type};
  }

  // The plan for `key`, or nullptr when cuBLASLt has no FP8 algorithm for it (remembered: the
  // product then takes the emulated path, with a warning the first time).
  Plan* plan_or_refusal(const Key& key) {
    if (refused_.count(key)) return nullptr;
    Plan* plan = plan_for(key);
    if (plan) return plan;
    refuse(key, "has no FP8 algorithm for");
    return nullptr;
  }

  void refuse(const Key& key, const char* why) {
    refused_.insert(key);
    if (key[12] == CUDA_R_16BF) {  // the fused loss's forward: the float32-output forward follows
      std::fprintf(stderr,
                   "speedrun: warning: cuBLASLt %s the lm_head's forward product with a bf16 output m=%lld n=%lld "
                   "k=%lld on this GPU; the head runs its forward, loss and backward as separate steps instead "
                   "(same values, more memory traffic)\n",
                   why, static_cast<long long>(key[0]), static_cast<long long>(key[1]),
                   static_cast<long long>(key[2]));
      return;
    }
    std::fprintf(stderr,
                 "speedrun: warning: cuBLASLt %s the lm_head's product m=%lld n=%lld k=%lld on this GPU; the head "
                 "runs its FP8 casts through bf16/float32 products instead (same values up to summation order, "
                 "slower)\n",
                 why, static_cast<long long>(key[0]), static_cast<long long>(key[1]), static_cast<long long>(key[2]));
  }

  void invalidate_weight(const float* W, int V, int d) {
    source_ = W;
    V_ = V;
    d_ = d;
    have_w8_ = have_w8_t_ = have_wf_ = false;
  }

  size_t weight_count() const { return static_cast<size_t>(V_) * d_; }

  const __nv_fp8_storage_t* weight_e4m3() {
    auto* w8 = static_cast<__nv_fp8_storage_t*>(weight8_.get(weight_count()));
    if (!have_w8_) scaled_cast<__NV_E4M3>(stream_, w8, source_, weight_count(), kWScale);
    have_w8_ = true;
    return w8;
  }

  const __nv_fp8_storage_t* weight_e4m3_transposed() {
    auto* w8t = static_cast<__nv_fp8_storage_t*>(weight8_t_.get(weight_count()));
    if (!have_w8_t_) scaled_cast_transpose<__NV_E4M3>(stream_, w8t, nullptr, source_, V_, d_, kWScale);
    have_w8_t_ = true;
    return w8t;
  }

  const float* weight_emulated() {
    float* wf = static_cast<float*>(weight_f_.get(weight_count() * sizeof(float)));
    if (!have_wf_) scaled_round<__NV_E4M3>(stream_, wf, source_, weight_count(), kWScale);
    have_wf_ = true;
    return wf;
  }

  // D [m, n] (column-major, fp32, ld m) = alpha * scale_a * scale_b * A^T B + beta * D, with
  // A stored column-major [k, m] and B [k, n] (both contiguous along k), as the plan's key says.
  // Tries the plan's algorithms in order while cuBLASLt answers CUBLAS_STATUS_NOT_SUPPORTED
  // (it checks an algorithm against the call only at run time); false, D untouched and the
  // product refused from now on, when it turns every one down.
  bool matmul(const Key& key, Plan& plan, const void* A, const void* B, float alpha, float beta, void* D) {
    auto& algorithms = plan.algorithms;
    for (size_t i = 0; i < algorithms.size(); ++i) {
      const cublasStatus_t status =
          cublasLtMatmul(handle_, plan.desc, &alpha, A, plan.a, B, plan.b, &beta, D, plan.d, D, plan.d,
                         &algorithms[i], workspace_, LtGemm::kWorkspaceBytes, stream_);
      if (status == CUBLAS_STATUS_NOT_SUPPORTED) continue;
      SPEEDRUN_CUBLAS_CHECK(status);
      if (i > 0) std::swap(algorithms[0], algorithms[i]);  // the next call starts with one that runs
      return true;
    }
    refuse(key, "turned down at run time every FP8 algorithm its heuristic offered for");
    return false;
  }

  // nullptr when cuBLASLt has no algorithm for the key.
  Plan* plan_for(const Key& key) {
    auto found = plans_.find(key);
    if (found != plans_.end()) return &found->second;
    Plan plan;
    try {
      if (!build_plan(key, plan)) {
        destroy(plan);
        return nullptr;
      }
    } catch (...) {
      destroy(plan);
      throw;
    }
    return &plans_.emplace(key, plan).first->second;
  }

  // Fills `plan` for `key`; false when cuBLASLt has no algorithm for it.
  bool build_plan(const Key& key, Plan& plan) {
    const uint64_t m = key[0], n = key[1], k = key[2];
    SPEEDRUN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
    set(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, transpose);
    set(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, keep);
    const float* scale_a = inverse_scales_ + key[4] * kScaleSlotFloats;
    const float* scale_b = inverse_scales_ + key[6] * kScaleSlotFloats;
    set(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, scale_a);
    set(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, scale_b);
    const int8_t fast = key[7] ? 1 : 0;
    set(plan.desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, fast);
    SPEEDRUN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.a, static_cast<cudaDataType_t>(key[3]), k, m, k));
    SPEEDRUN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.b, static_cast<cudaDataType_t>(key[5]), k, n, k));
    SPEEDRUN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.d, static_cast<cudaDataType_t>(key[12]), m, n, m));

    plan.algorithms = candidate_algorithms(handle_, plan.desc, plan.a, plan.b, plan.d, plan.d,
                                           static_cast<uint32_t>(key[9]), static_cast<uint32_t>(key[10]),
                                           static_cast<uint32_t>(key[11]), kCandidateAlgorithms,
                                           key[12] == CUDA_R_16BF);
    return !plan.algorithms.empty();
  }

  static void destroy(const Plan& plan) {
    if (plan.a) cublasLtMatrixLayoutDestroy(plan.a);
    if (plan.b) cublasLtMatrixLayoutDestroy(plan.b);
    if (plan.d) cublasLtMatrixLayoutDestroy(plan.d);
    if (plan.desc) cublasLtMatmulDescDestroy(plan.desc);
  }

  template <class T>
  static void set(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const T& value) {
    SPEEDRUN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
  }

  cudaStream_t stream_;
  LtGemm& gemm_;  // the backend's products, for the emulated path
  const bool tensor_cores_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  float* inverse_scales_ = nullptr;  // device: 1/2, 1/2^9, 1/2^19, kScaleSlotFloats apart
  std::map<Key, Plan> plans_;
  std::set<Key> refused_;  // products cuBLASLt has no FP8 algorithm for, or turned every one down

  // The kept weight: its source and which quantised forms are current.
  const float* source_ = nullptr;
  int V_ = 0, d_ = 0;
  bool have_w8_ = false, have_w8_t_ = false, have_wf_ = false;
  Scratch weight8_{stream_}, weight8_t_{stream_}, weight_f_{stream_};
  // Per-call operands (FP8 bytes, or FP8 values as floats on the emulated path).
  Scratch x_{stream_}, x_t_{stream_}, g_{stream_}, g_t_{stream_};
};

struct Fp8HeadDeleter {
  void operator()(Fp8Head* head) const;
};
void Fp8HeadDeleter::operator()(Fp8Head* head) const { delete head; }

std::unique_ptr<Fp8Head, Fp8HeadDeleter> make_fp8_head(cudaStream_t stream, LtGemm& gemm, bool emulate) {
  return std::unique_ptr<Fp8Head, Fp8HeadDeleter>(new Fp8Head(stream, gemm, emulate));
}

void fp8_head_forward(Fp8Head& head, float* logits, const float* x, const float* W, int rows, int V, int d,
                      bool requantize_weight) {
  head.forward(logits, x, W, rows, V, d, requantize_weight);
}

void fp8_head_backward(Fp8Head& head, float* dx, float* dW, const float* dlogits, const float* x, const float* W,
                       int rows, int V, int d, float output_scale) {
  head.backward(dx, dW, dlogits, x, W, rows, V, d, output_scale);
}

void fp8_head_loss(Fp8Head& head, float* logits, float* row_loss, float* dx, float* dW, const float* x, const float* W,
                   const int32_t* targets, int rows, int V, int d, float softcap, float loss_scale, float output_scale,
                   bool requantize_weight) {
  head.loss(logits, row_loss, dx, dW, x, W, targets, rows, V, d, softcap, loss_scale, output_scale, requantize_weight);
}

}  // namespace speedrun::cuda
