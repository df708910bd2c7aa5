#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (coverage + ASan + UBSan, UB aborts)
# in build-fuzz and runs each for a bounded time, starting from fuzz/corpus/<target>/
# and the saved crashers of fuzz/regressions/<target>/. A crash, leak, sanitizer report
# or broken invariant fails the script and leaves the input in build-fuzz/artifacts/.
#   scripts/fuzz.sh [--ci] [--time SECONDS] [TARGET...]
#     --ci        20 s per target (the default is 120 s)
#     TARGET      shard safetensors config tokenizer jsonl (default: all)
# Environment: FUZZ_BUILD_DIR (default build-fuzz), SPEEDRUN_SKIP_APT=1 to skip apt,
#   FUZZ_SEED (default 1: a CI run replays the mutation sequence of a local one).

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${FUZZ_BUILD_DIR:-$ROOT/build-fuzz}"
ALL_TARGETS=(shard safetensors config tokenizer jsonl)
SECONDS_EACH=120
targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ci) SECONDS_EACH=20 ;;
    --time) SECONDS_EACH="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) [[ " ${ALL_TARGETS[*]} " == *" $1 "* ]] || { echo "fuzz.sh: unknown target '$1'" >&2; exit 2; }
       targets+=("$1") ;;
  esac
  shift
done
[[ ${#targets[@]} -gt 0 ]] || targets=("${ALL_TARGETS[@]}")

log() { printf '\033[1m[fuzz]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[fuzz] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

# Largest input per target: enough for a header plus a little payload; longer inputs
# only slow each run down without reaching new code.
max_len() {
  case "$1" in
    shard) echo 4096 ;; safetensors) echo 4096 ;; config) echo 2048 ;; tokenizer) echo 1024 ;; jsonl) echo 2048 ;;
  esac
}

install_clang() {
  if command -v clang++-14 >/dev/null &&
     ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
    return
  fi
  [[ "${SPEEDRUN_SKIP_APT:-0}" == 1 ]] && die "clang-14 with libFuzzer is missing (apt-get install clang-14 libclang-rt-14-dev)"
  log "installing clang-14 and libclang-rt-14-dev"
  local sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq clang-14 libclang-rt-14-dev >/dev/null \
    || die "apt-get install clang-14 libclang-rt-14-dev failed"
}

start=$(date +%s)
install_clang
[[ " ${targets[*]} " == *" tokenizer "* && ! -f "$ROOT/.cache/gpt2/encoder.json" && -z "${SPEEDRUN_TOKENIZER_DIR:-}" ]] &&
  die "the tokenizer fuzzer needs the GPT-2 BPE files in .cache/gpt2: run scripts/setup.sh"

log "building in $BUILD_DIR"
CC=clang-14 CXX=clang++-14 cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSPEEDRUN_FUZZ=ON -DSPEEDRUN_CUDA=OFF -DSPEEDRUN_TESTS=OFF -DSPEEDRUN_BENCHMARKS=OFF -DSPEEDRUN_OPENMP=OFF \
  >/dev/null || die "cmake configure failed"
cmake --build "$BUILD_DIR" -j "$(nproc)" --target "${targets[@]/#/fuzz_}" || die "build failed"

export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
failed=()
for t in "${targets[@]}"; do
  work="$BUILD_DIR/corpus/$t"           # new inputs go here, never into the seed corpus
  artifacts="$BUILD_DIR/artifacts/$t"
  mkdir -p "$work" "$artifacts"
  seeds=("$ROOT/fuzz/corpus/$t")
  [[ -d "$ROOT/fuzz/regressions/$t" ]] && seeds+=("$ROOT/fuzz/regressions/$t")
  log "fuzz_$t: ${SECONDS_EACH}s, max_len $(max_len "$t")"
  if ! "$BUILD_DIR/fuzz/fuzz_$t" "$work" "${seeds[@]}" -seed="${FUZZ_SEED:-1}" -max_total_time="$SECONDS_EACH" -max_len="$(max_len "$t")" \
       -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts/" \
       >"$BUILD_DIR/fuzz_$t.log" 2>&1; then
    tail -n 60 "$BUILD_DIR/fuzz_$t.log" >&2
    failed+=("$t")
    continue
  fi
  grep -E '^stat::(number_of_executed_units|new_units_added)' "$BUILD_DIR/fuzz_$t.log" | tr '\n' ' '; echo
done
[[ ${#failed[@]} -eq 0 ]] || die "crash in: ${failed[*]} (inputs in $BUILD_DIR/artifacts/; logs $BUILD_DIR/fuzz_*.log)"
log "no crashes ($(( $(date +%s) - start ))s)"
