#!/usr/bin/env bash
# Runs the test suite (the README's test command): brings the build up to date, then
# ctest over every label: unit (fast), e2e (the binary end to end, incl. the README's
# main job), gpu (skipped with "no GPU" where none is present).
# Extra arguments go to ctest, e.g. `scripts/test.sh -L unit`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
[[ -f "$BUILD_DIR/CMakeCache.txt" ]] || { echo "test.sh: no build in $BUILD_DIR; run scripts/setup.sh first" >&2; exit 1; }
cmake --build "$BUILD_DIR"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 900 "$@"
