#!/usr/bin/env bash
# Downloads the FineWeb-10B GPT-2 token shards the NanoGPT speedrun trains on, from the
# Hugging Face dataset kjj0/fineweb10B-gpt2 (the files modded-nanogpt's
# data/cached_fineweb10B.py fetches), already in speedrun's .bin shard format.
#
# Usage: scripts/download_fineweb.sh [NUM_TRAIN_SHARDS] [TARGET_DIR]
#   NUM_TRAIN_SHARDS  train shards fineweb_train_000001.bin .. N, 100M tokens each
#                     (default 8, ~800M tokens; the 124M record reads ~700M tokens,
#                     use 9 to have the full record's data with margin; 103 is all of it)
#   TARGET_DIR        default data/fineweb10B under the repository root
# Also fetches the validation shard fineweb_val_000000.bin (~100M tokens).
# Files already present are skipped; each download goes to a temporary name and is
# renamed only after its header (magic 20240520, version 1) and size check out.
# Environment: HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (optional).
# Afterwards, e.g.:
#   speedrun inspect data/fineweb10B/fineweb_val_000000.bin
#   train with train shards 'data/fineweb10B/fineweb_train_*.bin' and val 'data/fineweb10B/fineweb_val_*.bin'
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NUM_TRAIN="${1:-8}"
TARGET="${2:-$ROOT/data/fineweb10B}"
REPO="kjj0/fineweb10B-gpt2"
BASE_URL="${HF_ENDPOINT:-https://huggingface.co}/datasets/$REPO/resolve/main"
MAGIC=20240520

log() { printf '[download_fineweb] %s\n' "$*"; }
die() { printf '[download_fineweb] error: %s\n' "$*" >&2; exit 1; }

if ! [[ "$NUM_TRAIN" =~ ^[0-9]+$ ]] || (( 10#$NUM_TRAIN < 1 || 10#$NUM_TRAIN > 103 )); then
  die "NUM_TRAIN_SHARDS must be a number from 1 to 103 (got '$NUM_TRAIN')"
fi
NUM_TRAIN=$(( 10#$NUM_TRAIN ))

if command -v curl >/dev/null; then
  fetch() {
    local auth=()
    [[ -n "${HF_TOKEN:-}" ]] && auth=(-H "Authorization: Bearer $HF_TOKEN")
    curl -fL --retry 3 --retry-delay 5 --progress-bar "${auth[@]}" -o "$2" "$1"
  }
elif command -v wget >/dev/null; then
  fetch() {
    local auth=()
    [[ -n "${HF_TOKEN:-}" ]] && auth=(--header "Authorization: Bearer $HF_TOKEN")
    wget -q --show-progress --tries=3 "${auth[@]}" -O "$2" "$1"
  }
else
  die "neither curl nor wget is installed"
fi

# header_int FILE INDEX: the INDEX-th little-endian int32 of the 256-int header.
header_int() { od -An -t d4 -j $(( $2 * 4 )) -N 4 "$1" | tr -d ' '; }

# check_shard FILE: magic, version and size 1024 + 2N, as speedrun's ShardReader checks them.
check_shard() {
  local file=$1 magic version count size
  size=$(wc -c < "$file" | tr -d ' ')
  (( size >= 1024 )) || { echo "file of $size bytes is too short for the 1024-byte header"; return 1; }
  magic=$(header_int "$file" 0)
  [[ "$magic" == "$MAGIC" ]] || { echo "bad magic $magic (expected $MAGIC)"; return 1; }
  version=$(header_int "$file" 1)
  [[ "$version" == 1 ]] || { echo "unsupported version $version (expected 1)"; return 1; }
  count=$(header_int "$file" 2)
  (( size == 1024 + 2 * count )) || { echo "size $size bytes but header says N=$count"; return 1; }
}

get() {
  local name=$1 dest="$TARGET/$1" problem
  if [[ -f "$dest" ]]; then
    log "$name present, skipped"
    return
  fi
  log "downloading $name"
  fetch "$BASE_URL/$name" "$dest.part" || { rm -f "$dest.part"; die "download of $BASE_URL/$name failed"; }
  if ! problem=$(check_shard "$dest.part"); then
    rm -f "$dest.part"
    die "$name is not a valid token shard: $problem"
  fi
  mv -f "$dest.part" "$dest"
}

mkdir -p "$TARGET"
get fineweb_val_000000.bin
for (( i = 1; i <= NUM_TRAIN; i++ )); do
  get "$(printf 'fineweb_train_%06d.bin' "$i")"
done
log "done: validation shard and $NUM_TRAIN train shards in $TARGET"
