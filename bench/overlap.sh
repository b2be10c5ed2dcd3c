#!/usr/bin/env bash
# Purpose:  how much of the gradient all-reduce the overlap with backward hides, over a simulated
#           cross-node link. Two network namespaces, one rank in each, joined by a veth pair
#           (198.18.0.1 <-> 198.18.0.2, addresses that exist inside the namespaces only), shaped
#           with tc (netem: RATE and DELAY per direction; on a kernel without netem, tbf: RATE
#           only, and the table says so). Each rank runs `devise bench-step`
#           (ResNet-18 at 64 px, softmax stage, BATCH images per rank, 1 compute thread, the
#           training loop's own step: src/train/bench.rs) with the `cpu` backend over TCP
#           (`--unix-sockets false`: the namespaces share a kernel, a Unix socket would bypass
#           the link). Designs, run alternately for ROUNDS rounds:
#             none          the same two processes at the same time, no communication at all
#             off           dist.overlap = false: every bucket all-reduced after backward
#             on-<MB>       dist.overlap = true with dist.bucket_size_mb = MB (first bucket 1 MiB)
#           Exposed communication = step time - the `none` step time (same core sharing, same
#           compute). The all-reduce time is the whole gradient (one buffer) all-reduced alone
#           over the same link (bench-step's all-reduce check, after its steps).
#           Saves the raw JSON lines to bench/results/overlap-<UTC date>.jsonl.
# Goal:     exposed communication <= 25% of the all-reduce time when backward is longer than the
#           all-reduce (overlap on).
# Hardware: written on a 2-core VM: the two ranks share 2 cores (1 compute thread each), and the
#           ring's communication thread shares them too.
# Command:  cargo build --release --workspace --bins && sudo bash bench/overlap.sh
#           (root: it creates namespaces; build first as yourself, or the build runs as root;
#           ROUNDS=5 RATE=1200mbit DELAY=500us BATCH=32 STEPS=16 by default). It removes the
#           namespaces (and with them the veth pair and its qdiscs) on exit, also on failure or
#           Ctrl-C.
# Time:     ~30 s per run, ~13 min for the default 5 rounds x 5 designs (after the build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-5}
rate=${RATE:-1200mbit}
delay=${DELAY:-500us}
batch=${BATCH:-32}
steps=${STEPS:-16}
designs=${DESIGNS:-"none off on-25 on-5 on-2"}
log() { printf '[overlap] %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "needs root (network namespaces, tc)"; exit 2; }
if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  log "needs ip and tc (iproute2)"
  exit 2
fi
export LIBTORCH="$root/.deps/libtorch"
[ -f "$LIBTORCH/.complete" ] || bash scripts/setup.sh
cargo build --quiet --release --workspace --bins
bin="${CARGO_TARGET_DIR:-$root/target}/release/devise"
out="bench/results/overlap-$(date -u +%Y-%m-%d).jsonl"
mkdir -p bench/results

# --- the link: two namespaces, a veth pair, netem on both ends ---------------------------------
ns_a="devise-ov-a-$$" ns_b="devise-ov-b-$$"
work=$(mktemp -d)
cleanup() {
  ip netns pids "$ns_a" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns pids "$ns_b" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add dvov-a netns "$ns_a" type veth peer name dvov-b netns "$ns_b"
ip -n "$ns_a" addr add 198.18.0.1/24 dev dvov-a
ip -n "$ns_b" addr add 198.18.0.2/24 dev dvov-b
for ns in "$ns_a" "$ns_b"; do ip -n "$ns" link set lo up; done
ip -n "$ns_a" link set dvov-a up
ip -n "$ns_b" link set dvov-b up
# netem (rate + delay) where the kernel has it; else tbf (rate only: the delay is the veth's own,
# tens of microseconds).
shape() {
  local ns=$1 dev=$2 err
  if err=$(tc -n "$ns" qdisc add dev "$dev" root netem rate "$rate" delay "$delay" limit 10000 2>&1); then
    return
  fi
  case $err in
    *"qdisc kind is unknown"*) ;;
    *) log "tc netem refused RATE=$rate DELAY=$delay: $err"; exit 2 ;;
  esac
  tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst 256kb latency 50ms
  added_delay="none (no netem in this kernel)"
}
added_delay=$delay
shape "$ns_a" dvov-a
shape "$ns_b" dvov-b
delay=$added_delay
log "link: $rate, added delay $delay each way; ranks in $ns_a (198.18.0.1, rank 0) and $ns_b (198.18.0.2)"

