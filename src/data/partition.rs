//! Partitions of the training split: which shards each rank streams, and each partition's
//! endless, resumable stream of samples (the order is described in [`super::reader`]).
//!
//! - [`choose_partitions`]: how many partitions a run uses (`data.partitions`, or the default).
//! - [`assign_shards`]: which shards each partition owns, once per run.
//! - `PartitionStream`: one partition's samples, epoch after epoch, through a shuffle buffer per
//!   shard; `RankWalker`: a rank's partitions interleaved in the global order.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{bail, Result};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::feed::{Entry, ShardFeed};
use super::reader::{Candidate, DataStats, Plan};
use super::shards::{mix, shuffle, ShardInfo};

/// Seed domain tags (never change: saved cursors depend on them).
const TAG_SHARDS: u64 = 0x5348_4152_4453; // "SHARDS"
const TAG_SAMPLES: u64 = 0x5341_4d50_4c45; // "SAMPLE"

/// The default's upper bound on partitions (when the world size is smaller).
const DEFAULT_MAX_PARTITIONS: usize = 64;

/// Outputs drawn from a shard's shuffle buffer before it must hold more than this many samples:
/// the buffer then grows by one sample per output up to `data.shuffle_buffer`, so a partition
/// hands out its first samples (of the run, and of every shard) without first reading a whole
/// buffer.
const SHUFFLE_RAMP: usize = 16;

/// How the training split is partitioned for a run: which shards each partition owns, and how
/// many of its samples each partition contributes to every epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub partitions: usize,
    /// Shards (manifest indices) of each partition, ascending; see [`Layout::new`].
    pub owned: Vec<Vec<usize>>,
    /// Samples each partition contributes to every epoch: the smallest partition's count, so
    /// that every partition fills the same positions of the global order.
    pub epoch_units: u64,
    /// Samples to train on that each epoch leaves out (the larger partitions' surplus over
    /// `epoch_units`; different samples every epoch, since shard orders are drawn per epoch).
    pub leftover: u64,
}

impl Layout {
    /// Assigns the shards with `units[k] > 0` (samples trained on) to `partitions` partitions:
    /// longest processing time first, by samples to train on (ties: bytes, then index): shards
    /// in decreasing size each go to the partition with the fewest samples so far (ties: fewest
    /// bytes, then lowest index). A pure function of the shard list, `units` and `partitions`;
    /// callers ensure `partitions` is at most the number of such shards, so every partition
    /// owns at least one.
    pub fn new(shards: &[ShardInfo], units: &[u64], partitions: usize) -> Layout {
        let mut order: Vec<usize> = (0..shards.len()).filter(|&k| units[k] > 0).collect();
        order.sort_by(|&a, &b| {
            (units[b], shards[b].bytes)
                .cmp(&(units[a], shards[a].bytes))
                .then(a.cmp(&b))
        });
        let mut load = vec![(0u64, 0u64); partitions];
        let mut owned = vec![Vec::new(); partitions];
        for k in order {
            let p = (0..partitions)
                .min_by_key(|&p| (load[p], p))
                .expect("at least one partition");
            load[p].0 += units[k];
            load[p].1 += shards[k].bytes;
            owned[p].push(k);
        }
        for list in &mut owned {
            list.sort_unstable();
        }
        let epoch_units = load.iter().map(|l| l.0).min().unwrap_or(0);
        let leftover = load.iter().map(|l| l.0 - epoch_units).sum();
        Layout {
            partitions,
            owned,
            epoch_units,
            leftover,
        }
    }

    /// Positions of one epoch of the global order: `partitions * epoch_units`.
    pub fn epoch_positions(&self) -> u64 {
        self.partitions as u64 * self.epoch_units
    }
}

/// Each epoch may leave out at most this fraction of the samples for the default partition
/// count to be preferred to a smaller one.
const DEFAULT_MAX_LEFTOVER: f64 = 0.02;

