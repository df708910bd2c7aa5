// speedrun bench: times real training steps of a preset (ms per step, tokens/s, MFU on a
// GPU, peak memory, launch to end of the first step), then profiles one more step per op
// (matmul throughput, against a plain sgemm on the CPU; the FP8 head's rate apart; attention
// TFLOP/s), and
// (with --json) writes the same as a JSON file.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "backends/attention_tiles.h"
#include "backends/backend.h"
#include "backends/matmul_sweep.h"
#include "backends/product_shape.h"
#include "backends/profiling_backend.h"
#include "cli/activation_flags.h"
#include "cli/backend_flags.h"
#include "cli/commands.h"
#include "cli/number_checks.h"
#include "cli/config_options.h"
#include "backends/cuda_devices.h"
#include "comm/communicator.h"
#include "comm/failure_agreement.h"
#include "comm/nccl_communicator.h"
#include "train/data_parallel.h"
#include "model/attention_mask.h"
#include "model/gpt.h"
#include "model/params.h"
#include "optim/optimizer.h"
#include "train/progress.h"
#include "train/run_memory.h"
#include "train/trainer.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/process_clock.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace speedrun::cli {
namespace {

using Clock = std::chrono::steady_clock;

// Tokens with a document boundary every ~700 tokens on average, as in web text (none when
// the separator is outside the vocabulary).
std::vector<int32_t> synthetic_tokens(size_t n, const Config& config, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const bool separated = config.document_separator < config.vocab_size;
  std::vector<int32_t> t(n);
  for (int32_t& x : t) {
    const bool starts_document = rng() % 700 == 0;
    x = separated && starts_document ? config.document_separator : static_cast<int32_t>(rng() % config.vocab_size);
  }
  return t;
}

// GFLOP/s of one large sgemm through the same BLAS: the ceiling the model's matmuls aim at.
double reference_sgemm_gflops(int M, int N, int K) {
  std::vector<float> a(static_cast<size_t>(M) * K, 0.5f), b(static_cast<size_t>(K) * N, 0.25f),
      c(static_cast<size_t>(M) * N);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.f, a.data(), K, b.data(), K, 0.f, c.data(), N);
  const auto start = Clock::now();
  int reps = 0;
  do {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.f, a.data(), K, b.data(), K, 0.f, c.data(), N);
    ++reps;
  } while (std::chrono::duration<double>(Clock::now() - start).count() < 0.5);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return 2.0 * M * N * K * reps / seconds / 1e9;
}

// Parameters that take part in matmuls (every block matrix and the head; the embeddings
// are lookups): 6 N FLOPs per token for forward and backward, the MFU convention.
double matmul_parameters(const ParamLayout& layout) {
  double n = 0;
  for (const ParamSpec& spec : layout.specs()) {
    if (spec.group == ParamGroup::kMuon || spec.group == ParamGroup::kLmHead) n += static_cast<double>(spec.count);
  }
  return n;
}

// Attention's forward FLOPs in one step of this process: 4 D per visible (query, key) pair
// and head, over the mask's visible pairs only (SPEC §3), per layer window. The backward's
// are 2.5 times these (FlashAttention's convention).
double attention_flops(const Config& config, const std::vector<int32_t>& inputs, int sequences, int long_window) {
  const int T = config.seq_len;
  double pairs = 0;
  for (int r = 0; r < sequences; ++r) {
    const std::span<const int32_t> seq(inputs.data() + static_cast<size_t>(r) * T, T);
    const std::vector<int32_t> doc = document_ids(seq, config.document_separator);
    const tiles::DocumentBounds bounds = tiles::document_bounds(doc.data(), T);
    for (int layer = 0; layer < config.num_layers; ++layer) {
      if (!config.layer_has_attention(layer)) continue;
      const int window = config.layer_uses_long_window(layer) ? long_window : short_window_blocks(long_window);
      pairs += static_cast<double>(tiles::visible_pairs(bounds, T, config.attn_block_size, window));
    }
  }
  return pairs * config.num_heads * 4.0 * config.head_dim;
}

// TFLOP/s of `flops` in `seconds` (0 when nothing was timed).
double tflops(double flops, double seconds) { return seconds > 0 ? flops / seconds / 1e12 : 0; }

