//! ImageFolder trees -> WebDataset tar shards + `manifest.json`, and reading the manifest back.
//!
//! Layout of a shard directory (any [`Store`] URL):
//!
//! ```text
//! <dst>/train-000000.tar, train-000001.tar, ...   one split's samples, shuffled, size-capped
//! <dst>/val-000000.tar, ...
//! <dst>/manifest.json                              written LAST: its presence means "complete"
//! ```
//!
//! Each shard is a WebDataset tar (<https://github.com/webdataset/webdataset#the-webdataset-format>):
//! per sample, consecutive members `<key>.jpg` (or `<key>.png`: the ORIGINAL file bytes, never
//! re-encoded), `<key>.cls` (the manifest class index, ASCII decimal) and `<key>.json`
//! (`{"wnid": "n01443537", "source": "train/n01443537/n01443537_0.JPEG"}`). The key is the file
//! stem with `.` replaced by `_` (keys never contain dots, so WebDataset's "cut at the first dot"
//! rule recovers it). If two files of a split share a stem (possible in generic ImageFolder
//! trees, not in ImageNet), every key of that split becomes `<wnid>_<stem>` instead.
//!
//! Tar headers are ustar with mtime 0, mode 0644, uid/gid 0 and no user names, and the sample
//! order is a seeded shuffle, so rebuilding the same tree with the same seed gives byte-identical
//! shards (and identical sha256 in the manifest).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::webdataset::append_member;
use crate::storage::Store;

/// The manifest's `format` value this code writes and reads.
pub const FORMAT: &str = "devise-shards/1";
/// The manifest's object name inside the shard directory.
pub const MANIFEST_NAME: &str = "manifest.json";

/// One tar shard of a split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// Object name relative to the shard directory, e.g. `"train-000000.tar"`.
    pub name: String,
    /// Samples (key groups) in the shard.
    pub samples: u64,
    /// Size of the tar, bytes.
    pub bytes: u64,
    /// sha256 of the whole tar, lower-case hex (readers verify it).
    pub sha256: String,
}

/// One split (`train`, `val`, ...) of a shard directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitInfo {
    /// Samples in the split (= sum of `shards[i].samples`).
    pub samples: u64,
    /// Shards in order (`<split>-000000.tar`, ...).
    pub shards: Vec<ShardInfo>,
    /// Samples per manifest class, indexed like [`Manifest::classes`].
    pub class_counts: Vec<u64>,
}

/// `manifest.json` of a shard directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`] (`"devise-shards/1"`).
    pub format: String,
    /// Class ids (ImageNet wnids, or synthetic ids), sorted; a sample's `.cls` indexes this.
    pub classes: Vec<String>,
    /// Split name -> its shards and counts.
    pub splits: BTreeMap<String, SplitInfo>,
}

impl Manifest {
    /// The split `name`, or an error listing the splits there are.
    pub fn split(&self, name: &str) -> Result<&SplitInfo> {
        self.splits.get(name).with_context(|| {
            format!(
                "the manifest has no split {name:?} (it has {:?})",
                self.splits.keys().collect::<Vec<_>>()
            )
        })
    }

    /// sha256 (hex) of the manifest's canonical JSON. Store it beside a saved
    /// [`crate::data::Cursor`]: a different value at resume means the shard directory was rebuilt
    /// and the cursor no longer names the same samples.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).expect("a manifest always serialises");
        hex::encode(Sha256::digest(json))
    }

    /// Checks internal consistency (format, sorted unique classes, counts adding up).
    pub fn check(&self) -> Result<()> {
        if self.format != FORMAT {
            bail!("manifest format {:?}, expected {FORMAT:?}", self.format);
        }
        if self.classes.windows(2).any(|w| w[0] >= w[1]) {
            bail!("manifest classes are not sorted and unique");
        }
        for (name, split) in &self.splits {
            let shard_sum: u64 = split.shards.iter().map(|s| s.samples).sum();
            let class_sum: u64 = split.class_counts.iter().sum();
            if shard_sum != split.samples || class_sum != split.samples {
                bail!(
                    "manifest split {name:?}: samples {} but shards hold {shard_sum} and class counts add to {class_sum}",
                    split.samples
                );
            }
            if split.class_counts.len() != self.classes.len() {
                bail!(
                    "manifest split {name:?}: {} class counts for {} classes",
                    split.class_counts.len(),
                    self.classes.len()
                );
            }
        }
        Ok(())
    }
}

