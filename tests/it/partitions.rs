//! Scope: the partitioned training stream over object storage, measured on the wire. The
//! synthetic shapes (`common::synthetic`) are built into the local S3 server (`common::s3`) in
//! about 160 small train shards, and 4 ranks (`devise-launch --nproc-per-node 4`) train 3 epochs
//! of the softmax stage from them with `[data] partitions = 4` (P = 4: each virtual partition
//! owns whole shards, rank r streams the partitions p with p % 4 == r), reading through a
//! counting proxy (`common::proxy`) that attributes every response byte to the rank named in the
//! request's User-Agent (`devise/<version> rank/<R>`). Checked:
//! - the train shards' GET bytes per epoch, all ranks together, are at most 1.05 x the split's
//!   bytes (the manifest's shard sizes): each shard is downloaded by one rank, not by every
//!   rank; the 5% cover what the ranks read ahead when the run stops at the end of epoch 2;
//! - each rank's share of those bytes is within 10% of 1/4;
//! - the batches of epoch 1 are not those of epoch 0 (the sample trace's `keys`: the samples that
//!   share a global batch change from one epoch to the next).
//!
//! Resuming a 2-rank checkpoint of such a run on 1 and on 4 ranks is in `resume.rs`.
use crate::common::launch::{launcher, run_dir, run_launcher, text, write_config};
use crate::common::proxy::CountingProxy;
use crate::common::s3::{build_small_shards, s3_env, start_server};
use crate::common::synthetic::shapes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Ranks and virtual partitions of the run.
const RANKS: u64 = 4;
const PARTITIONS: u64 = 4;
/// 1500 seen training images / 20 per step: 75 steps per epoch, the run ends on an epoch's end
/// (3 epochs: what the ranks read ahead when it stops is spread over 3).
pub(crate) const GLOBAL_BATCH: u64 = 20;
pub(crate) const EPOCHS: u64 = 3;

/// `write_config`'s run `name` (GroupNorm, sample trace, `PARTITIONS` partitions) reading
/// `shards`: `EPOCHS` epochs of the softmax stage and nothing else, `GLOBAL_BATCH` images per
/// step.
pub(crate) fn partitioned_config(dir: &Path, name: &str, shards: &str) -> std::path::PathBuf {
    let config = write_config(dir, name, EPOCHS as f64, "");
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            &format!("shards = \"{}\"", shapes().shards.display()),
            &format!("shards = \"{shards}\""),
        )
        .replace(
            "global_batch_size = 16",
            &format!("global_batch_size = {GLOBAL_BATCH}"),
        )
        .replace("devise = { epochs = 0.032,", "devise = { epochs = 0,")
        .replace("finetune = { epochs = 0.032,", "finetune = { epochs = 0,")
        .replace("every_steps = 2\n", "every_steps = 50\n")
        .replace(
            "check_params_every_steps = 1",
            "check_params_every_steps = 25",
        );
    for want in [
        format!("shards = \"{shards}\""),
        format!("partitions = {PARTITIONS}"),
        format!("global_batch_size = {GLOBAL_BATCH}"),
        "devise = { epochs = 0,".into(),
        "finetune = { epochs = 0,".into(),
    ] {
        assert!(toml.contains(&want), "the override {want:?} applied");
    }
    std::fs::write(&config, toml).unwrap();
    config
}

/// `devise-launch --nproc-per-node ranks` on `port` training `config`, reading the S3 server
/// through `proxy`.
pub(crate) fn launch_through(
    proxy: &CountingProxy,
    ranks: u64,
    config: &Path,
    port: &str,
) -> Command {
    let mut cmd = s3_env(Command::new(launcher()), proxy.port);
    cmd.args(["--nproc-per-node", &ranks.to_string()])
        .args(["--master-port", port, "--stop-timeout-secs", "10"])
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_devise"))
        .args(["train", "--config", config.to_str().unwrap()]);
    cmd
}

