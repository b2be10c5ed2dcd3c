//! One shard, streamed: object bytes -> tar parser -> classified samples, produced by a thread
//! per open shard into a bounded channel ([`ShardFeed`]).
//!
//! Bytes are parsed as they download ([`Store::open_read`]); nothing holds a whole shard. The
//! sha256 and byte count of the tar are computed on the fly and compared with the manifest when
//! the stream ends, so a mismatch is only known after the shard's samples were handed out: it
//! is warned and counted as a shard error (in `data.strict` mode the stream fails). `devise
//! data verify` checks shards before a run.
//!
//! Memory: every sample's encoded bytes are accounted in a shared [`Memory`] from the moment
//! the feed thread reads them until the last holder (channel, shuffle buffer, look-ahead,
//! decode) drops them; the reader reports the current and peak totals.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use sha2::{Digest, Sha256};

use super::cache::{Hit, ShardCache, Source, Writer};
use super::shards::ShardInfo;
use super::webdataset::{SampleReader, ShardError};
use crate::storage::Store;

/// Read buffer of a shard read from the shard cache.
const CACHE_READ_BUFFER: usize = 1 << 20;

/// Members tried, in order, as a sample's image (the first present wins).
pub(crate) const IMAGE_FIELDS: &[&str] = &["jpg", "jpeg", "png", "img"];

/// Bytes of encoded samples the reader holds right now, and the most it ever held.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    bytes: AtomicU64,
    peak: AtomicU64,
    /// Shard bytes read from the store so far (every open feed together; bytes read from the
    /// shard cache are counted in its counters instead).
    downloaded: AtomicU64,
}

impl Memory {
    fn add(&self, n: u64) {
        let now = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    fn sub(&self, n: u64) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }
    /// Shard bytes read from the store so far.
    pub(crate) fn downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }
    /// `(current, peak)` bytes.
    pub(crate) fn read(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.peak.load(Ordering::Relaxed),
        )
    }
}

/// A complete sample: key, manifest class, encoded image bytes (accounted in [`Memory`]).
#[derive(Debug)]
pub(crate) struct SampleData {
    pub key: String,
    pub class: usize,
    pub image: Vec<u8>,
    memory: Arc<Memory>,
}

impl Drop for SampleData {
    fn drop(&mut self) {
        self.memory.sub(self.image.len() as u64);
    }
}

/// One sample of a shard, classified (before decoding).
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    Ok(Arc<SampleData>),
    /// `missing` says what is missing and which fields the sample has.
    Incomplete {
        key: String,
        missing: String,
    },
    InvalidLabel {
        key: String,
        cls: String,
    },
}

impl Entry {
    /// Classifies a parsed sample: its `.cls` must be a manifest class index, and it needs an
    /// image member.
    fn classify(
        mut sample: super::webdataset::Sample,
        n_classes: usize,
        memory: &Arc<Memory>,
    ) -> Entry {
        let key = std::mem::take(&mut sample.key);
        let image = IMAGE_FIELDS.iter().find_map(|f| sample.fields.remove(*f));
        // WebDataset's key rule cuts the file name at its FIRST dot, so `img.1.jpg` and
        // `img.cls` are one sample with fields `1.jpg` and `cls`: say so rather than only
        // "missing jpg".
        let missing = |what: &str, fields: &BTreeMap<String, Vec<u8>>, image: bool| {
            let mut have: Vec<&str> = fields.keys().map(String::as_str).collect();
            if image {
                have.push("<image>");
            }
            let dotted = have.iter().any(|f| f.contains('.'));
            format!(
                "{what} (the sample has: {}){}",
                have.join(", "),
                if dotted {
                    "; a field with a dot means a dot in the file name: the key ends at the first dot"
                } else {
                    ""
                }
            )
        };
        match (sample.fields.get("cls"), image) {
            (None, image) => Entry::Incomplete {
                missing: missing("cls", &sample.fields, image.is_some()),
                key,
            },
            (Some(_), None) => Entry::Incomplete {
                missing: missing("an image (jpg/jpeg/png)", &sample.fields, false),
                key,
            },
            (Some(cls), Some(image)) => {
                let text = String::from_utf8_lossy(cls).trim().to_string();
                match text.parse::<usize>() {
                    Ok(class) if class < n_classes => {
                        memory.add(image.len() as u64);
                        Entry::Ok(Arc::new(SampleData {
                            key,
                            class,
                            image,
                            memory: memory.clone(),
                        }))
                    }
                    _ => Entry::InvalidLabel { key, cls: text },
                }
            }
        }
    }
}

