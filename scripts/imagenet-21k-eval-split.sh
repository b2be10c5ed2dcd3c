#!/usr/bin/env bash
# Purpose:  the image folder of configs/zero-shot-21k-eval.toml: up to PER_CLASS images of every
#           label of a wnid list, taken from an ImageNet-21K copy (one <wnid>.tar per synset, as
#           image-net.org ships it), laid out as DST/val/<wnid>/<file> for `devise data
#           build-shards --splits val`. Labels with no tar are counted and listed in
#           DST/missing.txt. The first PER_CLASS members in name order are taken, so reruns pick
#           the same images (members in sub-folders of a tar are moved up into the class folder).
#           Idempotent: a class already complete (marker DST/.done/<wnid>) is skipped.
# Command:  bash scripts/imagenet-21k-eval-split.sh SRC_TAR_DIR LABEL_LIST DST [PER_CLASS=50]
set -euo pipefail
if [[ $# -lt 3 || $# -gt 4 ]]; then
  echo "usage: $0 SRC_TAR_DIR LABEL_LIST DST [PER_CLASS=50]" >&2
  exit 2
fi
src=$1 list=$2 dst=$3 per_class=${4:-50}
[[ -d $src ]] || { echo "$0: $src is not a directory" >&2; exit 1; }
[[ -f $list ]] || { echo "$0: $list: no such label list" >&2; exit 1; }
mkdir -p "$dst/val" "$dst/.done"
: > "$dst/missing.txt.tmp"
classes=0 images=0
while read -r wnid _; do
  [[ -z $wnid || $wnid == \#* ]] && continue
  if [[ ! -f $src/$wnid.tar ]]; then
    echo "$wnid" >> "$dst/missing.txt.tmp"
    continue
  fi
  out=$dst/val/$wnid
  if [[ ! -f $dst/.done/$wnid ]]; then
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp"
    mapfile -t members < <(tar -tf "$src/$wnid.tar" | grep -v '/$' | LC_ALL=C sort | head -n "$per_class")
    if [[ ${#members[@]} -gt 0 ]]; then
      tar -xf "$src/$wnid.tar" -C "$out.tmp" "${members[@]}"
      find "$out.tmp" -mindepth 2 -type f -exec mv -t "$out.tmp" {} +
      find "$out.tmp" -mindepth 1 -type d -delete
    fi
    rm -rf "$out"
    mv "$out.tmp" "$out"
    touch "$dst/.done/$wnid"
  fi
  classes=$((classes + 1))
  images=$((images + $(find "$out" -type f | wc -l)))
done < "$list"
mv "$dst/missing.txt.tmp" "$dst/missing.txt"
echo "$dst/val: $classes classes, $images images; $(wc -l < "$dst/missing.txt") labels without a tar (missing.txt)"