// "12.5 TFLOP/s", or GFLOP/s below 0.1 TFLOP/s (the CPU's).
std::string rate_text(double tflops) {
  char text[32];
  if (tflops >= 0.1) {
    std::snprintf(text, sizeof(text), "%.3g TFLOP/s", tflops);
  } else {
    std::snprintf(text, sizeof(text), "%.3g GFLOP/s", tflops * 1e3);
  }
  return text;
}

// Dense bf16 tensor-core peak of an H100 SXM (the MFU denominator the record uses).
constexpr double kH100PeakFlops = 989e12;

std::string iso_date_utc() {
  const std::time_t now = std::time(nullptr);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return text;
}

std::string device_description(const std::string& device, int index) {
  if (device != "cuda") return "cpu (" + std::to_string(std::thread::hardware_concurrency()) + " hardware threads)";
  const CudaDeviceQuery query = query_cuda_devices();
  for (const CudaDeviceInfo& d : query.devices) {
    if (d.index == index) {
      return d.name + " (sm_" + std::to_string(d.compute_major) + std::to_string(d.compute_minor) + ", " +
             std::to_string(d.total_memory_bytes >> 20) + " MiB)";
    }
  }
  return "cuda";
}

// A profile's rows, the most time first.
std::vector<std::pair<std::string, OpStats>> slowest_first(const std::map<std::string, OpStats>& stats) {
  std::vector<std::pair<std::string, OpStats>> rows(stats.begin(), stats.end());
  std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.seconds > b.second.seconds; });
  return rows;
}

// The profiled step's products by shape (profiling_backend.h's names), slowest first, printed
// and returned as JSON: which products take the matmuls' time, and at what rate.
nlohmann::json print_product_shapes(const std::map<std::string, OpStats>& shapes) {
  const std::vector<std::pair<std::string, OpStats>> rows = slowest_first(shapes);
  nlohmann::json out = nlohmann::json::object();
  if (rows.empty()) return out;
  std::printf("matmuls by shape (A op, B op, M x N x K, output, +C when added to), profiled step:\n");
  std::printf("%-38s %10s %10s %12s\n", "shape", "ms/step", "calls/step", "GFLOP/s");
  for (const auto& [name, s] : rows) {
    const double gflops = s.seconds > 0 ? s.flops / s.seconds / 1e9 : 0;
    std::printf("%-38s %10.2f %10lld %12.0f\n", name.c_str(), 1000 * s.seconds, s.calls, gflops);
    out[name] = {{"ms_per_step", 1000 * s.seconds}, {"calls_per_step", s.calls}, {"gflops", gflops}};
  }
  return out;
}

// --sweep-matmuls: each product shape of the profiled step, slowest first, with cuBLASLt's
// candidates timed alone; printed with what choosing the fastest would save per step (its
// calls times the difference), and returned as JSON.
nlohmann::json sweep_matmul_algorithms(const std::map<std::string, OpStats>& shapes, int device, int candidates) {
  constexpr int kRepeats = 10;
  const std::vector<std::pair<std::string, OpStats>> rows = slowest_first(shapes);
  std::printf("cuBLASLt's algorithms for each shape, alone (median of %d runs; rank 0 is the step's; saves: per "
              "step, at its calls):\n",
              kRepeats);
  std::printf("%-38s %9s %9s %5s %9s  %s\n", "shape", "rank 0 ms", "best ms", "rank", "saves ms", "best's config");
  nlohmann::json out = nlohmann::json::array();
  double saving_ms = 0;
  for (const auto& [name, s] : rows) {
    std::vector<AlgorithmTiming> timings;
    try {
      timings = sweep_product_algorithms(device, parse_product_shape(name), candidates, kRepeats);
    } catch (const Error& e) {  // a diagnostic: the step's results stand, and the other shapes
      std::printf("%-38s sweep failed: %s\n", name.c_str(), e.what());
      out.push_back({{"shape", name}, {"error", e.what()}});
      continue;
    }
    const AlgorithmTiming* best = nullptr;
    nlohmann::json listed = nlohmann::json::array();
    for (const AlgorithmTiming& t : timings) {
      listed.push_back({{"rank", t.rank}, {"ms", t.ms >= 0 ? nlohmann::json(t.ms) : nlohmann::json(nullptr)},
                        {"config", t.config}});
      if (t.ms >= 0 && (!best || t.ms < best->ms)) best = &t;
    }
    const bool first_ran = !timings.empty() && timings.front().ms >= 0;
    // What the step would gain per step from the best, at this shape's calls per step.
    const double gain_ms = first_ran && best ? (timings.front().ms - best->ms) * s.calls : 0;
    saving_ms += gain_ms;
    std::printf("%-38s %9.3f %9.3f %5d %9.2f  %s\n", name.c_str(), first_ran ? timings.front().ms : -1.0,
                best ? best->ms : -1.0, best ? best->rank : -1, gain_ms, best ? best->config.c_str() : "none ran");
    out.push_back({{"shape", name}, {"calls_per_step", s.calls}, {"saving_ms_per_step", gain_ms},
                   {"candidates", listed}});
  }
  std::printf("choosing each shape's fastest would save %.1f ms per step (profiled calls x difference)\n",
              saving_ms);
  return out;
}

