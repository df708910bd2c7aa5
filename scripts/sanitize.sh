#!/usr/bin/env bash
# Sanitizer runs of the CPU system: AddressSanitizer + UndefinedBehaviorSanitizer over
# every unit-labelled test (build-asan), then ThreadSanitizer over the code that runs
# threads: the prefetcher, prepare's encoder pool, concurrent tokenizer encodes and the
# checkpoint writer (build-tsan). Any report fails the script (halt_on_error).
#   scripts/sanitize.sh [--ci]   (--ci: the same checks; it only says so in the log)
# Environment: ASAN_BUILD_DIR, TSAN_BUILD_DIR, SANITIZE_JOBS (default: nproc).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASAN_DIR="${ASAN_BUILD_DIR:-$ROOT/build-asan}"
TSAN_DIR="${TSAN_BUILD_DIR:-$ROOT/build-tsan}"
JOBS="${SANITIZE_JOBS:-$(nproc)}"
CI=0
for arg in "$@"; do
  case "$arg" in
    --ci) CI=1 ;;
    *) echo "usage: scripts/sanitize.sh [--ci]" >&2; exit 2 ;;
  esac
done

log() { printf '\033[1m[sanitize]\033[0m %s\n' "$*"; }
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start ))s"; }

# Only the targets that run are built: each test executable (and the `speedrun` binary
# the test targets depend on) with the sanitizer, no benchmarks, no CUDA.
configure() {
  local dir=$1 sanitize=$2; shift 2
  # -O1 -g1: sanitizer builds compile about twice as fast as at -O2 -g and still run quickly.
  cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
    -DSPEEDRUN_CUDA=OFF \
    -DSPEEDRUN_BENCHMARKS=OFF -DSPEEDRUN_SANITIZE="$sanitize" "$@" >/dev/null
}

unit_test_targets() {
  local f
  for f in "$ROOT"/tests/unit/test_*.cpp; do basename "$f" .cpp; done
}

# --- AddressSanitizer + UndefinedBehaviorSanitizer: every unit test -----------------------
log "ASan+UBSan build in $ASAN_DIR"
configure "$ASAN_DIR" address,undefined
# shellcheck disable=SC2046
cmake --build "$ASAN_DIR" -j "$JOBS" --target $(unit_test_targets)
log "ASan+UBSan: ctest -L unit ($(elapsed))"
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# ctest runs JOBS tests at once: one thread each, or OpenMP's spinning workers of
# concurrent tests fight over the cores and the training tests take minutes.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
failed=()
ctest --test-dir "$ASAN_DIR" -L unit --output-on-failure -j "$JOBS" --timeout 900 --no-tests=error ||
  failed+=("ASan+UBSan unit tests")
unset ASAN_OPTIONS UBSAN_OPTIONS

# --- ThreadSanitizer: the threaded code ----------------------------------------------------
# OpenMP off: libgomp is not TSan-instrumented and its barriers would be reported as races.
TSAN_TARGETS=(test_prefetcher test_prepare test_tokenizer test_atomic_file test_training)
TSAN_FILTER='Prefetcher*:HostBuffer*:Prepare*:Tokenizer.ConcurrentEncodesAgreeWithSerial:Tokenizer.TwoInstancesInOneThreadAgree:AtomicFile*:Training.CheckpointHasStateDictNamesShapesAndConfig:Training.ResumeIsBitIdenticalToAnUninterruptedRun'
log "TSan build in $TSAN_DIR ($(elapsed))"
configure "$TSAN_DIR" thread -DSPEEDRUN_OPENMP=OFF
cmake --build "$TSAN_DIR" -j "$JOBS" --target "${TSAN_TARGETS[@]}"
log "TSan: ${TSAN_TARGETS[*]} ($(elapsed))"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
export OPENBLAS_NUM_THREADS=1  # OpenBLAS's own (uninstrumented) threads are not ours to check
for t in "${TSAN_TARGETS[@]}"; do
  "$TSAN_DIR/tests/$t" --gtest_filter="$TSAN_FILTER" --gtest_brief=1 || failed+=("TSan $t")
done
if [[ ${#failed[@]} -gt 0 ]]; then
  printf '\033[1;31m[sanitize] FAILED:\033[0m %s (%s)\n' "${failed[*]}" "$(elapsed)" >&2
  exit 1
fi
log "clean ($(elapsed))$([[ $CI == 1 ]] && echo ' [ci]')"
