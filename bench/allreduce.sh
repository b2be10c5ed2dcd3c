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
#           from PyPI. PyPI only has the CUDA build, whose libraries need several GB of nvidia-*
#           wheels to load; we install torch with --no-deps plus its pure-Python deps and the two small
#           CUDA wheels libtorch_cpu.so itself links (cudart, cupti, ~15 MB; as setup.sh does for
#           libtorch), and compile tiny stub libraries for the rest (cuBLAS, cuDNN, NCCL, ...):
#           each exports the exact (versioned) symbols the torch libraries import, and aborts
#           with a message if ever called. CPU-only torch, gloo included, works; the venv is
#           ~1.4 GB, nothing is cached.
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

# --- the gloo side: a CPU-usable torch 2.11.0 venv ------------------------------------------------
venv="$root/.deps/bench-venv"
if [ ! -f "$venv/.complete" ]; then
  log "creating $venv (torch 2.11.0 from PyPI, CUDA libraries stubbed)"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --no-cache-dir --no-deps torch==2.11.0 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 filelock==4.3.1 \
    typing_extensions==4.16.0 sympy==1.14.0 mpmath==1.4.1 networkx==3.6.1 Jinja2==3.1.6 \
    MarkupSafe==3.0.4 fsspec==2026.9.0
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$venv/bin/python" - "$site/torch/lib" "$site/nvidia/cu13/lib" "$site/torch-cpu-stubs" <<'PY'
# Stub every library the torch libraries loaded by `import torch` need but cannot find here.
import collections, os, re, subprocess, sys
lib, cuda, out = sys.argv[1:4]
load = ["libtorch_python.so", "libtorch.so", "libtorch_cuda.so", "libc10_cuda.so", "libc10.so",
        "libtorch_nvshmem.so", "libtorch_cpu.so", "libshm.so", "libtorch_global_deps.so"]
run = lambda *a: subprocess.run(a, capture_output=True, text=True, check=True).stdout
system = run("ldconfig", "-p")
here = set(os.listdir(lib)) | set(os.listdir(cuda))
missing = {n for f in load for n in re.findall(r"\(NEEDED\).*\[(.+)\]", run("readelf", "-d", f"{lib}/{f}"))
           if n not in here and not re.search(rf"^\s+{re.escape(n)}\s", system, re.M)}
syms = lambda path: [l.split() for l in run("readelf", "--dyn-syms", "-W", path).splitlines()
                     if len(l.split()) >= 8 and l.split()[0].endswith(":")]
defined = {s[7].split("@")[0] for p in [f"{lib}/{f}" for f in load] + [f"{cuda}/{f}" for f in
           os.listdir(cuda) if ".so" in f] for s in syms(p) if s[6] != "UND"}
ver_file, want = {}, {}
for f in load:
    cur = None
    for line in run("readelf", "-V", "-W", f"{lib}/{f}").splitlines():
        if m := re.search(r"File: (\S+)", line): cur = m.group(1)
        if (m := re.search(r"Name: (\S+)\s+Flags", line)) and cur: ver_file[m.group(1)] = cur
    for s in syms(f"{lib}/{f}"):
        if s[6] == "UND" and s[4] == "GLOBAL":
            name, _, ver = s[7].partition("@")
            if (ver and ver_file.get(ver) in missing) or (not ver and name not in defined):
                want[name] = (s[3], ver)
home = sorted(missing)[0]  # unversioned symbols resolve from any loaded library
per_lib = collections.defaultdict(list)
for name, (typ, ver) in want.items():
    per_lib[ver_file[ver] if ver else home].append((name, typ, ver))
os.makedirs(out, exist_ok=True)
for so in sorted(missing):
    c = ["#include <stdio.h>\n#include <stdlib.h>",
         f'static void die(const char *s) {{ fprintf(stderr, "{so} is a CPU-only stub: %s called\\n", s); abort(); }}']
    vers = collections.defaultdict(list)
    for name, typ, ver in per_lib[so]:
        c.append({"OBJECT": f"char {name}[256];", "TLS": f"__thread char {name}[256];"}.get(
            typ, f'void {name}(void) {{ die("{name}"); }}'))
        if ver: vers[ver].append(name)
    open(f"{out}/{so}.c", "w").write("\n".join(c) + "\n")
    args = ["cc", "-shared", "-fPIC", "-w", "-o", f"{lib}/{so}", f"{out}/{so}.c", f"-Wl,-soname,{so}"]
    if vers:
        open(f"{out}/{so}.map", "w").write("".join(f"{v} {{ global: {' '.join(n + ';' for n in ns)} }};\n"
                                                   for v, ns in vers.items()))
        args.append(f"-Wl,--version-script={out}/{so}.map")
    subprocess.run(args, check=True)
    print(f"[allreduce] stub {so}: {len(per_lib[so])} symbols", file=sys.stderr)
PY
  "$venv/bin/python" -W ignore -c 'import torch.distributed as d; assert d.is_gloo_available()'
  touch "$venv/.complete"
fi

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
