//! The node-local shard cache (`data.cache_dir`): a shard downloaded once is read back from
//! local disk in later epochs, and the ranks of a node (every process using the same
//! directory) share it.
//!
//! # Layout
//! `<cache_dir>/<build>/<sha256>.tar` is a verified shard, named by the sha256 of its bytes;
//! `<build>` is the first 16 hex digits of the manifest's fingerprint (the sha256 of its JSON,
//! [`Manifest::fingerprint`]), so a cache
//! written for another shard build is never read. Beside each shard: `<sha256>.lock` (empty,
//! kept) and, while it downloads, `<sha256>.part`.
//!
//! # Writes
//! A miss streams the shard from the store exactly as without a cache and writes the same bytes
//! to `<sha256>.part` (sized to the manifest's byte count when created, so that its space is
//! accounted while it fills). Once the whole object was read and its size and sha256 match the
//! manifest, the part is synced and renamed to `<sha256>.tar`: the only files ever read back
//! are complete and verified. Before use, a cached shard is re-checked cheaply: its size, and
//! its name (the digest of the verified bytes). The stream then hashes every byte it reads, as
//! it does from the store, and a mismatch (the file changed on disk) deletes the file and is
//! reported like any shard checksum problem. A feed dropped before the end of its shard (a
//! partial visit at an epoch's end, the run stopping) keeps downloading the rest into the cache
//! on its own thread, so every shard of a full epoch ends up cached.
//!
//! # Sharing and crashes: a lock per shard file
//! Each shard's `.lock` file carries an advisory lock (`flock`): exclusive while a process
//! downloads the shard, shared while a process reads its cached copy. A process that wants a
//! shard another one is downloading waits for it and then reads the cached copy, so the same
//! shard is never downloaded twice at the same time. Eviction deletes only shards whose lock it
//! can take exclusively: never one a rank is reading or has opened ahead (the shard being read
//! and the `data.prefetch_shards` next ones of each partition). Why a lock per file rather than
//! one fetcher per node: with the partitioned plan the ranks of a run read disjoint shards, so
//! contention is rare (a change of world size, evaluation, two runs on one cache); the kernel
//! releases a dead process's locks, and there is no leader to elect and no shared memory that a
//! crash can leave stale. A `.part` whose lock is free belongs to a dead writer: it is
//! overwritten or deleted, never read. The locks need a local file system (not NFS).
//!
//! # Limit
//! `data.cache_limit_bytes` bounds the bytes of the `.tar` and `.part` files under `cache_dir`
//! (every build's). Before a download, shards are deleted until the new one fits: other
//! builds' first, then this build's least recently used (by modification time, set on every
//! use), skipping locked ones. When nothing more can be deleted, the shard is streamed without
//! being cached (counted as bypassed). A limit below the largest shard is an error at start.
//!
//! Cache I/O problems (a full disk, permissions) never fail the stream: the shard is read from
//! the store, and the first such problem is warned.
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};

use super::shards::{Manifest, ShardInfo};

/// How often a process waiting for a shard another process downloads looks again.
const POLL: Duration = Duration::from_millis(20);
/// Write buffer of a shard being cached.
const WRITE_BUFFER: usize = 1 << 20;

/// What this opened cache did (one per stream: the training stream's, each evaluation's), read
/// with [`ShardCache::counts`].
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    bypassed: AtomicU64,
    disk_bytes: AtomicU64,
    evictions: AtomicU64,
}

/// A snapshot of one opened cache's counters (a stream's).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheCounts {
    /// Shards read from the cache.
    pub hits: u64,
    /// Shards downloaded into the cache.
    pub misses: u64,
    /// Shards streamed from the store without being cached (no room under the limit, or a
    /// cache I/O problem).
    pub bypassed: u64,
    /// Bytes read from cached files.
    pub disk_bytes: u64,
    /// Shards this stream deleted to stay under the limit.
    pub evictions: u64,
}

