#!/usr/bin/env bash
# Purpose:  data-parallel efficiency on this host: training steps/s of 1 rank vs 2 ranks at a
#           fixed per-rank batch (64), real Tiny ImageNet shards, the shipped tiny-imagenet model
#           (convnet at 56 px, softmax stage), through devise-launch and the `cpu` backend. Also
#           the share of step time spent waiting for data and in all-reduce (time/data_wait_pct,
#           time/allreduce_pct of metrics.jsonl). Runs alternate: 1 rank, 2 ranks, 1, 2, ...
# Goal:     2-rank steps/s per rank >= 0.95 x the 1-rank steps/s.
# Hardware: written on a 2-core VM: each rank gets 1 compute thread and 1 decode thread, so the
#           2-rank run has half the CPU per rank of the 1-rank run: on 2 cores the ratio
#           measures the hardware split as much as our overhead; read time/allreduce_pct for the
#           communication cost itself.
# Command:  bash scripts/prepare-tiny-imagenet.sh 200 && bash bench/dp_scaling.sh
#           (ROUNDS=3 STEPS=60 by default)
# Time:     ~1 min per run on 2 cores, ~6 min for 3 rounds (after the release build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-3}
steps=${STEPS:-60}
log() { printf '[dp_scaling] %s\n' "$*" >&2; }

export LIBTORCH="$root/.deps/libtorch"
[ -f "$LIBTORCH/.complete" ] || bash scripts/setup.sh
[ -f data/shards/tiny-imagenet-200/manifest.json ] || {
  log "no Tiny ImageNet shards: run bash scripts/prepare-tiny-imagenet.sh 200 first"
  exit 2
}
cargo build --quiet --release --workspace --bins
bin="${CARGO_TARGET_DIR:-$root/target}/release"
out="bench/results/dp_scaling-$(date -u +%Y-%m-%d).jsonl"
mkdir -p bench/results
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One run of `steps` steps with `world` ranks x 64 images; prints a JSON line.
run() {
  local world=$1 round=$2 dir="$work/w$1-r$2"
  # Enough softmax epochs for `steps` steps (74k seen images); stop before the stage ends (no
  # evaluation): the run checkpoints and exits 75, which is expected here.
  local global=$((64 * world))
  local epochs
  epochs=$(python3 -c "print(($steps + 20) * $global / 73915)")
  set +e
  "$bin/devise-launch" --nproc-per-node "$world" --master-port $((29700 + world)) -- \
    "$bin/devise" train --config configs/tiny-imagenet.toml \
    --set "run.dir=\"$dir\"" --set run.threads=1 --set data.decode_threads=1 \
    --set train.global_batch_size=$global --set train.log_every_steps=10 \
    --set "train.softmax.epochs=$epochs" --set dist.check_params_every_steps=0 \
    --stop-after-step "$steps" >"$dir.log" 2>&1
  local rc=$?
  set -e
  if [ "$rc" -ne 75 ]; then
    log "run world=$world round=$round exited $rc (expected 75 = stopped after step $steps):"
    tail -20 "$dir.log" >&2
    exit 1
  fi
  # Skip the first window (start-up: thread pools, first shard); average the rest.
  python3 - "$dir/metrics.jsonl" "$world" "$round" <<'EOF'
import json, sys
path, world, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lines = [json.loads(l) for l in open(path) if '"train/loss"' in l][1:]
ms = sum(l["time/step_ms"] for l in lines) / len(lines)
print(json.dumps({
    "world_size": world, "round": rnd, "per_rank_batch": 64,
    "step_ms": round(ms, 1), "steps_per_s": round(1000 / ms, 3),
    "global_images_per_s": round(sum(l["throughput/global_images_per_sec"] for l in lines) / len(lines), 1),
    "data_wait_pct": round(sum(l["time/data_wait_pct"] for l in lines) / len(lines), 2),
    "allreduce_pct": round(sum(l["time/allreduce_pct"] for l in lines) / len(lines), 2),
}))
EOF
}

for round in $(seq 1 "$rounds"); do
  for world in 1 2; do
    log "round $round: $world rank(s)"
    run "$world" "$round" | tee -a "$out"
  done
done

python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][-2 * int(sys.argv[2]):]
def med(world, key):
    return statistics.median(r[key] for r in rows if r["world_size"] == world)
print("| ranks | step ms (median) | steps/s per rank | images/s all ranks | data wait % | all-reduce % |")
print("|---:|---:|---:|---:|---:|---:|")
for w in (1, 2):
    print(f"| {w} | {med(w,'step_ms'):.0f} | {med(w,'steps_per_s'):.2f} | {med(w,'global_images_per_s'):.0f} | {med(w,'data_wait_pct'):.1f} | {med(w,'allreduce_pct'):.1f} |")
eff = med(2, "steps_per_s") / med(1, "steps_per_s")
print(f"\nefficiency (2-rank steps/s per rank / 1-rank steps/s): {eff:.2f}  (goal >= 0.95)")
EOF
