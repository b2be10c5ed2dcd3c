//! Shards -> batches: the deterministic, resumable training stream and the one-pass eval reader.
//!
//! # The training stream and its cursor (state that crosses time: read this before changing it)
//!
//! The stream is infinite: epoch 0, 1, 2, ... of one manifest split. Epoch `e` visits a fixed
//! order of **slots**, one per sample the manifest says the split holds:
//!
//! 1. the split's shards, permuted by ChaCha8 seeded from `mix(seed, SHARDS, e)`;
//! 2. within each shard (manifest index `k`), its samples in tar order permuted by ChaCha8
//!    seeded from `mix(seed, SAMPLES, e, k)`.
//!
//! A [`Cursor`] `{epoch, position}` says "`position` slots of epoch `epoch`'s order have been
//! consumed". Every slot counts, whatever happened to it: accepted, filtered out by the label map,
//! incomplete, undecodable, or lost to a shard error. So the cursor is a pure function of how many
//! slots were walked, and [`TrainStream::start`] can jump to it from the manifest's per-shard
//! counts alone: whole shards before the cursor are never downloaded, and inside the shard the
//! cursor lands in, the first slots are skipped without decoding. A cursor saved with a
//! checkpoint therefore resumes the stream exactly: same samples, same order, same augmentation
//! (each sample's crop/flip comes from ChaCha8 seeded by `mix(seed, AUGMENT, epoch, position of
//! its slot)`, independent of threads and of where the stream was started).
//! `position == samples of the split` never appears: it is normalised to `{epoch + 1, 0}`.
//!
//! Batches run straight across epoch boundaries; nothing is dropped or padded.
//!
//! # Ranks
//!
//! Every rank walks the SAME slot order (and so reads every shard; the cost of an exact,
//! rank-independent cursor). A **global batch** is the next `per_rank_batch_size * world_size`
//! accepted slots (label map `Some`); rank `r` keeps the `j`-th of them when
//! `j % world_size == r`. All ranks therefore run the same number of steps per epoch-span and no
//! rank ever waits on another for data (field case B27).
//!
//! A sample whose image fails to decode is skipped (warned with shard + key, counted in
//! [`DataStats::decode_errors`]) and the rank's batch is topped up from further slots, so batches
//! are always full:
//! - `world_size == 1`: top-ups are simply the next accepted slots, and the cursor moves past them
//!   (exactly as if the bad sample had been filtered).
//! - `world_size > 1`: only the rank that owns a bad sample knows it is bad (ranks decode only
//!   their own share), so the cursor must not depend on it: the cursor after a batch is the end of
//!   the global batch on every rank, and the top-ups are taken by looking ahead at the slots that
//!   follow it that this rank would own (`j % world_size == rank`, counting on past the batch).
//!   Consequence: such a top-up sample is seen twice by that rank, once as a top-up and once in
//!   the next batch. Resume stays exact on every rank. (With ImageNet's 1.28M images and the
//!   CMYK/PNG handling of [`crate::data::image`] there are no decode failures; this is a
//!   safety net, not a hot path.)
//!
//! Shard-level problems (sha256 mismatch with the manifest, truncation, malformed grouping:
//! see [`crate::data::webdataset`]) are counted once in [`DataStats::shard_errors`] and warned
//! with the shard name; the shard's samples read before the problem (none on a sha256 mismatch,
//! whose content cannot be trusted) are used, its other slots are skipped. An I/O error
//! reading a shard (e.g. a missing object) is NOT skipped: it ends the stream with an error.
//!
//! # Threads
//!
//! A background thread walks the slots and assembles batches into a bounded channel
//! (`prefetch_batches` deep); decoding + augmentation run on a rayon pool of `decode_threads`,
//! order preserved; the next shard is fetched and verified in a helper thread while the current
//! one is consumed. Errors and panics in any of these come out of [`TrainStream::next_batch`] as
//! errors; dropping the stream stops and joins the thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::image::{decode_eval, decode_train};
use super::shards::{mix, shuffle, Manifest, ShardInfo};
use super::webdataset::SampleReader;
use super::Config;
use crate::storage::Store;

