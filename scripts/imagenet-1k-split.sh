#!/usr/bin/env bash
# Purpose:  the label split of configs/imagenet-1k-resnet50.toml: ImageNet's 1,000 ILSVRC-2012
#           classes, all seen (the paper's 1K training setting), in the split-file format
#           (`wnid TAB seen TAB names`), from ../shared/data/imagenet-meta/. Idempotent.
# Command:  bash scripts/imagenet-1k-split.sh      (writes data/imagenet-1k-split.tsv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
meta=../shared/data/imagenet-meta
out=data/imagenet-1k-split.tsv
mkdir -p data
{
  printf '# wnid\tsplit\tnames (ImageNet 1K, all seen; from %s)\n' "$meta/zero-shot-splits/1k.txt"
  awk -F'\t' 'NR == FNR { names[$1] = $2; next } { print $1 "\tseen\t" names[$1] }' \
    "$meta/words.txt" "$meta/zero-shot-splits/1k.txt"
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out: $(grep -vc '^#' "$out") classes"