/// An open shard cache; see the module docs.
#[derive(Debug)]
pub(crate) struct ShardCache {
    root: PathBuf,
    /// `root/<build>`.
    dir: PathBuf,
    limit: Option<u64>,
    counters: Counters,
    warned: AtomicBool,
    /// What the cache held when opened (logged at the start of training).
    pub(crate) summary: String,
}

/// Where a shard's bytes come from.
pub(crate) enum Source {
    /// The cached copy, its lock held shared until the [`Hit`] is dropped.
    Hit(File, Hit),
    /// The store; the bytes go to the cache through the writer.
    Miss(Writer),
    /// The store, not cached.
    Bypass,
}

/// A cached shard being read.
pub(crate) struct Hit {
    path: PathBuf,
    cache: Arc<ShardCache>,
    _lock: File,
}

impl Hit {
    /// Where the bytes read from the cached file are counted.
    pub(crate) fn counter(&self) -> &AtomicU64 {
        &self.cache.counters.disk_bytes
    }

    /// The cached file's bytes did not match the manifest: delete it (it is downloaded again the
    /// next time it is needed).
    pub(crate) fn discard(&self) {
        if let Err(e) = fs::remove_file(&self.path) {
            self.cache
                .warn(&format!("deleting {}: {e}", self.path.display()));
        }
    }
}

/// A shard being downloaded into the cache: its bytes go to `<sha256>.part`, which
/// [`Writer::commit`] renames once verified. Dropped uncommitted, the part is deleted.
pub(crate) struct Writer {
    part: Option<BufWriter<File>>,
    part_path: PathBuf,
    path: PathBuf,
    written: u64,
    cache: Arc<ShardCache>,
    _lock: File,
}

impl Writer {
    /// Appends `buf`; on an I/O error the shard is dropped from the cache (warned once).
    pub(crate) fn write(&mut self, buf: &[u8]) {
        let Some(part) = &mut self.part else { return };
        match part.write_all(buf) {
            Ok(()) => self.written += buf.len() as u64,
            Err(e) => self.abandon(&format!("writing {}: {e}", self.part_path.display())),
        }
    }

    /// Ends the download: `verified` (the whole object read, size and sha256 as in the
    /// manifest) renames the part into place; otherwise it is deleted.
    pub(crate) fn commit(mut self, verified: bool) {
        let Some(part) = self.part.take() else { return };
        if !verified {
            let _ = fs::remove_file(&self.part_path);
            return;
        }
        let done = part
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| {
                file.set_len(self.written)?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&self.part_path, &self.path));
        if let Err(e) = done {
            let _ = fs::remove_file(&self.part_path);
            self.cache.warn(&format!(
                "committing {} to {}: {e}",
                self.part_path.display(),
                self.path.display()
            ));
        }
    }

    fn abandon(&mut self, why: &str) {
        self.part = None;
        let _ = fs::remove_file(&self.part_path);
        self.cache.warn(why);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.part.take().is_some() {
            let _ = fs::remove_file(&self.part_path);
        }
    }
}

/// A `.tar` or `.part` file under the cache root, as the limit sees it.
struct Entry {
    path: PathBuf,
    lock: PathBuf,
    bytes: u64,
    modified: SystemTime,
    part: bool,
    this_build: bool,
}

