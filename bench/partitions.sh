#!/usr/bin/env bash
# Purpose:  what each rank of a data-parallel run downloads and waits for when W ranks stream the
#           train split of Tiny ImageNet (100,000 samples in 120 tars, 476 MB) from a real S3
#           server on 127.0.0.1 (s3s-fs 0.14.1, as in the tests), W = 1, 2, 4. Each rank is one
#           process of examples/plan_bench.rs (the trainer's TrainStream, image size 56,
#           augmentation on, decode_threads = 1, global batch 256, 1.25 epochs so the run crosses
#           an epoch boundary), all W started at once. Each rank talks to the server through its
#           own counting TCP proxy (bench/partitions_helper.py proxy), so its bytes are exactly
#           its own. The designs side by side:
#             ours      the example built from this tree;
#             previous  the same example built from the commit PREVIOUS (a temporary git
#                       worktree, the build sharing this tree's target directory);
#             cache1    ours with a node-local shard cache (data.cache_dir, shared by the W
#                       ranks, empty at the start): epoch 1 downloads into it;
#             cache2    ours again on the cache cache1 left (a new process per rank): epoch 2
#                       read from local disk (its bytes are the manifest only);
#             peer      Python webdataset 1.0.2, one process per rank, shards split by
#                       webdataset's split_by_node (shards[r::W]), each shard read through
#                       `pipe:curl` of a boto3-presigned GET, decoded with PIL and augmented
#                       with torchvision (RandomResizedCrop(56, scale=(0.35, 1)) + flip).
#           ROUNDS rounds (default 1). Prints one Markdown table per W and appends the raw JSON
#           lines (one per rank) to bench/results/partitions-<UTC date>.jsonl.
# Columns:  bytes/rank = everything the server sent that rank (shards, manifest, HTTP headers);
#           total / split = all ranks' bytes over the split's tar bytes (1.25 epochs of a rank
#           that reads only its share give ~1.25); share deviation = max over ranks of
#           |rank bytes / total - 1/W|; MB/s per core = all ranks' bytes / all ranks' CPU seconds
#           (user + system, getrusage; the peer's includes its curl children). Waits are the time
#           a rank's next batch took: the longest time to first batch over ranks, the longest
#           wait at the epoch boundary (the step where a rank's batch first holds a sample it
#           already delivered, and the steps just before and after it; the peer's epoch is each
#           rank's own shards), the longest wait anywhere, and the median of the ranks' medians.
# Goal:     a rank downloads about 1/W of the split per epoch (total / split stays ~1.25 for
#           every W) without longer waits at the start or at epoch boundaries, and streams at
#           least as many MB per CPU second as webdataset.
# Hardware: written on a 2-core VM (no GPU); server, proxies and all ranks share the 2 cores,
#           so rates fall with W from CPU contention alone; compare designs within a W.
# Command:  bash bench/partitions.sh    (ROUNDS=3, WORLDS="1 2", DESIGNS="ours cache1 cache2",
#           PREVIOUS=<commit>, PARTITIONS=<n> (passed to ours as --partitions),
#           EPOCHS_FRACTION=1.25, BENCH_VENV=<venv path> are optional)
# Builds:   the release devise binary and example plan_bench (honours CARGO_TARGET_DIR), the
#           same example at PREVIOUS (default 9ede550) in a temporary worktree (kept under
#           target/bench-previous/ for later runs; this tree is rebuilt after it); Tiny ImageNet
#           shards via scripts/prepare-tiny-imagenet.sh; s3s-fs into .deps/s3s; the Python venv
#           of bench/venv.sh plus webdataset 1.0.2 and boto3 1.44.18 (idempotent). The shards
#           reach the server through its S3 API (PutObject), as they reach a real bucket.
# Time:     on 2 cores, per W (1, 2, 4): ours and previous 17-28 s each, the peer 70-100 s;
#           one round of everything ~6 min, plus ~8 min the first time (PREVIOUS, then this tree
#           again).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-1}
worlds=${WORLDS:-"1 2 4"}
designs=${DESIGNS:-"ours cache1 cache2 previous peer"}
previous=${PREVIOUS:-9ede550}
fraction=${EPOCHS_FRACTION:-1.25}
log() { printf '[partitions] %s\n' "$*" >&2; }
export LIBTORCH="${LIBTORCH:-$root/.deps/libtorch}"
[ -f "$LIBTORCH/.complete" ] || bash scripts/setup.sh
[ -x .deps/s3s/bin/s3s-fs ] || cargo install --quiet --locked s3s-fs@0.14.1 --features binary --root .deps/s3s
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
target="$CARGO_TARGET_DIR/release"
# Cargo names this crate's outputs by its path inside the workspace, so the build of PREVIOUS
# below (a worktree sharing the target directory) replaces this tree's library, and cargo then
# takes it for this tree's, fresh. After that build every source of this tree is touched and
# rebuilt (~3 min); the marker makes a run interrupted in between do it at its next start.
marker="$CARGO_TARGET_DIR/bench-previous/target-holds-previous"
touch_sources() { find src examples csrc build.rs -type f -exec touch {} +; }
[ -e "$marker" ] && touch_sources
cargo build --quiet --release --bin devise --example plan_bench
rm -f "$marker"
shards=$(DEVISE_BIN="$target/devise" bash scripts/prepare-tiny-imagenet.sh 200 | tail -1)

