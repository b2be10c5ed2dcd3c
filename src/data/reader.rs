//! Shards -> batches: the deterministic, resumable training stream and the one-pass eval reader.
//!
//! # The training stream and its cursor (state that crosses time: read this before changing it)
//!
//! The stream is infinite: epoch 0, 1, 2, ... of one manifest split. Epoch `e` visits a fixed
//! order of **slots**, one per sample the manifest says the split holds:
//!
//! 1. the split's shards, permuted by ChaCha8 seeded from `mix(seed, SHARDS, e)`;
//! 2. within each shard (manifest index `k`), its samples in tar order passed through a shuffle
//!    buffer of `data.shuffle_buffer` samples: the buffer fills, then each slot takes the
//!    sample at a ChaCha8-drawn index (seeded from `mix(seed, SAMPLES, e, k)`) and the next
//!    sample of the tar refills it. A buffer at least as large as the shard gives a uniform
//!    permutation of it; a smaller one bounds memory (shards are built shuffled, so the buffer
//!    only has to vary the order between epochs).
//!
//! A [`Cursor`] `{epoch, position}` says "`position` slots of epoch `epoch`'s order have been
//! consumed". Every slot counts, whatever happened to it: accepted, filtered out by the label
//! map, incomplete, undecodable, or lost to a shard error. So the cursor is a pure function of
//! how many slots were walked, and [`TrainStream::start`] can jump to it from the manifest's
//! per-shard counts alone: whole shards before the cursor are never downloaded, and the shard
//! the cursor lands in is streamed through its shuffle buffer from the start, its first slots
//! skipped without decoding. A cursor saved with a checkpoint therefore resumes the stream
//! exactly: same samples, same order, same augmentation (each sample's crop/flip comes from
//! ChaCha8 seeded by `mix(seed, AUGMENT, epoch, position of its slot)`, independent of threads
//! and of where the stream was started).
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
//! Shard-level problems (truncation, malformed grouping: see [`crate::data::webdataset`];
//! sha256 or size different from the manifest) are warned with the shard URL and counted once
//! per visit in [`DataStats::shard_errors`]; the samples read before the problem are used, the
//! shard's remaining slots are lost (counted in [`DataStats::lost_to_shard_errors`]). Shards are
//! streamed, so a sha256 mismatch is known only at the end of the shard, after its samples were
//! used (`devise data verify` checks a shard directory beforehand). An I/O error reading a shard
//! that `object_store`'s retries (which resume a cut download at its byte offset) could not cure
//! is NOT skipped: it ends the stream with an error naming the shard. With `data.strict = true`
//! every skipped sample and every shard problem is an error instead.
//!
//! # Threads and memory
//!
//! A background thread walks the slots and assembles batches into a bounded channel
//! (`prefetch_batches` deep); decoding + augmentation run on a rayon pool of `decode_threads`,
//! order preserved. Each open shard is streamed by its own thread ([`crate::data::feed`]) into
//! a channel of `shard_readahead` samples; the shard being read and the next `prefetch_shards`
//! ones stream at once. Encoded bytes held by the reader are therefore bounded by about
//! `(shuffle_buffer + (1 + prefetch_shards) * shard_readahead + per_rank_batch_size *
//! world_size)` samples, never whole shards, and are reported as
//! [`DataStats::buffered_bytes`] / [`DataStats::peak_buffered_bytes`]. Errors and panics in any
//! of these threads come out of [`TrainStream::next_batch`] as errors; dropping the stream
//! stops and joins the loader thread (shard threads stop at their next sample).
//!

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::feed::{Entry, Memory, SampleData, ShardFeed};
use super::image::{decode_eval, decode_train};
use super::shards::{mix, shuffle, Manifest, ShardInfo};
use super::Config;
use crate::storage::Store;

