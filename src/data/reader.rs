//! Shards -> batches: the deterministic, resumable training stream and the one-pass eval reader.
//!
//! # The training stream and its cursor (state that crosses time: read this before changing it)
//!
//! The stream is endless: the training split's samples, epoch after epoch, in a **global
//! order** that every world size shares. Only samples of a class the label map keeps count:
//! the manifest's per-shard class counts say how many samples of each shard are trained on
//! (its **units**), before any shard is read.
//!
//! ## Partitions
//!
//! `P` virtual partitions (`data.partitions`, see [`super::partition::choose_partitions`]; fixed
//! when the run starts, saved in every cursor) each own whole shards, assigned once per run,
//! balanced by units ([`super::partition::Layout`]); shards without a unit are left out (never
//! downloaded). Rank `r` of `W` (`W` must divide `P`) streams only the partitions `p` with
//! `p % W == r`, so every shard is downloaded once per epoch by the whole job, and a rank's
//! bytes are within about one shard per partition of `1/W` of the split's.
//!
//! Every partition contributes the same `U` units to each epoch: the smallest partition's
//! count. In epoch `e`, partition `p` visits its shards in an order drawn by ChaCha8 from
//! `mix(seed, SHARDS, p, e)` until it has `U` units (a larger partition's last visit takes part
//! of a shard and skips the rest, which is not downloaded (with a shard cache it is, into the
//! cache: [`super::cache`]): its **leftover**, different samples
//! every epoch; the total
//! is logged at start, and the default `P` keeps it under 2 % where it can); each shard through
//! a shuffle buffer seeded from `mix(seed, SAMPLES, e, shard)` that starts small and grows by one
//! sample per output up to `data.shuffle_buffer` (so no partition reads a whole buffer before its
//! first sample). Its `q`-th unit (counting across epochs) is unit `q mod U` of epoch `q / U`.
//!
//! ## The global order
//!
//! Global position `i` is unit `i / P` of partition `i % P`: the partitions interleave one
//! sample each, so any `P` consecutive positions come from `P` different shards, and which
//! samples share a batch changes every epoch (each partition draws a new shard order and new
//! buffer orders). An epoch is `P * U` positions: every sample at most once, every partition
//! crossing into the next epoch within the same `P` positions. Batches run straight across
//! epoch boundaries; nothing is padded.
//!
//! A **global batch** is `per_rank_batch_size * W` consecutive positions; rank `r` takes its
//! positions `i % W == r` of it (exactly `per_rank_batch_size`), so step `s` trains on the same
//! global batch on every `W` that divides `P`, every rank takes the same number of steps, and no
//! rank waits on another for data (field case B27).
//!
//! A [`Cursor`] `{partitions, position}` says "`position` positions of the global order have been
//! consumed". From it, each partition's next unit follows by arithmetic, and a partition resumes
//! by opening the shard that unit is in and walking its shuffle buffer to the unit without
//! decoding: whole shards before it are never downloaded. A cursor therefore resumes the stream
//! exactly, on any world size that divides `P`: same samples, same order, same augmentation
//! (each sample's crop/flip comes from ChaCha8 seeded by `mix(seed, AUGMENT, position)`,
//! independent of ranks and threads).
//!
//! ## Bad samples
//!
//! A sample whose image fails to decode is skipped (warned with shard + key, counted in
//! [`DataStats::decode_errors`]), and so is a **hole**: a unit a shard did not deliver because it
//! ended early (truncated or malformed; counted in [`DataStats::lost_to_shard_errors`]). The rank
//! tops its batch up from the positions after the global batch that it would own, read ahead
//! without consuming them (only the rank that owns a bad sample knows it is bad, so the cursor
//! cannot depend on it): such a top-up sample is trained on twice, once as a top-up and once in
//! the next batch. Batches are always full, and resume stays exact on every rank. Samples
//! without `.cls` or image, or with a `.cls` that is not a class index, are skipped where they
//! are read (counted by reason); they are not units.
//!
//! Shard-level problems (truncation, malformed grouping: see [`crate::data::webdataset`]; sha256
//! or size different from the manifest) are warned with the shard URL and counted once per visit
//! in [`DataStats::shard_errors`]; the samples read before the problem are used. A visit that
//! takes part of a shard (the leftover above) does not read its end, so its checksum is checked
//! only in the epochs that read it whole. Shards are
//! streamed, so a sha256 mismatch is known only at the end of the shard, after its samples were
//! used (`devise data verify` checks a shard directory beforehand). An I/O error reading a shard
//! that `object_store`'s retries (which resume a cut download at its byte offset) could not cure
//! is NOT skipped: it ends the stream with an error naming the shard. With `data.strict = true`
//! every skipped sample and every shard problem is an error instead.
//!
//! # Threads and memory
//!
//! A background thread walks the rank's positions and assembles batches into a bounded channel
//! (`prefetch_batches` deep); decoding + augmentation run on a rayon pool of `decode_threads`,
//! order preserved. Each open shard is streamed by its own thread ([`crate::data::feed`]) into a
//! channel of `shard_readahead` samples; each of the rank's `P / W` partitions streams its
//! current shard and, once half of that shard's visit was delivered, the next `prefetch_shards`
//! ones (so at the start of a run, and of a resume, the first shards have the bandwidth to
//! themselves; later shards start downloading half a shard before they are needed). Encoded bytes held by the reader are
//! therefore bounded by about `P / W * (shuffle_buffer + (1 + prefetch_shards) *
//! shard_readahead) + 2 * per_rank_batch_size` samples, never whole shards, and are reported as
//! [`DataStats::buffered_bytes`] / [`DataStats::peak_buffered_bytes`]; the shard bytes the rank
//! downloaded as [`DataStats::shard_bytes`]. Errors and panics in any of these threads come out
//! of [`TrainStream::next_batch`] as errors; dropping the stream stops and joins the loader
//! thread (shard threads stop at their next sample).
//!
//! Evaluation ([`eval_batches`]) is one pass over a split in manifest order; every rank reads
//! every shard of it and keeps its share.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::cache::{CacheCounts, ShardCache};
use super::feed::{Entry, Memory, SampleData, ShardFeed};
use super::image::{decode_eval, decode_train};
use super::partition::{self, Layout, RankWalker, Unit};
use super::shards::{mix, Manifest, ShardInfo};
use super::Config;
use crate::storage::Store;