impl ShardCache {
    /// Opens (creating) the cache for shards of `manifest` under `root`; `splits` are those the
    /// run reads (training and evaluation: the limit must hold their largest shard, so that a
    /// limit too small fails at the start of training, not at the first evaluation). Deletes
    /// dead writers' parts.
    ///
    /// Errors: a limit below the largest shard (naming it), a directory that cannot be created
    /// or locked.
    pub(crate) fn open(
        root: &Path,
        limit: Option<u64>,
        manifest: &Manifest,
        splits: &[&str],
    ) -> Result<ShardCache> {
        let largest = splits
            .iter()
            .filter_map(|split| Some((*split, manifest.splits.get(*split)?)))
            .flat_map(|(split, info)| info.shards.iter().map(move |s| (split, s)))
            .rev()
            .max_by_key(|(_, s)| s.bytes);
        if let (Some(limit), Some((split, largest))) = (limit, largest) {
            if limit < largest.bytes {
                bail!(
                    "data.cache_limit_bytes = {limit} is smaller than shard {:?} of split {split:?} ({} bytes): \
                     the cache could not hold it; raise the limit to at least that (a full cache holds the \
                     node's partitions' shards) or leave data.cache_dir out",
                    largest.name,
                    largest.bytes
                );
            }
        }
        let dir = root.join(&manifest.fingerprint()[..16]);
        fs::create_dir_all(&dir)
            .with_context(|| format!("creating data.cache_dir {}", dir.display()))?;
        let mut cache = ShardCache {
            root: root.to_path_buf(),
            dir,
            limit,
            counters: Counters::default(),
            warned: AtomicBool::new(false),
            summary: String::new(),
        };
        let global = cache
            .global_lock()
            .with_context(|| format!("locking data.cache_dir {}", root.display()))?;
        let entries = cache
            .scan()
            .with_context(|| format!("reading data.cache_dir {}", root.display()))?;
        let mut held = [0u64; 2];
        for e in entries {
            if e.part {
                if unlocked(&e.lock) {
                    let _ = fs::remove_file(&e.path);
                }
            } else {
                held[usize::from(e.this_build)] += e.bytes;
            }
        }
        drop(global);
        cache.summary = format!(
            "shard cache {}: {:.1} MB of this shard build cached, {:.1} MB of other builds; limit {}",
            cache.dir.display(),
            held[1] as f64 / 1e6,
            held[0] as f64 / 1e6,
            limit.map_or("none".into(), |l| format!("{:.1} MB", l as f64 / 1e6))
        );
        tracing::debug!("{}", cache.summary);
        Ok(cache)
    }

    /// The counters of this opened cache so far.
    pub(crate) fn counts(&self) -> CacheCounts {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheCounts {
            hits: get(&c.hits),
            misses: get(&c.misses),
            bypassed: get(&c.bypassed),
            disk_bytes: get(&c.disk_bytes),
            evictions: get(&c.evictions),
        }
    }

    /// Where shard `info` is read from. Waits (checking `stop`) while another process
    /// downloads it. Never fails: a cache problem is warned once and gives [`Source::Bypass`].
    pub(crate) fn source(self: &Arc<Self>, info: &ShardInfo, stop: &AtomicBool) -> Source {
        match self.try_source(info, stop) {
            Ok(source) => source,
            Err(e) => {
                self.warn(&format!("shard {}: {e}", info.name));
                self.counters.bypassed.fetch_add(1, Ordering::Relaxed);
                Source::Bypass
            }
        }
    }

    fn try_source(self: &Arc<Self>, info: &ShardInfo, stop: &AtomicBool) -> io::Result<Source> {
        let sha = info.sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(io::Error::other(format!(
                "the manifest's sha256 {:?} is not 64 hex digits",
                info.sha256
            )));
        }
        let path = self.dir.join(format!("{sha}.tar"));
        let lock = lock_file(&self.dir.join(format!("{sha}.lock")))?;
        while !stop.load(Ordering::Relaxed) {
            // A verified copy, read under a shared lock (no eviction while it is read).
            match lock.try_lock_shared() {
                Ok(()) => match File::open(&path) {
                    Ok(file) if file.metadata()?.len() == info.bytes => {
                        let _ = file.set_modified(SystemTime::now()); // least recently used
                        self.counters.hits.fetch_add(1, Ordering::Relaxed);
                        let hit = Hit {
                            path,
                            cache: self.clone(),
                            _lock: lock,
                        };
                        return Ok(Source::Hit(file, hit));
                    }
                    Ok(_) => lock.unlock()?, // wrong size: replaced below
                    Err(e) if e.kind() == io::ErrorKind::NotFound => lock.unlock()?,
                    Err(e) => return Err(e),
                },
                Err(TryLockError::WouldBlock) => {
                    // Being downloaded by another process.
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(TryLockError::Error(e)) => return Err(e),
            }
            // Not cached: download it under the exclusive lock.
            match lock.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(TryLockError::Error(e)) => return Err(e),
            }
            match fs::metadata(&path) {
                Ok(m) if m.len() == info.bytes => {
                    // Committed by another process in between: read it.
                    lock.unlock()?;
                    continue;
                }
                Ok(_) => fs::remove_file(&path)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let part_path = self.dir.join(format!("{sha}.part"));
            return Ok(match self.reserve(&part_path, info.bytes)? {
                Some(part) => {
                    self.counters.misses.fetch_add(1, Ordering::Relaxed);
                    Source::Miss(Writer {
                        part: Some(BufWriter::with_capacity(WRITE_BUFFER, part)),
                        part_path,
                        path,
                        written: 0,
                        cache: self.clone(),
                        _lock: lock,
                    })
                }
                None => {
                    self.counters.bypassed.fetch_add(1, Ordering::Relaxed);
                    Source::Bypass
                }
            });
        }
        Ok(Source::Bypass)
    }