/// Seed domain tags (never change: saved cursors depend on them).
const TAG_SHARDS: u64 = 0x5348_4152_4453; // "SHARDS"
const TAG_SAMPLES: u64 = 0x5341_4d50_4c45; // "SAMPLE"
const TAG_AUGMENT: u64 = 0x4155_474d_454e; // "AUGMEN"

/// Image fields accepted as "the image" of a sample, in order of preference.
const IMAGE_FIELDS: &[&str] = &["jpg", "jpeg", "png", "img"];

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
    /// `[n]` each sample's id in the stream: training, the slot `(epoch, position)` it was read
    /// from (the same on every world size); evaluation, `(0, i)` with `i` its index among the
    /// split's accepted samples (all ranks together, see [`eval_batches`]).
    pub slots: Vec<Cursor>,
    /// Images in the batch.
    pub n: usize,
    /// Side of each image, pixels.
    pub image_size: usize,
}

impl Batch {
    /// An empty batch with room for `n` images of `image_size` x `image_size`.
    pub fn with_capacity(n: usize, image_size: usize) -> Batch {
        Batch {
            images: Vec::with_capacity(n * 3 * image_size * image_size),
            labels: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            slots: Vec::with_capacity(n),
            n: 0,
            image_size,
        }
    }
}

/// Position in the training stream; save it with a checkpoint, pass it to
/// [`TrainStream::start`] to resume exactly (see the module docs for the slot order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Epoch whose slot order is being consumed (0-based).
    pub epoch: u64,
    /// Slots of that epoch's order already consumed, `0 <= position < split samples`.
    pub position: u64,
}

/// Counters of what a stream (this rank's view) has seen since it was started (they restart
/// from zero on resume: they are diagnostics, not part of the cursor).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataStats {
    /// Samples delivered in batches (top-ups included).
    pub samples: u64,
    /// Samples skipped because their image failed to decode (truncated, corrupt, too large...).
    pub decode_errors: u64,
    /// Visits of shards with a content problem (sha256 mismatch, truncation, malformed grouping):
    /// counted each time the stream enters such a shard (once per epoch).
    pub shard_errors: u64,
    /// Samples skipped for a missing component (`.cls` or the image).
    pub incomplete_samples: u64,
    /// Slots skipped because the label map has `None` for their class (before decoding).
    pub filtered: u64,
    /// Samples skipped because their `.cls` is not a valid manifest class index.
    pub invalid_labels: u64,
}

// ---------------------------------------------------------------------------------------------
// Shard loading (shared by train and eval)

/// One sample of a loaded shard, classified.
#[derive(Debug)]
enum Entry {
    Ok {
        key: String,
        class: usize,
        image: Vec<u8>,
    },
    Incomplete {
        key: String,
        missing: &'static str,
    },
    InvalidLabel {
        key: String,
        cls: String,
    },
}

/// A shard read, verified and parsed: entries in tar order.
#[derive(Debug)]
struct LoadedShard {
    /// Index in the manifest split's shard list.
    index: usize,
    name: String,
    entries: Vec<Entry>,
    /// Content problem (sha mismatch, truncation, ...), already warned about.
    error: Option<String>,
}

/// Reads shard `info` from `store`. `Err` only for I/O failures (fatal); content problems are
/// recorded in `LoadedShard::error` (and warned).
fn load_shard(
    store: &Store,
    info: &ShardInfo,
    index: usize,
    n_classes: usize,
) -> Result<LoadedShard> {
    let bytes = store.get(&info.name)?;
    let url = store.child_url(&info.name);
    let sha = hex::encode(Sha256::digest(&bytes));
    if !sha.eq_ignore_ascii_case(&info.sha256) {
        let error = format!(
            "shard {url}: sha256 {sha} does not match the manifest's {} ({} bytes read, manifest says {}); skipping the whole shard",
            info.sha256,
            bytes.len(),
            info.bytes
        );
        tracing::warn!("{error}");
        return Ok(LoadedShard {
            index,
            name: info.name.clone(),
            entries: Vec::new(),
            error: Some(error),
        });
    }
    Ok(parse_shard(&bytes[..], &url, index, &info.name, n_classes))
}

