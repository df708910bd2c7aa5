// speedrun bench: times real training steps of a preset and reports per-op time,
// ms per step, tokens/s, matmul throughput against a plain sgemm of this machine,
// and (with --json) writes the same as a JSON file.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "backends/backend.h"
#include "backends/profiling_backend.h"
#include "cli/commands.h"
#include "cli/config_options.h"
#include "backends/cuda_devices.h"
#include "comm/communicator.h"
#include "comm/nccl_communicator.h"
#include "train/data_parallel.h"
#include "model/gpt.h"
#include "optim/optimizer.h"
#include "train/trainer.h"
#include "util/atomic_file.h"
#include "util/error.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace speedrun::cli {
namespace {

using Clock = std::chrono::steady_clock;

// Tokens with a document boundary every ~700 tokens on average, as in web text.
std::vector<int32_t> synthetic_tokens(size_t n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = (rng() % 700 == 0) ? 50256 % vocab : static_cast<int32_t>(rng() % vocab);
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

int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

void register_bench_command(CLI::App& app) {
  struct Options {
    ConfigOptions config;
    std::string device = "cpu";
    std::string grad_reduce = "auto";
    int steps = 3;
    int warmup = 1;
    int window = -1;
    std::string json_path;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("bench", "time training steps: per-op time, ms/step, tokens/s");
  opts->config.add_to(cmd, "tiny");
  cmd->add_option("--device", opts->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  cmd->add_option("--steps", opts->steps, "timed steps")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--warmup", opts->warmup, "untimed steps first")->check(CLI::NonNegativeNumber)->capture_default_str();
  cmd->add_option("--window", opts->window, "long attention window in blocks (default: the last step's)");
  cmd->add_option("--json", opts->json_path, "also write the results to this JSON file");
  cmd->add_option("--grad-reduce", opts->grad_reduce, "multi-process gradient reduction (see train --help)")
      ->check(CLI::IsMember({"auto", "exact", "overlap"}))
      ->capture_default_str();
  cmd->callback([opts] {
    Config config = opts->config.build();
    // Under mpirun every process times its share; rank 0 reports.
    std::unique_ptr<Communicator> process_comm = make_process_communicator();
    const int visible_gpus = static_cast<int>(query_cuda_devices().devices.size());
    auto device = make_backend(opts->device, opts->device == "cuda" && visible_gpus > 0
                                                 ? gpu_for_local_rank(process_comm->local_rank(), visible_gpus)
                                                 : process_comm->local_rank());
    // GPU gradients of several processes go through NCCL (bootstrapped over MPI).
    std::unique_ptr<Communicator> nccl;
    if (opts->device == "cuda" && process_comm->size() > 1) nccl = make_nccl_communicator(*process_comm, *device);
    Communicator* comm = nccl ? nccl.get() : process_comm.get();
    std::map<std::string, OpStats> stats;
    auto backend = make_profiling_backend(*device, stats);
    const auto launch = Clock::now();
    GPT model(config, *backend, config.seq_len, config.seq_len);
    Optimizer optimizer(config, model.layout(), *backend);
    DataParallel dp(*comm, model, {parse_grad_reduce(opts->grad_reduce)});
    const size_t tokens = static_cast<size_t>(config.world_size) * config.seq_len;
    const size_t local_tokens = static_cast<size_t>(dp.local_ranks()) * config.seq_len;
    const std::vector<int32_t> inputs = synthetic_tokens(local_tokens, config.vocab_size, 1 + comm->rank());
    const std::vector<int32_t> targets = synthetic_tokens(local_tokens, config.vocab_size, 100 + comm->rank());
    // The step index picks the window: the last step's unless --window says otherwise.
    int step = config.num_iterations - 1;
    if (opts->window >= 0) {
      while (step > 0 && long_window_blocks(config, step) > opts->window) --step;
    }
    const int window = long_window_blocks(config, step);
    double first_step_seconds = 0;
    for (int i = 0; i < opts->warmup; ++i) {
      run_training_step(dp, optimizer, inputs, targets, step);
      if (i == 0) first_step_seconds = std::chrono::duration<double>(Clock::now() - launch).count();
    }
    stats.clear();
    const double communication_before = dp.communication_seconds();
    const auto start = Clock::now();
    for (int i = 0; i < opts->steps; ++i) run_training_step(dp, optimizer, inputs, targets, step);
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const double step_ms = 1000 * seconds / opts->steps;
    const double tokens_per_second = tokens * opts->steps / seconds;
    const double communication_ms = 1000 * (dp.communication_seconds() - communication_before) / opts->steps;
    if (comm->rank() != 0) return;

    std::printf("speedrun bench: device %s (%d threads), %d process(es), %zu parameters, %d x %d tokens per step, "
                "window %d blocks\n",
                opts->device.c_str(), thread_count(), comm->size(), model.layout().total(), config.world_size,
                config.seq_len, window);
    std::printf("%-26s %10s %10s %8s %12s\n", "op", "ms/step", "calls/step", "share", "GFLOP/s");
    std::vector<std::pair<std::string, OpStats>> rows(stats.begin(), stats.end());
    std::sort(rows.begin(), rows.end(), [](auto& a, auto& b) { return a.second.seconds > b.second.seconds; });
    nlohmann::json ops = nlohmann::json::object();
    double matmul_flops = 0, matmul_seconds = 0;
    for (const auto& [name, s] : rows) {
      const double gflops = s.flops > 0 ? s.flops / s.seconds / 1e9 : 0;
      std::printf("%-26s %10.2f %10.1f %7.1f%% %12s\n", name.c_str(), 1000 * s.seconds / opts->steps,
                  static_cast<double>(s.calls) / opts->steps, 100 * s.seconds / seconds,
                  gflops > 0 ? std::to_string(static_cast<int>(gflops)).c_str() : "");
      ops[name] = {{"ms_per_step", 1000 * s.seconds / opts->steps}, {"calls_per_step", s.calls / opts->steps},
                   {"gflops", gflops}};
      if (name.rfind("matmul", 0) == 0) {
        matmul_flops += s.flops;
        matmul_seconds += s.seconds;
      }
    }
    const double model_gflops = matmul_flops / matmul_seconds / 1e9;
    const double sgemm_gflops = reference_sgemm_gflops(1024, 1024, 1024);
    std::printf("step: %.1f ms | %.0f tokens/s | matmuls %.1f GFLOP/s = %.0f%% of plain sgemm (%.1f GFLOP/s, 1024^3)\n",
                step_ms, tokens_per_second, model_gflops, 100 * model_gflops / sgemm_gflops, sgemm_gflops);
    std::printf("launch to end of first step: %.2f s\n", first_step_seconds);
    if (comm->size() > 1) {
      std::printf("communication: %.1f ms per step (%s gradient reduction over %s, host time in its calls)\n",
                  communication_ms, grad_reduce_name(dp.mode()).c_str(), comm->name().c_str());
    }
    if (!opts->json_path.empty()) {
      nlohmann::json out = {{"device", opts->device},
                            {"processes", comm->size()},
                            {"communication_ms_per_step", communication_ms},
                            {"threads", thread_count()},
                            {"hardware_threads", std::thread::hardware_concurrency()},
                            {"config", config.to_json()},
                            {"window_blocks", window},
                            {"tokens_per_step", tokens},
                            {"ms_per_step", step_ms},
                            {"tokens_per_second", tokens_per_second},
                            {"matmul_gflops", model_gflops},
                            {"reference_sgemm_gflops", sgemm_gflops},
                            {"first_step_seconds", first_step_seconds},
                            {"ops", ops}};
      write_file_atomically(opts->json_path, out.dump(2) + "\n");
    }
  });
}

}  // namespace speedrun::cli
