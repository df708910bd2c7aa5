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
#   2. there: run tool, carry ["build-gpu/carry"], command
#        scripts/gpu_check.sh build-gpu/carry [STAGES]
#        STAGES (comma-separated, default tests,sanitize; each call must end within the run
#        tool's 10 minutes, so bench goes in a second call): tests = every GPU test;
#        sanitize = compute-sanitizer memcheck and racecheck on the op tests; bench =
#        `speedrun bench --device cuda` on the presets once the training path takes cuda;
#        logs go to $OUT (at most 8 files; a summary is printed last).
#   3. here: copy the returned bench_speedrun-124m*.json to bench/results/ (named by date
#        and device) and commit it.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)

prepare_carry() {
  local dir=$1 build=$ROOT/build-gpu
  set -e
  # The default CUDA architectures (80;89;90): the binaries run on the sm_90 device and
  # their SASS for all three is checked there with cuobjdump.
  cmake -S "$ROOT" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPEEDRUN_BENCHMARKS=OFF -DSPEEDRUN_TESTS=ON
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
find_nccl_dir() {
  local d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/lib/x86_64-linux-gnu; do
    [ -e "$d/libnccl.so.2" ] && { echo "$d"; return; }
  done
  d=$(find / -name 'libnccl.so.2*' -not -path '/proc/*' 2>/dev/null | head -1)
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
  local stages=$2 dir out=${OUT:-/tmp/gpu_check_out} work=/tmp/speedrun_gpu rc
  dir=$(realpath -m "$1")
  mkdir -p "$out" "$work"
  tar -xzf "$dir/payload.tar.gz" -C "$work" || { echo "no payload in $dir: run --prepare-carry here first"; exit 2; }
  export PATH=/usr/local/cuda/bin:$PATH
  export LD_LIBRARY_PATH="$work/lib:$(find_cublas_dir):$(find_nccl_dir)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
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
  local archs
  archs=$(grep -o 'sm_[0-9]*' "$out/env.log" | sort -u | tr '\n' ' ')
  case "$archs" in
    *sm_80*sm_89*sm_90*) record "SASS in speedrun" "ok: $archs" ;;
    *) record "SASS in speedrun" "MISSING (want sm_80 sm_89 sm_90): $archs" ;;
  esac

  # 1. Every GPU test program (the gpu label's ctest runs exactly these; ctest's files hold
  #    this machine's absolute paths, so the programs are run directly), one log.
  if [[ $stages == *tests* ]]; then
    : >"$out/tests.log"
    for t in "${tests[@]}"; do
      echo "=== $(basename "$t")" >>"$out/tests.log"
      timeout 240 "$t" >"$work/test.tmp" 2>&1
      rc=$?
      cat "$work/test.tmp" >>"$out/tests.log"
      record "$(basename "$t")" "rc=$rc ($(count OK "$work/test.tmp") ok, $(count FAILED "$work/test.tmp") failed, $(count SKIPPED "$work/test.tmp") skipped)"
    done
  fi

  # 2. compute-sanitizer on the op tests (the model tests are too slow under it; racecheck,
  #    slow on shared-memory loops, gets small shapes only). Filters per program; a
  #    program not listed runs its tests whose names contain "Small" or "Op".
  declare -A memcheck=(
    [test_cuda_backend]='CudaBackendTest.*:GemmTest.StridedBatchesUseEveryMatrix:AttentionTest.EveryWindowOnSmallHeads:AttentionTest.OddShapesAndWideHeads'
    [test_cuda_fp8_head]='*MatchesTheCpuEmulation*:*QuantisedOperandsAreBitExact*'
  )
  declare -A racecheck=(
    [test_cuda_backend]='CudaBackendTest.*:AttentionTest.EveryWindowOnSmallHeads'
    [test_cuda_fp8_head]='*QuantisedOperandsAreBitExact*'
  )
  local tool name filter
  for tool in memcheck racecheck; do
    [[ $stages == *sanitize* ]] || continue
    : >"$out/sanitizer_$tool.log"
    for t in "${tests[@]}"; do
      name=$(basename "$t")
      [ "$name" = test_nccl_communicator ] && continue  # NCCL's own kernels are not ours to check
      if [ "$tool" = memcheck ]; then filter=${memcheck[$name]:-*Small*:*Op*}; else filter=${racecheck[$name]:-*Small*}; fi
      echo "=== $name --gtest_filter=$filter" >>"$out/sanitizer_$tool.log"
      timeout 150 compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" --gtest_filter="$filter" \
        >"$work/san.tmp" 2>&1
      rc=$?
      head -c 2M "$work/san.tmp" >>"$out/sanitizer_$tool.log"
      record "$tool $name" "rc=$rc ($(grep -E -m1 'ERROR SUMMARY|RACECHECK SUMMARY' "$work/san.tmp"))"
    done
  done

  # 3. Training-step benchmarks: each variant is a preset and its backend flags.
  #    speedrun-124m: bf16 matmuls and bf16-kept activations (the cuda defaults), float32
  #      reference attention;
  #    speedrun-124m-flash: the same with attention through the bf16 flash kernel;
  #    speedrun-124m-recompute: the flash variant recomputing activations (the <= 24 GB
  #      configuration: 20.9 GiB planned).
  local variant preset limit flags
  declare -A variant_flags=([micro]="" [tiny]="" [speedrun-124m]="" [speedrun-124m-flash]="--attention-kernel flash"
    [speedrun-124m-recompute]="--attention-kernel flash --recompute-activations")
  for variant in micro tiny speedrun-124m speedrun-124m-flash speedrun-124m-recompute; do
    [[ $stages == *bench* ]] || continue
    limit=120
    [[ $variant == speedrun-124m* ]] && limit=300
    flags=${variant_flags[$variant]}
    preset=${variant%-flash}
    preset=${preset%-recompute}
    echo "=== bench --device cuda --preset $preset $flags" >>"$out/bench.log"
    # shellcheck disable=SC2086
    timeout "$limit" "$speedrun" bench --device cuda --preset "$preset" $flags \
      --steps 2 --warmup 1 --json "$out/bench_$variant.json" >"$work/bench.tmp" 2>&1
    rc=$?
    cat "$work/bench.tmp" >>"$out/bench.log"
    record "bench --device cuda $variant" "rc=$rc $(grep -m1 '^step:\|error' "$work/bench.tmp")"
  done
  rm -f "$out/bench_micro.json" "$out/bench_tiny.json"  # at most 8 files come back
  if [[ $stages == *bench* && -x $work/bin/test_flash_attention ]]; then
    echo "=== flash attention kernel alone" >>"$out/bench.log"
    timeout 120 "$work/bin/test_flash_attention" --gtest_also_run_disabled_tests --gtest_filter='*Benchmark*' \
      >>"$out/bench.log" 2>&1
    record "flash attention benchmark" "rc=$? $(grep -m1 -i 'TFLOP/s' "$out/bench.log")"
  fi

  echo "--- failures (first 40 lines) ---"
  [ -f "$out/tests.log" ] && grep -E -A6 '^\[  FAILED  \]|Failure$' "$out/tests.log" | head -60
  echo "--- summary (logs in \$OUT) ---"
  printf '%s\n' "${summary[@]}"
}

case "${1:-}" in
  --prepare-carry) prepare_carry "$(realpath -m "${2:-$ROOT/build-gpu/carry}")" ;;
  -h | --help) sed -n '2,20p' "$0" ;;
  *) run_checks "${1:-build-gpu/carry}" "${2:-tests,sanitize}" ;;
esac