/// Seed domain tag of the augmentation (never change: saved cursors depend on it).
const TAG_AUGMENT: u64 = 0x4155_474d_454e; // "AUGMEN"

/// A batch of decoded, transformed images for one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[n, 3, image_size, image_size]` row-major (CHW per image), normalised with the
    /// config's mean/std.
    pub images: Vec<f32>,
    /// `[n]` training labels (`label_map[manifest class]`).
    pub labels: Vec<i64>,
    /// `[n]` sample keys (unique within a split), for debugging and eval bookkeeping.
    pub keys: Vec<String>,
    /// `[n]` each sample's position: training, its global position in the stream (the same on
    /// every world size; see the module docs); evaluation, its index among the split's accepted
    /// samples (all ranks together, see [`eval_batches`]).
    pub positions: Vec<u64>,
    /// Images in the batch.
    pub n: usize,
    /// Side of each image, pixels.
    pub image_size: usize,
}

impl Batch {
    /// An empty batch with room for `n` images of `image_size` x `image_size`.
    pub fn with_capacity(n: usize, image_size: usize) -> Batch {
        Batch::with_images(
            Vec::with_capacity(n * 3 * image_size * image_size),
            n,
            image_size,
        )
    }

    /// A batch of no images yet, for up to `n`, whose image buffer is `images`: a buffer of
    /// `n` slots that [`read_and_decode`] fills and [`accept_decoded_in_place`] cuts to the
    /// images accepted.
    fn with_images(images: Vec<f32>, n: usize, image_size: usize) -> Batch {
        Batch {
            images,
            labels: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            n: 0,
            image_size,
        }
    }
}

/// Position in the training stream; save it with a checkpoint, pass it to
/// [`TrainStream::start`] to resume exactly (see the module docs for the global order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    /// Partitions of the training split, fixed when the run started; 0 before the stream chose
    /// them (a fresh run: `data.partitions`, or the default for the world size).
    pub partitions: usize,
    /// Positions of the global order consumed, all ranks together, since the run started.
    pub position: u64,
}

