#!/usr/bin/env bash
# Purpose:  memory of one training worker: peak RSS (/usr/bin/time -v,
#           "Maximum resident set size") and steady-state RSS (VmRSS of /proc/<pid>/status every
#           0.5 s, median over the second half of the run's wall time) of `devise train` on real
#           Tiny ImageNet shards, one process, no launcher. Grid: data.prefetch_batches in
#           {1, 4, 16} x data.decode_threads in {1, 2, 4} on configs/tiny-imagenet.toml (convnet
#           at 56 px, batch 128, run.threads = 2, softmax stage); then, at the config defaults,
#           configs/tiny-imagenet-small.toml (ResNet-18, batch 64, softmax stage) and the devise
#           stage of configs/tiny-imagenet.toml with train.devise.cache_features = true (softmax
#           stage skipped: the encoder is untrained, the memory is the same) and = false, and the
#           cache run again with glibc's mmap threshold fixed at 128 KiB (these extra runs in round
#           1 only; EXTRAS=0 skips them). GRIDS="default mmap128k" (the default) runs the grid with
#           glibc malloc as it comes and again with MALLOC_MMAP_THRESHOLD_=131072 (no dynamic
#           raise of the threshold: every allocation over 128 KiB is its own mmap, returned to the
#           kernel on free, so RSS follows live memory). Every run stops after STEPS steps
#           (--stop-after-step: checkpoint, exit 75, no evaluation).
#           Beside each row: the prefetch queue's size, prefetch x batch x 3 x 56 x 56 x 4 bytes
#           (both configs train at 56 px). STEPS must stay below 230 (one softmax epoch of the
#           ResNet-18 config).
#           Prints a Markdown table (medians over ROUNDS rounds) and appends the raw JSON lines
#           to bench/results/memory-<UTC date>.jsonl (each with "round" and a downsampled RSS
#           series, MiB every 2 s).
# Goal:     none (a measurement): what dominates a worker's memory and how it scales with
#           prefetch depth and decode threads.
# Hardware: written on a 2-core AMD EPYC VM (Linux, no GPU, 23 GiB RAM), shared with other jobs:
#           each run holds an flock on BENCH_LOCK (default /tmp/bench.lock) so it does not
#           overlap other timed benchmarks that take the same lock. images/s is only indicative
#           (4 decode threads + 2 compute threads oversubscribe 2 cores); RSS is not timing.
# Command:  bash bench/memory.sh      (ROUNDS=1 STEPS=80 by default; GRIDS=default EXTRAS=0
#           PREFETCH="1 16" DECODE_THREADS="1 4" for a part of the grid)
#           DEVISE_BIN=path/to/devise uses that binary and skips the cargo build.
# Builds:   .deps/libtorch (scripts/setup.sh, if missing), the release binaries (unless
#           DEVISE_BIN), Tiny ImageNet shards (200 and 40 classes, scripts/prepare-tiny-imagenet.sh,
#           idempotent).
# Time:     ~25 s per grid run at 80 steps on 2 idle cores (1-2 min when the cores are shared),
#           ~30 s for ResNet-18, ~2-3.5 min for each feature-cache run (one forward pass over the
#           74,000 seen training images); the mmap128k grid's runs are slower (each large tensor is
#           a fresh mmap, zeroed by the kernel): ~15-20 min for round 1 on 2 idle cores.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-1}
steps=${STEPS:-80}
grids=${GRIDS:-"default mmap128k"}
extras=${EXTRAS:-1}
prefetch_grid=${PREFETCH:-"1 4 16"}
threads_grid=${DECODE_THREADS:-"1 2 4"}
lock=${BENCH_LOCK:-/tmp/bench.lock}
log() { printf '[memory] %s\n' "$*" >&2; }

[ -x /usr/bin/time ] || { log "needs GNU time at /usr/bin/time (apt-get install -y time)"; exit 2; }
export LIBTORCH="$root/.deps/libtorch"
[ -f "$LIBTORCH/.complete" ] || bash scripts/setup.sh
if [ -n "${DEVISE_BIN:-}" ]; then
  bin=$DEVISE_BIN
else
  cargo build --quiet --release --bin devise
  bin="${CARGO_TARGET_DIR:-$root/target}/release/devise"
fi
export DEVISE_BIN=$bin
DEVISE_BIN=$bin bash scripts/prepare-tiny-imagenet.sh 200 >/dev/null
DEVISE_BIN=$bin bash scripts/prepare-tiny-imagenet.sh 40 >/dev/null

