#!/usr/bin/env bash
# Purpose:  GPU throughput of ours against PyTorch on one GPU, in under 8 minutes (with 2 GPUs
#           and the overlap pair, under 10):
#             1. ResNet-50 training at 224 px, bf16 autocast, channels-last, batch 128, synthetic
#                data on the GPU: `devise bench-step` (the training loop's own step) against a
#                torchvision loop (bench/gpu_torch.py), images/s, 3 interleaved rounds;
#             2. the same for the DeViSE stage (frozen encoder forward + projection + hinge
#                rank loss + Adagrad);
#             3. NCCL smoke test: one rank joins an NCCL communicator and all-reduces a buffer of
#                the model's size; the result is checked (exactly the input with one rank).
#             4. with 2 or more GPUs: the gradient all-reduce overlapped with backward or not,
#                2 ranks (GPUs 0 and 1) of `devise bench-step --collective nccl`, designs
#                `none` (both ranks step, no communication), `off` (dist.overlap = false), `on`
#                (dist.overlap = true); step ms and exposed communication (step - none). On one
#                GPU it is skipped (a 1-rank all-reduce is a no-op).
# Needs:    a Linux machine with one NVIDIA GPU and PyTorch 2.11 (CUDA 13) + torchvision in
#           `python3` (pip install torch==2.11.0 torchvision==0.26.0; the wheel brings NCCL);
#           no Rust toolchain. The devise binary is built beforehand on any x86-64 Linux machine
#           with this repository: `bash scripts/setup.sh && cargo build --release --features nccl
#           --bin devise`, then copied here: DEVISE=/path/to/devise bash bench/gpu.sh. libtorch.so
#           is linked by name, so the wheel's libtorch.so (which pulls in libtorch_cuda.so) is the
#           one loaded once LD_LIBRARY_PATH points at torch/lib, which this script sets.
# Command:  DEVISE=/path/to/devise bash bench/gpu.sh      (ROUNDS=3 STEPS=30 BATCH=128)
#           A dry run of the script's logic on a CPU machine (tiny sizes, the `cpu` collective,
#           the bench venv's CPU torch): DEVICE=cpu ENCODER=resnet18 SIZE=32 BATCH=4 STEPS=2 \
#           ROUNDS=1 PYTHON=.deps/bench-venv/bin/python bash bench/gpu.sh
# Output:   a Markdown table on stdout; raw JSON lines in bench/results/gpu-<date>.jsonl.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
rounds=${ROUNDS:-3}
steps=${STEPS:-30}
batch=${BATCH:-128}
device=${DEVICE:-cuda}
encoder=${ENCODER:-resnet50}
size=${SIZE:-224}
devise=${DEVISE:-${CARGO_TARGET_DIR:-$root/target}/release/devise}
py=${PYTHON:-python3}
log() { printf '[gpu] %s\n' "$*" >&2; }

[ -x "$devise" ] || { log "no devise binary at $devise: set DEVISE=/path/to/devise"; exit 2; }
"$py" -c "import torch, torchvision; assert torch.__version__.startswith('2.11'), torch.__version__; assert '$device' == 'cpu' or torch.cuda.is_available(), 'no CUDA device'" \
  || { log "need PyTorch 2.11 with a CUDA device and torchvision in $py"; exit 2; }
# The wheel's libtorch (CUDA) and its nvidia-* libraries (cudnn, cublas, nccl, ...) first.
LD_LIBRARY_PATH="$("$py" -c 'import torch, os, glob; t = os.path.dirname(torch.__file__); print(":".join([os.path.join(t, "lib")] + sorted(glob.glob(os.path.join(os.path.dirname(t), "nvidia", "*", "lib")))))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
"$py" -c "import torch; print('[gpu]', torch.cuda.get_device_name(0) if '$device' == 'cuda' else 'cpu', 'torch', torch.__version__, 'cuda', torch.version.cuda)" >&2
collective=$([ "$device" = cuda ] && echo nccl || echo cpu)
out="bench/results/gpu-$(date -u +%Y-%m-%d).jsonl"
mkdir -p bench/results

common=(--encoder "$encoder" --image-size "$size" --batch-size "$batch" --classes 1000
  --steps "$steps" --warmup "$([ "$device" = cuda ] && echo 10 || echo 1)" --precision bf16
  --channels-last --device "$device")