/// Counters of what a stream (this rank's view) has seen since it was started (they restart
/// from zero on resume: they are diagnostics, not part of the cursor). The `*_errors`,
/// `incomplete_samples`, `invalid_labels` and `lost_to_shard_errors` counters are the skipped
/// samples by reason (`data/skipped_samples/<reason>` in the metrics). Samples are counted where
/// they are read, which may be ahead of the batches handed out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataStats {
    /// Samples delivered in batches (top-ups included).
    pub samples: u64,
    /// Samples skipped because their image failed to decode (truncated, corrupt, too large...).
    pub decode_errors: u64,
    /// Visits of shards with a content problem (truncation, malformed grouping, sha256 or size
    /// different from the manifest): counted each time the stream finishes such a shard.
    pub shard_errors: u64,
    /// Samples to train on lost because their shard ended early (truncated or malformed).
    pub lost_to_shard_errors: u64,
    /// Samples skipped for a missing component (`.cls` or the image).
    pub incomplete_samples: u64,
    /// Samples skipped because the label map has `None` for their class (before decoding; not
    /// a data problem: e.g. zero-shot classes held out of training).
    pub filtered: u64,
    /// Samples skipped because their `.cls` is not a valid manifest class index.
    pub invalid_labels: u64,
    /// Bytes of encoded samples the reader held when this batch was handed out: channels of
    /// open shards, the shuffle buffers, look-ahead, samples being decoded.
    pub buffered_bytes: u64,
    /// The most `buffered_bytes` has been since the stream started.
    pub peak_buffered_bytes: u64,
    /// Shard bytes this stream has read from the store so far (prefetched shards included;
    /// not those read from the shard cache).
    pub shard_bytes: u64,
    /// The shard cache's counters of this stream so far (`data.cache_dir`; zeros without).
    pub cache: CacheCounts,
    /// Partitions this rank streams (`partitions / world_size`; 0 for evaluation).
    pub partitions: u64,
}

impl DataStats {
    /// Skipped samples by reason, as `(reason, count)`: `decode_error`, `incomplete`,
    /// `invalid_label`, `shard_error` (samples lost to a shard that ended early).
    pub fn skipped_by_reason(&self) -> [(&'static str, u64); 4] {
        [
            ("decode_error", self.decode_errors),
            ("incomplete", self.incomplete_samples),
            ("invalid_label", self.invalid_labels),
            ("shard_error", self.lost_to_shard_errors),
        ]
    }
}

/// A sample to train on (or evaluate), waiting to be decoded.
#[derive(Clone)]
pub(super) struct Candidate {
    pub(super) data: Arc<SampleData>,
    /// URL of its shard (messages).
    pub(super) shard: Arc<str>,
    pub(super) label: i64,
    /// Global position (training: the augmentation seed) or index among accepted (eval).
    pub(super) position: u64,
}

/// Immutable description of one stream, shared by its threads.
pub(super) struct Plan {
    pub(super) cfg: Config,
    store: Store,
    shards: Vec<ShardInfo>,
    n_classes: usize,
    label_map: Vec<Option<i64>>,
    pub(super) seed: u64,
    per_rank_batch_size: usize,
    pub(super) rank: usize,
    pub(super) world_size: usize,
    /// Samples of each shard (manifest index) that the label map keeps, from the manifest's
    /// per-shard class counts (training streams only; empty for evaluation).
    pub(super) units: Vec<u64>,
    memory: Arc<Memory>,
    /// The node-local shard cache (`data.cache_dir`).
    cache: Option<Arc<ShardCache>>,
}

impl Plan {
    pub(super) fn open_feed(&self, k: usize) -> ShardFeed {
        ShardFeed::open(
            &self.store,
            self.cache.as_ref(),
            &self.shards[k],
            k,
            self.n_classes,
            self.cfg.shard_readahead,
            &self.memory,
        )
    }

    /// The sample is one the stream trains on (or evaluates): complete, with a class the label
    /// map keeps.
    pub(super) fn accepts(&self, entry: &Entry) -> bool {
        matches!(entry, Entry::Ok(d) if self.label_map[d.class].is_some())
    }

