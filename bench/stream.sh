#!/usr/bin/env bash
# Purpose:  shard streaming throughput from a real S3 server on 127.0.0.1 (s3s-fs 0.14.1, as in
#           the tests): every shard of Tiny ImageNet's train split (100,000 samples in 120 tars,
#           476 MB) read through the trainer's path (Store::open_read -> SampleReader, one shard
#           after another, examples/stream_bench.rs), against fetching each shard whole before
#           parsing (Store::get, the pre-streaming reader), and the same streaming read from the
#           local disk. ROUNDS interleaved rounds (default 3); prints a Markdown table of the
#           medians and appends the raw JSON lines to bench/results/stream-<UTC date>.jsonl.
# Goal:     streaming costs nothing against whole-object GETs (ratio >= 0.9) while holding
#           at most 64 body chunks per open shard instead of the whole shard.
# Hardware: written on a 2-core VM (no GPU); the S3 server runs on the same 2 cores, so the
#           numbers are the server's limit as much as ours. Real S3 is per-connection limited
#           (~100 MB/s): the trainer streams prefetch_shards + 1 shards at once per rank.
# Command:  bash bench/stream.sh          (ROUNDS=5 bash bench/stream.sh)
# Builds:   the release devise binary and example stream_bench (honours CARGO_TARGET_DIR);
#           Tiny ImageNet shards via scripts/prepare-tiny-imagenet.sh; s3s-fs into .deps/s3s.
#           The shards reach the server by being copied into its storage directory (s3s-fs
#           serves files there as objects).
# Time:     ~40 s per round once built.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-3}
export LIBTORCH="$root/.deps/libtorch"
[ -f "$LIBTORCH/.complete" ] || bash scripts/setup.sh
[ -x .deps/s3s/bin/s3s-fs ] || cargo install --quiet --locked s3s-fs@0.14.1 --features binary --root .deps/s3s
cargo build --quiet --release --bin devise --example stream_bench
target="${CARGO_TARGET_DIR:-$root/target}/release"
shards=$(DEVISE_BIN="$target/devise" bash scripts/prepare-tiny-imagenet.sh 200 | tail -1)

store=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$store/bench"
cp -r "$shards" "$store/bench/shards"
.deps/s3s/bin/s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret "$store" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$store"' EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1 \
  AWS_ENDPOINT="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true

mkdir -p bench/results
out="bench/results/stream-$(date -u +%Y-%m-%d).jsonl"
tmp=$(mktemp)
for r in $(seq "$rounds"); do
  for mode in "s3://bench/shards train" "s3://bench/shards train --whole" "$shards train"; do
    # shellcheck disable=SC2086
    "$target/examples/stream_bench" $mode | sed "s/^{/{\"round\":$r,/" | tee -a "$out" >>"$tmp"
  done
done
python3 - "$tmp" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(pred):
    v = [r["mb_per_sec"] for r in rows if pred(r)]
    return statistics.median(v), min(v), max(v), len(v)
s3s = med(lambda r: r["url"].startswith("s3://") and r["mode"] == "stream")
s3w = med(lambda r: r["url"].startswith("s3://") and r["mode"] == "whole")
loc = med(lambda r: not r["url"].startswith("s3://"))
print("| read | MB/s (median) | min-max | runs |")
print("|---|---|---|---|")
for name, m in [("S3, streamed (trainer path)", s3s), ("S3, whole object then parse", s3w), ("local disk, streamed", loc)]:
    print(f"| {name} | {m[0]:.1f} | {m[1]:.1f}-{m[2]:.1f} | {m[3]} |")
print(f"\nstreamed / whole on S3: {s3s[0] / s3w[0]:.2f}x")
PY
rm -f "$tmp"
