//! All-reduce benchmark of the `cpu` collective backend (`devise::collective::ring`), one worker.
//!
//! Purpose: measure our ring all-reduce (same host: Unix sockets, or TCP with
//! `ALLREDUCE_TRANSPORT=tcp`) side by side with PyTorch's gloo
//! backend (`bench/allreduce_gloo.py`, same sizes, same iteration policy, same JSON lines);
//! `bench/allreduce.sh` builds both, runs them interleaved and prints the comparison table.
//!
//! Sizes: 1, 4, 16, 25, 64, 100 MiB of f32 (MB here = MiB = 2^20 bytes, the unit of
//! `dist.bucket_size_mb` and of PyTorch DDP's `bucket_cap_mb`). Per size: one correctness check
//! (rank r fills `r + 1 + i mod 7`; every element must equal the exact sum over ranks, else the
//! process exits non-zero), 3 warm-up all-reduces that also estimate the time of one, then
//! `max(5, ceil(1 s / estimate))` timed all-reduces (rank 0's estimate, shared with every rank),
//! each preceded by a barrier and timed alone on rank 0. Rank 0 prints one JSON line per size:
//! `{"impl":"devise-ring-unix|tcp","world_size":..,"bytes":..,"median_s":..,"p10_s":..,"p90_s":..,
//! "iters":..,"busbw_gb_s":..}`, bus bandwidth as in NCCL-tests: `bytes * 2 (w-1)/w / median / 1e9`.
//!
//! Run (normally through `bash bench/allreduce.sh`), one process per rank:
//! ```text
//! export LIBTORCH=$PWD/.deps/libtorch && cargo build --release --example allreduce_bench
//! for r in 0 1; do RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
//!   DEVISE_RDZV_TOKEN=bench target/release/examples/allreduce_bench & done; wait
//! ```
//! `ALLREDUCE_SIZES_MB=1,25` (optional) restricts the sizes.
use anyhow::{bail, Context, Result};
use devise::collective::{self, Config, ReduceOp, WorkerEnv};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const SIZES_MB: [usize; 6] = [1, 4, 16, 25, 64, 100];
const MIB: usize = 1 << 20;
const WARMUP: usize = 3;
const MIN_ITERS: usize = 5;
const TARGET_S: f64 = 1.0;

fn main() -> Result<()> {
    tch::set_num_threads(1); // as the gloo side; the ring's own threads are not torch's
    let env = WorkerEnv::from_env()?;
    let transport = if std::env::var("ALLREDUCE_TRANSPORT").is_ok_and(|t| t == "tcp") {
        "tcp"
    } else {
        "unix"
    };
    let cfg = Config {
        backend: devise::collective::Backend::Cpu,
        // ALLREDUCE_TRANSPORT=tcp: TCP even between same-host neighbours (default: Unix sockets).
        unix_sockets: transport != "tcp",
        ..Config::default()
    };
    let coll = collective::init(&env, &cfg, Device::Cpu)?;
    let (rank, w) = (coll.rank(), coll.world_size());
    if w < 2 {
        bail!("run at least 2 ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)");
    }
    let sizes: Vec<usize> = match std::env::var("ALLREDUCE_SIZES_MB") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => SIZES_MB.to_vec(),
    };
    for mb in sizes {
        let n = (mb * MIB / 4) as i64;
        let idx = Tensor::arange(n, (Kind::Float, Device::Cpu)).fmod(7);

        // Correctness: sum over ranks of (r + 1 + i mod 7), exact in f32.
        let mut buf = &idx + (rank as f64 + 1.0);
        coll.all_reduce(&mut buf, ReduceOp::Sum)?;
        let want = &idx * w as f64 + (w * (w + 1) / 2) as f64;
        if !buf.equal(&want) {
            let bad = buf.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
            bail!("rank {rank}: WRONG all-reduce result at {mb} MiB: {bad} of {n} elements differ");
        }

        // Timing on zeros (repeated sums stay finite and no denormals appear).
        let _ = buf.zero_();
        let mut warm = Vec::with_capacity(WARMUP);
        for _ in 0..WARMUP {
            coll.barrier()?;
            let t = Instant::now();
            coll.all_reduce(&mut buf, ReduceOp::Sum)?;
            warm.push(t.elapsed().as_secs_f64());
        }
        let est = median(&mut warm);
        let mine = ((TARGET_S / est).ceil() as usize).clamp(MIN_ITERS, 100_000) as u64;
        let iters = u64::from_le_bytes(
            coll.broadcast_bytes(mine.to_le_bytes().to_vec())?
                .try_into()
                .ok()
                .context("iteration count")?,
        ) as usize;
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            coll.barrier()?;
            let t = Instant::now();
            coll.all_reduce(&mut buf, ReduceOp::Sum)?;
            times.push(t.elapsed().as_secs_f64());
        }
        if rank == 0 {
            let bytes = mb * MIB;
            let med = median(&mut times);
            let busbw = bytes as f64 * 2.0 * (w - 1) as f64 / w as f64 / med / 1e9;
            println!(
                r#"{{"impl":"devise-ring-{transport}","world_size":{w},"bytes":{bytes},"median_s":{med:.6e},"p10_s":{:.6e},"p90_s":{:.6e},"iters":{iters},"busbw_gb_s":{busbw:.4}}}"#,
                percentile(&times, 0.10),
                percentile(&times, 0.90),
            );
        }
    }
    coll.barrier()?; // rank 0 hosts the store: nobody leaves while others still need it
    Ok(())
}

/// Sorts `v` and returns its median.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Nearest-rank percentile of a sorted slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}