    /// A sample of shard `shard` and its label when the label map keeps it; otherwise `None`,
    /// the skip counted in `stats` (and warned, or an error in strict mode, for a data problem).
    pub(super) fn classify(
        &self,
        entry: Entry,
        shard: &Arc<str>,
        stats: &mut DataStats,
    ) -> Result<Option<(Arc<SampleData>, i64)>> {
        let problem = match entry {
            Entry::Ok(data) => {
                return match self.label_map[data.class] {
                    Some(label) => Ok(Some((data, label))),
                    None => {
                        stats.filtered += 1;
                        Ok(None)
                    }
                };
            }
            Entry::Incomplete { key, missing } => {
                stats.incomplete_samples += 1;
                format!("sample {key} of {shard}: missing component {missing}")
            }
            Entry::InvalidLabel { key, cls } => {
                stats.invalid_labels += 1;
                format!(
                    "sample {key} of {shard}: cls {cls:?} is not a class index (the manifest has {})",
                    self.n_classes
                )
            }
        };
        if self.cfg.strict {
            bail!("{problem} (data.strict = true)");
        }
        tracing::warn!("{problem}: sample skipped");
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Decodes + transforms candidates in parallel; `Err` entries carry the decode error.
fn decode_all(
    pool: &rayon::ThreadPool,
    cfg: &Config,
    seed: u64,
    cands: &[Candidate],
    augment: bool,
) -> Vec<Result<Vec<f32>>> {
    pool.install(|| {
        cands
            .par_iter()
            .map(|c| decode_one(cfg, seed, c, augment))
            .collect()
    })
}

/// One candidate's pixels, `[3, image_size, image_size]` (training transform seeded by its
/// position when `augment`, else the eval transform).
fn decode_one(cfg: &Config, seed: u64, c: &Candidate, augment: bool) -> Result<Vec<f32>> {
    let s = cfg.image_size as usize;
    let mut out = vec![0f32; 3 * s * s];
    decode_into(cfg, seed, c, augment, &mut out)?;
    Ok(out)
}

/// [`decode_one`] into `out` (`3 * image_size^2` values).
fn decode_into(
    cfg: &Config,
    seed: u64,
    c: &Candidate,
    augment: bool,
    out: &mut [f32],
) -> Result<()> {
    if augment {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[seed, TAG_AUGMENT, c.position]));
        decode_train(&c.data.image, cfg, &mut rng, out)
    } else {
        decode_eval(&c.data.image, cfg, out)
    }
}

/// Candidates per decode task of [`read_and_decode`].
const DECODE_CHUNK: usize = 16;

/// The rank's next `b` units read from `walker`, their samples decoded on `pool` straight into
/// `images` (`b` slots of `3 * image_size^2` values; the `j`-th sample read goes to slot `j`):
/// each run of [`DECODE_CHUNK`] candidates is handed to the pool as soon as it is read, so
/// decoding overlaps the reading (which waits on the network when shards start, at the start
/// of a run and at shard boundaries). Once everything is handed out, the reading thread runs
/// `meanwhile` while the pool decodes.
fn read_and_decode(
    pool: &rayon::ThreadPool,
    plan: &Plan,
    walker: &mut RankWalker,
    images: &mut [f32],
    stats: &mut DataStats,
    meanwhile: impl FnOnce(),
) -> Result<ReadBatch> {
    let (cfg, seed, augment) = (&plan.cfg, plan.seed, plan.cfg.augment);
    let img = 3 * (cfg.image_size as usize).pow(2);
    let b = images.len() / img;
    let (tx, rx) = mpsc::channel();
    let mut holes = 0;
    pool.in_place_scope(|scope| -> Result<()> {
        let (mut chunk, mut rest, mut slot) = (Vec::with_capacity(DECODE_CHUNK), images, 0);
        for i in 0..b {
            match walker.next(stats)? {
                (_, Unit::Sample(c)) => chunk.push(c),
                (_, Unit::Hole) => holes += 1,
            }
            if chunk.len() == DECODE_CHUNK || (i + 1 == b && !chunk.is_empty()) {
                let cands = std::mem::replace(&mut chunk, Vec::with_capacity(DECODE_CHUNK));
                let out;
                (out, rest) = std::mem::take(&mut rest).split_at_mut(cands.len() * img);
                let (tx, first) = (tx.clone(), slot);
                slot += cands.len();
                scope.spawn(move |_| {
                    let decoded = cands
                        .iter()
                        .zip(out.chunks_exact_mut(img))
                        .map(|(c, out)| decode_into(cfg, seed, c, augment, out))
                        .collect::<Vec<_>>();
                    // The receiver outlives the scope.
                    let _ = tx.send((first, cands, decoded));
                });
            }
        }
        meanwhile();
        Ok(())
    })?;
    drop(tx);
    let mut parts: Vec<_> = rx.into_iter().collect();
    parts.sort_by_key(|part| part.0);
    let (mut cands, mut decoded) = (Vec::with_capacity(b), Vec::with_capacity(b));
    for (_, c, d) in parts {
        cands.extend(c);
        decoded.extend(d);
    }
    Ok(ReadBatch {
        cands,
        decoded,
        holes,
    })
}

/// What [`read_and_decode`] read: candidates in position order, whether each decoded (its
/// pixels in the slot of the same index) in the same order, and the number of holes.
struct ReadBatch {
    cands: Vec<Candidate>,
    decoded: Vec<Result<()>>,
    holes: usize,
}

/// A buffer of `n` values with every page of it written once (NaN), so that the decode threads
/// filling it later do not take its page faults.
fn touched_buffer(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("devise-decode-{i}"))
        .build()
        .context("building the decode thread pool")
}

pub(crate) fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Appends decoded candidates to `batch`; returns how many failed (warned and counted).
/// Errors only in strict mode, on the first failure.
fn accept_decoded(
    batch: &mut Batch,
    cands: Vec<Candidate>,
    decoded: Vec<Result<Vec<f32>>>,
    stats: &mut DataStats,
    strict: bool,
) -> Result<usize> {
    let mut failed = 0;
    for (c, d) in cands.into_iter().zip(decoded) {
        match d {
            Ok(pixels) => {
                batch.images.extend_from_slice(&pixels);
                accept(batch, c, stats);
            }
            Err(e) => {
                reject(&c, e, stats, strict)?;
                failed += 1;
            }
        }
    }
    Ok(failed)
}