// --autotune-matmuls: the plans whose algorithm the backend chose by timing, most gained
// first (the heuristic's first against the chosen, per call, each timed alone), as JSON.
nlohmann::json report_matmul_tunings(std::vector<MatmulTuning> tunings) {
  if (tunings.empty()) return nullptr;
  const auto gain = [](const MatmulTuning& t) {
    return t.heuristic_ms >= 0 && t.chosen_ms >= 0 ? t.heuristic_ms - t.chosen_ms : 0.0;
  };
  std::stable_sort(tunings.begin(), tunings.end(),
                   [&](const MatmulTuning& a, const MatmulTuning& b) { return gain(a) > gain(b); });
  std::printf("%s (ms per call, each alone):\n", summarize_tunings(tunings).c_str());
  std::printf("%-38s %5s %5s %9s %9s  %s\n", "shape", "timed", "rank", "rank 0 ms", "chosen ms", "chosen config");
  nlohmann::json out = nlohmann::json::array();
  for (const MatmulTuning& t : tunings) {
    std::printf("%-38s %5d %5d %9.3f %9.3f  %s\n", t.shape.c_str(), t.timed, t.chosen_rank, t.heuristic_ms,
                t.chosen_ms, t.config.c_str());
    const auto ms = [](double v) { return v >= 0 ? nlohmann::json(v) : nlohmann::json(nullptr); };
    out.push_back({{"shape", t.shape}, {"timed", t.timed}, {"chosen_rank", t.chosen_rank},
                   {"heuristic_ms", ms(t.heuristic_ms)}, {"chosen_ms", ms(t.chosen_ms)}, {"config", t.config}});
  }
  return out;
}

int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

struct BenchOptions {
  ConfigOptions config;
  std::string device = "cpu";
  BackendFlags backend;
  ActivationFlags activations;
  std::string grad_reduce = "auto";
  int steps = 3;
  int warmup = 1;
  int window = -1;
  int sweep_matmuls = 0;
  std::string json_path;
};

// The config to time, with what would otherwise fail only after the timing checked first:
// where the JSON goes, and the process count.
Config checked_config(const BenchOptions& opts, int processes) {
  Config config = opts.config.build();
  if (!opts.json_path.empty()) {
    const std::filesystem::path json(opts.json_path);
    const std::filesystem::path parent = json.parent_path().empty() ? "." : json.parent_path();
    if (std::filesystem::is_directory(json) || !std::filesystem::is_directory(parent)) {
      throw UsageError("--json '" + opts.json_path + "' must name a file in an existing directory");
    }
  }
  DataParallel::check_process_count(config.world_size, processes);
  return config;
}

}  // namespace

