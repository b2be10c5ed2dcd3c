//! Scope: the node-local shard cache (`data.cache_dir`) in runs of 2 ranks through
//! `devise-launch` (one node) reading the synthetic shapes from the local S3 server (about 60
//! small train shards) through the counting proxy (`common::proxy`), 3 epochs of the softmax
//! stage with 4 partitions (`partitions::partitioned_config`). Checked:
//! - with a cache and no limit, every train shard is downloaded exactly once in the whole run
//!   (epoch 1 fetches each shard once, epochs 2 and 3 fetch 0 bytes from the store), every file
//!   the cache holds is a shard of the manifest with its sha256, and the run trains on the same
//!   global batches as without a cache (the sample trace);
//! - a limit of half the split's bytes evicts (the metrics' `data/cache/evictions`), stays under
//!   the limit, and still trains the same batches;
//! - a limit below one shard is an error at start naming the key and the shard;
//! - SIGKILL of every process of a run, 10 times at varied moments while shards are being
//!   written to the cache (a `.part` file exists), never leaves a cached file that does not
//!   match its sha256, and the next run on the same cache completes without cleanup, with the
//!   same batches.
use crate::common::launch::{processes_of, run_dir, run_launcher, text};
use crate::common::proxy::CountingProxy;
use crate::common::s3::{build_small_shards, start_server, S3Server};
use crate::partitions::{keys_per_step, launch_through, partitioned_config};
use devise::data::shards::Manifest;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

const RANKS: u64 = 2;

/// The partitioned run `name` with `[data] cache_dir = cache` (and `cache_limit_bytes`).
fn config(dir: &Path, name: &str, cache: Option<(&Path, Option<u64>)>) -> PathBuf {
    let config = partitioned_config(dir, name, "s3://devise/shards");
    if let Some((cache, limit)) = cache {
        let mut keys = format!("[data]\ncache_dir = \"{}\"\n", cache.display());
        if let Some(limit) = limit {
            keys += &format!("cache_limit_bytes = {limit}\n");
        }
        let toml = std::fs::read_to_string(&config).unwrap();
        assert!(toml.contains("[data]\n"));
        std::fs::write(&config, toml.replacen("[data]\n", &keys, 1)).unwrap();
    }
    config
}

fn run(proxy: &CountingProxy, config: &Path) -> Output {
    run_launcher(|port| launch_through(proxy, RANKS, config, port))
}

/// GET requests per train shard object so far.
fn train_gets(proxy: &CountingProxy, manifest: &Manifest) -> BTreeMap<String, u64> {
    let names: BTreeSet<String> = manifest.splits["train"]
        .shards
        .iter()
        .map(|s| format!("/devise/shards/{}", s.name))
        .collect();
    let mut out = BTreeMap::new();
    for ((_, method, path), (requests, _)) in proxy.counts() {
        if method == "GET" && names.contains(&path) {
            *out.entry(path).or_default() += requests;
        }
    }
    out
}

/// Every cached shard file under `cache`: (path, size); panics on one whose bytes do not
/// hash to its name or that is not a shard of `manifest`.
fn verified_cache_files(cache: &Path, manifest: &Manifest) -> Vec<(PathBuf, u64)> {
    let known: BTreeMap<String, u64> = manifest
        .splits
        .values()
        .flat_map(|s| &s.shards)
        .map(|s| (s.sha256.to_ascii_lowercase(), s.bytes))
        .collect();
    let mut out = Vec::new();
    for build in std::fs::read_dir(cache).unwrap().flatten() {
        if !build.path().is_dir() {
            continue;
        }
        for file in std::fs::read_dir(build.path()).unwrap().flatten() {
            let path = file.path();
            if path.extension().and_then(|e| e.to_str()) != Some("tar") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let sha = hex::encode(Sha256::digest(&bytes));
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            assert_eq!(
                sha,
                stem,
                "{}: a cached file whose bytes do not match its name",
                path.display()
            );
            assert_eq!(
                known.get(&sha),
                Some(&(bytes.len() as u64)),
                "{}: not a shard of the manifest",
                path.display()
            );
            out.push((path, bytes.len() as u64));
        }
    }
    out
}

/// The sum of metric `key` over every rank's metrics lines.
fn metric_sum(run: &Path, key: &str) -> f64 {
    let mut sum = 0.0;
    for entry in walkdir::WalkDir::new(run).into_iter().flatten() {
        if entry.file_name() != "metrics.jsonl" {
            continue;
        }
        for line in std::fs::read_to_string(entry.path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            sum += v.get(key).and_then(|x| x.as_f64()).unwrap_or(0.0);
        }
    }
    sum
}

struct Setup {
    server: S3Server,
    manifest: Manifest,
    split_bytes: u64,
    /// Step -> sample keys of the run without a cache.
    baseline: BTreeMap<u64, BTreeSet<String>>,
}

fn setup(dir: &Path) -> Option<Setup> {
    let server = start_server("devise")?;
    let manifest = build_small_shards(&server, "shards", 60);
    let split_bytes = manifest.splits["train"]
        .shards
        .iter()
        .map(|s| s.bytes)
        .sum();
    let proxy = CountingProxy::start(server.port);
    let plain = config(dir, "plain", None);
    let out = run(&proxy, &plain);
    assert!(out.status.success(), "{}", text(&out));
    let baseline = keys_per_step(&run_dir(&plain), RANKS).unwrap();
    let gets = train_gets(&proxy, &manifest);
    assert!(
        gets.values().any(|&n| n > 1),
        "without a cache, shards are downloaded again every epoch: {gets:?}"
    );
    Some(Setup {
        server,
        manifest,
        split_bytes,
        baseline,
    })
}