/// [`accept_decoded`] for candidates decoded in place by [`read_and_decode`]: `batch.images`
/// holds candidate `j`'s pixels in slot `j` (and nothing usable in its other slots); those that
/// decoded move down over the failed ones, and `batch.images` is cut after the last.
fn accept_decoded_in_place(
    batch: &mut Batch,
    cands: Vec<Candidate>,
    decoded: Vec<Result<()>>,
    stats: &mut DataStats,
    strict: bool,
) -> Result<usize> {
    let img = 3 * batch.image_size * batch.image_size;
    let mut failed = 0;
    for (j, (c, d)) in cands.into_iter().zip(decoded).enumerate() {
        match d {
            Ok(()) => {
                if j != batch.n {
                    batch
                        .images
                        .copy_within(j * img..(j + 1) * img, batch.n * img);
                }
                accept(batch, c, stats);
            }
            Err(e) => {
                reject(&c, e, stats, strict)?;
                failed += 1;
            }
        }
    }
    batch.images.truncate(batch.n * img);
    Ok(failed)
}

/// Records an accepted candidate (its pixels already in `batch.images`).
fn accept(batch: &mut Batch, c: Candidate, stats: &mut DataStats) {
    batch.labels.push(c.label);
    batch.keys.push(c.data.key.clone());
    batch.positions.push(c.position);
    batch.n += 1;
    stats.samples += 1;
}

