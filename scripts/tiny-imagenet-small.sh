#!/usr/bin/env bash
# Purpose:  the real-data run of configs/tiny-imagenet-small.toml from scratch: extract the first
#           40 classes of the fixed zero-shot split from ../shared/data/tiny-imagenet-200.tar.gz,
#           build WebDataset shards, train all three stages, write the report.
# Hardware: 2 CPU cores.
# Command:  bash scripts/tiny-imagenet-small.sh [extra `devise train` flags, e.g. --set k=v]
# Time:     extraction + shards ~1 min; training + evaluation at most 20 min.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
shared=../shared/data
split="$shared/tiny-imagenet-200-zero-shot-split.tsv"
bash scripts/setup.sh
export LIBTORCH="$PWD/.deps/libtorch"
cargo build --release --locked
src=data/tiny-imagenet-200
if [ ! -d "$src/val" ]; then
  mkdir -p data
  mapfile -t wnids < <(grep -v '^#' "$split" | head -n 40 | cut -f1)
  members=()
  for w in "${wnids[@]}"; do members+=("tiny-imagenet-200/train/$w" "tiny-imagenet-200/val/$w"); done
  tar xzf "$shared/tiny-imagenet-200.tar.gz" -C data "${members[@]}"
fi
if [ ! -f data/shards/tiny-imagenet-small/manifest.json ]; then
  target/release/devise data build-shards --src "$src" --dst data/shards/tiny-imagenet-small \
    --classes "$split" --limit-classes 40 --shard-size-bytes 4000000
fi
exec target/release/devise train --config configs/tiny-imagenet-small.toml "$@"
