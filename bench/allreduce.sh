#!/usr/bin/env bash
# Purpose:  all-reduce bandwidth of our `cpu` collective backend (src/collective/ring.rs, ring over
#           TCP) against PyTorch's torch.distributed gloo backend, 2 ranks on this one host, run
#           side by side: ours, gloo, ours, gloo, ... (ROUNDS rounds each, default 3), sizes 1, 4,
#           16, 25, 64, 100 MiB of f32. Prints a Markdown table of bus bandwidth (NCCL-tests
#           convention: bytes * 2 (w-1)/w / median time) and saves the raw JSON lines to
#           bench/results/allreduce-<UTC date>.jsonl (appended; each line has "run" and "round").
# Goal:     ours >= 1.5x gloo at 25 MiB (our default gradient bucket, and PyTorch DDP's).
# Hardware: written on a 2-core AMD EPYC VM (Linux, no GPU, 23 GiB RAM), shared with other jobs:
#           a spread (max-min)/median over 20% is flagged as noisy; rerun then.
# Command:  bash bench/allreduce.sh        (ROUNDS=5 bash bench/allreduce.sh for more rounds)
# Builds, idempotently: .deps/libtorch (scripts/setup.sh, if missing), the release example
#           `allreduce_bench` (honours CARGO_TARGET_DIR), and .deps/bench-venv with torch==2.11.0
#           from PyPI (bench/venv.sh: CPU-usable torch without the CUDA wheels; ~1.4 GB).
# Time:     ~80 s for the default 3 rounds (~27 s per round, both sides) once built; the first
#           run adds ~1 min for the venv (0.9 GB download) plus the cargo build if stale.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-3}
log() { printf '[allreduce] %s\n' "$*" >&2; }

# --- our side -----------------------------------------------------------------------------------
export LIBTORCH="$root/.deps/libtorch"
[ -f "$LIBTORCH/.complete" ] || bash scripts/setup.sh
cargo build --quiet --release --example allreduce_bench
ours="${CARGO_TARGET_DIR:-$root/target}/release/examples/allreduce_bench"

# --- the gloo side: a CPU-usable torch 2.11.0 venv (bench/venv.sh) -----------------------------
bash bench/venv.sh
venv="$root/.deps/bench-venv"

# --- runs ---------------------------------------------------------------------------------------
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# launch ROUND CMD...: 2 ranks on 127.0.0.1, rank 0's JSON lines (tagged) appended to $tmp/run.jsonl
launch() {
  local round=$1 port r rc=0 pids=()
  shift
  port=$(free_port)
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 \
      MASTER_PORT=$port DEVISE_RDZV_TOKEN=$token GLOO_SOCKET_IFNAME=lo \
      timeout 600 "$@" >"$tmp/out.$r" 2>"$tmp/err.$r" &
    pids+=($!)
  done
  for r in 0 1; do wait "${pids[$r]}" || rc=$?; done
  if ((rc != 0)); then
    log "FAILED (exit $rc): $*"
    cat "$tmp/err.0" "$tmp/err.1" >&2
    exit 1
  fi
  sed "s/^{/{\"run\":\"$run\",\"round\":$round,/" "$tmp/out.0" | tee -a "$tmp/run.jsonl" >&2
}

run=$(date -u +%Y-%m-%dT%H:%M:%SZ)
start=$SECONDS
for ((k = 1; k <= rounds; k++)); do
  log "round $k/$rounds: devise-ring (Unix sockets between same-host neighbours, the default)"
  ALLREDUCE_TRANSPORT=unix launch "$k" "$ours"
  log "round $k/$rounds: devise-ring over TCP (dist.unix_sockets = false)"
  ALLREDUCE_TRANSPORT=tcp launch "$k" "$ours"
  log "round $k/$rounds: torch-gloo"
  launch "$k" "$venv/bin/python" bench/allreduce_gloo.py
done
mkdir -p bench/results
out="bench/results/allreduce-$(date -u +%Y-%m-%d).jsonl"
cat "$tmp/run.jsonl" >>"$out"
log "$rounds rounds in $((SECONDS - start)) s; raw lines appended to $out"

python3 - "$tmp/run.jsonl" <<'PY'
import collections, json, statistics, sys
bw = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    bw[r["impl"], r["bytes"]].append(r["busbw_gb_s"])
def cell(v):
    m = statistics.median(v)
    spread = (max(v) - min(v)) / m
    return m, f"{m:.3f} ({min(v):.3f}-{max(v):.3f}){' noisy' if spread > 0.2 else ''}"
print("| size (MiB) | ours (Unix sockets) GB/s | ours (TCP) GB/s | gloo (TCP) GB/s | ours/gloo | ours TCP/gloo |")
print("|---:|---:|---:|---:|---:|---:|")
for size in sorted({b for _, b in bw}):
    (u, us), (t, ts), (g, gs) = (cell(bw[i, size]) for i in ("devise-ring-unix", "devise-ring-tcp", "torch-gloo"))
    print(f"| {size / 2**20:g} | {us} | {ts} | {gs} | {u / g:.2f} | {t / g:.2f} |")
print(f"\n{len(bw['torch-gloo', size])} rounds; bus bandwidth, median (min-max); 'noisy': (max-min)/median > 20%.")
PY