/// Reads and checks `<shards_url>/manifest.json`.
///
/// Errors: missing directory or manifest (the URL is named), invalid JSON, unknown format,
/// inconsistent counts.
pub fn read_manifest(shards_url: &str) -> Result<Manifest> {
    let store = Store::open_existing(shards_url)?;
    let bytes = store.get(MANIFEST_NAME)?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("parsing {}", store.child_url(MANIFEST_NAME)))?;
    manifest
        .check()
        .with_context(|| store.child_url(MANIFEST_NAME))?;
    Ok(manifest)
}

/// What [`build_shards`] builds.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Split folders to shard, e.g. `["train", "val"]`; a missing folder is an error.
    pub splits: Vec<String>,
    /// Only these class folders (wnids); `None` = every folder found. A listed class found in no
    /// split is an error (typo guard).
    pub classes: Option<Vec<String>>,
    /// A new shard starts when adding the next sample would make the tar larger than this
    /// (bytes, including the 1 KiB end-of-archive). A sample larger on its own gets its own shard.
    pub shard_size_bytes: u64,
    /// Seed of the per-split sample shuffle (so every shard mixes classes).
    pub seed: u64,
    /// Show an indicatif progress bar on stderr.
    pub progress: bool,
}

/// Image file extensions picked up from the ImageFolder tree (compared case-insensitively).
const IMAGE_EXTENSIONS: &[&str] = &["jpeg", "jpg", "png"];

struct SourceFile {
    class: usize,
    rel: String, // "<split>/<wnid>/<file>"
    path: PathBuf,
    stem: String,
    is_png: bool,
}

/// Shards the ImageFolder tree `<src>/<split>/<wnid>/*.{JPEG,jpg,jpeg,png}` into
/// `<dst_url>/<split>-000000.tar, ...` and writes `<dst_url>/manifest.json` LAST.
///
/// Per split: files are listed in sorted order, shuffled with a ChaCha8 stream seeded from
/// `(opts.seed, split name)`, and packed into shards capped at `opts.shard_size_bytes`. The
/// manifest's class list is the sorted union of class folders over the requested splits
/// (restricted to `opts.classes`). Old shards in `dst_url` that the new manifest does not list
/// are left in place (harmless: readers go through the manifest).
///
/// Errors: missing split folder, unreadable file, no images at all, a requested class found
/// nowhere, write failures (named by URL).
pub fn build_shards(src: &Path, dst_url: &str, opts: &BuildOptions) -> Result<Manifest> {
    if opts.splits.is_empty() {
        bail!("build_shards: no splits requested");
    }
    if opts.shard_size_bytes == 0 {
        bail!("build_shards: shard_size_bytes must be > 0");
    }
    let store = Store::open(dst_url)?;

    // Class list: sorted union of class folders over the requested splits.
    let mut found: BTreeMap<String, ()> = BTreeMap::new();
    for split in &opts.splits {
        let dir = src.join(split);
        if !dir.is_dir() {
            bail!("split folder {} does not exist", dir.display());
        }
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry?;
            // metadata() follows symbolic links: a linked class folder is a class folder.
            if std::fs::metadata(entry.path())?.is_dir() {
                found.insert(entry.file_name().to_string_lossy().into_owned(), ());
            }
        }
    }
    let classes: Vec<String> = match &opts.classes {
        None => found.into_keys().collect(),
        Some(wanted) => {
            let mut wanted = wanted.clone();
            wanted.sort();
            wanted.dedup();
            if let Some(missing) = wanted.iter().find(|c| !found.contains_key(*c)) {
                bail!(
                    "class {missing:?} is in no split folder under {} ({:?})",
                    src.display(),
                    opts.splits
                );
            }
            wanted
        }
    };

    // List every split first so the progress bar knows the total.
    let mut per_split = Vec::new();
    for split in &opts.splits {
        let files = list_split(src, split, &classes)?;
        per_split.push((split.clone(), files));
    }
    let total: usize = per_split.iter().map(|(_, f)| f.len()).sum();
    if total == 0 {
        bail!(
            "no images found under {} for splits {:?}",
            src.display(),
            opts.splits
        );
    }
    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} images {per_sec} eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let mut splits = BTreeMap::new();
    for (split, mut files) in per_split {
        bar.set_message(format!("sharding {split}"));
        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[opts.seed, fnv1a(split.as_bytes())]));
        shuffle(&mut files, &mut rng);
        let info = write_split(
            &store,
            &split,
            &files,
            &classes,
            opts.shard_size_bytes,
            &bar,
        )?;
        splits.insert(split, info);
    }
    bar.finish_and_clear();

    let manifest = Manifest {
        format: FORMAT.to_string(),
        classes,
        splits,
    };
    manifest.check()?;
    let json = serde_json::to_vec_pretty(&manifest)?;
    store.put(MANIFEST_NAME, Bytes::from(json))?;
    Ok(manifest)
}