/// Parses tar bytes into classified entries (see [`crate::data::webdataset`] for the policy).
fn parse_shard(
    reader: impl std::io::Read,
    url: &str,
    index: usize,
    name: &str,
    n_classes: usize,
) -> LoadedShard {
    let mut entries = Vec::new();
    let mut error = None;
    for item in SampleReader::new(reader, url) {
        let mut sample = match item {
            Ok(s) => s,
            Err(e) => {
                let msg = format!(
                    "shard {url}: {e}; {} samples before it are used",
                    entries.len()
                );
                tracing::warn!("{msg}");
                error = Some(msg);
                break;
            }
        };
        let key = std::mem::take(&mut sample.key);
        let image = IMAGE_FIELDS.iter().find_map(|f| sample.fields.remove(*f));
        let entry = match (sample.fields.get("cls"), image) {
            (None, _) => Entry::Incomplete {
                key,
                missing: "cls",
            },
            (Some(_), None) => Entry::Incomplete {
                key,
                missing: "jpg",
            },
            (Some(cls), Some(image)) => {
                let text = String::from_utf8_lossy(cls).trim().to_string();
                match text.parse::<usize>() {
                    Ok(class) if class < n_classes => Entry::Ok { key, class, image },
                    _ => Entry::InvalidLabel { key, cls: text },
                }
            }
        };
        entries.push(entry);
    }
    LoadedShard {
        index,
        name: name.to_string(),
        entries,
        error,
    }
}

// ---------------------------------------------------------------------------------------------
// The slot walker: the cursor's state machine

/// What one slot holds after classification (before decoding).
enum Slot {
    /// Label map `Some`: to be decoded.
    Accepted(Candidate),
    /// Anything else; already counted in the stats passed to `Walker::next_slot`.
    Skipped,
}

/// An accepted sample waiting to be decoded.
#[derive(Clone)]
struct Candidate {
    shard: Arc<LoadedShard>,
    entry: usize,
    label: i64,
    /// Epoch and slot position, the augmentation seed.
    epoch: u64,
    position: u64,
}

impl Candidate {
    fn key(&self) -> &str {
        match &self.shard.entries[self.entry] {
            Entry::Ok { key, .. } => key,
            _ => unreachable!("candidates are made from Entry::Ok only"),
        }
    }
    fn image(&self) -> &[u8] {
        match &self.shard.entries[self.entry] {
            Entry::Ok { image, .. } => image,
            _ => unreachable!("candidates are made from Entry::Ok only"),
        }
    }
}

/// Immutable description of one stream, shared by its threads.
struct Plan {
    cfg: Config,
    store: Store,
    shards: Vec<ShardInfo>,
    n_classes: usize,
    label_map: Vec<Option<i64>>,
    seed: u64,
    per_rank_batch_size: usize,
    rank: usize,
    world_size: usize,
    /// Slots per epoch (= samples of the split).
    epoch_slots: u64,
}

/// Walks the slot order from a cursor. Cloneable for look-ahead (the clone shares loaded shards).
struct Walker {
    plan: Arc<Plan>,
    epoch: u64,
    /// Slots of `epoch` consumed.
    position: u64,
    /// Manifest shard indices in this epoch's order, and the slot where each starts.
    order: Vec<usize>,
    starts: Vec<u64>,
    /// Shard the cursor is in: (index into `order`, its in-shard permutation, the shard).
    current: Option<(usize, Vec<u32>, Arc<LoadedShard>)>,
    /// Next shard being fetched in a helper thread: (manifest shard index, result channel).
    prefetch: Option<(usize, mpsc::Receiver<Result<LoadedShard>>)>,
    /// Fetch the next shard in the background (off for look-ahead clones).
    prefetching: bool,
}

impl Walker {
    fn new(plan: Arc<Plan>, start: Cursor, prefetching: bool) -> Walker {
        let mut w = Walker {
            plan,
            epoch: start.epoch,
            position: start.position,
            order: Vec::new(),
            starts: Vec::new(),
            current: None,
            prefetch: None,
            prefetching,
        };
        w.enter_epoch(start.epoch, start.position);
        w
    }