work=$(mktemp -d)
store="$work/store"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -d "$work/previous-tree" ] && git worktree remove --force "$work/previous-tree" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
cp "$target/examples/plan_bench" "$work/ours"
ours_commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src examples || echo "+dirty")

if [[ " $designs " == *" previous "* ]]; then
  # Kept between runs, keyed by the commit and the example's source.
  cached="$CARGO_TARGET_DIR/bench-previous/$(git rev-parse --short "$previous")-$(sha256sum examples/plan_bench.rs | cut -c1-12)"
  if [ ! -x "$cached/plan_bench" ]; then
    # The example may not exist at PREVIOUS: this tree's copy is built against that commit's src/.
    log "building examples/plan_bench.rs at $previous"
    git worktree add --quiet --detach "$work/previous-tree" "$previous"
    cp examples/plan_bench.rs "$work/previous-tree/examples/"
    ln -s "$(readlink -f .deps)" "$work/previous-tree/.deps"
    mkdir -p "$cached"
    touch "$marker"
    (cd "$work/previous-tree" && cargo build --quiet --release --example plan_bench)
    cp "$target/examples/plan_bench" "$cached/plan_bench"
    git worktree remove --force "$work/previous-tree"
    log "rebuilding this tree's library and binaries (the build of $previous replaced them)"
    touch_sources
    cargo build --quiet --release --bin devise --example plan_bench
    rm -f "$marker"
  fi
  cp "$cached/plan_bench" "$work/previous"
fi
# The venv uploads the shards (boto3) and runs the peer.
export BENCH_VENV="${BENCH_VENV:-$root/.deps/bench-venv}"
bash bench/venv.sh
py="$BENCH_VENV/bin/python"
if ! "$py" -c 'import webdataset, boto3' 2>/dev/null; then
  log "installing webdataset 1.0.2 and boto3 1.44.18 into $BENCH_VENV"
  "$BENCH_VENV/bin/pip" install --quiet --no-cache-dir webdataset==1.0.2 boto3==1.44.18
fi
if [[ " $designs " == *" peer "* ]]; then
  command -v curl >/dev/null || { log "the peer needs curl"; exit 1; }
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; log "port $1 never opened"; exit 1; }
mkdir -p "$store"
# The previous design's manifest reader rejects per-shard class counts (a newer field): it reads
# the same tars under a manifest without them.
python3 - "$shards/manifest.json" >"$work/manifest-previous.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for split in m["splits"].values():
    for shard in split["shards"]:
        shard.pop("class_counts", None)
print(json.dumps(m))
PY
port=$(free_port)
.deps/s3s/bin/s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret "$store" >/dev/null 2>&1 &
pids+=($!)
wait_port "$port"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1 \
  AWS_DEFAULT_REGION=us-east-1 AWS_ALLOW_HTTP=true