/// The number of partitions of a run on `world_size` ranks (see [`Layout`] for `shards` and
/// `units`).
///
/// `configured` (`data.partitions`) must be a multiple of `world_size` and at most the number
/// of shards holding samples to train on. `None` picks among `world_size * 2^k`, at most
/// `max(64, world_size)` and at most that number of shards, the largest whose epochs leave out
/// at most 2 % of the samples, else the one that leaves out the fewest.
///
/// Errors name the value, the world size and the shard count.
pub fn choose_partitions(
    configured: Option<usize>,
    shards: &[ShardInfo],
    units: &[u64],
    world_size: usize,
) -> Result<usize> {
    let n = units.iter().filter(|&&u| u > 0).count();
    if n < world_size {
        bail!(
            "the training split has {n} shard(s) holding training samples, fewer than the {world_size} ranks: \
             each rank streams whole shards, so build the shards smaller (devise data build-shards --shard-size-bytes) \
             or use at most {n} rank(s)"
        );
    }
    if let Some(p) = configured {
        check_partitions(p, world_size)?;
        if p > n {
            bail!(
                "data.partitions = {p} is more than the {n} shard(s) of the training split that hold training samples \
                 (each partition owns whole shards)"
            );
        }
        return Ok(p);
    }
    let cap = DEFAULT_MAX_PARTITIONS.max(world_size).min(n);
    let total: u64 = units.iter().sum();
    let mut best: Option<(u64, usize)> = None;
    let mut p = world_size;
    while p <= cap {
        let leftover = Layout::new(shards, units, p).leftover;
        if leftover as f64 <= DEFAULT_MAX_LEFTOVER * total as f64 {
            best = Some((0, p)); // the largest acceptable one wins
        } else if best.is_none_or(|(l, _)| l > 0 && leftover <= l) {
            best = Some((leftover, p));
        }
        p *= 2;
    }
    Ok(best.expect("world_size itself is a candidate").1)
}

/// `partitions` can run on `world_size` ranks: a multiple of it. The error names the world
/// sizes that work.
pub fn check_partitions(partitions: usize, world_size: usize) -> Result<()> {
    if partitions == 0 || world_size == 0 || !partitions.is_multiple_of(world_size) {
        let work: Vec<String> = (1..=partitions)
            .filter(|w| partitions.is_multiple_of(*w))
            .map(|w| w.to_string())
            .collect();
        bail!(
            "the training stream has {partitions} partitions (data.partitions, fixed when the run started), \
             which {world_size} ranks cannot share: each rank streams whole partitions. \
             World sizes that work: {} (those that also divide train.global_batch_size)",
            work.join(", ")
        );
    }
    Ok(())
}

/// Where the `q`-th unit (0-based, counting across epochs) of partition `p` sits in the global
/// order of `partitions` partitions.
pub(super) fn global_position(p: usize, q: u64, partitions: usize) -> u64 {
    p as u64 + q * partitions as u64
}

/// Units of partition `p` that come before global position `position`.
fn units_before(p: usize, position: u64, partitions: usize) -> u64 {
    let p = p as u64;
    if position <= p {
        0
    } else {
        (position - p).div_ceil(partitions as u64)
    }
}

/// One unit of a partition's stream: a sample to train on, or a hole left by a shard that
/// ended before delivering the samples its manifest entry promised (truncated, malformed).
#[derive(Clone)]
pub(super) enum Unit {
    Sample(Candidate),
    Hole,
}

/// The shard a partition is reading, through its shuffle buffer.
struct OpenShard {
    /// Manifest index.
    k: usize,
    feed: ShardFeed,
    buffer: Vec<Entry>,
    rng: ChaCha8Rng,
    /// Outputs drawn from the buffer so far.
    outputs: usize,
    /// Units of this shard delivered so far (samples and holes).
    units: u64,
    /// The feed reached its end (and its problem, if any, was counted).
    done: bool,
}

/// One partition's samples, epoch after epoch (see [`super::reader`], "Partitions").
pub(super) struct PartitionStream {
    plan: Arc<Plan>,
    p: usize,
    partitions: usize,
    /// Owned shards, ascending manifest indices.
    shards: Vec<usize>,
    /// Units per epoch ([`Layout::epoch_units`]).
    epoch_units: u64,
    /// Units delivered since the run started (the next unit's index `q`).
    delivered: u64,
    epoch: u64,
    /// This epoch's shard visits `(manifest index, units taken)`, and the one being read.
    visits: Vec<(usize, u64)>,
    t: usize,
    /// Units of visit `t` to skip (without decoding) when its shard is opened: a resume.
    skip: u64,
    open: Option<OpenShard>,
    /// Shards after the open one, already streaming.
    prefetch: VecDeque<ShardFeed>,
    /// The prefetch queue was topped up for the open shard (it is, once half of the shard's
    /// visit was delivered: until then the open shard has the partition's bandwidth to itself).
    prefetching: bool,
}