    fn look_ahead(&self) -> Walker {
        Walker {
            plan: self.plan.clone(),
            epoch: self.epoch,
            position: self.position,
            order: self.order.clone(),
            starts: self.starts.clone(),
            current: self.current.clone(),
            prefetch: None,
            prefetching: false,
        }
    }

    fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            position: self.position,
        }
    }

    /// Epoch `epoch`'s shard order: manifest shard indices.
    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.plan.shards.len()).collect();
        let seed = mix(&[self.plan.seed, TAG_SHARDS, epoch]);
        shuffle(&mut order, &mut ChaCha8Rng::seed_from_u64(seed));
        order
    }

    /// Moves to `position` of `epoch`. The loaded shard and a pending prefetch are kept: they
    /// are keyed by manifest shard index, which is valid in any epoch.
    fn enter_epoch(&mut self, epoch: u64, position: u64) {
        let order = self.epoch_order(epoch);
        let mut starts = Vec::with_capacity(order.len());
        let mut acc = 0;
        for &k in &order {
            starts.push(acc);
            acc += self.plan.shards[k].samples;
        }
        self.epoch = epoch;
        self.position = position;
        self.order = order;
        self.starts = starts;
        // `current` is keyed by position in the old order: invalidate the key (usize::MAX never
        // matches) but keep the shard, so `load` can reuse it if the new order visits it first.
        self.current = self
            .current
            .take()
            .map(|(_, _, shard)| (usize::MAX, Vec::new(), shard));
    }

    fn sample_perm(&self, shard: usize) -> Vec<u32> {
        let n = self.plan.shards[shard].samples as u32;
        let mut perm: Vec<u32> = (0..n).collect();
        let seed = mix(&[self.plan.seed, TAG_SAMPLES, self.epoch, shard as u64]);
        shuffle(&mut perm, &mut ChaCha8Rng::seed_from_u64(seed));
        perm
    }

    /// Fetches, verifies and parses manifest shard `k` in a helper thread.
    fn spawn_fetch(&self, k: usize) -> mpsc::Receiver<Result<LoadedShard>> {
        let (tx, rx) = mpsc::sync_channel(1);
        let plan = self.plan.clone();
        std::thread::Builder::new()
            .name("devise-shard-fetch".into())
            .spawn(move || {
                let info = &plan.shards[k];
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    load_shard(&plan.store, info, k, plan.n_classes)
                }))
                .unwrap_or_else(|p| Err(anyhow!("shard fetch panicked: {}", panic_text(&p))));
                let _ = tx.send(r);
            })
            .expect("spawning a shard fetch thread");
        rx
    }

    /// Loads shard `order[t]` (reusing the loaded one or the prefetch when it is that shard)
    /// and starts fetching the shard after it (crossing into the next epoch's order if needed).
    fn load(&mut self, t: usize) -> Result<Arc<LoadedShard>> {
        let k = self.order[t];
        let shard = match &self.current {
            Some((_, _, loaded)) if loaded.index == k => loaded.clone(),
            _ => {
                let rx = match self.prefetch.take() {
                    Some((pk, rx)) if pk == k => rx,
                    _ => self.spawn_fetch(k),
                };
                let shard = rx
                    .recv()
                    .map_err(|_| anyhow!("shard fetch thread vanished"))?
                    .with_context(|| format!("loading shard {}", self.plan.shards[k].name))?;
                let (parsed, expected) = (shard.entries.len() as u64, self.plan.shards[k].samples);
                if parsed > expected && shard.error.is_none() {
                    tracing::warn!(
                        shard = %shard.name,
                        "shard holds {parsed} samples, the manifest says {expected}; the extra ones are ignored"
                    );
                }
                Arc::new(shard)
            }
        };
        if self.prefetching && self.prefetch.is_none() {
            let next = match self.order.get(t + 1) {
                Some(&k2) => k2,
                None => self.epoch_order(self.epoch + 1)[0],
            };
            if next != k {
                self.prefetch = Some((next, self.spawn_fetch(next)));
            }
        }
        Ok(shard)
    }

    /// Consumes one slot, counting skips into `stats` (if given; look-ahead walkers pass `None`
    /// and stay silent, the slots are counted when the real walker reaches them).
    fn next_slot(&mut self, mut stats: Option<&mut DataStats>) -> Result<Slot> {
        if self.position >= self.plan.epoch_slots {
            self.enter_epoch(self.epoch + 1, 0);
        }
        // Shard t of this epoch's order holds slots starts[t] .. starts[t] + samples.
        let t = self.starts.partition_point(|&s| s <= self.position) - 1;
        let needs_load = !matches!(&self.current, Some((ct, _, _)) if *ct == t);
        if needs_load {
            let shard = self.load(t)?;
            if shard.error.is_some() {
                if let Some(s) = stats.as_deref_mut() {
                    s.shard_errors += 1; // once per visit of a bad shard
                }
            }
            let perm = self.sample_perm(self.order[t]);
            self.current = Some((t, perm, shard));
        }
        let (index, shard) = {
            let (_, perm, shard) = self.current.as_ref().expect("loaded above");
            let offset = (self.position - self.starts[t]) as usize;
            (perm[offset] as usize, shard.clone())
        };
        let slot_position = self.position;
        self.position += 1;
        let Some(entry) = shard.entries.get(index) else {
            // Lost to a shard error (counted once at load).
            return Ok(Slot::Skipped);
        };
        match entry {
            Entry::Ok { class, .. } => match self.plan.label_map[*class] {
                Some(label) => Ok(Slot::Accepted(Candidate {
                    shard: shard.clone(),
                    entry: index,
                    label,
                    epoch: self.epoch,
                    position: slot_position,
                })),
                None => {
                    if let Some(s) = stats {
                        s.filtered += 1;
                    }
                    Ok(Slot::Skipped)
                }
            },
            Entry::Incomplete { key, missing } => {
                if let Some(s) = stats {
                    tracing::warn!(shard = %shard.name, key = %key, "missing component {missing}: sample skipped");
                    s.incomplete_samples += 1;
                }
                Ok(Slot::Skipped)
            }
            Entry::InvalidLabel { key, cls } => {
                if let Some(s) = stats {
                    tracing::warn!(
                        shard = %shard.name, key = %key,
                        "cls {cls:?} is not a class index (manifest has {}): sample skipped",
                        self.plan.n_classes
                    );
                    s.invalid_labels += 1;
                }
                Ok(Slot::Skipped)
            }
        }
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
    let s = cfg.image_size as usize;
    pool.install(|| {
        cands
            .par_iter()
            .map(|c| {
                let mut out = vec![0f32; 3 * s * s];
                if augment {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(mix(&[seed, TAG_AUGMENT, c.epoch, c.position]));
                    decode_train(c.image(), cfg, &mut rng, &mut out)?;
                } else {
                    decode_eval(c.image(), cfg, &mut out)?;
                }
                Ok(out)
            })
            .collect()
    })
}

fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("devise-decode-{i}"))
        .build()
        .context("building the decode thread pool")
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Appends decoded candidates to `batch`; returns how many failed (warned and counted).
fn accept_decoded(
    batch: &mut Batch,
    cands: Vec<Candidate>,
    decoded: Vec<Result<Vec<f32>>>,
    stats: &mut DataStats,
) -> usize {
    let mut failed = 0;
    for (c, d) in cands.into_iter().zip(decoded) {
        match d {
            Ok(pixels) => {
                batch.images.extend_from_slice(&pixels);
                batch.labels.push(c.label);
                batch.keys.push(c.key().to_string());
                batch.slots.push(Cursor {
                    epoch: c.epoch,
                    position: c.position,
                });
                batch.n += 1;
                stats.samples += 1;
            }
            Err(e) => {
                tracing::warn!(shard = %c.shard.name, key = %c.key(), "image skipped: {e:#}");
                stats.decode_errors += 1;
                failed += 1;
            }
        }
    }
    failed
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
    /// - `start`: [`Cursor::default()`] for a fresh run, or the cursor saved with a checkpoint.
    ///
    /// Errors (synchronous): invalid config, split missing from the manifest or empty, no class
    /// with samples is mapped, bad rank/world size/batch size/label map length, a cursor beyond
    /// the split, the shard directory missing.
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
        let plan = make_plan(
            cfg,
            manifest,
            &cfg.train_split,
            label_map,
            per_rank_batch_size,
            seed,
            rank,
            world_size,
        )?;
        if start.position > plan.epoch_slots {
            bail!(
                "cursor {start:?} is beyond split {:?} of {} samples (was the shard directory rebuilt?)",
                cfg.train_split,
                plan.epoch_slots
            );
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
                    produce(plan, pool, start, &tx, &thread_stop)
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
    /// Errors: shard I/O failures, no usable sample in two whole epochs, a panic in the loader
    /// (all with context). After an error the stream is finished; later calls error too.
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
        epoch_slots: info.samples,
    })
}