/// What a feed thread sends.
enum Item {
    Entry(Entry),
    /// Always the last item: `Some(message)` when the shard had a content problem (already
    /// warned): truncation, malformed grouping, sha256/size mismatch with the manifest.
    End(Option<String>),
}

/// An open shard being streamed by its own thread, `readahead` samples ahead at most.
pub(crate) struct ShardFeed {
    /// Index in the manifest split's shard list.
    pub index: usize,
    /// Full URL of the shard (for messages).
    pub url: Arc<str>,
    rx: mpsc::Receiver<Result<Item>>,
    stop: Arc<AtomicBool>,
    /// `Some` once the end was reached: the content problem, if any.
    end: Option<Option<String>>,
}

impl ShardFeed {
    /// Starts streaming `info` (manifest shard `index`) from `store`, or from `cache` when it
    /// holds the shard (a miss is written to it). Never blocks: opening the object happens in
    /// the thread, and an open failure comes out of [`ShardFeed::next`].
    pub(crate) fn open(
        store: &Store,
        cache: Option<&Arc<ShardCache>>,
        info: &ShardInfo,
        index: usize,
        n_classes: usize,
        readahead: usize,
        memory: &Arc<Memory>,
    ) -> ShardFeed {
        let (tx, rx) = mpsc::sync_channel(readahead.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let url: Arc<str> = store.child_url(&info.name).into();
        let (store, cache, info, memory, thread_stop, thread_url) = (
            store.clone(),
            cache.cloned(),
            info.clone(),
            memory.clone(),
            stop.clone(),
            url.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("devise-shard-feed".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    stream_shard(
                        &store,
                        cache.as_ref(),
                        &info,
                        &thread_url,
                        n_classes,
                        &memory,
                        &tx,
                        &thread_stop,
                    )
                }));
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(e));
                    }
                    Err(p) => {
                        let _ = tx.send(Err(anyhow!(
                            "shard feed of {thread_url} panicked: {}",
                            super::reader::panic_text(&p)
                        )));
                    }
                }
            });
        let (tx_fail, rx_fail);
        let rx = match spawned {
            Ok(_) => rx,
            Err(e) => {
                (tx_fail, rx_fail) = mpsc::sync_channel(1);
                let _ = tx_fail.send(Err(anyhow!("spawning a shard feed thread: {e}")));
                rx_fail
            }
        };
        ShardFeed {
            index,
            url,
            rx,
            stop,
            end: None,
        }
    }

    /// The next sample in tar order; `Ok(None)` at the end of the shard (see
    /// [`ShardFeed::problem`]). `Err`: the shard could not be read (missing object, network
    /// failure after retries): fatal for the stream.
    pub(crate) fn next(&mut self) -> Result<Option<Entry>> {
        if self.end.is_some() {
            return Ok(None);
        }
        match self.rx.recv() {
            Ok(Ok(Item::Entry(e))) => Ok(Some(e)),
            Ok(Ok(Item::End(problem))) => {
                self.end = Some(problem);
                Ok(None)
            }
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvError) => Err(anyhow!("shard feed of {} ended unexpectedly", self.url)),
        }
    }

    /// After `next` returned `Ok(None)`: the shard's content problem, if it had one.
    pub(crate) fn problem(&self) -> Option<&str> {
        self.end.as_ref().and_then(|p| p.as_deref())
    }
}