impl PartitionStream {
    /// Partition `p` of `layout`, positioned before its unit `q`.
    pub(super) fn new(plan: Arc<Plan>, layout: &Layout, p: usize, q: u64) -> PartitionStream {
        let epoch_units = layout.epoch_units;
        assert!(epoch_units > 0, "partition {p} owns no training sample");
        let mut s = PartitionStream {
            plan,
            p,
            partitions: layout.partitions,
            shards: layout.owned[p].clone(),
            epoch_units,
            delivered: q,
            epoch: q / epoch_units,
            visits: Vec::new(),
            t: 0,
            skip: 0,
            open: None,
            prefetch: VecDeque::new(),
            prefetching: false,
        };
        s.visits = s.epoch_visits(s.epoch);
        let mut u = q % epoch_units;
        while u >= s.visits[s.t].1 {
            u -= s.visits[s.t].1;
            s.t += 1;
        }
        s.skip = u;
        // Start the first shard's download now: the walker reads its partitions one position at
        // a time, so opening each one only when its first sample is needed would wait for one
        // time-to-first-byte per partition in series at the start of a run.
        let first = s.plan.open_feed(s.visits[s.t].0);
        s.prefetch.push_back(first);
        s
    }

    /// Epoch `epoch`'s shard visits: the owned shards in an order drawn for the epoch, each with
    /// the units it contributes, until the epoch has `epoch_units` (the last visit may take part
    /// of its shard; shards after it are not visited this epoch).
    fn epoch_visits(&self, epoch: u64) -> Vec<(usize, u64)> {
        let mut order = self.shards.clone();
        let seed = mix(&[self.plan.seed, TAG_SHARDS, self.p as u64, epoch]);
        shuffle(&mut order, &mut ChaCha8Rng::seed_from_u64(seed));
        let mut left = self.epoch_units;
        let mut visits = Vec::with_capacity(order.len());
        for k in order {
            if left == 0 {
                break;
            }
            let n = self.plan.units[k].min(left);
            visits.push((k, n));
            left -= n;
        }
        visits
    }

    /// The next unit, at global position `p + q * partitions`.
    pub(super) fn next(&mut self, stats: &mut DataStats) -> Result<(u64, Unit)> {
        let position = global_position(self.p, self.delivered, self.partitions);
        loop {
            if self.open.is_none() {
                self.open_shard()?;
            }
            let open = self.open.as_ref().expect("opened");
            if open.units == self.visits[self.t].1 {
                self.close_open(stats)?;
                self.t += 1;
                if self.t == self.visits.len() {
                    self.epoch += 1;
                    self.visits = self.epoch_visits(self.epoch);
                    self.t = 0;
                }
                continue;
            }
            let entry = self.next_output(stats)?;
            let open = self.open.as_mut().expect("opened");
            let url = open.feed.url.clone();
            let unit = match entry {
                None => {
                    stats.lost_to_shard_errors += 1;
                    Unit::Hole
                }
                Some(entry) => match self.plan.classify(entry, &url, stats)? {
                    Some((data, label)) => Unit::Sample(Candidate {
                        data,
                        shard: url,
                        label,
                        position,
                    }),
                    None => continue,
                },
            };
            open.units += 1;
            self.delivered += 1;
            if !self.prefetching && 2 * open.units >= self.visits[self.t].1 {
                self.top_up_prefetch();
            }
            return Ok((position, unit));
        }
    }

    /// The `n` manifest shard indices visited after visit `t` of the current epoch.
    fn shards_after(&self, t: usize, n: usize) -> Vec<usize> {
        let mut next: Vec<usize> = self.visits[t + 1..].iter().map(|v| v.0).take(n).collect();
        let mut epoch = self.epoch;
        while next.len() < n {
            epoch += 1;
            let visits = self.epoch_visits(epoch);
            next.extend(visits.into_iter().map(|v| v.0).take(n - next.len()));
        }
        next
    }

    /// Opens the shard of visit `t` (from the prefetch queue when it is there) and skips the
    /// units a resume starts after. The next `prefetch_shards` shards start streaming once half
    /// of this visit was delivered ([`Self::top_up_prefetch`]), not now: at the start of a run
    /// every partition opens its first shard at once, and the first batch needs only those.
    fn open_shard(&mut self) -> Result<()> {
        let k = self.visits[self.t].0;
        let feed = match self.prefetch.front() {
            Some(f) if f.index == k => self.prefetch.pop_front().expect("front exists"),
            _ => {
                self.prefetch.clear();
                self.plan.open_feed(k)
            }
        };
        self.prefetching = false;
        let seed = mix(&[self.plan.seed, TAG_SAMPLES, self.epoch, k as u64]);
        self.open = Some(OpenShard {
            k,
            feed,
            buffer: Vec::with_capacity(self.plan.cfg.shuffle_buffer.min(1 << 16)),
            rng: ChaCha8Rng::seed_from_u64(seed),
            outputs: 0,
            units: 0,
            done: false,
        });
        // Resuming inside the shard: walk its first units without decoding or counting them.
        let mut quiet = DataStats::default();
        while self.skip > 0 {
            if let Some(entry) = self.next_output(&mut quiet)? {
                if !self.plan.accepts(&entry) {
                    continue;
                }
            }
            self.open.as_mut().expect("opened").units += 1;
            self.skip -= 1;
        }
        Ok(())
    }

