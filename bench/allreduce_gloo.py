"""All-reduce benchmark of PyTorch's gloo backend, one worker: the reference for
examples/allreduce_bench.rs (same sizes, same iteration policy, same JSON lines, "impl":"torch-gloo").

Sizes: 1, 4, 16, 25, 64, 100 MiB of float32 (MB = MiB = 2**20 bytes). Per size: one correctness
check (rank r fills r + 1 + i mod 7; every element must equal the exact sum over ranks, else exit
non-zero), 3 warm-up all-reduces that estimate the time of one, then max(5, ceil(1 s / estimate))
timed all-reduces (rank 0's estimate, broadcast), each preceded by a barrier and timed alone on
rank 0. Rank 0 prints one JSON line per size; busbw_gb_s = bytes * 2 (w-1)/w / median / 1e9
(NCCL-tests convention).

Run (normally through `bash bench/allreduce.sh`), one process per rank, env:// rendezvous:
    for r in 0 1; do RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 \
      GLOO_SOCKET_IFNAME=lo .deps/bench-venv/bin/python bench/allreduce_gloo.py & done; wait
ALLREDUCE_SIZES_MB=1,25 (optional) restricts the sizes.
"""
import json
import math
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # numpy is not needed
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SIZES_MB = [1, 4, 16, 25, 64, 100]
MIB = 1 << 20
WARMUP = 3
MIN_ITERS = 5
TARGET_S = 1.0


def median(v):
    v = sorted(v)
    m = len(v) // 2
    return v[m] if len(v) % 2 else (v[m - 1] + v[m]) / 2


def percentile(sorted_v, p):
    """Nearest-rank percentile of a sorted list (as the Rust side)."""
    i = min(max(math.ceil(p * len(sorted_v)), 1), len(sorted_v)) - 1
    return sorted_v[i]


def main():
    torch.set_num_threads(1)
    dist.init_process_group(backend="gloo", init_method="env://")
    rank, w = dist.get_rank(), dist.get_world_size()
    sizes = [int(x) for x in os.environ.get("ALLREDUCE_SIZES_MB", "").split(",") if x.strip()]
    for mb in sizes or SIZES_MB:
        n = mb * MIB // 4
        idx = torch.arange(n, dtype=torch.float32).fmod_(7)

        buf = idx + (rank + 1.0)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        want = idx * w + w * (w + 1) // 2
        if not torch.equal(buf, want):
            bad = int((buf != want).sum())
            sys.exit(f"rank {rank}: WRONG all-reduce result at {mb} MiB: {bad} of {n} elements differ")

        buf.zero_()
        warm = []
        for _ in range(WARMUP):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            warm.append(time.perf_counter() - t)
        mine = min(max(math.ceil(TARGET_S / median(warm)), MIN_ITERS), 100_000)
        it = torch.tensor([mine], dtype=torch.int64)
        dist.broadcast(it, src=0)
        iters = int(it.item())
        times = []
        for _ in range(iters):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            times.append(time.perf_counter() - t)
        if rank == 0:
            nbytes = mb * MIB
            times.sort()
            med = median(times)
            print(json.dumps({
                "impl": "torch-gloo", "world_size": w, "bytes": nbytes, "median_s": med,
                "p10_s": percentile(times, 0.10), "p90_s": percentile(times, 0.90), "iters": iters,
                "busbw_gb_s": round(nbytes * 2 * (w - 1) / w / med / 1e9, 4),
            }, separators=(",", ":")), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
