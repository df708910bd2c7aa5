#!/usr/bin/env bash
# The one script for a lent GPU: checks the CUDA backend there and brings back logs.
#
# The device machine (see /work/.library/device/README.md) is bare and offline: it has
# nvcc, CUDA 13, cuBLASLt, compute-sanitizer and cuobjdump, but none of the Debian -dev
# packages this project builds against (OpenBLAS, PCRE2, nlohmann-json, GoogleTest). So we
# build HERE and carry the binaries with the shared libraries they need:
#
#   1. here:  scripts/gpu_check.sh --prepare-carry build-gpu/carry
#        configures and builds build-gpu (the release architectures sm_80, sm_89 and
#        sm_90: about 25 minutes at -j1 from scratch), then packs every GPU test
#        (tests/gpu/test_*.cpp), speedrun and their non-system libraries into
#        build-gpu/carry/payload.tar.gz
#        (build-gpu/ is git-ignored, so the run tool must be told to carry it).
#   2. there: run tool, carry ["build-gpu/carry"], timeout_s 600, command
#        scripts/gpu_check.sh build-gpu/carry [STAGES] [DEADLINE_S]
#        STAGES (comma-separated, in this order; default tests,bench,sanitize): tests =
#        every GPU test; bench = `speedrun bench --device cuda`, the most telling variants
#        first; sanitize = compute-sanitizer memcheck and racecheck on the op tests.
#        DEADLINE_S (default 540): no item starts after it, and each item's timeout ends
#        by it, so that one call fits the run tool's 10 minutes and a task's 15 minutes of
#        device time (start-up included) with the summary always printed. Logs go to
#        $OUT (at most 8 files; a summary is printed last).
#   3. here: copy the returned bench_speedrun-124m*.json to bench/results/ (named by date
#        and device) and commit it.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)