/// Seed domain tags (never change: saved cursors depend on them).
const TAG_SHARDS: u64 = 0x5348_4152_4453; // "SHARDS"
const TAG_SAMPLES: u64 = 0x5341_4d50_4c45; // "SAMPLE"
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
/// from zero on resume: they are diagnostics, not part of the cursor). The `*_errors`,
/// `incomplete_samples`, `invalid_labels` and `lost_to_shard_errors` counters are the skipped
/// samples by reason (`data/skipped_samples/<reason>` in the metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataStats {
    /// Samples delivered in batches (top-ups included).
    pub samples: u64,
    /// Samples skipped because their image failed to decode (truncated, corrupt, too large...).
    pub decode_errors: u64,
    /// Visits of shards with a content problem (truncation, malformed grouping, sha256 or size
    /// different from the manifest): counted each time the stream finishes such a shard.
    pub shard_errors: u64,
    /// Slots of the split lost because their shard ended early (truncated or malformed).
    pub lost_to_shard_errors: u64,
    /// Samples skipped for a missing component (`.cls` or the image).
    pub incomplete_samples: u64,
    /// Slots skipped because the label map has `None` for their class (before decoding; not
    /// a data problem: e.g. zero-shot classes held out of training).
    pub filtered: u64,
    /// Samples skipped because their `.cls` is not a valid manifest class index.
    pub invalid_labels: u64,
    /// Bytes of encoded samples the reader held when this batch was handed out: channels of
    /// open shards, the shuffle buffer, look-ahead, samples being decoded.
    pub buffered_bytes: u64,
    /// The most `buffered_bytes` has been since the stream started.
    pub peak_buffered_bytes: u64,
}

