#!/usr/bin/env bash
# Purpose:  one training step of ours (`devise train`, the whole loop: data feed, forward,
#           backward, finiteness check, the per-step loss/stop all-reduce, optimizer) against
#           PyTorch eager doing the same step (bench/train_step_torch.py, torch 2.11 = the
#           libtorch we link), same model, batch and threads, on CPU. Three workloads:
#             softmax        ResNet-18 at 64 px, batch 64, SGD (the softmax pretraining stage)
#             devise         frozen ResNet-18 forward + projection + hinge rank loss, Adagrad
#             devise-cached  the projection stage on cached features (ours: train.devise.
#                            cache_features = true; the peer indexes a random [N, 512] tensor)
#           Ours reads real Tiny ImageNet JPEGs (first 20 classes of the split, 64 px, no
#           augmentation, 1 decode thread) and its step time includes any data wait; the peer
#           trains on one fixed random batch. Runs interleave: ours, peer, ours, peer, ...
# Goal:     ours no more than 2 % slower per step.
# Command:  bash scripts/prepare-tiny-imagenet.sh 200 && bash bench/train_step.sh
#           (ROUNDS=5 STEPS=30 THREADS=2 by default; MODES="softmax devise devise-cached")
# Time:     ~15 min for 5 rounds on 2 cores (after the release build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-5}
steps=${STEPS:-30}
threads=${THREADS:-2}
modes=${MODES:-softmax devise devise-cached}
log() { printf '[train_step] %s\n' "$*" >&2; }

export LIBTORCH="$root/.deps/libtorch"
[ -f "$LIBTORCH/.complete" ] || bash scripts/setup.sh
[ -f data/shards/tiny-imagenet-200/manifest.json ] || {
  log "no Tiny ImageNet shards: run bash scripts/prepare-tiny-imagenet.sh 200 first"
  exit 2
}
bash bench/venv.sh
py="$root/.deps/bench-venv/bin/python"
cargo build --quiet --release --bin devise
bin="${CARGO_TARGET_DIR:-$root/target}/release"
out="bench/results/train_step-$(date -u +%Y-%m-%d).jsonl"
mkdir -p bench/results
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# 20 classes of the split: 15 seen (7,500 training images), 5 unseen.
classes=15
train_images=7500

# Ours: `steps` steps of one stage, logged every 5 steps; prints the windows' step ms.
ours() {
  local mode=$1 round=$2 dir="$work/$1-r$2"
  local stage=(--set "train.softmax.epochs=$(python3 -c "print(($steps + 10) * 64 / $train_images)")")
  if [ "$mode" != softmax ]; then
    stage=(--set train.softmax.epochs=0
      --set "train.devise.epochs=$(python3 -c "print(($steps + 10) * 64 / $train_images)")"
      --set "train.devise.cache_features=$([ "$mode" = devise-cached ] && echo true || echo false)")
  fi
  set +e
  "$bin/devise" train --config configs/tiny-imagenet.toml --set "run.dir=\"$dir\"" \
    --set run.threads="$threads" --set labels.limit=20 --set 'model.encoder="resnet18"' \
    --set data.image_size=64 --set data.eval_resize=64 --set data.augment=false \
    --set data.decode_threads=1 --set train.global_batch_size=64 \
    --set train.log_every_steps=5 --set loss.stop_at_first_violation=false \
    --set checkpoint.every_steps=0 --set dist.check_params_every_steps=0 \
    "${stage[@]}" --stop-after-step "$steps" >"$dir.log" 2>&1
  local rc=$?
  set -e
  if [ "$rc" -ne 75 ]; then
    log "ours $mode round $round exited $rc (expected 75 = stopped after step $steps):"
    tail -20 "$dir.log" >&2
    exit 1
  fi
  python3 - "$dir/metrics.jsonl" "$mode" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if '"train/loss"' in l][1:]
print(json.dumps({"mode": sys.argv[2], "windows_ms": [round(l["time/step_ms"], 3) for l in lines],
                  "data_wait_pct": [round(l["time/data_wait_pct"], 2) for l in lines]}))
PY
}

peer() {
  "$py" -W ignore bench/train_step_torch.py --mode "$1" --steps "$steps" --window 5 \
    --threads "$threads" --batch 64 --size 64 --classes "$classes" --cached "$train_images"
}

for round in $(seq 1 "$rounds"); do
  for mode in $modes; do
    log "round $round: $mode, ours then peer"
    ours "$mode" "$round" | python3 -c "import json,sys; d=json.load(sys.stdin); d.update(side='ours', round=$round, threads=$threads); print(json.dumps(d))" | tee -a "$out"
    peer "$mode" | python3 -c "import json,sys; d=json.load(sys.stdin); d.update(side='pytorch', round=$round, threads=$threads); print(json.dumps(d))" | tee -a "$out"
  done
done

python3 - "$out" "$rounds" "$threads" <<'PY'
import json, statistics as st, sys
path, rounds, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(l) for l in open(path)]
rows = [r for r in rows if r.get("threads") == threads][-rounds * 2 * 3:]
print(f"\n{rounds} rounds, {threads} threads, batch 64; per round the mean of its 5-step windows "
      "(first dropped); median (min-max) over rounds\n")
print("| workload | ours ms/step | PyTorch ms/step | ours/PyTorch | ours data wait % |")
print("|---|---:|---:|---:|---:|")
for mode in ["softmax", "devise", "devise-cached"]:
    per = {}
    for side in ["ours", "pytorch"]:
        per[side] = [st.mean(r["windows_ms"]) for r in rows if r["mode"] == mode and r["side"] == side]
    if not per["ours"] or not per["pytorch"]:
        continue
    o, p = st.median(per["ours"]), st.median(per["pytorch"])
    wait = st.median([st.mean(r["data_wait_pct"]) for r in rows if r["mode"] == mode and r["side"] == "ours"])
    f = lambda v: f"{st.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
    print(f"| {mode} | {f(per['ours'])} | {f(per['pytorch'])} | {o / p:.3f} | {wait:.2f} |")
PY