    /// Makes room for `bytes` under the limit (evicting) and creates the part file at
    /// `part_path` sized to `bytes`; `None` when no room can be made.
    fn reserve(&self, part_path: &Path, bytes: u64) -> io::Result<Option<File>> {
        let _global = self.global_lock()?;
        if let Some(limit) = self.limit {
            let mut entries: Vec<Entry> = self
                .scan()?
                .into_iter()
                .filter(|e| e.path != part_path) // ours (a dead writer's) is replaced
                .collect();
            let mut used: u64 = entries.iter().map(|e| e.bytes).sum();
            // Dead writers' parts first, then other builds' shards, then the least recently used.
            entries.sort_by_key(|e| (!e.part, e.this_build, e.modified));
            for e in entries {
                if used + bytes <= limit {
                    break;
                }
                let Ok(lock) = lock_file(&e.lock) else {
                    continue;
                };
                if lock.try_lock().is_ok() && fs::remove_file(&e.path).is_ok() {
                    used -= e.bytes;
                    if !e.part {
                        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(shard = %e.path.display(), "shard cache: evicted");
                    }
                }
            }
            if used + bytes > limit {
                return Ok(None);
            }
        }
        let part = File::create(part_path)?;
        part.set_len(bytes)?;
        Ok(Some(part))
    }

    /// Every `.tar` and `.part` under the root (one level of build directories).
    fn scan(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for build in fs::read_dir(&self.root)? {
            let build = build?;
            if !build.file_type()?.is_dir() {
                continue;
            }
            let this_build = build.path() == self.dir;
            for file in fs::read_dir(build.path())? {
                let file = file?;
                let path = file.path();
                let part = match path.extension().and_then(|e| e.to_str()) {
                    Some("tar") => false,
                    Some("part") => true,
                    _ => continue,
                };
                let Ok(meta) = file.metadata() else {
                    continue; // deleted meanwhile
                };
                out.push(Entry {
                    lock: path.with_extension("lock"),
                    path,
                    bytes: meta.len(),
                    modified: meta.modified()?,
                    part,
                    this_build,
                });
            }
        }
        Ok(out)
    }

    /// The root's lock, held exclusively while a process makes room and creates a part.
    fn global_lock(&self) -> io::Result<File> {
        let f = lock_file(&self.root.join(".lock"))?;
        f.lock()?;
        Ok(f)
    }

    fn warn(&self, what: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "shard cache {}: {what}; such shards are read from the store instead (warned once)",
                self.root.display()
            );
        }
    }
}

fn lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
}