    /// Keeps the `prefetch_shards` shards visited after the open one streaming (those already
    /// queued stay when they are still the right ones).
    fn top_up_prefetch(&mut self) {
        let want = self.shards_after(self.t, self.plan.cfg.prefetch_shards);
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
        self.prefetching = true;
    }

    /// The open shard's next sample out of its shuffle buffer; `None` once the shard is
    /// exhausted. The buffer holds at most `SHUFFLE_RAMP + outputs` samples (and at most
    /// `data.shuffle_buffer`); the order is a pure function of the tar order and the shard's
    /// seed.
    fn next_output(&mut self, stats: &mut DataStats) -> Result<Option<Entry>> {
        let cfg = &self.plan.cfg;
        let open = self.open.as_mut().expect("a shard is open");
        let fill_to = cfg.shuffle_buffer.min(SHUFFLE_RAMP + open.outputs);
        while !open.done && open.buffer.len() < fill_to {
            match open.feed.next()? {
                Some(e) => open.buffer.push(e),
                None => {
                    open.done = true;
                    if let Some(problem) = open.feed.problem() {
                        if cfg.strict {
                            bail!("{problem} (data.strict = true)");
                        }
                        stats.shard_errors += 1;
                    }
                }
            }
        }
        let n = open.buffer.len();
        if n == 0 {
            return Ok(None);
        }
        let i = ((open.rng.next_u64() as u128 * n as u128) >> 64) as usize;
        open.outputs += 1;
        Ok(Some(open.buffer.swap_remove(i)))
    }

    /// Closes the open shard once its visit's units were delivered. When the visit took the whole
    /// shard, reads the rest of it (so a sha256 mismatch is seen; normally only the tar's end is
    /// left) and warns about samples to train on beyond the manifest's count. A visit that took
    /// part of its shard (a partition's leftover at the end of an epoch) drops the feed instead:
    /// the rest is not downloaded (with a shard cache, the feed's thread downloads it into the
    /// cache), and the shard's checksum is checked in the epochs that read it whole.
    fn close_open(&mut self, stats: &mut DataStats) -> Result<()> {
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        let whole = open.units == self.plan.units[open.k];
        if !whole {
            return Ok(());
        }
        let mut extra = open.buffer.iter().filter(|e| self.plan.accepts(e)).count();
        if !open.done {
            while let Some(e) = open.feed.next()? {
                extra += usize::from(self.plan.accepts(&e));
            }
            if let Some(problem) = open.feed.problem() {
                if self.plan.cfg.strict {
                    bail!("{problem} (data.strict = true)");
                }
                stats.shard_errors += 1;
            }
        }
        if extra > 0 {
            tracing::warn!(
                shard = %open.feed.url,
                "the shard holds {extra} training samples more than the manifest says; the extra ones are ignored"
            );
        }
        Ok(())
    }
}

/// A rank's partitions (`p % world_size == rank`) interleaved in the global order: global
/// position `i` belongs to partition `i % partitions`, so the rank reads positions
/// `i % world_size == rank` in increasing order, each from the partition it belongs to.
pub(super) struct RankWalker {
    partitions: usize,
    world_size: usize,
    rank: usize,
    /// `streams[j]` is partition `rank + j * world_size`.
    streams: Vec<PartitionStream>,
    /// The next position to read.
    read: u64,
    /// Units read but not consumed yet (look-ahead for top-ups).
    ahead: VecDeque<(u64, Unit)>,
}

impl RankWalker {
    /// The walker of `plan.rank`, positioned before global position `position`.
    pub(super) fn new(plan: Arc<Plan>, layout: &Layout, position: u64) -> RankWalker {
        let (w, r, partitions) = (plan.world_size, plan.rank, layout.partitions);
        let streams = (r..partitions)
            .step_by(w)
            .map(|p| {
                let q = units_before(p, position, partitions);
                PartitionStream::new(plan.clone(), layout, p, q)
            })
            .collect();
        let offset = (r as u64 + w as u64 - position % w as u64) % w as u64;
        RankWalker {
            partitions,
            world_size: w,
            rank: r,
            streams,
            read: position + offset,
            ahead: VecDeque::new(),
        }
    }