/// Step -> the sample keys of all `ranks` together (the trace's `keys`; the last line per rank
/// and step wins), or an error when the trace carries no keys.
pub(crate) fn keys_per_step(
    run: &Path,
    ranks: u64,
) -> Result<BTreeMap<u64, BTreeSet<String>>, String> {
    let mut all: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for r in 0..ranks {
        let path = run.join(format!("trace/rank-{r}.jsonl"));
        let mut steps: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let Some(keys) = v.get("keys").and_then(|k| k.as_array()) else {
                return Err(format!(
                    "{}: a trace line without a \"keys\" array: {line}",
                    path.display()
                ));
            };
            let keys = keys
                .iter()
                .map(|k| k.as_str().unwrap().to_string())
                .collect();
            steps.insert(v["step"].as_u64().unwrap(), keys);
        }
        for (step, keys) in steps {
            let entry = all.entry(step).or_default();
            for key in keys {
                assert!(entry.insert(key.clone()), "step {step}: {key} used twice");
            }
        }
    }
    Ok(all)
}

#[test]
fn four_ranks_in_four_partitions_download_each_train_shard_once_per_epoch() {
    let Some(server) = start_server("devise") else {
        return;
    };
    let manifest = build_small_shards(&server, "shards", 160);
    let train = &manifest.splits["train"];
    assert!(
        train.shards.len() as u64 >= 20 * PARTITIONS,
        "{} train shards: at least 20 per partition",
        train.shards.len()
    );
    let split_bytes: u64 = train.shards.iter().map(|s| s.bytes).sum();
    let train_objects: BTreeSet<String> = train
        .shards
        .iter()
        .map(|s| format!("/devise/shards/{}", s.name))
        .collect();

    let proxy = CountingProxy::start(server.port);
    let dir = tempfile::tempdir().unwrap();
    let config = partitioned_config(dir.path(), "partitioned", "s3://devise/shards");
    let out = run_launcher(|port| launch_through(&proxy, RANKS, &config, port));
    let log = text(&out);
    assert!(out.status.success(), "{log}");

    // Bytes of the train shards' GET answers, per rank (from the User-Agent).
    let mut per_rank: BTreeMap<Option<u64>, (u64, u64)> = BTreeMap::new();
    for ((rank, method, path), (requests, bytes)) in proxy.counts() {
        if method == "GET" && train_objects.contains(&path) {
            let entry = per_rank.entry(rank).or_default();
            entry.0 += requests;
            entry.1 += bytes;
        }
    }
    let total: u64 = per_rank.values().map(|(_, b)| b).sum();
    let per_epoch = total as f64 / EPOCHS as f64;
    eprintln!(
        "train split: {} shards, {split_bytes} bytes; GETs of train shards in {EPOCHS} epochs: \
         {total} bytes = {:.3} x the split per epoch; per rank (GETs, bytes): {per_rank:?}",
        train.shards.len(),
        per_epoch / split_bytes as f64,
    );
    assert!(
        !per_rank.contains_key(&None),
        "every train shard GET names its rank in the User-Agent: {per_rank:?}"
    );
    assert!(total > 0, "the train shards were read through the proxy");

    // Every check below is gathered, so that one run names all that is wrong.
    let mut failures = Vec::new();
    if per_epoch > 1.05 * split_bytes as f64 {
        failures.push(format!(
            "the ranks together downloaded {per_epoch:.0} bytes of train shards per epoch, {:.3} x \
             the split's {split_bytes} (at most 1.05 x)",
            per_epoch / split_bytes as f64
        ));
    }
    for r in 0..RANKS {
        let bytes = per_rank.get(&Some(r)).map_or(0, |(_, b)| *b);
        let share = bytes as f64 / total as f64;
        let want = 1.0 / RANKS as f64;
        if (share - want).abs() > 0.1 * want {
            failures.push(format!(
                "rank {r} downloaded {share:.3} of the train shard bytes ({bytes}), not {want} +- 10%"
            ));
        }
    }

    // The trace: which samples shared a global batch.
    match keys_per_step(&run_dir(&config), RANKS) {
        Err(e) => failures.push(e),
        Ok(steps) => {
            let steps_per_epoch = 1500 / GLOBAL_BATCH;
            assert_eq!(
                steps.keys().copied().collect::<Vec<_>>(),
                (1..=EPOCHS * steps_per_epoch).collect::<Vec<_>>(),
                "every step traced"
            );
            for keys in steps.values() {
                assert_eq!(keys.len() as u64, GLOBAL_BATCH, "a full global batch");
            }
            failures.extend(composition_changes(&steps, steps_per_epoch as usize / 2).err());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Whether the samples that share a global batch change from epoch 0 to epoch 1 (at most 10% of
/// epoch 1's batches are batches of epoch 0), with at least `min` batches wholly inside each
/// epoch. A sample's first use is in epoch 0, its second in epoch 1; a step belongs to epoch e
/// when all its samples are at their e-th use.
fn composition_changes(steps: &BTreeMap<u64, BTreeSet<String>>, min: usize) -> Result<(), String> {
    let mut uses: BTreeMap<&String, usize> = BTreeMap::new();
    let mut batches: [BTreeSet<Vec<&String>>; 2] = Default::default();
    for keys in steps.values() {
        let epochs: BTreeSet<usize> = keys
            .iter()
            .map(|k| {
                let n = uses.entry(k).or_default();
                *n += 1;
                *n - 1
            })
            .collect();
        if let [e] = epochs.into_iter().collect::<Vec<_>>()[..] {
            if e < 2 {
                batches[e].insert(keys.iter().collect());
            }
        }
    }
    let [first, second] = &batches;
    eprintln!(
        "global batches wholly in epoch 0: {}, in epoch 1: {}",
        first.len(),
        second.len()
    );
    if first.len() < min || second.len() < min {
        return Err(format!(
            "only {} and {} global batches lie wholly in epoch 0 and 1 (want {min} each)",
            first.len(),
            second.len()
        ));
    }
    let again = second.intersection(first).count();
    if again * 10 > second.len() {
        return Err(format!(
            "{again} of epoch 1's {} global batches hold the same samples as one of epoch 0 \
             (the composition must change between epochs)",
            second.len()
        ));
    }
    Ok(())
}

/// The check above on made-up traces: batches re-used in another order fail it, batches
/// re-drawn pass it, and so does a batch straddling the epochs.
#[test]
fn the_composition_check_tells_reshuffled_batches_from_reordered_ones() {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let samples: Vec<String> = (0..100).map(|i| format!("s{i:03}")).collect();
    let batches_of = |order: &[String]| -> Vec<BTreeSet<String>> {
        order
            .chunks(10)
            .map(|c| c.iter().cloned().collect())
            .collect()
    };
    let steps = |epochs: Vec<Vec<BTreeSet<String>>>| -> BTreeMap<u64, BTreeSet<String>> {
        (1..).zip(epochs.into_iter().flatten()).collect()
    };
    let mut order = samples.clone();
    order.shuffle(&mut rng);
    let epoch0 = batches_of(&order);
    // Same batches, other order.
    let mut reordered = epoch0.clone();
    reordered.shuffle(&mut rng);
    let e = composition_changes(&steps(vec![epoch0.clone(), reordered]), 5).unwrap_err();
    assert!(e.contains("10 of epoch 1's 10"), "{e}");
    // Re-drawn.
    let mut again = samples.clone();
    again.shuffle(&mut rng);
    composition_changes(&steps(vec![epoch0.clone(), batches_of(&again)]), 5).unwrap();
    // 15-sample batches, one straddling the epochs: the others still count.
    let both: Vec<String> = order.iter().chain(&again).cloned().collect();
    let straddling = both
        .chunks(15)
        .map(|c| c.iter().cloned().collect())
        .collect::<Vec<_>>();
    composition_changes(&steps(vec![straddling]), 5).unwrap();
    // Too few whole batches to tell.
    let e = composition_changes(&steps(vec![epoch0]), 5).unwrap_err();
    assert!(e.contains("10 and 0"), "{e}");
}