prepare_carry() {
  local dir=$1 build=$ROOT/${SPEEDRUN_GPU_BUILD:-build-gpu}
  set -e
  # The default CUDA architectures (80;89;90): the binaries run on the sm_90 device and
  # their SASS for all three is checked there with cuobjdump. SPEEDRUN_GPU_BUILD names an
  # existing Release build with CUDA to pack instead (e.g. build/, which setup.sh makes):
  # no 25-minute build when a device is lent late in a session.
  if [ -z "${SPEEDRUN_GPU_BUILD:-}" ]; then
    cmake -S "$ROOT" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPEEDRUN_BENCHMARKS=OFF -DSPEEDRUN_TESTS=ON
  fi
  local tests
  tests=$(gpu_test_names)
  # shellcheck disable=SC2086
  ninja -C "$build" -j1 $tests speedrun  # nvcc is slow and the cores are shared: -j1
  rm -rf "$dir" && mkdir -p "$dir/stage/bin" "$dir/stage/lib" "$dir/stage/fallback"
  local t
  for t in $tests; do cp "$build/tests/$t" "$dir/stage/bin/"; done
  cp "$build/speedrun" "$dir/stage/bin/"
  # The commit the binaries were built from, for the benchmark results' JSON.
  local commit
  commit=$(git -C "$ROOT" rev-parse --short HEAD)
  git -C "$ROOT" diff --quiet HEAD -- src || commit="$commit-dirty"
  echo "$commit" >"$dir/stage/commit.txt"
  # Every library the binaries load, except glibc's (the device's is newer) and CUDA's
  # (the device has its own CUDA 13). libstdc++/libgcc_s go to fallback/: used there only
  # if the device's own are older than this machine's.
  local lib
  for lib in $(ldd "$dir"/stage/bin/* | awk '/=> \// {print $3}' | sort -u); do
    case $(basename "$lib") in
      libc.so* | libm.so* | libpthread* | libdl.so* | librt.so* | ld-linux* | libcuda* | libcublas* | libnccl*) ;;
      libstdc++* | libgcc_s*) cp -L "$lib" "$dir/stage/fallback/" ;;
      *) cp -L "$lib" "$dir/stage/lib/" ;;
    esac
  done
  tar -C "$dir/stage" -czf "$dir/payload.tar.gz" bin lib fallback commit.txt
  rm -rf "$dir/stage"
  du -sh "$dir/payload.tar.gz"
  echo "carry '${dir#"$ROOT"/}' and run: scripts/gpu_check.sh ${dir#"$ROOT"/}"
}

# Directory holding libnccl.so.2 on the device (218 MB: never carried): the toolkit's,
# else the one in PyTorch's wheels.
# $SPEEDRUN_NCCL_DIR first; the wheels' usual places before a search of the whole disk
# (which skips /proc, /sys and /dev rather than walking them).
find_nccl_dir() {
  local d
  if [ -n "${SPEEDRUN_NCCL_DIR:-}" ]; then echo "$SPEEDRUN_NCCL_DIR"; return; fi
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/lib/x86_64-linux-gnu \
           /usr/local/lib/python3*/*-packages/nvidia/nccl/lib /usr/lib/python3*/*-packages/nvidia/nccl/lib \
           /opt/conda/lib/python3*/site-packages/nvidia/nccl/lib; do
    [ -e "$d/libnccl.so.2" ] && { echo "$d"; return; }
  done
  d=$(find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o -name 'libnccl.so.2*' -print 2>/dev/null | head -1)
  [ -n "$d" ] && dirname "$d"
}

# The GPU test programs: one per tests/gpu/test_*.cpp.
gpu_test_names() {
  local f
  for f in "$ROOT"/tests/gpu/test_*.cpp; do basename "$f" .cpp; done
}

# Directory holding libcublasLt.so.13 on the device: the toolkit's, else a Python wheel's.
find_cublas_dir() {
  local d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib; do
    [ -e "$d/libcublasLt.so.13" ] && { echo "$d"; return; }
  done
  d=$(find / -name 'libcublasLt.so.13*' -not -path '/proc/*' 2>/dev/null | head -1)
  [ -n "$d" ] && dirname "$d"
}

run_checks() {
  local stages=$2 deadline=$3 dir out=${OUT:-/tmp/gpu_check_out} work=/tmp/speedrun_gpu rc
  dir=$(realpath -m "$1")
  mkdir -p "$out" "$work"
  tar -xzf "$dir/payload.tar.gz" -C "$work" || { echo "no payload in $dir: run --prepare-carry here first"; exit 2; }
  export PATH=/usr/local/cuda/bin:$PATH
  local cublas_dir nccl_dir
  cublas_dir=$(find_cublas_dir)
  nccl_dir=$(find_nccl_dir)
  export LD_LIBRARY_PATH="$work/lib:$cublas_dir:$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local speedrun=$work/bin/speedrun tests=() t
  SPEEDRUN_COMMIT=$(cat "$work/commit.txt" 2>/dev/null || echo unknown)
  export SPEEDRUN_COMMIT
  for t in "$work"/bin/test_*; do tests+=("$t"); done
  if ! "${tests[0]}" --gtest_list_tests >/dev/null 2>&1; then
    export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$work/fallback"  # the device's libstdc++ is too old
  fi
  {
    nvidia-smi
    ldd --version | head -1
    ldd "$speedrun"
    cuobjdump --list-elf "$speedrun"  # expect one cubin per architecture built
  } >"$out/env.log" 2>&1

  local summary=()
  record() { summary+=("$(printf '%-40s %s' "$1" "$2")"); }
  count() { grep -c "^\[ *$1 *\] .* ms)\$" "$2"; }
  # budget NAME LIMIT: sets `limit` to LIMIT seconds or what is left before the deadline
  # (10 s kept for the summary); false, with NAME recorded as skipped, when too little is.
  budget() {
    local left=$((deadline - SECONDS - 10))
    if ((left < 20)); then
      record "$1" "skipped: deadline ${deadline}s reached"
      return 1
    fi
    limit=$(($2 < left ? $2 : left))
  }
  local archs
  archs=$(grep -o 'sm_[0-9]*' "$out/env.log" | sort -u | tr '\n' ' ')
  case "$archs" in
    *sm_80*sm_89*sm_90*) record "SASS in speedrun" "ok: $archs" ;;
    *) record "SASS in speedrun" "MISSING (want sm_80 sm_89 sm_90): $archs" ;;
  esac

  local stage limit
  for stage in ${stages//,/ }; do
    case $stage in
      tests) stage_tests ;;
      bench) stage_bench ;;
      sanitize) stage_sanitize ;;
      train) stage_train ;;
      *) record "stage $stage" "unknown (tests, bench, sanitize, train)" ;;
    esac
  done

  echo "--- failures (first 60 lines) ---"
  [ -f "$out/tests.log" ] && grep -E -A6 '^\[  FAILED  \]|Failure$' "$out/tests.log" | head -60
  echo "--- summary (logs in \$OUT; ${SECONDS}s of ${deadline}s) ---"
  printf '%s\n' "${summary[@]}"
}