mkdir -p bench/results
out="bench/results/memory-$(date -u +%Y-%m-%d).jsonl"
work=$(mktemp -d)
tmp="$work/rows.jsonl"
trap 'rm -rf "$work"' EXIT
exec 9>>"$lock"

# One run: name, round, config, batch size, prefetch, decode threads, an environment assignment
# for the process ("" for none; e.g. a glibc malloc tunable), then `--set` overrides.
# Appends its JSON line to $tmp and $out.
run() {
  local name=$1 round=$2 config=$3 batch=$4 prefetch=$5 threads=$6 malloc_env=$7
  shift 7
  local dir="$work/$name-r$round" kv rc=0 tpid pid=""
  local -a sets=()
  for kv in "$@"; do sets+=(--set "$kv"); done
  log "round $round: $name (prefetch $prefetch, decode threads $threads)"
  flock 9
  env ${malloc_env:+"$malloc_env"} /usr/bin/time -v -o "$dir.time" "$bin" train --config "$config" \
    --set "run.dir=\"$dir\"" --set train.log_every_steps=10 \
    --set "data.prefetch_batches=$prefetch" --set "data.decode_threads=$threads" \
    "${sets[@]}" --stop-after-step "$steps" >"$dir.log" 2>&1 9>&- &
  tpid=$!
  : >"$dir.rss"
  # env execs /usr/bin/time, which forks devise: sample its child. Lines: "<unix time> <VmRSS kB> <VmHWM kB>".
  while kill -0 "$tpid" 2>/dev/null; do
    [ -n "$pid" ] || pid=$(pgrep -P "$tpid" || true)
    if [ -n "$pid" ]; then
      awk -v t="$EPOCHREALTIME" '/^VmRSS/ {r = $2} /^VmHWM/ {h = $2}
        END {if (r != "") print t, r, h}' "/proc/$pid/status" >>"$dir.rss" 2>/dev/null || true
    fi
    sleep 0.5
  done
  wait "$tpid" || rc=$?
  flock -u 9
  if [ "$rc" -ne 75 ]; then
    log "run $name round $round exited $rc (expected 75 = stopped after step $steps):"
    tail -20 "$dir.log" >&2
    exit 1
  fi
  python3 - "$dir" "$name" "$round" "$config" "$batch" "$prefetch" "$threads" "$steps" "$malloc_env" <<'EOF' | tee -a "$out" >>"$tmp"
import json, re, statistics, sys
d, name, rnd, config, batch, prefetch, threads, steps, malloc_env = sys.argv[1:]
batch, prefetch, threads = int(batch), int(prefetch), int(threads)
mib = 1 << 20
timev = open(d + ".time").read()
peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timev).group(1))
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", timev).group(1)
cpu = re.search(r"Percent of CPU this job got: (\d+)%", timev).group(1)
samples = [tuple(map(float, l.split())) for l in open(d + ".rss") if len(l.split()) == 3]
t0, t1 = samples[0][0], samples[-1][0]
half = [r for t, r, _ in samples if t >= (t0 + t1) / 2]
q3 = [r for t, r, _ in samples if (t0 + t1) / 2 <= t < t0 + 0.75 * (t1 - t0)]
q4 = [r for t, r, _ in samples if t >= t0 + 0.75 * (t1 - t0)]
windows = [json.loads(l) for l in open(d + "/metrics.jsonl") if '"train/loss"' in l]
steady = windows[1:] or windows  # the first window is start-up
mean = lambda k: sum(w[k] for w in steady) / len(steady)
log = open(d + ".log").read()
cache = re.search(r"cached frozen-encoder features of (\d+) training images.* in ([\d.]+) s", log)
print(json.dumps({
    "run": name, "round": int(rnd), "config": config, "stage": steady[-1]["stage"],
    "malloc_env": malloc_env or None, "steps": int(steps), "batch": batch, "prefetch_batches": prefetch, "decode_threads": threads,
    "queue_mib": round(prefetch * batch * 3 * 56 * 56 * 4 / mib, 2),
    "peak_rss_mib": round(peak_kb / 1024, 1),
    "steady_rss_mib": round(statistics.median(half) / 1024, 1),
    "growth_q3_to_q4_mib": round((statistics.median(q4) - statistics.median(q3)) / 1024, 1) if q3 and q4 else None,
    "vmhwm_last_mib": round(samples[-1][2] / 1024, 1),
    "images_per_s": round(mean("throughput/images_per_sec"), 1),
    "data_wait_pct": round(mean("time/data_wait_pct"), 2),
    "peak_buffered_encoded_mb": max(w["data/peak_buffered_mb"] for w in windows),
    "cached_images": int(cache.group(1)) if cache else None,
    "cache_seconds": float(cache.group(2)) if cache else None,
    "wall": wall, "cpu_pct": int(cpu), "rss_samples": len(samples),
    "rss_series_mib_2s": [round(r / 1024) for _, r, _ in samples[::4]],
}))
EOF
}