# Shards reach the server through its S3 API, as they reach a real bucket (a file copied into
# s3s-fs's directory instead has no stored checksum, and the server then hashes the whole
# object at every GET before it answers).
log "uploading the shards to the S3 server"
AWS_ENDPOINT="http://127.0.0.1:$port" "$py" bench/partitions_helper.py upload "$shards" s3://bench/shards
AWS_ENDPOINT="http://127.0.0.1:$port" "$py" bench/partitions_helper.py upload "$shards" \
  s3://bench/shards-previous "$work/manifest-previous.json"

mkdir -p bench/results
out="bench/results/partitions-$(date -u +%Y-%m-%d).jsonl"
rows="$work/rows.jsonl"
url=s3://bench/shards
for round in $(seq "$rounds"); do
  for w in $worlds; do
    for design in $designs; do
      run="$work/run-$round-$w-$design"
      mkdir -p "$run"
      proxies=() ranks=()
      for r in $(seq 0 $((w - 1))); do
        p=$(free_port)
        python3 bench/partitions_helper.py proxy "$p" "$port" "$run/proxy-$r.json" &
        proxies+=($!)
        pids+=($!)
        echo "$p" >"$run/port-$r"
      done
      for r in $(seq 0 $((w - 1))); do wait_port "$(cat "$run/port-$r")"; done
      start=$(date +%s.%N)
      for r in $(seq 0 $((w - 1))); do
        args=("$url" --rank "$r" --world-size "$w" --epochs-fraction "$fraction")
        case $design in
          ours) cmd=("$work/ours" "${args[@]}" ${PARTITIONS:+--partitions "$PARTITIONS"}) ;;
          cache1 | cache2)
            cmd=("$work/ours" "${args[@]}" ${PARTITIONS:+--partitions "$PARTITIONS"}
              --set "cache_dir=\"$work/cache-$round-$w\"") ;;
          previous) cmd=("$work/previous" "s3://bench/shards-previous" "${args[@]:1}") ;;
          peer) cmd=("$py" -W ignore bench/partitions_helper.py peer "${args[@]}") ;;
        esac
        AWS_ENDPOINT="http://127.0.0.1:$(cat "$run/port-$r")" "${cmd[@]}" >"$run/rank-$r.json" &
        ranks+=($!)
      done
      for p in "${ranks[@]}"; do wait "$p"; done
      wall=$(python3 -c "import time; print(round(time.time() - $start, 1))")
      kill -TERM "${proxies[@]}"
      for p in "${proxies[@]}"; do wait "$p" || true; done
      case $design in ours | cache1 | cache2) commit=$ours_commit ;; previous) commit=$previous ;; *) commit= ;; esac
      python3 - "$run" "$w" "$design" "$round" "$wall" "$shards/manifest.json" "$commit" <<'PY' | tee -a "$out" >>"$rows"
import json, sys, time
run, w, design, rnd, wall, manifest, commit = sys.argv[1:]
split = json.load(open(manifest))["splits"]["train"]
for r in range(int(w)):
    row = json.loads(open(f"{run}/rank-{r}.json").read().strip().splitlines()[-1])
    proxy = json.load(open(f"{run}/proxy-{r}.json"))
    objs = proxy["objects"]
    print(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "design": design,
        "commit": commit or None, "round": int(rnd), "config_wall_s": float(wall), **row,
        "bytes": proxy["down_bytes"], "up_bytes": proxy["up_bytes"],
        "shard_get_bytes": sum(v for k, v in objs.items() if k.startswith("GET ") and k.endswith(".tar")),
        "shards_requested": len([k for k in objs if k.startswith("GET ") and k.endswith(".tar")]),
        "requests": proxy["requests"], "connections": proxy["connections"],
        "split_bytes": sum(s["bytes"] for s in split["shards"]), "split_samples": split["samples"],
        "mb_per_sec": proxy["down_bytes"] / 1e6 / row["seconds"],
    }))
PY
      log "round $round W=$w $design: ${wall} s"
    done
  done
done
python3 bench/partitions_helper.py table "$rows"