# Every GPU test program (the gpu label's ctest runs exactly these; ctest's files hold this
# machine's absolute paths, so the programs are run directly), one log.
stage_tests() {
  local t
  : >"$out/tests.log"
  for t in "${tests[@]}"; do
    budget "$(basename "$t")" 240 || continue
    echo "=== $(basename "$t")" >>"$out/tests.log"
    timeout "$limit" "$t" >"$work/test.tmp" 2>&1
    rc=$?
    cat "$work/test.tmp" >>"$out/tests.log"
    record "$(basename "$t")" "rc=$rc ($(count OK "$work/test.tmp") ok, $(count FAILED "$work/test.tmp") failed, $(count SKIPPED "$work/test.tmp") skipped)"
    if [[ $(basename "$t") == test_cuda_fp8_head ]] && grep -q 'turned down\|FAILED.*MatchesTheCpuEmulation' "$work/test.tmp"; then
      fp8_diagnosis "$t"
    fi
  done
}

# When the FP8 head falls back on aligned shapes: cuBLASLt's own log of why (its errors and
# API trace for the one test), appended to tests.log.
fp8_diagnosis() {
  budget "cuBLASLt log of the FP8 refusal" 60 || return
  CUBLASLT_LOG_LEVEL=5 CUBLASLT_LOG_FILE="$work/cublaslt.log" timeout "$limit" "$1" \
    --gtest_filter='*MatchesTheCpuEmulation' >/dev/null 2>&1
  {
    echo "=== cuBLASLt log (level 5) of CudaFp8HeadTest.MatchesTheCpuEmulation: errors, then the first 300 lines"
    grep -i -m100 'error\|not supported\|fail' "$work/cublaslt.log"
    head -300 "$work/cublaslt.log"
  } >>"$out/tests.log" 2>&1
  record "cuBLASLt log of the FP8 refusal" "in tests.log ($(grep -ci 'error' "$work/cublaslt.log" 2>/dev/null) error lines)"
}