impl Drop for ShardFeed {
    fn drop(&mut self) {
        // The thread notices at its next sample (or its next send fails): it is detached, not
        // joined, so dropping a feed never waits on the network.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Hashes and counts the bytes read through it (in `counter` too), and hands them to the shard
/// cache's writer when the shard is being cached.
struct Hashing<'a, R> {
    inner: R,
    sha: Sha256,
    bytes: u64,
    counter: &'a AtomicU64,
    tee: Option<Writer>,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(tee) = &mut self.tee {
            tee.write(&buf[..n]);
        }
        Ok(n)
    }
}

impl<R: Read> Hashing<'_, R> {
    /// Reads what is left of the object; its sha256 (hex) and whether it and the byte count
    /// are the manifest's.
    fn finish(&mut self, info: &ShardInfo) -> std::io::Result<(String, bool)> {
        std::io::copy(self, &mut std::io::sink())?;
        let sha = hex::encode(self.sha.finalize_reset());
        let verified = sha.eq_ignore_ascii_case(&info.sha256) && self.bytes == info.bytes;
        Ok((sha, verified))
    }
}

/// The feed thread's body. `Err` only for read failures; content problems end in `Item::End`.
#[allow(clippy::too_many_arguments)]
fn stream_shard(
    store: &Store,
    cache: Option<&Arc<ShardCache>>,
    info: &ShardInfo,
    url: &str,
    n_classes: usize,
    memory: &Arc<Memory>,
    tx: &mpsc::SyncSender<Result<Item>>,
    stop: &AtomicBool,
) -> Result<()> {
    let source = cache.map_or(Source::Bypass, |c| c.source(info, stop));
    if stop.load(Ordering::Relaxed) {
        return Ok(()); // dropped while waiting for another process's download
    }
    let (inner, hit, tee): (Box<dyn Read + Send>, Option<Hit>, Option<Writer>) = match source {
        Source::Hit(file, hit) => {
            tracing::debug!(shard = url, "shard feed: from the shard cache");
            let file = std::io::BufReader::with_capacity(CACHE_READ_BUFFER, file);
            (Box::new(file), Some(hit), None)
        }
        Source::Miss(writer) => (store.open_read(&info.name)?, None, Some(writer)),
        Source::Bypass => (store.open_read(&info.name)?, None, None),
    };
    tracing::debug!(shard = url, "shard feed: opened (response headers in)");
    let mut hashing = Hashing {
        inner,
        sha: Sha256::new(),
        bytes: 0,
        counter: hit.as_ref().map_or(&memory.downloaded, Hit::counter),
        tee,
    };
    let (mut samples, mut problem, mut stopped) = (0u64, None, false);
    {
        let reader = SampleReader::new(&mut hashing, url);
        for item in reader {
            if stop.load(Ordering::Relaxed) {
                stopped = true;
                break;
            }
            match item {
                Ok(sample) => {
                    if samples == 0 {
                        tracing::debug!(shard = url, "shard feed: first sample");
                    }
                    samples += 1;
                    let entry = Entry::classify(sample, n_classes, memory);
                    if tx.send(Ok(Item::Entry(entry))).is_err() {
                        stopped = true; // the reader moved on
                        break;
                    }
                }
                Err(ShardError::Io { offset, message }) => {
                    anyhow::bail!("reading {url} at byte {offset}: {message}")
                }
                Err(e) => {
                    let msg = format!("shard {url}: {e}; the {samples} samples before it are used");
                    tracing::warn!("{msg}");
                    problem = Some(msg);
                    break;
                }
            }
        }
    }
    if stopped {
        // Nobody reads this shard any more; one being cached is downloaded to its end.
        if let Some(tee) = hashing.tee.take() {
            let mut rest = Hashing {
                tee: None,
                ..hashing
            };
            tee.commit(rest.finish(info).is_ok_and(|(_, verified)| verified));
        }
        return Ok(());
    }
    if problem.is_none() {
        // The tar's end-of-archive blocks and record padding count in the checksum.
        let (sha, verified) = hashing
            .finish(info)
            .map_err(|e| anyhow!("reading {url} at byte {}: {e}", hashing.bytes))?;
        if let Some(tee) = hashing.tee.take() {
            tee.commit(verified);
        }
        if !verified {
            let from = match &hit {
                Some(hit) => {
                    hit.discard();
                    " (its cached copy, now deleted)"
                }
                None => "",
            };
            let msg = format!(
                "shard {url}{from}: sha256 {sha} ({} bytes) does not match the manifest's {} ({} bytes); its {samples} samples were already used",
                hashing.bytes, info.sha256, info.bytes
            );
            tracing::warn!("{msg}");
            problem = Some(msg);
        } else if samples != info.samples {
            let msg = format!(
                "shard {url}: {samples} samples, the manifest says {}",
                info.samples
            );
            tracing::warn!("{msg}");
            problem = Some(msg);
        }
    }
    tracing::debug!(
        shard = url,
        samples,
        bytes = hashing.bytes,
        "shard feed: end"
    );
    let _ = tx.send(Ok(Item::End(problem)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::webdataset::tar_of as tar;

    fn info(name: &str, bytes: &[u8], samples: u64) -> ShardInfo {
        ShardInfo {
            name: name.into(),
            samples,
            bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
            class_counts: Vec::new(),
        }
    }

    fn drain(feed: &mut ShardFeed) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(e) = feed.next().unwrap() {
            out.push(match e {
                Entry::Ok(d) => format!("{}:ok{}", d.key, d.class),
                Entry::Incomplete { key, missing } => format!("{key}:missing {missing}"),
                Entry::InvalidLabel { key, cls } => format!("{key}:bad {cls}"),
            });
        }
        out
    }

    #[test]
    fn streams_classified_samples_and_checks_the_manifest_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let bytes = tar(&[
            ("a.jpg", b"img"),
            ("a.cls", b"1\n"),
            ("b.jpg", b"img"),
            ("c.png", b"img"),
            ("c.cls", b"7"),
            ("d.cls", b"0"),
            ("e.1.jpg", b"img"),
            ("e.cls", b"1"),
            ("v1.0/f.jpg", b"img"),
            ("v1.0/f.cls", b"2"),
        ]);
        store.put("x.tar", bytes.clone().into()).unwrap();
        let memory = Arc::new(Memory::default());
        let mut feed = ShardFeed::open(&store, None, &info("x.tar", &bytes, 6), 0, 3, 1, &memory);
        assert_eq!(
            drain(&mut feed),
            [
                "a:ok1",
                "b:missing cls (the sample has: <image>)",
                "c:bad 7",
                "d:missing an image (jpg/jpeg/png) (the sample has: cls)",
                "e:missing an image (jpg/jpeg/png) (the sample has: 1.jpg, cls); a field with a dot means a dot in the file name: the key ends at the first dot",
                "v1.0/f:ok2",
            ]
        );
        assert_eq!(feed.problem(), None);
        assert_eq!(memory.read().0, 0, "accepted images were dropped");

        // Same bytes, a manifest with another checksum: samples still come, then the problem.
        let mut wrong = info("x.tar", &bytes, 6);
        wrong.sha256 = "00".repeat(32);
        let mut feed = ShardFeed::open(&store, None, &wrong, 0, 3, 1, &memory);
        assert_eq!(drain(&mut feed).len(), 6);
        let problem = feed.problem().expect("sha mismatch reported");
        assert!(
            problem.contains("x.tar") && problem.contains("does not match"),
            "{problem}"
        );

        // A missing object is an error naming it, not an empty shard.
        let mut feed =
            ShardFeed::open(&store, None, &info("gone.tar", &bytes, 4), 0, 3, 1, &memory);
        let err = feed.next().unwrap_err().to_string();
        assert!(
            err.contains("gone.tar") && err.contains("not found"),
            "{err}"
        );
    }
}