/// A candidate whose image did not decode: warned and counted; an error in strict mode.
fn reject(c: &Candidate, e: anyhow::Error, stats: &mut DataStats, strict: bool) -> Result<()> {
    if strict {
        bail!(
            "sample {} of {}: image does not decode: {e:#} (data.strict = true)",
            c.data.key,
            c.shard
        );
    }
    tracing::warn!(shard = %c.shard, key = %c.data.key, "image skipped: {e:#}");
    stats.decode_errors += 1;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The training stream

type Message = Result<(Batch, Cursor, DataStats)>;

/// The infinite, deterministic, resumable training stream of one rank (see the module docs).
pub struct TrainStream {
    rx: Option<mpsc::Receiver<Message>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    stats: DataStats,
    failed: bool,
}

impl TrainStream {
    /// Starts the stream of split `cfg.train_split` at `start`, for rank `rank` of `world_size`.
    ///
    /// - `label_map[c]`: training label of manifest class `c`, or `None` to skip its samples
    ///   before decoding (e.g. zero-shot classes held out); `label_map.len()` must equal
    ///   `manifest.classes.len()`.
    /// - `per_rank_batch_size`: images per batch on this rank.
    /// - `seed`: shuffling and augmentation seed (the same on every rank).
    /// - `start`: [`Cursor::default()`] for a fresh run (partitions from `cfg.partitions`, or the
    ///   default for `world_size`), or the cursor saved with a checkpoint.
    ///
    /// Errors (synchronous): invalid config, split missing from the manifest or empty, a manifest
    /// without per-shard class counts, no class with samples is mapped, bad rank/world
    /// size/batch size/label map length, partitions that `world_size` does not divide or that
    /// differ from `cfg.partitions`, more ranks than shards, the shard directory missing.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        cfg: &Config,
        manifest: &Manifest,
        label_map: Vec<Option<i64>>,
        per_rank_batch_size: usize,
        seed: u64,
        start: Cursor,
        rank: usize,
        world_size: usize,
    ) -> Result<TrainStream> {
        let mut plan = make_plan(
            cfg,
            manifest,
            &cfg.train_split,
            label_map,
            per_rank_batch_size,
            seed,
            rank,
            world_size,
        )?;
        if let Some(shard) = plan.shards.iter().find(|s| s.class_counts.is_empty()) {
            bail!(
                "{}/manifest.json has no per-shard class counts (shard {}): it was written by an older devise; \
                 rewrite it with `devise data index --shards {}` (reads every shard once)",
                cfg.shards,
                shard.name,
                cfg.shards
            );
        }
        plan.units = plan
            .shards
            .iter()
            .map(|s| {
                s.class_counts
                    .iter()
                    .zip(&plan.label_map)
                    .filter(|(_, l)| l.is_some())
                    .map(|(n, _)| n)
                    .sum()
            })
            .collect();
        let trainable = plan.units.iter().filter(|&&u| u > 0).count();
        let partitions = if start.partitions == 0 {
            if start.position != 0 {
                bail!("cursor {start:?} has a position but no partitions");
            }
            partition::choose_partitions(cfg.partitions, &plan.shards, &plan.units, world_size)?
        } else {
            if let Some(p) = cfg.partitions.filter(|&p| p != start.partitions) {
                bail!(
                    "data.partitions = {p}, but the run's training stream has {} partitions (fixed when it started, \
                     saved in its checkpoints): leave data.partitions out or set it to {}",
                    start.partitions,
                    start.partitions
                );
            }
            partition::check_partitions(start.partitions, world_size)?;
            if start.partitions > trainable {
                bail!(
                    "the cursor has {} partitions but split {:?} has only {trainable} shards with training samples \
                     (were the shards rebuilt?)",
                    start.partitions,
                    cfg.train_split
                );
            }
            start.partitions
        };
        let layout = Layout::new(&plan.shards, &plan.units, partitions);
        if rank == 0 {
            let total: u64 = plan.units.iter().sum();
            tracing::info!(
                "training stream: {partitions} partitions of {trainable} shards, {} per rank; an epoch is {} samples \
                 ({} per partition), leaving out {} of the split's {total} ({:.2} %, different ones each epoch)",
                partitions / world_size,
                layout.epoch_positions(),
                layout.epoch_units,
                layout.leftover,
                100.0 * layout.leftover as f64 / total as f64
            );
            if let Some(cache) = &plan.cache {
                tracing::info!("{}", cache.summary);
            }
        }
        let pool = build_pool(cfg.decode_threads)?;
        let plan = Arc::new(plan);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::sync_channel::<Message>(cfg.prefetch_batches - 1);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("devise-data-rank{rank}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let walker = RankWalker::new(plan.clone(), &layout, start.position);
                    produce(
                        plan,
                        pool,
                        walker,
                        partitions,
                        start.position,
                        &tx,
                        &thread_stop,
                    )
                }));
                let err = match result {
                    Ok(Ok(())) => return, // stopped
                    Ok(Err(e)) => e,
                    Err(p) => anyhow!("data loader thread panicked: {}", panic_text(&p)),
                };
                let _ = tx.send(Err(err));
            })
            .context("spawning the data loader thread")?;
        Ok(TrainStream {
            rx: Some(rx),
            thread: Some(thread),
            stop,
            stats: DataStats::default(),
            failed: false,
        })
    }

    /// The next batch (exactly `per_rank_batch_size` images) and the cursor AFTER it: save that
    /// cursor with the checkpoint of the step that consumed this batch.
    ///
    /// Errors: shard I/O failures, no usable sample in two whole epochs, a bad sample in strict
    /// mode, a panic in the loader (all with context). After an error the stream is finished;
    /// later calls error too.
    pub fn next_batch(&mut self) -> Result<(Batch, Cursor)> {
        if self.failed {
            bail!("the data stream already failed (see the earlier error)");
        }
        let rx = self.rx.as_ref().expect("receiver present until drop");
        match rx.recv() {
            Ok(Ok((batch, cursor, stats))) => {
                self.stats = stats;
                Ok((batch, cursor))
            }
            Ok(Err(e)) => {
                self.failed = true;
                Err(e.context("data stream"))
            }
            Err(mpsc::RecvError) => {
                self.failed = true;
                Err(anyhow!("data loader thread ended unexpectedly"))
            }
        }
    }

    /// Counters as of the last batch returned (not of batches prefetched beyond it).
    pub fn stats(&self) -> DataStats {
        self.stats.clone()
    }
}

impl Drop for TrainStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.rx.take()); // unblocks a producer waiting in `send`
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn make_plan(
    cfg: &Config,
    manifest: &Manifest,
    split: &str,
    label_map: Vec<Option<i64>>,
    per_rank_batch_size: usize,
    seed: u64,
    rank: usize,
    world_size: usize,
) -> Result<Plan> {
    cfg.validate()?;
    manifest.check()?;
    if world_size == 0 || rank >= world_size {
        bail!("rank {rank} is not in 0..world_size ({world_size})");
    }
    if per_rank_batch_size == 0 {
        bail!("per_rank_batch_size must be > 0");
    }
    if label_map.len() != manifest.classes.len() {
        bail!(
            "label map has {} entries but the manifest has {} classes",
            label_map.len(),
            manifest.classes.len()
        );
    }
    let info = manifest.split(split)?;
    if info.samples == 0 {
        bail!("split {split:?} has no samples");
    }
    let mapped: u64 = info
        .class_counts
        .iter()
        .zip(&label_map)
        .filter(|(_, l)| l.is_some())
        .map(|(n, _)| n)
        .sum();
    if mapped == 0 {
        bail!("no sample of split {split:?} has a class in the label map");
    }
    let store = Store::open_existing(&cfg.shards)?;
    let cache = match &cfg.cache_dir {
        Some(dir) => Some(Arc::new(ShardCache::open(
            dir,
            cfg.cache_limit_bytes,
            manifest,
            &[split, &cfg.val_split],
        )?)),
        None => None,
    };
    Ok(Plan {
        cfg: cfg.clone(),
        store,
        shards: info.shards.clone(),
        n_classes: manifest.classes.len(),
        label_map,
        seed,
        per_rank_batch_size,
        rank,
        world_size,
        units: Vec::new(),
        memory: Arc::new(Memory::default()),
        cache,
    })
}