impl DataStats {
    /// Skipped samples by reason, as `(reason, count)`: `decode_error`, `incomplete`,
    /// `invalid_label`, `shard_error` (slots lost to a shard that ended early).
    pub fn skipped_by_reason(&self) -> [(&'static str, u64); 4] {
        [
            ("decode_error", self.decode_errors),
            ("incomplete", self.incomplete_samples),
            ("invalid_label", self.invalid_labels),
            ("shard_error", self.lost_to_shard_errors),
        ]
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
    data: Arc<SampleData>,
    /// URL of its shard (messages).
    shard: Arc<str>,
    label: i64,
    /// Epoch and slot position, the augmentation seed.
    epoch: u64,
    position: u64,
}

/// A slot as read by the walker's read head, before it is classified and counted.
#[derive(Clone)]
struct RawSlot {
    epoch: u64,
    position: u64,
    shard: Arc<str>,
    /// `None`: the shard ended before this slot (truncated or malformed shard).
    entry: Option<Entry>,
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
    memory: Arc<Memory>,
}

impl Plan {
    fn open_feed(&self, k: usize) -> ShardFeed {
        ShardFeed::open(
            &self.store,
            &self.shards[k],
            k,
            self.n_classes,
            self.cfg.shard_readahead,
            &self.memory,
        )
    }

    /// Classifies a slot; with `stats`, counts and warns about skips (look-ahead passes `None`:
    /// the slot is counted when the walker consumes it). Strict mode turns a skip into an error.
    fn classify(&self, raw: RawSlot, stats: Option<&mut DataStats>) -> Result<Slot> {
        let Some(entry) = raw.entry else {
            if let Some(s) = stats {
                s.lost_to_shard_errors += 1;
            }
            return Ok(Slot::Skipped);
        };
        let problem = match entry {
            Entry::Ok(data) => {
                return match self.label_map[data.class] {
                    Some(label) => Ok(Slot::Accepted(Candidate {
                        data,
                        shard: raw.shard,
                        label,
                        epoch: raw.epoch,
                        position: raw.position,
                    })),
                    None => {
                        if let Some(s) = stats {
                            s.filtered += 1;
                        }
                        Ok(Slot::Skipped)
                    }
                };
            }
            Entry::Incomplete { key, missing } => {
                let Some(s) = stats else {
                    return Ok(Slot::Skipped);
                };
                s.incomplete_samples += 1;
                format!("sample {key} of {}: missing component {missing}", raw.shard)
            }
            Entry::InvalidLabel { key, cls } => {
                let Some(s) = stats else {
                    return Ok(Slot::Skipped);
                };
                s.invalid_labels += 1;
                format!(
                    "sample {key} of {}: cls {cls:?} is not a class index (the manifest has {})",
                    raw.shard, self.n_classes
                )
            }
        };
        if self.cfg.strict {
            bail!("{problem} (data.strict = true)");
        }
        tracing::warn!("{problem}: sample skipped");
        Ok(Slot::Skipped)
    }
}

/// The shard the read head is in, streamed through the shuffle buffer.
struct OpenShard {
    /// Position in the epoch's shard order.
    t: usize,
    feed: ShardFeed,
    buffer: Vec<Entry>,
    rng: ChaCha8Rng,
    /// Slots of this shard walked so far.
    slots: u64,
    /// The feed reached its end (and its problem, if any, was counted).
    done: bool,
}

/// Walks the slot order from a cursor. The read head may run ahead of the consumed cursor
/// (look-ahead for top-ups); slots read ahead wait in `ahead`.
struct Walker {
    plan: Arc<Plan>,
    /// Consumed cursor.
    epoch: u64,
    position: u64,
    /// Read head: the next slot `pull` produces; `order`/`starts` belong to `head_epoch`.
    head_epoch: u64,
    head_position: u64,
    /// Manifest shard indices in `head_epoch`'s order, and the slot where each starts.
    order: Vec<usize>,
    starts: Vec<u64>,
    open: Option<OpenShard>,
    /// Shards after the open one, already streaming (`prefetch_shards` of them).
    prefetch: VecDeque<ShardFeed>,
    /// Slots read but not consumed yet.
    ahead: VecDeque<RawSlot>,
    /// Shard problems seen by the read head, not yet added to the stats.
    shard_problems: u64,
}

impl Walker {
    fn new(plan: Arc<Plan>, start: Cursor) -> Walker {
        let mut w = Walker {
            plan,
            epoch: start.epoch,
            position: start.position,
            head_epoch: start.epoch,
            head_position: start.position,
            order: Vec::new(),
            starts: Vec::new(),
            open: None,
            prefetch: VecDeque::new(),
            ahead: VecDeque::new(),
            shard_problems: 0,
        };
        w.enter_epoch(start.epoch);
        w
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

    /// Moves the read head's shard order to `epoch`.
    fn enter_epoch(&mut self, epoch: u64) {
        let order = self.epoch_order(epoch);
        let mut starts = Vec::with_capacity(order.len());
        let mut acc = 0;
        for &k in &order {
            starts.push(acc);
            acc += self.plan.shards[k].samples;
        }
        self.head_epoch = epoch;
        self.order = order;
        self.starts = starts;
    }

    /// The `n` manifest shard indices the read head visits after shard `t` of its order.
    fn shards_after(&self, t: usize, n: usize) -> Vec<usize> {
        let mut next: Vec<usize> = self.order[t + 1..].iter().copied().take(n).collect();
        let mut epoch = self.head_epoch;
        while next.len() < n {
            epoch += 1;
            let order = self.epoch_order(epoch);
            next.extend(order.into_iter().take(n - next.len()));
        }
        next
    }

    /// Closes the open shard: reads its feed to the end (so a sha256 mismatch is seen) and
    /// counts its problem; extra samples beyond the manifest's count are warned about.
    fn close_open(&mut self) -> Result<()> {
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        let mut extra = open.buffer.len() as u64;
        if !open.done {
            while open.feed.next()?.is_some() {
                extra += 1;
            }
            self.note_problem(&open.feed)?;
        }
        if extra > 0 {
            tracing::warn!(
                shard = %open.feed.url,
                "the shard holds {extra} samples more than the manifest says; the extra ones are ignored"
            );
        }
        Ok(())
    }

    fn note_problem(&mut self, feed: &ShardFeed) -> Result<()> {
        if let Some(problem) = feed.problem() {
            if self.plan.cfg.strict {
                bail!("{problem} (data.strict = true)");
            }
            self.shard_problems += 1;
        }
        Ok(())
    }

    /// Opens shard `order[t]` for the read head (from the prefetch queue when it is there) and
    /// keeps the next `prefetch_shards` shards streaming.
    fn open_shard(&mut self, t: usize) -> Result<()> {
        self.close_open()?;
        let k = self.order[t];
        let feed = match self.prefetch.front() {
            Some(f) if f.index == k => self.prefetch.pop_front().expect("front exists"),
            _ => {
                self.prefetch.clear();
                self.plan.open_feed(k)
            }
        };
        let want = self.shards_after(t, self.plan.cfg.prefetch_shards);
        if !self
            .prefetch
            .iter()
            .map(|f| f.index)
            .eq(want.iter().copied().take(self.prefetch.len()))
        {
            self.prefetch.clear();
        }
        for &k2 in &want[self.prefetch.len()..] {
            self.prefetch.push_back(self.plan.open_feed(k2));
        }
        let seed = mix(&[self.plan.seed, TAG_SAMPLES, self.head_epoch, k as u64]);
        self.open = Some(OpenShard {
            t,
            feed,
            buffer: Vec::with_capacity(self.plan.cfg.shuffle_buffer.min(1 << 16)),
            rng: ChaCha8Rng::seed_from_u64(seed),
            slots: 0,
            done: false,
        });
        Ok(())
    }

    /// The open shard's next sample out of the shuffle buffer; `None` once the shard is
    /// exhausted. Output order is a pure function of the tar order and the shard's seed.
    fn next_output(&mut self) -> Result<Option<Entry>> {
        let (capacity, strict) = (self.plan.cfg.shuffle_buffer, self.plan.cfg.strict);
        let open = self.open.as_mut().expect("a shard is open");
        while !open.done && open.buffer.len() < capacity {
            match open.feed.next()? {
                Some(e) => open.buffer.push(e),
                None => {
                    open.done = true;
                    if let Some(problem) = open.feed.problem() {
                        if strict {
                            bail!("{problem} (data.strict = true)");
                        }
                        self.shard_problems += 1;
                    }
                }
            }
        }
        let n = open.buffer.len();
        if n == 0 {
            return Ok(None);
        }
        use rand::RngCore;
        let i = ((open.rng.next_u64() as u128 * n as u128) >> 64) as usize;
        Ok(Some(open.buffer.swap_remove(i)))
    }

    /// Reads the slot at the read head and advances it.
    fn pull(&mut self) -> Result<RawSlot> {
        if self.head_position >= self.plan.epoch_slots {
            self.enter_epoch(self.head_epoch + 1);
            self.head_position = 0;
            self.close_open()?;
        }
        // Shard t of the order holds slots starts[t] .. starts[t] + samples.
        let t = self.starts.partition_point(|&s| s <= self.head_position) - 1;
        if !matches!(&self.open, Some(o) if o.t == t) {
            self.open_shard(t)?;
            // Resuming inside the shard: walk its first slots without decoding.
            let offset = self.head_position - self.starts[t];
            while self.open.as_ref().expect("opened").slots < offset {
                self.next_output()?;
                self.open.as_mut().expect("opened").slots += 1;
            }
        }
        let entry = self.next_output()?;
        let open = self.open.as_mut().expect("opened");
        open.slots += 1;
        let raw = RawSlot {
            epoch: self.head_epoch,
            position: self.head_position,
            shard: open.feed.url.clone(),
            entry,
        };
        self.head_position += 1;
        Ok(raw)
    }

    /// Consumes one slot, counting skips into `stats`.
    fn next_slot(&mut self, stats: &mut DataStats) -> Result<Slot> {
        let raw = match self.ahead.pop_front() {
            Some(raw) => raw,
            None => self.pull()?,
        };
        stats.shard_errors += std::mem::take(&mut self.shard_problems);
        self.epoch = raw.epoch;
        self.position = raw.position + 1;
        self.plan.classify(raw, Some(stats))
    }

    /// The `i`-th slot after the consumed cursor (0 = the next one), classified without
    /// counting; the walker still consumes it later.
    fn peek(&mut self, i: usize) -> Result<Slot> {
        while self.ahead.len() <= i {
            let raw = self.pull()?;
            self.ahead.push_back(raw);
        }
        self.plan.classify(self.ahead[i].clone(), None)
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
                    decode_train(&c.data.image, cfg, &mut rng, &mut out)?;
                } else {
                    decode_eval(&c.data.image, cfg, &mut out)?;
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
                batch.labels.push(c.label);
                batch.keys.push(c.data.key.clone());
                batch.slots.push(Cursor {
                    epoch: c.epoch,
                    position: c.position,
                });
                batch.n += 1;
                stats.samples += 1;
            }
            Err(e) => {
                if strict {
                    bail!(
                        "sample {} of {}: image does not decode: {e:#} (data.strict = true)",
                        c.data.key,
                        c.shard
                    );
                }
                tracing::warn!(shard = %c.shard, key = %c.data.key, "image skipped: {e:#}");
                stats.decode_errors += 1;
                failed += 1;
            }
        }
    }
    Ok(failed)
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
        memory: Arc::new(Memory::default()),
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
    let mut walker = Walker::new(plan.clone(), start);
    let mut stats = DataStats::default();
    let (b, w, r) = (plan.per_rank_batch_size, plan.world_size, plan.rank);
    let (s, strict) = (plan.cfg.image_size as usize, plan.cfg.strict);
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
            if let Slot::Accepted(c) = walker.next_slot(&mut stats)? {
                if j % w == r {
                    mine.push(c);
                }
                j += 1;
            }
        }
        let decoded = decode_all(&pool, &plan.cfg, plan.seed, &mine, plan.cfg.augment);
        let mut missing = accept_decoded(&mut batch, mine, decoded, &mut stats, strict)?;
        // 2. Top-ups for undecodable images (see the module docs for world_size > 1): with one
        //    rank, the next accepted slots; with several, the slots after the global batch
        //    that this rank would own, read ahead without consuming them.
        let mut peeked = 0usize;
        let mut j_ahead = b * w; // global index of the next look-ahead accepted slot
        while missing > 0 {
            let mut more = Vec::with_capacity(missing);
            while more.len() < missing {
                guard(&mut walked)?;
                if w == 1 {
                    if let Slot::Accepted(c) = walker.next_slot(&mut stats)? {
                        more.push(c);
                    }
                } else {
                    if let Slot::Accepted(c) = walker.peek(peeked)? {
                        if j_ahead % w == r {
                            more.push(c);
                        }
                        j_ahead += 1;
                    }
                    peeked += 1;
                }
            }
            let decoded = decode_all(&pool, &plan.cfg, plan.seed, &more, plan.cfg.augment);
            missing = accept_decoded(&mut batch, more, decoded, &mut stats, strict)?;
        }
        let mut cursor = walker.cursor();
        if cursor.position >= plan.epoch_slots {
            cursor = Cursor {
                epoch: cursor.epoch + 1,
                position: 0,
            };
        }
        (stats.buffered_bytes, stats.peak_buffered_bytes) = plan.memory.read();
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
            let raw = RawSlot {
                epoch: 0,
                position: i,
                shard,
                entry: Some(entry),
            };
            if let Slot::Accepted(c) = self.plan.classify(raw, Some(&mut self.stats))? {
                self.accepted += 1;
                if i % self.plan.world_size as u64 == self.plan.rank as u64 {
                    self.pending.push_back(c);
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