void register_bench_command(CLI::App& app) {
  auto opts = std::make_shared<BenchOptions>();
  CLI::App* cmd = app.add_subcommand("bench", "time training steps: per-op time, ms/step, tokens/s");
  opts->config.add_to(cmd, "tiny");
  cmd->add_option("--device", opts->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  opts->backend.add_to(cmd);
  opts->activations.add_to(cmd);
  cmd->add_option("--steps", opts->steps, "timed steps")->check(whole_number(1))->capture_default_str();
  cmd->add_option("--warmup", opts->warmup, "untimed steps first")->check(whole_number(0))->capture_default_str();
  cmd->add_option("--window", opts->window, "long attention window in blocks (default: the last step's)")
      ->check(whole_number(1));
  cmd->add_option("--sweep-matmuls", opts->sweep_matmuls,
                  "cuda: also time up to N of cuBLASLt's candidate algorithms for each product shape of the "
                  "profiled step, each alone, against the first (the one the step runs)")
      ->check(CLI::Range(0, 64));
  cmd->add_option("--json", opts->json_path, "also write the results to this JSON file");
  cmd->add_option("--grad-reduce", opts->grad_reduce,
                  "gradient reduction over the logical ranks and processes (see train --help)")
      ->check(CLI::IsMember({"auto", "exact", "overlap"}))
      ->capture_default_str();
  cmd->callback([opts] {
    // The sweep measures each shape's candidates against the heuristic's first, which tuning
    // replaces by its own choice: its "saves" would be against an algorithm the step never ran.
    if (opts->sweep_matmuls > 0 && opts->backend.autotune_matmuls > 0) {
      throw UsageError("--sweep-matmuls compares cuBLASLt's candidates with the heuristic's first algorithm, which "
                       "--autotune-matmuls replaces (its report lists each tuned plan against that first): use one "
                       "or the other");
    }
    if (opts->sweep_matmuls > 0 && opts->device != "cuda") {
      throw UsageError("--sweep-matmuls times cuBLASLt's algorithms: it needs --device cuda");
    }
    // Under mpirun every process times its share; rank 0 reports, also the mistakes every
    // process makes alike in the flags and config (once, every process exiting together).
    std::unique_ptr<Communicator> process_comm = make_process_communicator();
    Config config;
    try {
      config = agreeing_on_failure(*process_comm, [&] { return checked_config(*opts, process_comm->size()); });
    } catch (const AgreedError& e) {
      if (process_comm->size() == 1) throw;
      leave_together(*process_comm, std::string("error: ") + e.what(), static_cast<int>(e.code()));
    }
    const int visible_gpus = static_cast<int>(query_cuda_devices().devices.size());
    const int device_index = opts->device == "cuda" && visible_gpus > 0
                                 ? gpu_for_local_rank(process_comm->local_rank(), visible_gpus)
                                 : process_comm->local_rank();
    const BackendOptions backend_options = opts->backend.resolve(opts->device, config.head_dim);
    auto device = make_backend(opts->device, device_index, backend_options);
    // GPU gradients of several processes go through NCCL (bootstrapped over MPI).
    std::unique_ptr<Communicator> nccl;
    if (opts->device == "cuda" && process_comm->size() > 1) nccl = make_nccl_communicator(*process_comm, *device);
    Communicator* comm = nccl ? nccl.get() : process_comm.get();
    std::map<std::string, OpStats> stats, product_shapes;
    bool profiling = false;  // the timed steps run unprofiled; one more step is profiled
    auto backend = make_profiling_backend(*device, stats, &profiling, &product_shapes);
    const ActivationOptions activations = opts->activations.resolve(opts->device);
    // Sized as a training run sizes it (validation sequences included), so that the peak
    // memory reported is the run's.
    GPT model(config, *backend, config.seq_len, config.val_seq_len, activations);
    Optimizer optimizer(config, model.layout(), *backend);
    DataParallel dp(*comm, model, {parse_grad_reduce(opts->grad_reduce)});
    const size_t tokens = static_cast<size_t>(config.world_size) * config.seq_len;
    const size_t local_tokens = static_cast<size_t>(dp.local_ranks()) * config.seq_len;
    const std::vector<int32_t> inputs = synthetic_tokens(local_tokens, config, 1 + comm->rank());
    const std::vector<int32_t> targets = synthetic_tokens(local_tokens, config, 100 + comm->rank());
    // The step index picks the window: the last step's unless --window says otherwise.
    int step = config.num_iterations - 1;
    if (opts->window > long_window_blocks(config, step)) {
      throw UsageError("--window " + std::to_string(opts->window) + " is longer than this config's longest window (" +
                       std::to_string(long_window_blocks(config, step)) + " blocks, at its last step)");
    }
    if (opts->window >= 0) {
      while (step > 0 && long_window_blocks(config, step) > opts->window) --step;
    }
    const int window = long_window_blocks(config, step);
    double first_step_seconds = -1;  // from exec to the end of the first step, warm-up or timed
    // A step returns with its optimiser update still queued on a device: the first step's
    // clock and the window's two ends wait for the device, so the window holds exactly
    // the work of its steps.
    auto training_step = [&] {
      run_training_step(dp, optimizer, inputs, targets, step);
      if (first_step_seconds < 0) {
        backend->synchronize();
        first_step_seconds = seconds_since_process_start();
      }
    };
    for (int i = 0; i < opts->warmup; ++i) training_step();
    backend->synchronize();
    const double communication_before = dp.communication_seconds();
    const size_t operand_copies_before = backend->operand_copy_traffic_bytes();
    const auto start = Clock::now();
    for (int i = 0; i < opts->steps; ++i) training_step();
    backend->synchronize();
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    // The bf16 operand copies' traffic: at ~3 TB/s an H100 spends ~1/3 ms per GB on it.
    const double operand_copy_gb_per_step =
        static_cast<double>(backend->operand_copy_traffic_bytes() - operand_copies_before) / opts->steps / 1e9;
    const double step_ms = 1000 * seconds / opts->steps;
    const double tokens_per_second = tokens * opts->steps / seconds;
    const double communication_ms = 1000 * (dp.communication_seconds() - communication_before) / opts->steps;
    const bool on_gpu = opts->device == "cuda";
    // Per GPU: the step's tokens are every process's, each process on its own GPU.
    const double mfu = 6 * matmul_parameters(model.layout()) * tokens_per_second / (comm->size() * kH100PeakFlops);
    // What `speedrun memory` plans, against what the backend allocated and, on a GPU, what
    // the device has in use (its allocations only grow, so after the steps that is their
    // peak; it adds the matmul workspace, operand copies and the CUDA context).
    const size_t planned_bytes =
        plan_run_memory(config, activations, backend->head_chunk_rows(), comm->size(), dp.mode()).total_bytes();
    const size_t backend_peak_bytes = backend->peak_memory_bytes();
    const size_t device_in_use_bytes = backend->device_memory_in_use();
    // The headline is what the machine holds for the run: on a GPU the device's memory in use
    // (what nvidia-smi shows and a 24 GB budget is about), on the host the peak RSS.
    const size_t peak_bytes = on_gpu ? device_in_use_bytes : static_cast<size_t>(peak_rss_bytes());
    // One profiled step: every op synchronised and timed.
    profiling = true;
    const auto profile_start = Clock::now();
    run_training_step(dp, optimizer, inputs, targets, step);
    const double profiled_seconds = std::chrono::duration<double>(Clock::now() - profile_start).count();
    profiling = false;
    if (comm->rank() != 0) return;

    std::printf("speedrun bench: %s, %d thread(s), %d process(es), %zu parameters, %d x %d tokens per step, "
                "window %d blocks\n",
                device_description(opts->device, device_index).c_str(), thread_count(), comm->size(),
                model.layout().parameter_count(), config.world_size, config.seq_len, window);
    std::printf("matmul inputs %s, attention kernel %s, lm_head %s, activations %s (%.1f MiB)\n",
                matmul_precision_name(backend_options.matmul).c_str(),
                attention_kernel_name(backend_options.attention).c_str(), config.lm_head_fp8 ? "fp8" : "plain",
                ActivationFlags::describe(activations).c_str(), model.activation_bytes() / (1024.0 * 1024.0));
    // Under mpirun each process profiles its own share; the table is rank 0's.
    std::printf("per op, one profiled step%s (%.1f ms with a synchronisation around every op):\n",
                comm->size() > 1 ? " of rank 0's share" : "", 1000 * profiled_seconds);
    // GB/s: the op's floor of memory traffic (each input read once, each output written
    // once) over its time; against the device's bandwidth it says how far a memory-bound
    // kernel is from its floor.
    std::printf("%-26s %10s %10s %8s %12s %10s\n", "op", "ms/step", "calls/step", "share", "GFLOP/s", "GB/s");
    const std::vector<std::pair<std::string, OpStats>> rows = slowest_first(stats);
    nlohmann::json ops = nlohmann::json::object();
    double matmul_flops = 0, matmul_seconds = 0, attention_forward_seconds = 0, attention_backward_seconds = 0;
    OpStats fp8_head;
    for (const auto& [name, s] : rows) {
      const double gflops = s.flops > 0 && s.seconds > 0 ? s.flops / s.seconds / 1e9 : 0;
      const double gbps = s.bytes > 0 && s.seconds > 0 ? s.bytes / s.seconds / 1e9 : 0;
      std::printf("%-26s %10.2f %10.1f %7.1f%% %12s %10s\n", name.c_str(), 1000 * s.seconds,
                  static_cast<double>(s.calls), 100 * s.seconds / profiled_seconds,
                  gflops > 0 ? std::to_string(static_cast<int>(gflops)).c_str() : "",
                  gbps > 0 ? std::to_string(static_cast<int>(gbps)).c_str() : "");
      ops[name] = {{"ms_per_step", 1000 * s.seconds},
                   {"calls_per_step", s.calls},
                   {"gflops", gflops},
                   {"floor_bytes_per_step", s.bytes},
                   {"gb_per_s", gbps}};
      // The FP8 head's time holds its casts and fused loss and its rate another peak's:
      // reported apart, not mixed into the products' rate.
      if (name == kFp8HeadOp) {
        fp8_head = s;
      } else if (name.rfind("matmul", 0) == 0) {
        matmul_flops += s.flops;
        matmul_seconds += s.seconds;
      }
      if (name == "attention forward") attention_forward_seconds = s.seconds;
      if (name == "attention backward") attention_backward_seconds = s.seconds;
    }
    const nlohmann::json shapes = print_product_shapes(product_shapes);
    const double model_gflops = matmul_seconds > 0 ? matmul_flops / matmul_seconds / 1e9 : 0;
    const double attention_forward_flops = attention_flops(config, inputs, dp.local_ranks(), window);
    const double attention_tflops =
        tflops(3.5 * attention_forward_flops, attention_forward_seconds + attention_backward_seconds);
    const double attention_forward_tflops = tflops(attention_forward_flops, attention_forward_seconds);
    const double attention_backward_tflops = tflops(2.5 * attention_forward_flops, attention_backward_seconds);
    std::printf("step: %.1f ms | %.0f tokens/s", step_ms, tokens_per_second);
    if (on_gpu) std::printf(" | MFU %.1f%% (6 x %.1fM matmul parameters per token, 989 TFLOP/s)", 100 * mfu,
                            matmul_parameters(model.layout()) / 1e6);
    std::printf("\n");
    double sgemm_gflops = 0;
    if (!on_gpu) {
      sgemm_gflops = reference_sgemm_gflops(1024, 1024, 1024);
      std::printf("matmuls %.1f GFLOP/s = %.0f%% of plain sgemm (%.1f GFLOP/s, 1024^3)\n", model_gflops,
                  100 * model_gflops / sgemm_gflops, sgemm_gflops);
    } else {
      std::printf("matmuls %.1f TFLOP/s (profiled step)\n", model_gflops / 1e3);
    }
    const double fp8_head_gflops = fp8_head.seconds > 0 ? fp8_head.flops / fp8_head.seconds / 1e9 : 0;
    if (fp8_head.calls > 0) {
      std::printf("lm_head FP8 %s (its three products over the op's time, casts and fused loss included; not in "
                  "the matmuls' rate above)\n",
                  rate_text(fp8_head_gflops / 1e3).c_str());
    }
    std::printf("attention %s (visible pairs only, forward + backward; forward %s, backward %s; profiled step)\n",
                rate_text(attention_tflops).c_str(), rate_text(attention_forward_tflops).c_str(),
                rate_text(attention_backward_tflops).c_str());
    std::printf("peak memory: %.1f MiB (%s)\n", peak_bytes / (1024.0 * 1024.0),
                on_gpu ? "device memory in use after the steps, context, scratch and workspaces included" : "host RSS");
    std::printf("memory plan: %.1f MiB (parameters, gradients, optimiser, gradient reduction, activations; speedrun "
                "memory), backend "
                "allocations %.1f MiB",
                planned_bytes / (1024.0 * 1024.0), backend_peak_bytes / (1024.0 * 1024.0));
    if (on_gpu) {
      std::printf(", device in use %.1f MiB (with scratch, workspaces, CUDA context)",
                  device_in_use_bytes / (1024.0 * 1024.0));
    }
    std::printf("\n");
    std::printf("launch to end of first step: %.2f s (from exec)\n", first_step_seconds);
    if (operand_copy_gb_per_step > 0) {
      std::printf("bf16 operand copies: %.3g GB of memory traffic per step (the matmuls' float32 operands rounded "
                  "into scratch before each product)\n",
                  operand_copy_gb_per_step);
    }
    if (comm->size() > 1) {
      std::printf("communication: %.1f ms per step (%s gradient reduction over %s, host time in its calls)\n",
                  communication_ms, grad_reduce_name(dp.mode()).c_str(), comm->name().c_str());
    }
    const nlohmann::json sweep =
        opts->sweep_matmuls > 0 ? sweep_matmul_algorithms(product_shapes, device_index, opts->sweep_matmuls)
                                : nlohmann::json(nullptr);
    const nlohmann::json tunings = report_matmul_tunings(backend->matmul_tunings());
    if (!opts->json_path.empty()) {
      const char* commit = std::getenv("SPEEDRUN_COMMIT");
      nlohmann::json out = {{"date", iso_date_utc()},
                            {"commit", commit ? commit : "unknown"},
                            {"device", opts->device},
                            {"device_name", device_description(opts->device, device_index)},
                            {"matmul", matmul_precision_name(backend_options.matmul)},
                            {"attention_kernel", attention_kernel_name(backend_options.attention)},
                            {"recompute_activations", activations.memory == ActivationMemory::kRecompute},
                            {"activation_memory", ActivationFlags::memory_name(activations.memory)},
                            {"activation_precision", ActivationFlags::precision_name(activations.precision)},
                            {"activation_bytes", model.activation_bytes()},
                            {"processes", comm->size()},
                            {"communication_ms_per_step", communication_ms},
                            {"operand_copy_gb_per_step", operand_copy_gb_per_step},
                            {"threads", thread_count()},
                            {"hardware_threads", std::thread::hardware_concurrency()},
                            {"config", config.to_json()},
                            {"window_blocks", window},
                            {"tokens_per_step", tokens},
                            {"steps_timed", opts->steps},
                            {"warmup_steps", opts->warmup},
                            {"ms_per_step", step_ms},
                            {"tokens_per_second", tokens_per_second},
                            {"mfu", on_gpu ? nlohmann::json(mfu) : nlohmann::json(nullptr)},
                            {"matmul_parameters", matmul_parameters(model.layout())},
                            {"matmul_gflops", model_gflops},
                            {"fp8_head_gflops",
                             fp8_head.calls > 0 ? nlohmann::json(fp8_head_gflops) : nlohmann::json(nullptr)},
                            {"attention_tflops", attention_tflops},
                            {"attention_forward_tflops", attention_forward_tflops},
                            {"attention_backward_tflops", attention_backward_tflops},
                            {"peak_memory_bytes", peak_bytes},
                            {"peak_memory_kind",
                             on_gpu ? "device memory in use (context, scratch, workspaces)" : "host RSS"},
                            {"planned_memory_bytes", planned_bytes},
                            {"backend_peak_memory_bytes", backend_peak_bytes},
                            {"device_memory_in_use_bytes",
                             on_gpu ? nlohmann::json(device_in_use_bytes) : nlohmann::json(nullptr)},
                            {"reference_sgemm_gflops",
                             on_gpu ? nlohmann::json(nullptr) : nlohmann::json(sgemm_gflops)},
                            {"first_step_seconds", first_step_seconds},
                            {"profiled_step_ms", 1000 * profiled_seconds},
                            {"ops", ops},
                            {"matmul_shapes", shapes},
                            {"matmul_sweep", sweep},
                            {"autotune_matmuls", backend_options.autotune_matmuls},
                            {"head_chunk_rows", backend->head_chunk_rows()},
                            {"matmul_tunings", tunings}};
      write_file_atomically(opts->json_path, out.dump(2) + "\n");
    }
  });
}

}  // namespace speedrun::cli