fn list_split(src: &Path, split: &str, classes: &[String]) -> Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for (class, wnid) in classes.iter().enumerate() {
        let dir = src.join(split).join(wnid);
        if !dir.is_dir() {
            continue; // a class may be absent from one split (count 0)
        }
        let mut names: Vec<(String, PathBuf)> = Vec::new();
        let mut ignored = 0usize;
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ext = name
                .rsplit_once('.')
                .map(|(_, e)| e.to_ascii_lowercase())
                .unwrap_or_default();
            // metadata() follows symbolic links: a linked image is an image.
            let is_file = std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file());
            if IMAGE_EXTENSIONS.contains(&ext.as_str()) && is_file {
                names.push((name, entry.path()));
            } else {
                ignored += 1;
            }
        }
        if ignored > 0 {
            tracing::warn!(
                "{}: {ignored} entries are not image files (.jpeg/.jpg/.png) and were ignored",
                dir.display()
            );
        }
        if names.is_empty() {
            tracing::warn!(
                "{}: no images: class {wnid} has 0 samples in split {split}",
                dir.display()
            );
        }
        names.sort();
        for (name, path) in names {
            let (stem, ext) = name.rsplit_once('.').unwrap();
            files.push(SourceFile {
                class,
                rel: format!("{split}/{wnid}/{name}"),
                path,
                stem: stem.replace('.', "_"),
                is_png: ext.eq_ignore_ascii_case("png"),
            });
        }
    }
    // Keys must be unique within a split: on any stem collision, prefix every key with its wnid.
    let mut stems: Vec<&str> = files.iter().map(|f| f.stem.as_str()).collect();
    stems.sort_unstable();
    if stems.windows(2).any(|w| w[0] == w[1]) {
        tracing::warn!(
            split,
            "file stems collide across classes; keys become <wnid>_<stem>"
        );
        for f in &mut files {
            f.stem = format!("{}_{}", classes[f.class].replace('.', "_"), f.stem);
        }
    }
    Ok(files)
}

fn write_split(
    store: &Store,
    split: &str,
    files: &[SourceFile],
    classes: &[String],
    shard_size_bytes: u64,
    bar: &indicatif::ProgressBar,
) -> Result<SplitInfo> {
    let mut shards = Vec::new();
    let mut class_counts = vec![0u64; classes.len()];
    let mut builder = tar::Builder::new(Vec::new());
    let mut in_shard = 0u64;
    for f in files {
        let data =
            std::fs::read(&f.path).with_context(|| format!("reading {}", f.path.display()))?;
        let meta = serde_json::json!({"wnid": classes[f.class], "source": f.rel});
        let before = builder.get_ref().len();
        append_sample(&mut builder, f, &data, &meta)?;
        // 1024 = the two end-of-archive blocks `finish` appends.
        if in_shard > 0 && builder.get_ref().len() as u64 + 1024 > shard_size_bytes {
            // Roll back this sample, close the shard, and start the next one with it.
            builder.get_mut().truncate(before);
            let full = std::mem::replace(&mut builder, tar::Builder::new(Vec::new()));
            shards.push(put_shard(store, split, shards.len(), full, in_shard)?);
            in_shard = 0;
            append_sample(&mut builder, f, &data, &meta)?;
        }
        in_shard += 1;
        class_counts[f.class] += 1;
        bar.inc(1);
    }
    if in_shard > 0 {
        shards.push(put_shard(store, split, shards.len(), builder, in_shard)?);
    }
    Ok(SplitInfo {
        samples: files.len() as u64,
        shards,
        class_counts,
    })
}