    fn pull(&mut self, stats: &mut DataStats) -> Result<(u64, Unit)> {
        let i = self.read;
        self.read += self.world_size as u64;
        let p = (i % self.partitions as u64) as usize;
        let (position, unit) = self.streams[(p - self.rank) / self.world_size].next(stats)?;
        debug_assert_eq!(position, i);
        Ok((position, unit))
    }

    /// Consumes this rank's next unit.
    pub(super) fn next(&mut self, stats: &mut DataStats) -> Result<(u64, Unit)> {
        match self.ahead.pop_front() {
            Some(x) => Ok(x),
            None => self.pull(stats),
        }
    }

    /// This rank's `k`-th unit after the consumed ones (0 = the next), without consuming it.
    pub(super) fn peek(&mut self, k: usize, stats: &mut DataStats) -> Result<&Unit> {
        while self.ahead.len() <= k {
            let x = self.pull(stats)?;
            self.ahead.push_back(x);
        }
        Ok(&self.ahead[k].1)
    }

    /// Units per epoch of this rank's partitions together.
    pub(super) fn epoch_units(&self) -> u64 {
        self.streams.iter().map(|s| s.epoch_units).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(bytes: u64) -> ShardInfo {
        ShardInfo {
            name: String::new(),
            samples: 10,
            bytes,
            sha256: String::new(),
            class_counts: Vec::new(),
        }
    }

    fn equal(n: usize, units: u64) -> (Vec<ShardInfo>, Vec<u64>) {
        ((0..n).map(|_| shard(1000)).collect(), vec![units; n])
    }

    #[test]
    fn default_partitions_are_the_world_size_times_a_power_of_two_that_leaves_little_out() {
        let choose = |(shards, units): (Vec<ShardInfo>, Vec<u64>), w| {
            choose_partitions(None, &shards, &units, w).unwrap()
        };
        assert_eq!(choose(equal(1024, 10), 1), 64);
        assert_eq!(choose(equal(1024, 10), 8), 64);
        assert_eq!(choose(equal(1024, 10), 128), 128);
        // 120 equal shards: 64, 32 or 16 partitions would leave whole shards out of every epoch;
        // 8 take 15 shards each.
        assert_eq!(choose(equal(120, 10), 1), 8);
        assert_eq!(choose(equal(120, 10), 2), 8);
        assert_eq!(choose(equal(120, 10), 6), 24);
        // Nothing acceptable: the fewest left out (ties: the larger).
        assert_eq!(choose(equal(10, 10), 3), 3);
        assert_eq!(choose(equal(5, 10), 1), 1);
        let (shards, units) = equal(20, 10);
        assert_eq!(choose_partitions(Some(16), &shards, &units, 4).unwrap(), 16);
        let e = choose_partitions(Some(6), &shards, &units, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1, 2, 3, 6"), "{e}");
        let e = choose_partitions(Some(32), &shards, &units, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than the 20 shard"), "{e}");
        let e = choose_partitions(None, &shards[..3], &units[..3], 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fewer than the 4 ranks"), "{e}");
    }

    #[test]
    fn shards_are_balanced_by_samples_and_empty_shards_left_out() {
        let shards: Vec<ShardInfo> = (0..8).map(|_| shard(1000)).collect();
        let units = [100, 90, 80, 70, 60, 50, 0, 10];
        let layout = Layout::new(&shards, &units, 3);
        // LPT: 100 -> 0, 90 -> 1, 80 -> 2, 70 -> 2 (80), 60 -> 1 (90), 50 -> 0 (100), then all
        // hold 150 and 2000 bytes: 10 -> 0.
        assert_eq!(layout.owned, vec![vec![0, 5, 7], vec![1, 4], vec![2, 3]]);
        assert_eq!(layout.epoch_units, 150);
        assert_eq!(layout.leftover, 10);
        assert_eq!(layout.epoch_positions(), 450);
    }

    #[test]
    fn positions_map_to_partition_units() {
        assert_eq!(units_before(0, 0, 4), 0);
        assert_eq!(units_before(0, 1, 4), 1);
        assert_eq!(units_before(3, 3, 4), 0);
        assert_eq!(units_before(3, 4, 4), 1);
        assert_eq!(units_before(1, 9, 4), 2); // positions 1 and 5
        assert_eq!(global_position(1, 2, 4), 9);
    }
}
