//! Shard streaming throughput: reads every shard of one split of a shard directory (any URL the
//! trainer accepts: path, s3://, gs://, ...) through the same path the trainer uses
//! (`Store::open_read` -> `webdataset::SampleReader`), one shard after another, and prints one
//! JSON line: bytes, samples, seconds, MB/s, samples/s. `--whole` instead fetches each shard
//! as one buffer (`Store::get`) and parses it afterwards, the pre-streaming reader's way.
//!
//! Run by bench/stream.sh (which starts the local S3 server); by hand:
//! `cargo run --release --example stream_bench -- s3://bucket/shards train [--whole]`.
use anyhow::{Context, Result};
use devise::data::shards::read_manifest;
use devise::data::webdataset::SampleReader;
use devise::storage::Store;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args
        .first()
        .context("usage: stream_bench URL SPLIT [--whole]")?;
    let split = args.get(1).map(String::as_str).unwrap_or("train");
    let whole = args.iter().any(|a| a == "--whole");
    let manifest = read_manifest(url)?;
    let store = Store::open_existing(url)?;
    let (mut bytes, mut samples) = (0u64, 0u64);
    let t = Instant::now();
    for shard in &manifest.split(split)?.shards {
        let url = store.child_url(&shard.name);
        let reader: Box<dyn std::io::Read + Send> = if whole {
            Box::new(std::io::Cursor::new(store.get(&shard.name)?))
        } else {
            store.open_read(&shard.name)?
        };
        for sample in SampleReader::new(reader, &url) {
            let sample = sample.with_context(|| url.clone())?;
            samples += 1;
            bytes += sample.fields.values().map(|v| v.len() as u64).sum::<u64>();
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let tar_bytes: u64 = manifest.split(split)?.shards.iter().map(|s| s.bytes).sum();
    println!(
        "{}",
        serde_json::json!({
            "mode": if whole { "whole" } else { "stream" },
            "url": url,
            "tar_bytes": tar_bytes,
            "payload_bytes": bytes,
            "samples": samples,
            "seconds": secs,
            "mb_per_sec": tar_bytes as f64 / 1e6 / secs,
            "samples_per_sec": samples as f64 / secs,
        })
    );
    Ok(())
}