tiny=configs/tiny-imagenet.toml
mmap=MALLOC_MMAP_THRESHOLD_=131072
for round in $(seq 1 "$rounds"); do
  for grid in $grids; do
    case $grid in
      default) genv="" sfx="" ;;
      mmap128k) genv=$mmap sfx=-mmap128k ;;
      *) log "unknown grid $grid (default, mmap128k)"; exit 2 ;;
    esac
    for prefetch in $prefetch_grid; do
      for threads in $threads_grid; do
        run "tiny-p$prefetch-t$threads$sfx" "$round" "$tiny" 128 "$prefetch" "$threads" "$genv" \
          train.softmax.epochs=1
      done
    done
  done
  if [ "$extras" != 1 ] || [ "$round" -ne 1 ]; then continue; fi
  # Once: ResNet-18, and the devise stage with and without the feature cache.
  run resnet18-small "$round" configs/tiny-imagenet-small.toml 64 4 2 "" train.softmax.epochs=1
  run devise-cache "$round" "$tiny" 128 4 2 "" train.softmax.epochs=0 train.devise.epochs=1 \
    train.devise.cache_features=true
  run devise-cache-mmap128k "$round" "$tiny" 128 4 2 "$mmap" train.softmax.epochs=0 \
    train.devise.epochs=1 train.devise.cache_features=true
  run devise-nocache "$round" "$tiny" 128 4 2 "" train.softmax.epochs=0 train.devise.epochs=1 \
    train.devise.cache_features=false
done

python3 - "$tmp" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
names = list(dict.fromkeys(r["run"] for r in rows))
def med(name, key):
    v = [r[key] for r in rows if r["run"] == name and r[key] is not None]
    return statistics.median(v) if v else float("nan")
print("| run | prefetch | decode threads | prefetch queue MiB | peak RSS MiB | steady RSS MiB | growth q3->q4 MiB | images/s | runs |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for n in names:
    r = next(r for r in rows if r["run"] == n)
    print(f"| {n} ({r['stage']}, batch {r['batch']}) | {r['prefetch_batches']} | {r['decode_threads']} | "
          f"{r['queue_mib']:.1f} | {med(n, 'peak_rss_mib'):.0f} | {med(n, 'steady_rss_mib'):.0f} | "
          f"{med(n, 'growth_q3_to_q4_mib'):+.0f} | {med(n, 'images_per_s'):.0f} | "
          f"{sum(r['run'] == n for r in rows)} |")
print(f"\nmedians over runs; {rows[0]['steps']} steps per run; MiB = 2^20 bytes; prefetch queue ="
      " prefetch x batch x 3 x 56 x 56 x 4 bytes; *-mmap128k: MALLOC_MMAP_THRESHOLD_=131072;"
      " images/s of devise-cache* are cached feature rows, not images decoded.")
# Slope of peak and steady RSS against prefetch depth, per decode-thread count (least squares).
print("\n| malloc | decode threads | peak RSS MiB per prefetched batch | steady RSS MiB per prefetched batch | one batch MiB |")
print("|---|---:|---:|---:|---:|")
for sfx, t in [(sfx, t) for sfx in ("", "-mmap128k") for t in (1, 2, 4)]:
    pts = [(p, med(f"tiny-p{p}-t{t}{sfx}", "peak_rss_mib"), med(f"tiny-p{p}-t{t}{sfx}", "steady_rss_mib"))
           for p in (1, 4, 16) if any(r["run"] == f"tiny-p{p}-t{t}{sfx}" for r in rows)]
    if len(pts) < 2:
        continue
    mx = sum(p for p, _, _ in pts) / len(pts)
    sxx = sum((p - mx) ** 2 for p, _, _ in pts)
    slope = lambda i: sum((pt[0] - mx) * (pt[i] - sum(q[i] for q in pts) / len(pts)) for pt in pts) / sxx
    print(f"| {'mmap threshold 128 KiB' if sfx else 'default'} | {t} | {slope(1):.2f} | {slope(2):.2f} | {128 * 3 * 56 * 56 * 4 / (1 << 20):.2f} |")
EOF