# Training-step benchmarks, the most telling first: each variant is a preset and its flags.
#   speedrun-124m-relu2: the cuda defaults (bf16 matmuls and activations, attention through
#     the bf16 flash kernel) keeping all activations but relu(h)^2 (16.6 GiB planned);
#   speedrun-124m-recompute: the same recomputing activations (15.0 GiB planned);
#   speedrun-124m: the same keeping activations (19.7 GiB planned since rotated q and k are
#     rotated again in the backward: the <= 24 GB candidate with ~1.3 GB of context), with cuBLASLt's first 8 algorithms for each product shape timed alone (--sweep-matmuls);
#   speedrun-124m-autotune: the same running, for each product plan, the fastest of those 8
#     (--autotune-matmuls): what the sweep's saving is worth in the step;
#   speedrun-124m-chunk4096: the same with the head's logits 4096 rows at a time (dW added
#     into half as often, 0.4 GB more logits and FP8 scratch);
#   speedrun-124m-reference: float32 reference attention;
#   then the flash kernel and the FP8 head's pieces alone, and the small presets (tiny on
#   flash, micro's head size 8 on reference).
stage_bench() {
  local variant preset flags in_use
  declare -A variant_flags=([micro]="" [tiny]="" [speedrun-124m]="--sweep-matmuls 8"
    [speedrun-124m-reference]="--attention-kernel reference"
    [speedrun-124m-recompute]="--recompute-activations" [speedrun-124m-relu2]="--recompute-relu2"
    [speedrun-124m-autotune]="--autotune-matmuls 8" [speedrun-124m-chunk4096]="--head-chunk-rows 4096")
  # SPEEDRUN_BENCH_VARIANTS (space-separated) runs fewer: the reference variant alone takes
  # about 2 minutes of a 15-minute device budget.
  # Kernel benchmarks: a GPU test program's DISABLED_Benchmark test.
  declare -A kernel_bench=([flash-kernel]=test_flash_attention [fp8-head]=test_cuda_fp8_head)
  for variant in ${SPEEDRUN_BENCH_VARIANTS:-speedrun-124m-relu2 speedrun-124m-recompute speedrun-124m speedrun-124m-autotune speedrun-124m-chunk4096 flash-kernel fp8-head speedrun-124m-reference tiny micro}; do
    if [ -n "${kernel_bench[$variant]:-}" ]; then
      local program=$work/bin/${kernel_bench[$variant]}
      [ -x "$program" ] || continue
      budget "$variant benchmark" 120 || continue
      echo "=== $variant benchmark (${kernel_bench[$variant]})" >>"$out/bench.log"
      timeout "$limit" "$program" --gtest_also_run_disabled_tests --gtest_filter='*Benchmark*' >"$work/bench.tmp" 2>&1
      rc=$?
      cat "$work/bench.tmp" >>"$out/bench.log"
      record "$variant benchmark" "rc=$rc $(grep -m3 -i 'TFLOP/s' "$work/bench.tmp" | tr -s ' ' | paste -sd';' | cut -c1-240)"
      continue
    fi
    budget "bench --device cuda $variant" "$([[ $variant == speedrun-124m* ]] && echo 240 || echo 60)" || continue
    flags=${variant_flags[$variant]}
    preset=${variant%-reference}
    preset=${preset%-recompute}
    preset=${preset%-relu2}
    preset=${preset%-autotune}
    preset=${preset%-chunk4096}
    echo "=== bench --device cuda --preset $preset $flags" >>"$out/bench.log"
    # shellcheck disable=SC2086
    timeout "$limit" "$speedrun" bench --device cuda --preset "$preset" $flags \
      --steps 2 --warmup 1 --json "$out/bench_$variant.json" >"$work/bench.tmp" 2>&1
    rc=$?
    cat "$work/bench.tmp" >>"$out/bench.log"
    record "bench --device cuda $variant" "rc=$rc $(grep -m1 '^step:\|error' "$work/bench.tmp")"
    # #4's memory target: the device memory in use (context and scratch included) against 24 GB.
    in_use=$(grep -m1 '^memory plan:' "$work/bench.tmp" | grep -o 'device in use [0-9.]* MiB' | grep -o '[0-9.]*')
    if [ -n "$in_use" ]; then
      record "memory $variant" "$(awk -v mib="$in_use" 'BEGIN { gb = mib * 1048576 / 1e9;
        printf "device in use %.1f MiB = %.2f GB: %s 24 GB", mib, gb, gb <= 24 ? "within" : "OVER" }')"
    fi
    if grep -q '^attention .*visible pairs' "$work/bench.tmp"; then
      record "attention $variant" "$(grep -m1 '^attention .*visible pairs' "$work/bench.tmp" | cut -c11-130)"
    fi
    if grep -q 'would save' "$work/bench.tmp"; then
      record "matmul sweep $variant" "$(grep -m1 'would save' "$work/bench.tmp")"
    fi
    if grep -q '^matmul plans tuned' "$work/bench.tmp"; then
      record "matmul autotune $variant" "$(grep -m1 '^matmul plans tuned' "$work/bench.tmp" | cut -c1-110)"
    fi
    # A fallback the backend took (a batch run unbatched, the FP8 head's refusal) says so once.
    if grep -q '^speedrun: warning' "$work/bench.tmp"; then
      record "warnings $variant" "$(grep '^speedrun: warning' "$work/bench.tmp" | cut -c20-150 | paste -sd';')"
    fi
  done
  # At most 8 files come back (5 logs): the other variants' lines are in bench.log.
  rm -f "$out/bench_micro.json" "$out/bench_tiny.json" "$out/bench_speedrun-124m-reference.json" \
    "$out/bench_speedrun-124m-recompute.json" "$out/bench_speedrun-124m-chunk4096.json"
}