record() { "$py" -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d.update(side='$1', round=$2); print(json.dumps(d))" | tee -a "$out"; }

for round in $(seq 1 "$rounds"); do
  for stage in softmax devise; do
    log "round $round: $stage, ours then PyTorch"
    timeout 300 "$devise" bench-step "${common[@]}" --stage "$stage" | record ours "$round"
    timeout 300 "$py" -W ignore bench/gpu_torch.py "${common[@]}" --stage "$stage" | record pytorch "$round"
  done
done

log "$collective smoke test: one rank"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29517} \
  timeout 300 "$devise" bench-step --encoder "$encoder" --image-size "$size" --batch-size 4 \
  --steps 2 --warmup 1 --precision bf16 --channels-last --device "$device" \
  --collective "$collective" | record "$collective-smoke" 1

gpus=$([ "$device" = cuda ] && "$py" -c 'import torch; print(torch.cuda.device_count())' || echo 0)
if [ "$gpus" -ge 2 ]; then
  # 2 ranks on GPUs 0 and 1 (LOCAL_RANK picks the GPU), rank 0's line recorded.
  pair() {
    local design=$1 round=$2 r pids=() rc=0 flags=()
    case $design in
      off) flags=(--collective nccl --overlap false) ;;
      on) flags=(--collective nccl --overlap true) ;;
    esac
    for r in 0 1; do
      RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 \
        MASTER_PORT=$((29530 + round)) timeout 300 "$devise" bench-step "${common[@]}" \
        --stage softmax "${flags[@]}" >"$out.rank$r" 2>"$out.rank$r.err" &
      pids+=($!)
    done
    for r in 0 1; do wait "${pids[$r]}" || rc=$?; done
    if [ "$rc" -ne 0 ]; then
      log "overlap pair $design round $round failed ($rc):"
      tail -5 "$out.rank0.err" "$out.rank1.err" >&2
    else
      record "overlap-$design" "$round" <"$out.rank0"
    fi
    rm -f "$out.rank0" "$out.rank1" "$out.rank0.err" "$out.rank1.err"
  }
  for round in $(seq 1 "$rounds"); do
    for design in none off on; do
      log "round $round: 2 GPUs, overlap $design"
      pair "$design" "$round"
    done
  done
else
  log "overlap on/off pair skipped: it needs 2 GPUs ($gpus here; on one GPU the all-reduce is a no-op)"
fi

"$py" - "$out" "$rounds" <<'PY'
import json, statistics as st, sys
path, rounds = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(path)]
print(f"\n{rows[-1]['encoder']}, {rows[-1]['image_size']} px, bf16 autocast, channels-last, batch {rows[-1]['batch_size'] if rows else '?'}; "
      f"images/s, median (min-max) of {rounds} rounds\n")
print("| stage | ours img/s | PyTorch img/s | ours/PyTorch |")
print("|---|---:|---:|---:|")
for stage in ["softmax", "devise"]:
    v = {s: [r["result"]["images_per_sec"] for r in rows
             if r.get("stage") == stage and r["side"] == s][-rounds:] for s in ["ours", "pytorch"]}
    if v["ours"] and v["pytorch"]:
        f = lambda x: f"{st.median(x):.0f} ({min(x):.0f}-{max(x):.0f})"
        print(f"| {stage} | {f(v['ours'])} | {f(v['pytorch'])} | {st.median(v['ours']) / st.median(v['pytorch']):.3f} |")
pairs = {d: [r["result"] for r in rows if r["side"] == f"overlap-{d}"][-rounds:] for d in ["none", "off", "on"]}
if all(pairs.values()):
    base = st.median([r["step_ms"] for r in pairs["none"]])
    print(f"\n2 GPUs, softmax stage, NCCL; step ms, median of {rounds} rounds\n")
    print("| design | step ms | exposed comm ms (step - none) | reducer's wait ms | buckets started in backward |")
    print("|---|---:|---:|---:|---:|")
    for d in ["none", "off", "on"]:
        step = st.median([r["step_ms"] for r in pairs[d]])
        last = pairs[d][-1]
        print(f"| {d} | {step:.1f} | {'-' if d == 'none' else f'{step - base:.1f}'} | "
              f"{st.median([r['exposed_comm_ms'] for r in pairs[d]]):.1f} | "
              f"{last['buckets_started_in_backward']} of {len(last['buckets'])} |")
smoke = [r for r in rows if r["side"].endswith("-smoke")][-1:]
for r in smoke:
    b, ms, calls = r["result"]["all_reduce"]
    print(f"\n{r['side']} test (1 rank): {calls} all-reduces of {b / 2**20:.1f} MiB, {ms:.3f} ms each, result checked")
PY