/// The loader thread: batches until stopped or the receiver is gone. `Err` = fatal.
fn produce(
    plan: Arc<Plan>,
    pool: rayon::ThreadPool,
    mut walker: RankWalker,
    partitions: usize,
    mut position: u64,
    tx: &mpsc::SyncSender<Message>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut stats = DataStats {
        partitions: (partitions / plan.world_size) as u64,
        ..DataStats::default()
    };
    let (b, w) = (plan.per_rank_batch_size, plan.world_size);
    let (s, strict, augment) = (
        plan.cfg.image_size as usize,
        plan.cfg.strict,
        plan.cfg.augment,
    );
    // Two whole epochs of this rank's partitions without a usable top-up: nothing usable is left.
    let max_peek = 2 * walker.epoch_units() as usize + b;
    let mut first = true;
    // The next batch's images, written once before the decode threads fill them: the first
    // batch's while its shards' first bytes are on their way, later ones while the pool decodes.
    let mut images = touched_buffer(b * 3 * s * s);
    while !stop.load(Ordering::SeqCst) {
        let mut batch = Batch::with_images(std::mem::take(&mut images), b, s);
        // 1. This rank's part of the global batch: its `b` positions among the next `b * w`.
        let read = read_and_decode(
            &pool,
            &plan,
            &mut walker,
            &mut batch.images,
            &mut stats,
            || images = touched_buffer(b * 3 * s * s),
        )?;
        let mut missing = read.holes;
        missing +=
            accept_decoded_in_place(&mut batch, read.cands, read.decoded, &mut stats, strict)?;
        // 2. Top-ups for holes and undecodable images: this rank's positions after the global
        //    batch, read ahead without consuming them (see the module docs).
        let mut peeked = 0usize;
        while missing > 0 {
            let mut more = Vec::with_capacity(missing);
            while more.len() < missing {
                if peeked >= max_peek {
                    bail!(
                        "no usable sample in {max_peek} positions of split {:?} read ahead by rank {} (every image undecodable or every shard bad?)",
                        plan.cfg.train_split,
                        plan.rank
                    );
                }
                if let Unit::Sample(c) = walker.peek(peeked, &mut stats)? {
                    more.push(c.clone());
                }
                peeked += 1;
            }
            let decoded = decode_all(&pool, &plan.cfg, plan.seed, &more, augment);
            missing = accept_decoded(&mut batch, more, decoded, &mut stats, strict)?;
        }
        position += (b * w) as u64;
        let cursor = Cursor {
            partitions,
            position,
        };
        (stats.buffered_bytes, stats.peak_buffered_bytes) = plan.memory.read();
        stats.shard_bytes = plan.memory.downloaded();
        stats.cache = plan.cache.as_ref().map(|c| c.counts()).unwrap_or_default();
        if first {
            tracing::debug!(
                rank = plan.rank,
                shard_bytes = stats.shard_bytes,
                "training stream: first batch ready"
            );
            first = false;
        }
        if tx.send(Ok((batch, cursor, stats.clone()))).is_err() {
            break; // receiver dropped
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Evaluation

/// Batches of one split for evaluation: every accepted sample exactly once (see
/// [`eval_batches`]). Yields `Err` once on a fatal problem (shard I/O), then ends.
pub struct EvalBatches {
    plan: Arc<Plan>,
    pool: rayon::ThreadPool,
    /// Manifest index of the next shard to open.
    next_shard: usize,
    /// The shard being read, then the ones streaming ahead of it.
    feeds: VecDeque<ShardFeed>,
    /// Accepted samples of this rank not yet handed out, in tar order.
    pending: VecDeque<Candidate>,
    /// Accepted samples seen so far (all ranks), for the `i % world_size == rank` split.
    accepted: u64,
    expected: u64,
    stats: DataStats,
    done: bool,
}

/// One pass over split `split` for evaluation, on rank `rank` of `world_size`.
///
/// Shards in manifest order, samples in tar order (streamed, `prefetch_shards` shards ahead);
/// accepted samples (label map `Some`) are numbered `i = 0, 1, ...` and this rank takes those
/// with `i % world_size == rank`. Eval transform (resize + centre crop, never augmentation).
/// Batches of `batch_size` images, the last one partial. Samples that fail to decode are
/// skipped (warned, counted in [`EvalBatches::stats`]); shard content problems as in training.
///
/// Errors (synchronous): as [`TrainStream::start`]; (from the iterator): shard I/O failures,
/// bad samples in strict mode.
pub fn eval_batches(
    cfg: &Config,
    manifest: &Manifest,
    split: &str,
    label_map: Vec<Option<i64>>,
    batch_size: usize,
    rank: usize,
    world_size: usize,
) -> Result<EvalBatches> {
    let plan = make_plan(
        cfg, manifest, split, label_map, batch_size, 0, rank, world_size,
    )?;
    let info = manifest.split(split)?;
    let accepted_total: u64 = info
        .class_counts
        .iter()
        .zip(&plan.label_map)
        .filter(|(_, l)| l.is_some())
        .map(|(n, _)| n)
        .sum();
    let (w, r) = (world_size as u64, rank as u64);
    let expected = accepted_total / w + u64::from(accepted_total % w > r);
    Ok(EvalBatches {
        pool: build_pool(cfg.decode_threads)?,
        plan: Arc::new(plan),
        next_shard: 0,
        feeds: VecDeque::new(),
        pending: VecDeque::new(),
        accepted: 0,
        expected,
        stats: DataStats::default(),
        done: false,
    })
}

impl EvalBatches {
    /// Samples this rank should receive if every image decodes (from the manifest's class
    /// counts): `ceil`-style share of the accepted samples. Use it to agree on step counts.
    pub fn expected_samples(&self) -> u64 {
        self.expected
    }

    /// Counters so far.
    pub fn stats(&self) -> DataStats {
        let mut stats = self.stats.clone();
        (stats.buffered_bytes, stats.peak_buffered_bytes) = self.plan.memory.read();
        stats
    }

    /// Reads one more sample of the split into `pending` (if it is this rank's). `Ok(false)`
    /// at the end of the split.
    fn pull_one(&mut self) -> Result<bool> {
        loop {
            // Keep the current shard plus `prefetch_shards` streaming.
            while self.feeds.len() < 1 + self.plan.cfg.prefetch_shards
                && self.next_shard < self.plan.shards.len()
            {
                self.feeds.push_back(self.plan.open_feed(self.next_shard));
                self.next_shard += 1;
            }
            let Some(feed) = self.feeds.front_mut() else {
                return Ok(false);
            };
            let shard = feed.url.clone();
            let Some(entry) = feed
                .next()
                .with_context(|| format!("reading shard {shard}"))?
            else {
                if let Some(problem) = feed.problem() {
                    if self.plan.cfg.strict {
                        bail!("{problem} (data.strict = true)");
                    }
                    self.stats.shard_errors += 1;
                }
                self.feeds.pop_front();
                continue;
            };
            let i = self.accepted;
            if let Some((data, label)) = self.plan.classify(entry, &shard, &mut self.stats)? {
                self.accepted += 1;
                if i % self.plan.world_size as u64 == self.plan.rank as u64 {
                    self.pending.push_back(Candidate {
                        data,
                        shard,
                        label,
                        position: i,
                    });
                }
            }
            return Ok(true);
        }
    }

    fn next_batch(&mut self) -> Result<Option<Batch>> {
        let b = self.plan.per_rank_batch_size;
        let s = self.plan.cfg.image_size as usize;
        let mut batch = Batch::with_capacity(b, s);
        let mut exhausted = false;
        while batch.n < b && !(exhausted && self.pending.is_empty()) {
            while !exhausted && self.pending.len() < b - batch.n {
                exhausted = !self.pull_one()?;
            }
            let take = (b - batch.n).min(self.pending.len());
            let cands: Vec<Candidate> = self.pending.drain(..take).collect();
            let decoded = decode_all(&self.pool, &self.plan.cfg, 0, &cands, false);
            accept_decoded(
                &mut batch,
                cands,
                decoded,
                &mut self.stats,
                self.plan.cfg.strict,
            )?;
        }
        Ok((batch.n > 0).then_some(batch))
    }
}

impl Iterator for EvalBatches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_batch() {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn eval_expected_share() {
        // 10 accepted over 3 ranks: 4, 3, 3
        let share = |n: u64, w: u64, r: u64| n / w + u64::from(n % w > r);
        assert_eq!(
            [share(10, 3, 0), share(10, 3, 1), share(10, 3, 2)],
            [4, 3, 3]
        );
    }
}