# run DESIGN ROUND: one 2-rank bench-step; rank 0's JSON line, tagged, appended to $out.
run() {
  local design=$1 round=$2 rc=0 pids=() r ns port token
  local -a flags=(--encoder resnet18 --image-size 64 --batch-size "$batch" --classes 200
    --threads 1 --steps "$steps" --warmup 3)
  case $design in
    none) ;;
    off) flags+=(--collective cpu --unix-sockets false --overlap false) ;;
    on-*) flags+=(--collective cpu --unix-sockets false --overlap true
      --bucket-size-mb "${design#on-}") ;;
    *) log "unknown design $design"; exit 2 ;;
  esac
  port=$((29800 + RANDOM % 100))
  token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  for r in 0 1; do
    ns=$ns_a
    [ "$r" -eq 1 ] && ns=$ns_b
    ip netns exec "$ns" env RANK=$r WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 \
      MASTER_ADDR=198.18.0.1 MASTER_PORT=$port DEVISE_RDZV_TOKEN="$token" \
      timeout 600 "$bin" bench-step "${flags[@]}" >"$work/out.$r" 2>"$work/err.$r" &
    pids+=($!)
  done
  # The first rank to fail takes the other down (no waiting for its timeout).
  local remaining=("${pids[@]}") done_pid
  while [ ${#remaining[@]} -gt 0 ]; do
    if ! wait -n -p done_pid "${remaining[@]}"; then
      rc=1
      kill "${remaining[@]}" 2>/dev/null || true
      wait 2>/dev/null || true
      break
    fi
    mapfile -t remaining < <(printf '%s\n' "${remaining[@]}" | grep -vx "$done_pid" || true)
  done
  if [ "$rc" -ne 0 ]; then
    log "design $design round $round failed ($rc):"
    tail -5 "$work/err.0" "$work/err.1" >&2
    exit 1
  fi
  python3 -c 'import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
d.update(design=sys.argv[2], round=int(sys.argv[3]), rate=sys.argv[4], delay=sys.argv[5])
print(json.dumps(d))' "$work/out.0" "$design" "$round" "$rate" "$delay" | tee -a "$out" >"$work/last"
  log "round $round $design: $(python3 -c 'import json, sys; d = json.load(open(sys.argv[1]))["result"]; print("%.0f ms/step, exposed %.0f ms" % (d["step_ms"], d["exposed_comm_ms"]))' "$work/last")"
}

since=0
[ -f "$out" ] && since=$(wc -l <"$out")
for round in $(seq 1 "$rounds"); do
  for design in $designs; do run "$design" "$round"; done
done

# --- the table ------------------------------------------------------------------------------------
python3 - "$out" "$since" <<'EOF'
import json, statistics, sys
path, since = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(path).read().splitlines()[since:]]
by = {}
for r in rows:
    by.setdefault(r["design"], []).append(r)
med = lambda xs: statistics.median(xs)
def spread(xs):
    return (max(xs) - min(xs)) / med(xs) if xs and med(xs) else 0.0
base = med([r["result"]["step_ms"] for r in by.get("none", [])]) if "none" in by else None
ar = [r["result"]["all_reduce"][1] for d, rs in by.items() for r in rs if r["result"]["all_reduce"]]
ar_ms = med(ar) if ar else None
first = rows[0]
print(f"ResNet-18, 64 px, {first['batch_size']} images per rank, 2 ranks x 1 thread, link "
      f"{first['rate']} / {first['delay']} each way; {len(by.get('none', []))} rounds; medians")
if ar_ms:
    mb = next(r["result"]["all_reduce"][0] for rs in by.values() for r in rs if r["result"]["all_reduce"]) / 2**20
    print(f"whole-gradient all-reduce alone ({mb:.1f} MiB): {ar_ms:.0f} ms")
print()
print("| design | buckets | started in backward | step ms (spread) | backward ms | exposed comm ms | exposed / all-reduce | reducer's wait ms |")
print("|---|---|---|---|---|---|---|---|")
for design in [d for d in ["none", "off"] if d in by] + sorted(d for d in by if d.startswith("on-")):
    rs = by[design]
    step = med([r["result"]["step_ms"] for r in rs])
    exposed = step - base if base is not None else float("nan")
    share = f"{100 * exposed / ar_ms:.0f}%" if ar_ms and design != "none" else "-"
    buckets = len(rs[-1]["result"]["buckets"])
    started = rs[-1]["result"]["buckets_started_in_backward"]
    backward = med([r["result"]["backward_ms"] for r in rs])
    print(f"| {design} | {buckets} | {started} | {step:.0f} ({100 * spread([r['result']['step_ms'] for r in rs]):.0f}%) | "
          f"{backward:.0f} | {'-' if design == 'none' else f'{exposed:.0f}'} | {share} | "
          f"{med([r['result']['exposed_comm_ms'] for r in rs]):.0f} |")
if base and "off" in by:
    off = med([r["result"]["step_ms"] for r in by["off"]])
    print(f"\nsequential all-reduce share of the 2-rank step (off): {100 * (off - base) / off:.0f}%")
EOF
