#!/usr/bin/env bash
# Purpose:  images/s per core of the training data path, decode + RandomResizedCrop(224) +
#           horizontal flip + normalise to CHW float32, over the 100 full-size ILSVRC JPEGs of
#           ../shared/data/imagenet-sample-100 (sizes 333x500 to 1600x1200, mean 0.21 MP):
#           ours (examples/decode_bench.rs: devise::data::image::decode_train, what the reader
#           calls: libjpeg-turbo, partial decode around the crop, DCT scaling, SIMD crop-resize,
#           normalise), ours with DCT scaling off (data.jpeg_dct_scaling = false), and
#           torchvision 0.26 on PIL (bench/decode_torchvision.py: Image.open().convert("RGB") +
#           RandomResizedCrop +
#           RandomHorizontalFlip + ToTensor + Normalize, and the same with transforms.v2), all one
#           thread, run side by side: ours, ours (no DCT scaling), torchvision, torchvision v2,
#           ours, ... (ROUNDS rounds, default 5). Files are read into memory first; each run
#           does passes over the set for >= 3 s. Prints a Markdown table (medians over rounds,
#           min-max, images per wall-clock second and per CPU second) and appends the raw JSON
#           lines to bench/results/decode-<UTC date>.jsonl (each with "run" and "round").
#           RandomResizedCrop area scale (0.08, 1), torchvision's default; DECODE_MIN_SCALE=0.25
#           gives the project's default (data.min_crop_scale), DECODE_SIZE the output side.
#           A second table: ours with DCT scaling on / off where it applies (whole-image crops of
#           the 15 images whose shorter side is >= 448 px).
# Goal:     ours >= 2x torchvision per core (images per CPU second, the faster torchvision API).
# Hardware: written on a 2-core AMD EPYC VM (Linux, no GPU, 23 GiB RAM), shared with other jobs:
#           a spread (max-min)/median over 20% is flagged as noisy; rerun then (check `uptime`).
# Command:  bash bench/decode.sh        (ROUNDS=3 bash bench/decode.sh for fewer rounds)
# Builds, idempotently: .deps/libtorch (scripts/setup.sh, if missing), the release example
#           `decode_bench` (honours CARGO_TARGET_DIR), .deps/bench-venv (bench/venv.sh: torch
#           2.11.0, torchvision 0.26.0, pillow, numpy).
# Time:     ~2.5 min for 5 rounds (6 runs of ~3-5 s each per round) once built; the first run
#           adds the venv (~1 min) and the cargo build if stale.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-5}
images=$(cd "$root/../shared/data/imagenet-sample-100" && pwd)
log() { printf '[decode] %s\n' "$*" >&2; }

export LIBTORCH="$root/.deps/libtorch"
[ -f "$LIBTORCH/.complete" ] || bash scripts/setup.sh
cargo build --quiet --release --example decode_bench
ours="${CARGO_TARGET_DIR:-$root/target}/release/examples/decode_bench"
bash bench/venv.sh
py="$root/.deps/bench-venv/bin/python"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# one ROUND NAME CMD...: runs CMD, tags its JSON line with run, round and variant name
one() {
  local round=$1 name=$2
  shift 2
  "$@" "$images" >"$tmp/out" || { log "FAILED: $*"; exit 1; }
  sed "s/^{/{\"run\":\"$run\",\"round\":$round,\"variant\":\"$name\",/" "$tmp/out" |
    tee -a "$tmp/run.jsonl" >&2
}
log "load before: $(uptime)"
start=$SECONDS
for ((k = 1; k <= rounds; k++)); do
  one "$k" ours "$ours"
  DECODE_DCT_SCALING=0 one "$k" ours-no-dct-scaling "$ours"
  one "$k" torchvision "$py" bench/decode_torchvision.py
  TV_API=v2 one "$k" torchvision-v2 "$py" bench/decode_torchvision.py
done
# Where DCT scaling applies: whole-image crops (min scale 1) of the 15 images whose shorter side
# is >= 448 px (2x the output), ours only, on / off.
for ((k = 1; k <= rounds; k++)); do
  DECODE_MIN_SCALE=1 DECODE_MIN_SHORT_SIDE=448 one "$k" large-ours "$ours"
  DECODE_MIN_SCALE=1 DECODE_MIN_SHORT_SIDE=448 DECODE_DCT_SCALING=0 \
    one "$k" large-ours-no-dct-scaling "$ours"
done
log "load after: $(uptime)"
mkdir -p bench/results
out="bench/results/decode-$(date -u +%Y-%m-%d).jsonl"
cat "$tmp/run.jsonl" >>"$out"
log "$rounds rounds in $((SECONDS - start)) s; raw lines appended to $out"

python3 - "$tmp/run.jsonl" <<'PY'
import collections, json, statistics, sys
rate = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    r = json.loads(line)
    rate[r["variant"]]["wall"].append(r["images_per_sec"])
    rate[r["variant"]]["cpu"].append(r["images_per_cpu_sec"])
med = {v: statistics.median(r["cpu"]) for v, r in rate.items()}
theirs = max(med["torchvision"], med["torchvision-v2"])
def cell(v):
    m = statistics.median(v)
    spread = (max(v) - min(v)) / m
    return f"{m:.0f} ({min(v):.0f}-{max(v):.0f}){' noisy' if spread > 0.2 else ''}"
names = {"ours": "ours: decode_train (libjpeg-turbo partial decode + DCT scaling)",
         "ours-no-dct-scaling": "ours, DCT scaling off",
         "torchvision": "torchvision 0.26 transforms + PIL",
         "torchvision-v2": "torchvision 0.26 transforms.v2 + PIL"}
print("| variant (1 thread) | images/s per core (CPU time) | images/s (wall) | / faster torchvision |")
print("|---|---:|---:|---:|")
for v in names:
    print(f"| {names[v]} | {cell(rate[v]['cpu'])} | {cell(rate[v]['wall'])} | {med[v] / theirs:.2f} |")
n = len(rate["ours"]["cpu"])
print(f"\n{n} rounds; median (min-max); 'noisy': (max-min)/median > 20%.\n")
print("| whole-image crops of the 15 images with shorter side >= 448 px | images/s per core (CPU time) | DCT scaling gain |")
print("|---|---:|---:|")
on, off = med["large-ours"], med["large-ours-no-dct-scaling"]
print(f"| ours, DCT scaling on | {cell(rate['large-ours']['cpu'])} | {on / off:.2f} |")
print(f"| ours, DCT scaling off | {cell(rate['large-ours-no-dct-scaling']['cpu'])} | 1.00 |")
PY