/// The loader thread: batches until stopped or the receiver is gone. `Err` = fatal.
fn produce(
    plan: Arc<Plan>,
    pool: rayon::ThreadPool,
    start: Cursor,
    tx: &mpsc::SyncSender<Message>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut walker = Walker::new(plan.clone(), start, true);
    let mut stats = DataStats::default();
    let (b, w, r) = (plan.per_rank_batch_size, plan.world_size, plan.rank);
    let s = plan.cfg.image_size as usize;
    // Two whole epochs without filling a batch means nothing usable is left: fail, don't spin.
    let max_slots = 2 * plan.epoch_slots + (b * w) as u64;
    while !stop.load(Ordering::SeqCst) {
        let mut batch = Batch::with_capacity(b, s);
        let mut walked = 0u64;
        let split = &plan.cfg.train_split;
        let guard = |walked: &mut u64| -> Result<()> {
            *walked += 1;
            if *walked > max_slots {
                bail!(
                    "no usable sample in {max_slots} consecutive slots of split {split:?} (every image undecodable or every shard bad?)"
                );
            }
            Ok(())
        };
        // 1. The global batch: the next b*w accepted slots; this rank keeps j % w == r.
        let mut mine = Vec::with_capacity(b);
        let mut j = 0;
        while j < b * w {
            guard(&mut walked)?;
            if let Slot::Accepted(c) = walker.next_slot(Some(&mut stats))? {
                if j % w == r {
                    mine.push(c);
                }
                j += 1;
            }
        }
        let decoded = decode_all(&pool, &plan.cfg, plan.seed, &mine, plan.cfg.augment);
        let mut missing = accept_decoded(&mut batch, mine, decoded, &mut stats);
        // 2. Top-ups for undecodable images (see the module docs for world_size > 1).
        let mut ahead = (w > 1).then(|| walker.look_ahead());
        let mut j_ahead = b * w; // global index of the next look-ahead accepted slot
        while missing > 0 {
            let mut more = Vec::with_capacity(missing);
            while more.len() < missing {
                guard(&mut walked)?;
                match &mut ahead {
                    None => {
                        if let Slot::Accepted(c) = walker.next_slot(Some(&mut stats))? {
                            more.push(c);
                        }
                    }
                    Some(a) => {
                        if let Slot::Accepted(c) = a.next_slot(None)? {
                            if j_ahead % w == r {
                                more.push(c);
                            }
                            j_ahead += 1;
                        }
                    }
                }
            }
            let decoded = decode_all(&pool, &plan.cfg, plan.seed, &more, plan.cfg.augment);
            missing = accept_decoded(&mut batch, more, decoded, &mut stats);
        }
        let mut cursor = walker.cursor();
        if cursor.position >= plan.epoch_slots {
            cursor = Cursor {
                epoch: cursor.epoch + 1,
                position: 0,
            };
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
    /// Manifest index of the next shard to load.
    next_shard: usize,
    /// Accepted samples of the current shard not yet handed out, in tar order.
    pending: VecDeque<Candidate>,
    /// Accepted samples seen so far (all ranks), for the `i % world_size == rank` split.
    accepted: u64,
    expected: u64,
    stats: DataStats,
    done: bool,
}

/// One pass over split `split` for evaluation, on rank `rank` of `world_size`.
///
/// Shards in manifest order, samples in tar order; accepted samples (label map `Some`) are
/// numbered `i = 0, 1, ...` and this rank takes those with `i % world_size == rank`. Eval
/// transform (resize + centre crop, never augmentation). Batches of `batch_size` images, the
/// last one partial. Samples that fail to decode are skipped (warned, counted in
/// [`EvalBatches::stats`]); shard content problems as in training.
///
/// Errors (synchronous): as [`TrainStream::start`]; (from the iterator): shard I/O failures.
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
        self.stats.clone()
    }

    /// Loads shards until `pending` is non-empty or the split ends. `Ok(false)` at the end.
    fn refill(&mut self) -> Result<bool> {
        while self.pending.is_empty() {
            if self.next_shard >= self.plan.shards.len() {
                return Ok(false);
            }
            let info = &self.plan.shards[self.next_shard];
            self.next_shard += 1;
            let shard = Arc::new(
                load_shard(
                    &self.plan.store,
                    info,
                    self.next_shard - 1,
                    self.plan.n_classes,
                )
                .with_context(|| format!("loading shard {}", info.name))?,
            );
            if shard.error.is_some() {
                self.stats.shard_errors += 1;
            }
            for (index, entry) in shard.entries.iter().enumerate() {
                match entry {
                    Entry::Ok { class, .. } => match self.plan.label_map[*class] {
                        Some(label) => {
                            let i = self.accepted;
                            let mine = i % self.plan.world_size as u64 == self.plan.rank as u64;
                            self.accepted += 1;
                            if mine {
                                self.pending.push_back(Candidate {
                                    shard: shard.clone(),
                                    entry: index,
                                    label,
                                    epoch: 0,
                                    position: i,
                                });
                            }
                        }
                        None => self.stats.filtered += 1,
                    },
                    Entry::Incomplete { key, missing } => {
                        tracing::warn!(shard = %shard.name, key = %key, "missing component {missing}: sample skipped");
                        self.stats.incomplete_samples += 1;
                    }
                    Entry::InvalidLabel { key, cls } => {
                        tracing::warn!(shard = %shard.name, key = %key, "cls {cls:?} is not a class index: sample skipped");
                        self.stats.invalid_labels += 1;
                    }
                }
            }
        }
        Ok(true)
    }

    fn next_batch(&mut self) -> Result<Option<Batch>> {
        let b = self.plan.per_rank_batch_size;
        let s = self.plan.cfg.image_size as usize;
        let mut batch = Batch::with_capacity(b, s);
        while batch.n < b {
            if !self.refill()? {
                break;
            }
            let take = (b - batch.n).min(self.pending.len());
            let cands: Vec<Candidate> = self.pending.drain(..take).collect();
            let decoded = decode_all(&self.pool, &self.plan.cfg, 0, &cands, false);
            accept_decoded(&mut batch, cands, decoded, &mut self.stats);
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
    use super::*;

    #[test]
    fn parse_shard_classifies_entries() {
        let mut b = tar::Builder::new(Vec::new());
        let add = |b: &mut tar::Builder<Vec<u8>>, p: &str, d: &[u8]| {
            super::super::webdataset::append_member(b, p, d).unwrap()
        };
        add(&mut b, "a.jpg", b"img");
        add(&mut b, "a.cls", b"1\n");
        add(&mut b, "b.jpg", b"img");
        add(&mut b, "c.png", b"img");
        add(&mut b, "c.cls", b"7");
        add(&mut b, "d.cls", b"0");
        let bytes = b.into_inner().unwrap();
        let shard = parse_shard(&bytes[..], "mem://x.tar", 0, "x.tar", 3);
        assert!(shard.error.is_none());
        let kinds: Vec<String> = shard
            .entries
            .iter()
            .map(|e| match e {
                Entry::Ok { key, class, .. } => format!("{key}:ok{class}"),
                Entry::Incomplete { key, missing } => format!("{key}:missing {missing}"),
                Entry::InvalidLabel { key, cls } => format!("{key}:bad {cls}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["a:ok1", "b:missing cls", "c:bad 7", "d:missing jpg"]
        );
    }

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