/// Nobody holds the lock at `path` (a missing lock file counts as free).
fn unlocked(path: &Path) -> bool {
    match lock_file(path) {
        Ok(f) => f.try_lock().is_ok(),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::super::feed::{Entry, Memory, ShardFeed};
    use super::super::shards::SplitInfo;
    use super::super::webdataset::tar_of;
    use super::*;
    use crate::storage::Store;
    use sha2::{Digest, Sha256};
    use std::collections::BTreeMap;

    /// A store with `n` one-sample shards of `size` image bytes each, and its manifest.
    fn shards(dir: &Path, n: usize, size: usize) -> (Store, Manifest) {
        let store = Store::open(dir.to_str().unwrap()).unwrap();
        let mut infos = Vec::new();
        for i in 0..n {
            let image = vec![i as u8; size];
            let bytes = tar_of(&[(&format!("s{i}.jpg"), &image), (&format!("s{i}.cls"), b"0")]);
            let name = format!("train-{i:06}.tar");
            store.put(&name, bytes.clone().into()).unwrap();
            infos.push(ShardInfo {
                name,
                samples: 1,
                bytes: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(&bytes)),
                class_counts: vec![1],
            });
        }
        let split = SplitInfo {
            samples: n as u64,
            shards: infos,
            class_counts: vec![n as u64],
        };
        let manifest = Manifest {
            format: super::super::shards::FORMAT.into(),
            classes: vec!["c".into()],
            splits: BTreeMap::from([("train".into(), split)]),
        };
        (store, manifest)
    }

    fn open(root: &Path, limit: Option<u64>, m: &Manifest) -> Result<Arc<ShardCache>> {
        ShardCache::open(root, limit, m, &["train", "val"]).map(Arc::new)
    }

    /// Reads shard `k` through a feed: its keys and the feed's problem.
    fn read(
        store: &Store,
        cache: &Arc<ShardCache>,
        m: &Manifest,
        k: usize,
    ) -> (Vec<String>, Option<String>) {
        let memory = Arc::new(Memory::default());
        let info = &m.splits["train"].shards[k];
        let mut feed = ShardFeed::open(store, Some(cache), info, k, 1, 4, &memory);
        let mut keys = Vec::new();
        while let Some(e) = feed.next().unwrap() {
            if let Entry::Ok(d) = e {
                keys.push(d.key.clone());
            }
        }
        (keys, feed.problem().map(str::to_string))
    }

    fn cached(cache: &ShardCache, m: &Manifest, k: usize) -> PathBuf {
        cache
            .dir
            .join(format!("{}.tar", m.splits["train"].shards[k].sha256))
    }

    #[test]
    fn a_miss_is_cached_verified_and_a_changed_copy_is_deleted_not_trusted() {
        let (data, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (store, m) = shards(data.path(), 2, 1000);
        let cache = open(root.path(), None, &m).unwrap();
        assert_eq!(read(&store, &cache, &m, 0), (vec!["s0".to_string()], None));
        let path = cached(&cache, &m, 0);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            store.get("train-000000.tar").unwrap()
        );
        assert_eq!(read(&store, &cache, &m, 0), (vec!["s0".to_string()], None));
        let c = cache.counts();
        assert_eq!((c.misses, c.hits, c.bypassed), (1, 1, 0));
        assert_eq!(c.disk_bytes, m.splits["train"].shards[0].bytes);

        // The same size, other bytes: read once (the size check cannot tell), reported, deleted.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[600] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let (_, problem) = read(&store, &cache, &m, 0);
        let problem = problem.expect("a changed cached file is a checksum problem");
        assert!(
            problem.contains("its cached copy, now deleted"),
            "{problem}"
        );
        assert!(!path.exists());
        // Another size: never read; downloaded again.
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(read(&store, &cache, &m, 0), (vec!["s0".to_string()], None));
        assert_eq!(cache.counts().misses, 2);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            store.get("train-000000.tar").unwrap()
        );

        // Another shard build (manifest) has its own directory: nothing of this one is read.
        let mut other = m.clone();
        other.classes.push("d".into());
        let cache2 = open(root.path(), None, &other).unwrap();
        assert_ne!(cache2.dir, cache.dir);
        read(&store, &cache2, &other, 0);
        assert_eq!((cache2.counts().hits, cache2.counts().misses), (0, 1));
    }

    #[test]
    fn a_dead_writers_part_is_deleted_and_a_download_elsewhere_is_waited_for() {
        let (data, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (store, m) = shards(data.path(), 1, 1000);
        let cache = open(root.path(), None, &m).unwrap();
        let sha = &m.splits["train"].shards[0].sha256;
        // A part with no lock held: a dead writer's.
        let part = cache.dir.join(format!("{sha}.part"));
        std::fs::write(&part, b"half a shard").unwrap();
        let cache = open(root.path(), None, &m).unwrap();
        assert!(!part.exists(), "a dead writer's part is deleted at open");

        // Another process downloading it: the lock is held exclusively.
        let lock = lock_file(&cache.dir.join(format!("{sha}.lock"))).unwrap();
        lock.lock().unwrap();
        let stop = AtomicBool::new(true);
        let info = &m.splits["train"].shards[0];
        assert!(
            matches!(cache.source(info, &stop), Source::Bypass),
            "stopped while waiting"
        );
        let waiter = {
            let (cache, store, m) = (cache.clone(), store.clone(), m.clone());
            std::thread::spawn(move || read(&store, &cache, &m, 0))
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !waiter.is_finished(),
            "waits while another process downloads"
        );
        std::fs::copy(data.path().join("train-000000.tar"), cached(&cache, &m, 0)).unwrap();
        drop(lock);
        assert_eq!(waiter.join().unwrap(), (vec!["s0".to_string()], None));
        assert_eq!((cache.counts().hits, cache.counts().misses), (1, 0));
    }

    #[test]
    fn the_limit_evicts_least_recently_used_shards_never_locked_ones() {
        let (data, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (store, m) = shards(data.path(), 4, 3000);
        let size = m.splits["train"].shards[0].bytes;
        let err = open(root.path(), Some(size - 1), &m)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "data.cache_limit_bytes = {} is smaller than shard \"train-000000.tar\"",
                size - 1
            )),
            "{err}"
        );
        // A larger validation shard (evaluation reads through the cache too): an error at start.
        let mut with_val = m.clone();
        let mut val = m.splits["train"].clone();
        val.shards[0].bytes = 3 * size;
        with_val.splits.insert("val".into(), val);
        let err = open(root.path(), Some(2 * size), &with_val)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("of split \"val\" ({} bytes)", 3 * size)),
            "{err}"
        );
        // Room for two shards.
        let cache = open(root.path(), Some(2 * size + size / 2), &m).unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        for k in 0..2 {
            read(&store, &cache, &m, k);
        }
        File::options()
            .write(true)
            .open(cached(&cache, &m, 1))
            .unwrap()
            .set_modified(old)
            .unwrap();
        read(&store, &cache, &m, 2); // evicts shard 1, the least recently used
        assert!(cached(&cache, &m, 0).exists() && !cached(&cache, &m, 1).exists());
        assert_eq!(cache.counts().evictions, 1);

        // Shards 0 and 2 read by others (shared locks): shard 3 is streamed, not cached.
        let pins: Vec<File> = [0, 2]
            .iter()
            .map(|&k| {
                let sha = &m.splits["train"].shards[k].sha256;
                let f = lock_file(&cache.dir.join(format!("{sha}.lock"))).unwrap();
                f.lock_shared().unwrap();
                f
            })
            .collect();
        assert_eq!(read(&store, &cache, &m, 3), (vec!["s3".to_string()], None));
        assert!(cached(&cache, &m, 0).exists() && cached(&cache, &m, 2).exists());
        assert!(!cached(&cache, &m, 3).exists());
        assert_eq!((cache.counts().bypassed, cache.counts().evictions), (1, 1));
        drop(pins);
        read(&store, &cache, &m, 3);
        assert!(cached(&cache, &m, 3).exists());
        assert_eq!(cache.counts().evictions, 2);
    }
}
