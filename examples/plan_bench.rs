//! One rank's view of the training stream: streams the train split of a shard directory (any URL
//! the trainer accepts: path, s3://, ...) as rank `--rank` of `--world-size` through
//! [`devise::data::TrainStream`], the trainer's own reader, for `--epochs-fraction` epochs of
//! global batches (default 1.25, so the run crosses one epoch boundary), and prints one JSON line:
//! `rank`, `world_size`, `per_rank_batch_size`, `partitions` (null when not given), `steps`,
//! `samples` (delivered to this rank), `seconds` (from `TrainStream::start` to the last batch),
//! `time_to_first_batch_s`, `median_batch_wait_s`, `max_batch_wait_s`,
//! `longest_epoch_boundary_wait_s`, `cpu_seconds` (user + system of the whole process, getrusage),
//! `images_per_sec`, `boundary_step`, `data_stats` (the stream's counters: shard bytes from the
//! store, the shard cache's hits and bytes from disk with `--set cache_dir=...`) and, with
//! `--waits`, `waits_s`.
//!
//! A batch's wait is the time `next_batch` took (nothing else happens between batches). The
//! epoch boundary is found in the batches themselves: the first step whose batch holds a sample
//! key this rank already delivered starts the rank's second epoch (every design delivers each
//! of its samples once per epoch), and `longest_epoch_boundary_wait_s` is the longest wait of
//! that step and the steps just before and after it (0 when the run never reaches a second
//! epoch). `boundary_step` says which step it was.
//!
//! Settings: image size 56, augmentation on (RandomResizedCrop scale 0.35..1 + flip, as
//! configs/tiny-imagenet.toml), `decode_threads = 1` (one core per rank), every manifest class
//! labelled. The `[data]` table is built as TOML and deserialised like a run config; `partitions`
//! is put in only when `--partitions` is given. Bytes are not counted here: bench/partitions.sh
//! puts a counting proxy in front of each rank.
//!
//! `RUST_LOG=devise::data=debug` logs the start-up's stages to stderr (each shard's GET,
//! response headers, first sample and end; the first batch ready); the JSON line stays alone on
//! stdout.
//!
//! Run by bench/partitions.sh (which starts the S3 server and the proxies); by hand:
//! `cargo run --release --example plan_bench -- s3://bucket/shards --rank 0 --world-size 2`.
use anyhow::{Context, Result};
use clap::Parser;
use devise::data::shards::read_manifest;
use devise::data::{Config, Cursor, TrainStream};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Shard directory URL (holding manifest.json).
    url: String,
    #[arg(long, default_value_t = 0)]
    rank: usize,
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Samples per rank per step; default 256 / world size (global batch 256).
    #[arg(long)]
    per_rank_batch_size: Option<usize>,
    /// Epochs of global batches to stream (rounded up to whole steps).
    #[arg(long, default_value_t = 1.25)]
    epochs_fraction: f64,
    /// `data.partitions`; left out of the config when not given.
    #[arg(long)]
    partitions: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also print every batch's wait (`waits_s`, seconds, in step order).
    #[arg(long)]
    waits: bool,
    /// Further `[data]` keys, `KEY=VALUE` (VALUE parsed as TOML), e.g. `--set shard_readahead=8`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let w = args.world_size;
    let per_rank = args.per_rank_batch_size.unwrap_or(256 / w);
    let global = (per_rank * w) as u64;

    let mut table = toml::Table::new();
    table.insert("shards".into(), args.url.clone().into());
    table.insert("image_size".into(), 56.into());
    table.insert("augment".into(), true.into());
    table.insert("min_crop_scale".into(), 0.35.into());
    table.insert("decode_threads".into(), 1.into());
    if let Some(p) = args.partitions {
        table.insert("partitions".into(), (p as i64).into());
    }
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        let v: toml::Value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .with_context(|| format!("--set {kv:?}: the value is not TOML"))?["v"]
            .clone();
        table.insert(k.to_string(), v);
    }
    let cfg: Config = toml::Value::Table(table)
        .try_into()
        .context("building the [data] config")?;
    cfg.validate()?;

    let manifest = read_manifest(&args.url)?;
    let epoch = manifest.split(&cfg.train_split)?.samples;
    let steps = (args.epochs_fraction * epoch as f64 / global as f64).ceil() as u64;
    let label_map = (0..manifest.classes.len() as i64).map(Some).collect();

    tracing::debug!("plan_bench: starting the training stream");
    let t0 = Instant::now();
    let mut stream = TrainStream::start(
        &cfg,
        &manifest,
        label_map,
        per_rank,
        args.seed,
        Cursor::default(),
        args.rank,
        w,
    )?;
    let (mut waits, mut samples) = (Vec::new(), 0u64);
    let (mut seen, mut boundary_step) = (std::collections::HashSet::new(), None);
    for step in 0..steps {
        let t = Instant::now();
        let (batch, _cursor) = stream.next_batch()?;
        let wait = t.elapsed().as_secs_f64();
        if step == 0 {
            tracing::debug!("plan_bench: first batch received");
        }
        samples += batch.n as u64;
        waits.push(wait);
        for key in batch.keys {
            if !seen.insert(key) && boundary_step.is_none() {
                boundary_step = Some(step as usize);
            }
        }
    }
    let boundary_wait = boundary_step.map_or(0.0, |b| {
        waits[b.saturating_sub(1)..(b + 2).min(waits.len())]
            .iter()
            .copied()
            .fold(0f64, f64::max)
    });
    let seconds = t0.elapsed().as_secs_f64();
    let all_waits = args.waits.then(|| waits.clone());
    let first = waits.first().copied().unwrap_or(f64::NAN);
    let max = waits.iter().copied().fold(0f64, f64::max);
    waits.sort_by(f64::total_cmp);
    let median = waits.get(waits.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({
            "rank": args.rank,
            "world_size": w,
            "per_rank_batch_size": per_rank,
            "partitions": args.partitions,
            "steps": steps,
            "samples": samples,
            "seconds": seconds,
            "time_to_first_batch_s": first,
            "median_batch_wait_s": median,
            "max_batch_wait_s": max,
            "longest_epoch_boundary_wait_s": boundary_wait,
            "boundary_step": boundary_step,
            "waits_s": all_waits,
            "cpu_seconds": cpu_seconds(),
            "images_per_sec": samples as f64 / seconds,
            // The stream's counters (with `--set cache_dir=...`, the shard cache's in `cache`).
            "data_stats": stream.stats(),
        })
    );
    Ok(())
}

/// User + system CPU seconds of this process (all threads), getrusage(RUSAGE_SELF).
fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_SELF)");
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}