fn append_sample(
    builder: &mut tar::Builder<Vec<u8>>,
    f: &SourceFile,
    data: &[u8],
    meta: &serde_json::Value,
) -> Result<()> {
    let ext = if f.is_png { "png" } else { "jpg" };
    append_member(builder, &format!("{}.{ext}", f.stem), data)?;
    append_member(
        builder,
        &format!("{}.cls", f.stem),
        f.class.to_string().as_bytes(),
    )?;
    append_member(
        builder,
        &format!("{}.json", f.stem),
        meta.to_string().as_bytes(),
    )?;
    Ok(())
}

fn put_shard(
    store: &Store,
    split: &str,
    index: usize,
    builder: tar::Builder<Vec<u8>>,
    samples: u64,
) -> Result<ShardInfo> {
    let bytes = builder.into_inner()?; // appends the end-of-archive blocks
    let name = format!("{split}-{index:06}.tar");
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let size = bytes.len() as u64;
    store.put(&name, Bytes::from(bytes))?;
    Ok(ShardInfo {
        name,
        samples,
        bytes: size,
        sha256,
    })
}

/// splitmix64 finaliser chain: mixes several u64s into one seed. Stable forever (resume
/// determinism of saved cursors depends on it).
pub(crate) fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p;
        h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// FNV-1a of a string, to mix names into seeds (stable, unlike `DefaultHasher`).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Fisher-Yates with our own index draw (`(u64 * (i+1)) >> 64`), so a permutation depends only
/// on the ChaCha8 stream, never on `rand`'s version-specific `gen_range`/`shuffle` algorithms.
pub(crate) fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    use rand::RngCore;
    for i in (1..items.len()).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_stable_permutation() {
        let mut a: Vec<u32> = (0..100).collect();
        shuffle(&mut a, &mut ChaCha8Rng::seed_from_u64(7));
        let mut b: Vec<u32> = (0..100).collect();
        shuffle(&mut b, &mut ChaCha8Rng::seed_from_u64(7));
        assert_eq!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        // Pinned values: a change here silently breaks resuming old checkpoints.
        assert_eq!(mix(&[1, 2]), mix(&[1, 2]));
        assert_ne!(mix(&[1, 2]), mix(&[2, 1]));
        assert_eq!(&a[..5], &PINNED_FIRST5);
        assert_eq!(mix(&[1, 2]), 9_550_467_469_912_592_448);
    }

    // Recorded from the first run. If this changes, saved cursors no longer resume exactly.
    const PINNED_FIRST5: [u32; 5] = [58, 77, 13, 82, 66];

    #[test]
    fn manifest_check_catches_inconsistency() {
        let mut m = Manifest {
            format: FORMAT.into(),
            classes: vec!["a".into(), "b".into()],
            splits: BTreeMap::from([(
                "train".to_string(),
                SplitInfo {
                    samples: 3,
                    shards: vec![ShardInfo {
                        name: "train-000000.tar".into(),
                        samples: 3,
                        bytes: 10,
                        sha256: String::new(),
                    }],
                    class_counts: vec![1, 2],
                },
            )]),
        };
        m.check().unwrap();
        let fp = m.fingerprint();
        assert_eq!(fp.len(), 64);
        assert_eq!(fp, m.clone().fingerprint());
        m.splits.get_mut("train").unwrap().class_counts = vec![1, 1];
        assert_ne!(fp, m.fingerprint());
        assert!(m.check().is_err());
        m.splits.get_mut("train").unwrap().class_counts = vec![1, 2];
        m.classes = vec!["b".into(), "a".into()];
        assert!(m.check().is_err());
    }
}