# `speedrun train --device cuda` on the default corpus (carry data/default too): batches
# through pinned host memory from the prefetcher, the device-side fault flag every step,
# validation and checkpoints; then runs whose embedding rate (1e39: inf in float32)
# overflows the weights: the fault flag must stop the first with the step named and a
# checkpoint (exit 1), and the second (--on-nonfinite skip) must skip the first non-finite
# step's update and stop there, its parameters being non-finite already (exit 1).
stage_train() {
  local data=$ROOT/data/default
  [ -f "$data/val_000000.bin" ] || { record "train" "skipped: no data/default (carry it)"; return; }
  train_run "train --device cuda tiny" 120 run --steps 40 --set val_every=20 || return
  record "train --device cuda tiny" "rc=$rc $(grep -m1 -i 'val loss\|error' "$work/train.tmp" | cut -c1-80)"
  local overflow=(--set lr_embed=1e39 --set val_every=1000)
  train_run "train --device cuda, weights overflowed" 60 blowup --steps 10 "${overflow[@]}" || return
  record "train --device cuda, weights overflowed" "rc=$rc (want 1) $(grep -m1 -i 'non-finite' "$work/train.tmp" | cut -c1-80)"
  train_run "train --device cuda, overflowed steps skipped" 60 skipped --steps 5 "${overflow[@]}" \
    --on-nonfinite skip || return
  record "train --device cuda, overflowed steps skipped" \
    "rc=$rc (want 1: one step skipped, then 'cannot help') $(grep -c "update skipped" "$work/train.tmp") skipped"
}

# train_run NAME LIMIT OUT_DIR ARGS...: tiny on the default corpus with ARGS, output in
# $work/train.tmp (appended to train.log), exit status in rc; false when out of time.
train_run() {
  local name=$1 seconds=$2 dir=$3
  shift 3
  budget "$name" "$seconds" || return 1
  timeout "$limit" "$speedrun" train --preset tiny --device cuda "$@" --train "$data/train_*.bin" \
    --val "$data/val_*.bin" --out-dir "$work/$dir" >"$work/train.tmp" 2>&1
  rc=$?
  { echo "=== $name: $*"; cat "$work/train.tmp"; } >>"$out/train.log"
}

# compute-sanitizer on the op tests (the model tests are too slow under it; racecheck, slow
# on shared-memory loops, gets small shapes only). Filters per program; a program not
# listed runs its tests whose names contain "Small" or "Op".
stage_sanitize() {
  declare -A memcheck=(
    [test_cuda_backend]='CudaBackendTest.*:GemmTest.StridedBatchesUseEveryMatrix:GemmTest.ProductsIntoCodesAreTheRoundedProduct:AttentionTest.EveryWindowOnSmallHeads:AttentionTest.OddShapesAndWideHeads-CudaBackendTest.FailuresBecomeErrorsNamingTheCall'
    [test_cuda_fp8_head]='*MatchesTheCpuEmulation*:*QuantisedOperandsAreBitExact*:*FusedLossIsBitExact*'
    [test_flash_attention]='FlashAttention.DocumentBoundsMatchHost:FlashAttention.MatchesCpuOnShortSequences'
  )
  declare -A racecheck=(
    [test_cuda_backend]='CudaBackendTest.*:AttentionTest.EveryWindowOnSmallHeads-CudaBackendTest.FailuresBecomeErrorsNamingTheCall'
    [test_cuda_fp8_head]='*QuantisedOperandsAreBitExact*:*FusedLossIsBitExact*'
    [test_flash_attention]='FlashAttention.MatchesCpuOnShortSequences'
  )
  local tool name filter t
  : >"$out/sanitizers.log"  # both tools, one file (at most 8 come back)
  for tool in memcheck racecheck; do
    for t in "${tests[@]}"; do
      name=$(basename "$t")
      [ "$name" = test_nccl_communicator ] && continue  # NCCL's own kernels are not ours to check
      budget "$tool $name" 150 || continue
      if [ "$tool" = memcheck ]; then filter=${memcheck[$name]:-*Small*:*Op*}; else filter=${racecheck[$name]:-*Small*}; fi
      echo "=== $tool $name --gtest_filter=$filter" >>"$out/sanitizers.log"
      timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" --gtest_filter="$filter" \
        >"$work/san.tmp" 2>&1
      rc=$?
      head -c 2M "$work/san.tmp" >>"$out/sanitizers.log"
      record "$tool $name" "rc=$rc ($(grep -E -m1 'ERROR SUMMARY|RACECHECK SUMMARY' "$work/san.tmp"))"
    done
  done
}

case "${1:-}" in
  --prepare-carry) prepare_carry "$(realpath -m "${2:-$ROOT/build-gpu/carry}")" ;;
  -h | --help) sed -n '2,23p' "$0" ;;
  *) run_checks "${1:-build-gpu/carry}" "${2:-tests,bench,sanitize}" "${3:-540}" ;;
esac
