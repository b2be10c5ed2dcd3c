#!/usr/bin/env bash
# Purpose:  extract the first N classes (default: all 200) of the fixed Tiny ImageNet zero-shot
#           split from ../shared/data/tiny-imagenet-200.tar.gz into data/tiny-imagenet-200/ and
#           build WebDataset shards of them into data/shards/tiny-imagenet-N/. Idempotent.
# Hardware: any; all 200 classes on 2 cores: extract 4 s, shards 28 s (measured).
# Command:  bash scripts/prepare-tiny-imagenet.sh [N]     (after scripts/setup.sh and a release build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-200}
shared=../shared/data
split="$shared/tiny-imagenet-200-zero-shot-split.tsv"
dst="data/shards/tiny-imagenet-$n"
bin=${DEVISE_BIN:-${CARGO_TARGET_DIR:-target}/release/devise}
mapfile -t wnids < <(grep -v '^#' "$split" | head -n "$n" | cut -f1)
missing=()
for w in "${wnids[@]}"; do
  [ -d "data/tiny-imagenet-200/val/$w" ] || missing+=("tiny-imagenet-200/train/$w" "tiny-imagenet-200/val/$w")
done
if ((${#missing[@]})); then
  mkdir -p data
  tar xzf "$shared/tiny-imagenet-200.tar.gz" -C data "${missing[@]}"
fi
# A manifest without per-shard class counts (written by an older devise; then "class_counts"
# appears only once per split) cannot plan the partitioned training stream: rebuild the shards.
if [ -f "$dst/manifest.json" ] && [ "$(grep -c '"class_counts"' "$dst/manifest.json")" -le 2 ]; then
  echo "rebuilding $dst: its manifest.json has no per-shard class counts" >&2
  rm -rf "$dst"
fi
if [ ! -f "$dst/manifest.json" ]; then
  "$bin" data build-shards --src data/tiny-imagenet-200 --dst "$dst" \
    --classes "$split" --limit-classes "$n" --shard-size-bytes 4000000
fi
echo "$dst"