#[test]
fn a_node_cache_downloads_each_shard_once_evicts_under_its_limit_and_keeps_the_batches() {
    let dir = tempfile::tempdir().unwrap();
    let Some(s) = setup(dir.path()) else {
        return;
    };
    let proxy = CountingProxy::start(s.server.port);
    let shards = s.manifest.splits["train"].shards.len();

    // No limit: each train shard downloaded once in 3 epochs.
    let cache = dir.path().join("cache-full");
    let full = config(dir.path(), "full", Some((&cache, None)));
    let out = run(&proxy, &full);
    assert!(out.status.success(), "{}", text(&out));
    let gets = train_gets(&proxy, &s.manifest);
    assert_eq!(
        gets.len(),
        shards,
        "every train shard was downloaded: {gets:?}"
    );
    assert!(
        gets.values().all(|&n| n == 1),
        "each train shard downloaded exactly once in {} epochs (epochs 2 and 3 from the cache): {gets:?}",
        crate::partitions::EPOCHS
    );
    let cached = verified_cache_files(&cache, &s.manifest);
    assert!(cached.len() >= shards, "{} files cached", cached.len());
    assert_eq!(
        keys_per_step(&run_dir(&full), RANKS).unwrap(),
        s.baseline,
        "the same global batches with a cache as without"
    );
    let hits = metric_sum(&run_dir(&full), "data/cache/hits");
    let disk_mb = metric_sum(&run_dir(&full), "data/cache/disk_mb");
    assert!(
        hits >= shards as f64 / 2.0 && disk_mb > 0.0,
        "rank 0's metrics count its hits of epochs 2 and 3: {hits} hits, {disk_mb} MB from disk"
    );

    // Half the split: evictions, never above the limit, the same batches.
    let limit = s.split_bytes / 2;
    let cache = dir.path().join("cache-half");
    let half = config(dir.path(), "half", Some((&cache, Some(limit))));
    let out = run(&proxy, &half);
    assert!(out.status.success(), "{}", text(&out));
    let held: u64 = verified_cache_files(&cache, &s.manifest)
        .iter()
        .map(|(_, b)| b)
        .sum();
    assert!(held <= limit, "{held} bytes cached, limit {limit}");
    let evictions = metric_sum(&run_dir(&half), "data/cache/evictions");
    assert!(evictions > 0.0, "a half-split limit evicts");
    assert_eq!(
        keys_per_step(&run_dir(&half), RANKS).unwrap(),
        s.baseline,
        "the same global batches with a half-split cache"
    );

    // Below one shard: the start-up error.
    let largest = s.manifest.splits["train"]
        .shards
        .iter()
        .map(|s| s.bytes)
        .max()
        .unwrap();
    let tiny = config(
        dir.path(),
        "tiny",
        Some((&dir.path().join("cache-tiny"), Some(largest - 1))),
    );
    let out = run(&proxy, &tiny);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "data.cache_limit_bytes = {} is smaller than shard",
            largest - 1
        )) && log.contains(&format!("({largest} bytes)")),
        "{log}"
    );
}

/// Starts the run `config` and returns once a shard is being written to `cache` (a `.part`
/// exists), or after 30 s.
fn start_until_a_cache_write(proxy: &CountingProxy, config: &Path, cache: &Path) -> (Child, bool) {
    let port = crate::common::ports::reserve().release();
    let child = launch_through(proxy, RANKS, config, &port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let writing = walkdir::WalkDir::new(cache)
            .into_iter()
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "part"));
        if writing {
            return (child, true);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    (child, false)
}

#[test]
fn sigkill_during_cache_writes_never_leaves_a_bad_shard_and_the_next_run_needs_no_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let Some(s) = setup(dir.path()) else {
        return;
    };
    let proxy = CountingProxy::start(s.server.port);
    let cache = dir.path().join("cache");
    let killed = config(dir.path(), "killed", Some((&cache, None)));
    let mut interrupted = 0;
    for i in 0..10u64 {
        let (mut child, writing) = start_until_a_cache_write(&proxy, &killed, &cache);
        // Varied moments: 0 to 540 ms after the run began writing to the cache (later, the cache
        // would be full after a few kills, and nothing would be written any more).
        std::thread::sleep(Duration::from_millis(60 * i));
        for pid in processes_of(&killed) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = child.kill();
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !processes_of(&killed).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the killed run's processes are gone"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let parts = walkdir::WalkDir::new(&cache)
            .into_iter()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
            .count();
        if writing && parts > 0 {
            interrupted += 1;
        }
        let cached = verified_cache_files(&cache, &s.manifest).len();
        eprintln!("kill {i}: writing {writing}, {parts} parts left, {cached} shards cached");
    }
    assert!(
        interrupted >= 5,
        "at least half of the kills interrupted a cache write ({interrupted} did)"
    );

    // The next run on the same cache: no cleanup, the same batches, nothing bad read back.
    let after = config(dir.path(), "after", Some((&cache, None)));
    let out = run(&proxy, &after);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("does not match"), "{log}");
    assert_eq!(
        keys_per_step(&run_dir(&after), RANKS).unwrap(),
        s.baseline,
        "the same global batches after the kills"
    );
    let cached = verified_cache_files(&cache, &s.manifest);
    assert!(
        cached.len() >= s.manifest.splits["train"].shards.len(),
        "{} shards cached after a whole run",
        cached.len()
    );
    assert!(
        walkdir::WalkDir::new(&cache)
            .into_iter()
            .flatten()
            .all(|e| e.path().extension().is_none_or(|x| x != "part")),
        "no part file left after a completed run"
    );
}
