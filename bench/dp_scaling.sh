#!/usr/bin/env bash
# Purpose:  data-parallel efficiency on this host: training steps/s of 1 rank vs 2 ranks at a
#           fixed per-rank batch (64), real Tiny ImageNet shards, the shipped tiny-imagenet model
#           (convnet at 56 px, softmax stage), through devise-launch and the `cpu` backend. Also
#           the share of step time spent waiting for data and in all-reduce (time/data_wait_pct,
#           time/allreduce_pct of metrics.jsonl). Runs alternate: 1 rank, 2 ranks, 1, 2, ...
#           Then the split of the 2-rank step against the 1-rank step (data wait, communication
#           wait after backward, the rest: compute and the loop's own work), and compute alone
#           on a synthetic batch (`devise bench-step`, same model and per-rank batch, 1 thread):
#           one process, then two at once (what sharing the cores costs without data or
#           communication).
# Goal:     2-rank steps/s per rank >= 0.95 x the 1-rank steps/s.
# Hardware: written on a 2-core VM: each rank gets 1 compute thread and 1 decode thread, so the
#           2-rank run has half the CPU per rank of the 1-rank run: on 2 cores the ratio
#           measures the hardware split as much as our overhead; read time/allreduce_pct for the
#           communication cost itself.
# Command:  bash scripts/prepare-tiny-imagenet.sh 200 && bash bench/dp_scaling.sh
#           (ROUNDS=3 STEPS=60 by default)
# Time:     ~1 min per run on 2 cores, ~9 min for 3 rounds with the compute runs (after the
#           release build).
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

# compute ROUND: the training step's compute alone (1 process) and with 2 processes at once,
# no data pipeline, no communication; a JSON line.
compute() {
  local round=$1 r pids=()
  local -a flags=(--encoder convnet --image-size 56 --batch-size 64 --classes 150 --threads 1
    --steps 40 --warmup 5)
  "$bin/devise" bench-step "${flags[@]}" >"$work/alone.json" 2>"$work/alone.err" ||
    { log "bench-step failed:"; tail -5 "$work/alone.err" >&2; exit 1; }
  for r in 0 1; do
    "$bin/devise" bench-step "${flags[@]}" >"$work/shared.$r.json" 2>"$work/shared.$r.err" &
    pids+=($!)
  done
  for r in 0 1; do
    wait "${pids[$r]}" || { log "bench-step failed:"; tail -5 "$work/shared.$r.err" >&2; exit 1; }
  done
  python3 - "$round" "$work/alone.json" "$work/shared.0.json" "$work/shared.1.json" <<'EOF'
import json, sys
ms = lambda p: json.loads(open(p).read().strip().splitlines()[-1])["result"]["step_ms"]
print(json.dumps({"kind": "compute", "round": int(sys.argv[1]), "alone_ms": round(ms(sys.argv[2]), 1),
                  "shared_ms": round((ms(sys.argv[3]) + ms(sys.argv[4])) / 2, 1)}))
EOF
}

for round in $(seq 1 "$rounds"); do
  for world in 1 2; do
    log "round $round: $world rank(s)"
    run "$world" "$round" | tee -a "$out"
  done
  log "round $round: compute alone and shared (bench-step)"
  compute "$round" | tee -a "$out"
done

python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][-3 * int(sys.argv[2]):]
runs = [r for r in rows if r.get("kind") != "compute"]
comp = [r for r in rows if r.get("kind") == "compute"]
def med(world, key):
    return statistics.median(r[key] for r in runs if r["world_size"] == world)
print("| ranks | step ms (median) | steps/s per rank | images/s all ranks | data wait % | all-reduce % |")
print("|---:|---:|---:|---:|---:|---:|")
for w in (1, 2):
    print(f"| {w} | {med(w,'step_ms'):.0f} | {med(w,'steps_per_s'):.2f} | {med(w,'global_images_per_s'):.0f} | {med(w,'data_wait_pct'):.1f} | {med(w,'allreduce_pct'):.1f} |")
eff = med(2, "steps_per_s") / med(1, "steps_per_s")
print(f"\nefficiency (2-rank steps/s per rank / 1-rank steps/s): {eff:.2f}  (goal >= 0.95)")
s1, s2 = med(1, "step_ms"), med(2, "step_ms")
d1, d2 = s1 * med(1, "data_wait_pct") / 100, s2 * med(2, "data_wait_pct") / 100
a2 = s2 * med(2, "allreduce_pct") / 100
print("\nWhere the 2-rank step's time goes, against the 1-rank step (ms, medians of the runs' metrics):\n")
print("| part | 1 rank | 2 ranks | difference |")
print("|---|---:|---:|---:|")
for name, x, y in [("data wait", d1, d2), ("communication wait after backward", 0.0, a2),
                   ("compute and the loop's own work (the rest)", s1 - d1, s2 - d2 - a2),
                   ("step", s1, s2)]:
    print(f"| {name} | {x:.1f} | {y:.1f} | {y - x:+.1f} |")
if comp:
    c1 = statistics.median(r["alone_ms"] for r in comp)
    c2 = statistics.median(r["shared_ms"] for r in comp)
    print(f"\nCompute alone on a synthetic batch (bench-step, same model and batch, 1 thread): one "
          f"process {c1:.1f} ms, two at once {c2:.1f} ms per step ({c2 / c1:.2f}x; per round: "
          + ", ".join(f"{r['shared_ms'] / r['alone_ms']:.2f}" for r in comp) + ")")
EOF
