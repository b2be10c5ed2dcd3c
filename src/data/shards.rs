//! Image sources -> WebDataset tar shards + `manifest.json`, and reading the manifest back.
//!
//! Sources ([`Sources`]): an ImageFolder tree (`<src>/<split>/<wnid>/*.JPEG`) and/or the
//! ILSVRC-2012 validation images as distributed (a flat folder plus Kaggle's
//! `LOC_val_solution.csv`, [`crate::data::ilsvrc`]), which becomes the split `val`.
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
//! (`{"source":"train/n01443537/n01443537_0.JPEG","wnid":"n01443537"}`; for the ILSVRC
//! validation folder `source` is the file name). The key is the file stem with `.` replaced by
//! `_` (keys never contain dots, so WebDataset's "cut at the first dot" rule recovers it). If two
//! files of an ImageFolder split share a stem (possible in generic trees, not in ImageNet), every
//! key of that split becomes `<wnid>_<stem>` instead; two files that still get one key (`a.b.jpg`
//! and `a_b.jpg` in one class folder) are an error naming both. A file named only by its
//! extension (`.jpg`) has no stem and is not an image. The Python `webdataset` library reads these
//! shards as they are (tested: `tests/it/shards.rs`).
//!
//! Tar headers are ustar with mtime 0, mode 0644, uid/gid 0 and no user names, the sample order
//! is a seeded shuffle, and the shard membership is planned from file sizes before any shard is
//! written, so rebuilding the same sources with the same seed gives byte-identical shards (and
//! identical sha256 in the manifest) whatever the number of threads building them.
//!
//! Shard directories written by other tools (e.g. Python's `webdataset.TarWriter`) get a
//! manifest from [`crate::data::index`]; [`crate::data::verify`] checks any shard directory
//! against its manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ilsvrc::{read_ilsvrc_val, IlsvrcVal, ValImage, IMAGE_EXTENSIONS};
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
    /// Samples of the shard per manifest class, indexed like [`Manifest::classes`]. The
    /// training stream plans from it how many samples of each shard it will train on (without
    /// reading the shard) and so where a saved cursor points; empty in manifests written before
    /// it existed (training then asks for `devise data index` to rewrite the manifest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_counts: Vec<u64>,
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
            for shard in split.shards.iter().filter(|s| !s.class_counts.is_empty()) {
                let sum: u64 = shard.class_counts.iter().sum();
                if shard.class_counts.len() != self.classes.len() || sum != shard.samples {
                    bail!(
                        "manifest split {name:?}, shard {}: {} class counts adding to {sum}, for {} classes and {} samples",
                        shard.name,
                        shard.class_counts.len(),
                        self.classes.len(),
                        shard.samples
                    );
                }
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

/// How [`build_shards`] / [`build_shards_from`] shard.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Split folders of the ImageFolder source to shard, e.g. `["train", "val"]`; a missing
    /// folder is an error. Empty when there is no ImageFolder source.
    pub splits: Vec<String>,
    /// Only these classes (wnids); `None` = every class found (class folders, wnids of the
    /// ILSVRC validation CSV). A listed class found in no source is an error (typo guard).
    pub classes: Option<Vec<String>>,
    /// A new shard starts when adding the next sample would make the tar larger than this
    /// (bytes, including the 1 KiB end-of-archive). A sample larger on its own gets its own shard.
    pub shard_size_bytes: u64,
    /// Seed of the per-split sample shuffle (so every shard mixes classes).
    pub seed: u64,
    /// Show an indicatif progress bar on stderr.
    pub progress: bool,
}

/// Where the images of a build come from: an ImageFolder tree, the ILSVRC-2012 validation set
/// as distributed (flat folder + `LOC_val_solution.csv`, which gives the split `val`), or both.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// ImageFolder root holding `<split>/<wnid>/*.{JPEG,jpg,jpeg,png}` for each of
    /// [`BuildOptions::splits`].
    pub image_folder: Option<PathBuf>,
    /// The split `val` from the ILSVRC-2012 validation folder and its solution CSV. The
    /// ImageFolder source must not also provide `val`.
    pub ilsvrc_val: Option<IlsvrcVal>,
}

/// The split name the ILSVRC-2012 validation source provides.
pub const ILSVRC_VAL_SPLIT: &str = "val";

/// One image to shard.
struct SourceFile {
    /// Index into the manifest's class list.
    class: usize,
    /// `"<split>/<wnid>/<file>"` (ImageFolder) or `"<file>"` (ILSVRC val), for `<key>.json`.
    rel: String,
    path: PathBuf,
    /// The sample key (file stem, `.` -> `_`).
    stem: String,
    is_png: bool,
    /// File size when listed, bytes (the shard plan depends on it; re-checked when read).
    bytes: u64,
}

impl SourceFile {
    fn image_member(&self) -> String {
        format!("{}.{}", self.stem, if self.is_png { "png" } else { "jpg" })
    }
    fn cls_text(&self) -> String {
        self.class.to_string()
    }
    fn json_text(&self, classes: &[String]) -> String {
        // serde_json's map sorts keys: {"source":..,"wnid":..}, the same bytes every build.
        serde_json::json!({"wnid": classes[self.class], "source": self.rel}).to_string()
    }
    /// Bytes this sample adds to a tar: its three members (see [`member_tar_bytes`]).
    fn tar_bytes(&self, classes: &[String]) -> u64 {
        member_tar_bytes(self.image_member().len(), self.bytes)
            + member_tar_bytes(self.stem.len() + 4, self.cls_text().len() as u64)
            + member_tar_bytes(self.stem.len() + 5, self.json_text(classes).len() as u64)
    }
}

/// Tar block size, bytes.
const BLOCK: u64 = 512;
/// The end-of-archive marker: two zero blocks, bytes.
pub const END_OF_ARCHIVE_BYTES: u64 = 2 * BLOCK;
/// Longest member name that fits the ustar header's `name` field, bytes.
const USTAR_NAME_BYTES: usize = 100;

/// Bytes one member adds to a tar written by [`append_member`]: a 512-byte header, the data
/// rounded up to 512, and, for a name over 100 bytes (ustar's `name` field) without `/` (sample
/// keys never contain one), a GNU `L` long-name record first: another header plus the name and a
/// NUL rounded up to 512 (what the `tar` crate writes; a unit test compares every length).
pub fn member_tar_bytes(name_bytes: usize, data_bytes: u64) -> u64 {
    let round = |n: u64| n.div_ceil(BLOCK) * BLOCK;
    let long_name = if name_bytes > USTAR_NAME_BYTES {
        BLOCK + round(name_bytes as u64 + 1)
    } else {
        0
    };
    long_name + BLOCK + round(data_bytes)
}

/// One planned shard: which samples of its split, and its exact size.
struct ShardPlan {
    split: String,
    /// Index of the shard within its split (`<split>-{index:06}.tar`).
    index: usize,
    /// The samples, a range of the split's shuffled file list.
    range: std::ops::Range<usize>,
    /// Exact tar size, end-of-archive included.
    bytes: u64,
}

/// Shards the ImageFolder tree `<src>/<split>/<wnid>/*.{JPEG,jpg,jpeg,png}`: [`build_shards_from`]
/// with only an ImageFolder source.
pub fn build_shards(src: &Path, dst_url: &str, opts: &BuildOptions) -> Result<Manifest> {
    let sources = Sources {
        image_folder: Some(src.to_path_buf()),
        ilsvrc_val: None,
    };
    build_shards_from(&sources, dst_url, opts)
}

/// Shards `sources` into `<dst_url>/<split>-000000.tar, ...` (any [`Store`] URL) and writes
/// `<dst_url>/manifest.json` LAST.
///
/// 1. **List.** ImageFolder splits (`opts.splits`) and/or the ILSVRC validation set (split
///    `val`, [`read_ilsvrc_val`]). The manifest's class list is the sorted union of the classes
///    found in all sources, restricted to `opts.classes`; images of other classes are left out.
/// 2. **Plan** (one thread). Per split, files in sorted order are shuffled with a ChaCha8 stream
///    seeded from `(opts.seed, split name)` and cut into shards capped at `opts.shard_size_bytes`.
///    Tar sizes are computed exactly from the file sizes ([`member_tar_bytes`]), so every
///    shard's membership is fixed before any image is read.
/// 3. **Build** every shard on the current rayon pool (the global pool, or the pool a caller
///    `install`s, as the CLI's `--threads` does): read its files, write the tar, check its size
///    against the plan, sha256 it, put it. The bytes depend only on the sources and the seed,
///    never on the number of threads.
/// 4. **Manifest**, once every shard is stored.
///
/// Old shards in `dst_url` that the new manifest does not list are left in place (harmless:
/// readers go through the manifest). An interrupted build leaves shards but no new manifest.
///
/// Errors: no source, splits without an ImageFolder source, `val` from both sources, a missing
/// split folder, ILSVRC validation problems (file and line named, see [`read_ilsvrc_val`]), an
/// unreadable file or one whose size changed since it was listed, no images at all, a requested
/// class found nowhere, write failures (named by URL).
pub fn build_shards_from(
    sources: &Sources,
    dst_url: &str,
    opts: &BuildOptions,
) -> Result<Manifest> {
    if opts.shard_size_bytes == 0 {
        bail!("build_shards: shard_size_bytes must be > 0");
    }
    match (&sources.image_folder, &sources.ilsvrc_val) {
        (None, None) => bail!("build_shards: no source (an ImageFolder tree and/or the ILSVRC-2012 validation folder)"),
        (Some(src), _) if opts.splits.is_empty() => {
            bail!("build_shards: no splits requested of {}", src.display())
        }
        (None, Some(_)) if !opts.splits.is_empty() => bail!(
            "build_shards: splits {:?} requested but there is no ImageFolder source",
            opts.splits
        ),
        _ => {}
    }
    if sources.ilsvrc_val.is_some() && opts.splits.iter().any(|s| s == ILSVRC_VAL_SPLIT) {
        bail!(
            "split {ILSVRC_VAL_SPLIT:?} would come from both the ImageFolder tree ({}) and the ILSVRC-2012 validation folder: drop it from the ImageFolder splits",
            sources.image_folder.as_deref().unwrap_or(Path::new("")).display()
        );
    }
    let store = Store::open(dst_url)?;

    // 1. Classes: sorted union over the sources, restricted to opts.classes.
    let mut found: BTreeSet<String> = BTreeSet::new();
    if let Some(src) = &sources.image_folder {
        for split in &opts.splits {
            found.extend(class_folders(&src.join(split))?);
        }
    }
    let val_images = match &sources.ilsvrc_val {
        Some(val) => {
            let images = read_ilsvrc_val(val)?;
            found.extend(images.iter().map(|v| v.wnid.clone()));
            Some(images)
        }
        None => None,
    };
    let classes: Vec<String> = match &opts.classes {
        None => found.into_iter().collect(),
        Some(wanted) => {
            let wanted: BTreeSet<String> = wanted.iter().cloned().collect();
            if let Some(missing) = wanted.iter().find(|c| !found.contains(*c)) {
                bail!(
                    "class {missing:?} is in no source ({})",
                    describe(sources, opts)
                );
            }
            wanted.into_iter().collect()
        }
    };

    let mut per_split: BTreeMap<String, Vec<SourceFile>> = BTreeMap::new();
    if let Some(src) = &sources.image_folder {
        for split in &opts.splits {
            per_split.insert(split.clone(), list_split(src, split, &classes)?);
        }
    }
    if let Some(images) = val_images {
        per_split.insert(ILSVRC_VAL_SPLIT.to_string(), val_files(images, &classes));
    }
    for (split, files) in &per_split {
        check_unique_keys(split, files)?;
    }
    let total: usize = per_split.values().map(Vec::len).sum();
    if total == 0 {
        bail!("no images found in {}", describe(sources, opts));
    }

    // 2. Plan: shuffle, then cut each split into shards by exact tar size.
    let mut plans = Vec::new();
    for (split, files) in &mut per_split {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[opts.seed, fnv1a(split.as_bytes())]));
        shuffle(files, &mut rng);
        plans.extend(plan_split(split, files, &classes, opts.shard_size_bytes));
    }

    // 3. Build, hash and put every shard in parallel; results come back in plan order.
    let bar = progress_bar(opts.progress, total as u64);
    bar.set_message(format!("{} shards", plans.len()));
    let built: Vec<ShardInfo> = plans
        .par_iter()
        .map(|plan| write_shard(&store, plan, &per_split[&plan.split], &classes, &bar))
        .collect::<Result<_>>()?;
    bar.finish_and_clear();

    let mut splits = BTreeMap::new();
    for (split, files) in &per_split {
        let mut class_counts = vec![0u64; classes.len()];
        for f in files {
            class_counts[f.class] += 1;
        }
        let shards: Vec<ShardInfo> = plans
            .iter()
            .zip(&built)
            .filter(|(p, _)| &p.split == split)
            .map(|(_, s)| s.clone())
            .collect();
        splits.insert(
            split.clone(),
            SplitInfo {
                samples: files.len() as u64,
                shards,
                class_counts,
            },
        );
    }

    // 4. The manifest, last.
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

/// "<src> splits [..]" and/or "<dir> + <csv>", for error messages.
fn describe(sources: &Sources, opts: &BuildOptions) -> String {
    let mut parts = Vec::new();
    if let Some(src) = &sources.image_folder {
        parts.push(format!("{} splits {:?}", src.display(), opts.splits));
    }
    if let Some(val) = &sources.ilsvrc_val {
        parts.push(format!(
            "{} + {}",
            val.images_dir.display(),
            val.solution_csv.display()
        ));
    }
    parts.join(", ")
}

fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} images {per_sec} eta {eta}",
        )
        .expect("a valid progress template")
        .progress_chars("=> "),
    );
    bar
}

/// Names of the sub-folders of a split folder (symbolic links followed).
fn class_folders(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        bail!("split folder {} does not exist", dir.display());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        // metadata() follows symbolic links: a linked class folder is a class folder.
        let meta = std::fs::metadata(entry.path())
            .with_context(|| format!("reading {}", entry.path().display()))?;
        if meta.is_dir() {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

/// The ILSVRC validation images of the manifest's classes, in ImageId order.
fn val_files(images: Vec<ValImage>, classes: &[String]) -> Vec<SourceFile> {
    let index: BTreeMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    images
        .into_iter()
        .filter_map(|v| {
            let class = *index.get(v.wnid.as_str())?;
            let is_png = v
                .file_name
                .rsplit_once('.')
                .is_some_and(|(_, e)| e.eq_ignore_ascii_case("png"));
            Some(SourceFile {
                class,
                rel: v.file_name,
                path: v.path,
                stem: v.image_id.replace('.', "_"),
                is_png,
                bytes: v.bytes,
            })
        })
        .collect()
}

fn list_split(src: &Path, split: &str, classes: &[String]) -> Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for (class, wnid) in classes.iter().enumerate() {
        let dir = src.join(split).join(wnid);
        if !dir.is_dir() {
            continue; // a class may be absent from one split (count 0)
        }
        let mut names: Vec<(String, PathBuf, u64)> = Vec::new();
        let mut ignored = 0usize;
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ext = match name.rsplit_once('.') {
                // A name that is all extension (`.jpg`, a hidden file) has no stem to key by.
                Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
                _ => String::new(),
            };
            // metadata() follows symbolic links: a linked image is an image.
            match std::fs::metadata(entry.path()) {
                Ok(m) if m.is_file() && IMAGE_EXTENSIONS.contains(&ext.as_str()) => {
                    names.push((name, entry.path(), m.len()))
                }
                _ => ignored += 1,
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
        for (name, path, bytes) in names {
            let (stem, ext) = name.rsplit_once('.').expect("has an image extension");
            files.push(SourceFile {
                class,
                rel: format!("{split}/{wnid}/{name}"),
                path,
                stem: stem.replace('.', "_"),
                is_png: ext.eq_ignore_ascii_case("png"),
                bytes,
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

/// Two files of one split must not get one sample key (e.g. `a.b.jpg` and `a_b.jpg` of one class
/// both become `a_b`): a reader would see one sample twice. Errors name both files and the key.
fn check_unique_keys(split: &str, files: &[SourceFile]) -> Result<()> {
    let mut by_key: BTreeMap<&str, &str> = BTreeMap::new();
    for f in files {
        if let Some(other) = by_key.insert(&f.stem, &f.rel) {
            bail!(
                "split {split}: {other:?} and {:?} both become the sample key {:?} (a `.` in a file name becomes `_`); rename one",
                f.rel,
                f.stem
            );
        }
    }
    Ok(())
}

/// Cuts a split's (shuffled) files into shards: a new shard starts when the next sample would
/// make the tar, end-of-archive included, larger than `shard_size_bytes`; a sample larger than
/// that on its own gets a shard of its own.
fn plan_split(
    split: &str,
    files: &[SourceFile],
    classes: &[String],
    shard_size_bytes: u64,
) -> Vec<ShardPlan> {
    let mut plans = Vec::new();
    let mut start = 0;
    let mut bytes = END_OF_ARCHIVE_BYTES;
    for (i, f) in files.iter().enumerate() {
        let sample = f.tar_bytes(classes);
        if i > start && bytes + sample > shard_size_bytes {
            plans.push(ShardPlan {
                split: split.to_string(),
                index: plans.len(),
                range: start..i,
                bytes,
            });
            start = i;
            bytes = END_OF_ARCHIVE_BYTES;
        }
        bytes += sample;
    }
    if start < files.len() {
        plans.push(ShardPlan {
            split: split.to_string(),
            index: plans.len(),
            range: start..files.len(),
            bytes,
        });
    }
    plans
}

/// Reads the planned samples, writes the tar, checks its size against the plan, hashes and
/// stores it.
fn write_shard(
    store: &Store,
    plan: &ShardPlan,
    files: &[SourceFile],
    classes: &[String],
    bar: &indicatif::ProgressBar,
) -> Result<ShardInfo> {
    let name = format!("{}-{:06}.tar", plan.split, plan.index);
    let mut builder = tar::Builder::new(Vec::with_capacity(plan.bytes as usize));
    for f in &files[plan.range.clone()] {
        let data =
            std::fs::read(&f.path).with_context(|| format!("reading {}", f.path.display()))?;
        if data.len() as u64 != f.bytes {
            bail!(
                "{} changed size during the build ({} bytes when listed, {} when read)",
                f.path.display(),
                f.bytes,
                data.len()
            );
        }
        let ctx = || format!("writing sample {} into {name}", f.stem);
        append_member(&mut builder, &f.image_member(), &data).with_context(ctx)?;
        append_member(
            &mut builder,
            &format!("{}.cls", f.stem),
            f.cls_text().as_bytes(),
        )
        .with_context(ctx)?;
        append_member(
            &mut builder,
            &format!("{}.json", f.stem),
            f.json_text(classes).as_bytes(),
        )
        .with_context(ctx)?;
        bar.inc(1);
    }
    let bytes = builder.into_inner()?; // appends the end-of-archive blocks
    if bytes.len() as u64 != plan.bytes {
        bail!(
            "{name}: the tar is {} bytes but {} were planned (a tar member layout this code does not predict)",
            bytes.len(),
            plan.bytes
        );
    }
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let size = bytes.len() as u64;
    store.put(&name, Bytes::from(bytes))?;
    let mut class_counts = vec![0u64; classes.len()];
    for f in &files[plan.range.clone()] {
        class_counts[f.class] += 1;
    }
    Ok(ShardInfo {
        name,
        samples: plan.range.len() as u64,
        bytes: size,
        sha256,
        class_counts,
    })
}

/// First column of each non-blank line that does not start with `#`, with its 1-based line
/// number (class files: `wnids.txt`, `<wnid> TAB <names>` tables).
///
/// Errors: unreadable file (named), no class ids at all.
pub fn read_class_column(path: &Path) -> Result<Vec<(usize, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let out: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter_map(|(i, l)| l.split_whitespace().next().map(|w| (i + 1, w.to_string())))
        .collect();
    if out.is_empty() {
        bail!("{}: no class ids", path.display());
    }
    Ok(out)
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

    #[test]
    fn member_sizes_match_what_append_member_writes() {
        // Every name length around the ustar limit (100) and the 512-byte rounding of the GNU
        // long-name record, with data sizes around the block boundary.
        for name_len in (1..=260).chain([511, 512, 513, 1000]) {
            let name = if name_len >= 3 {
                format!("{}.j", "k".repeat(name_len - 2))
            } else {
                "k".repeat(name_len)
            };
            let name = name.as_str();
            for data_len in [0usize, 1, 511, 512, 513, 1500] {
                let mut b = tar::Builder::new(Vec::new());
                append_member(&mut b, name, &vec![7u8; data_len]).unwrap();
                let written = b.into_inner().unwrap().len() as u64 - END_OF_ARCHIVE_BYTES;
                assert_eq!(
                    member_tar_bytes(name.len(), data_len as u64),
                    written,
                    "name of {name_len} bytes, {data_len} data bytes"
                );
            }
        }
    }

    #[test]
    fn long_keys_round_trip_through_the_tar() {
        // A key over the ustar name field must come back whole (GNU long name), not cut.
        for key_len in [96, 97, 100, 101, 150, 300] {
            let key = "x".repeat(key_len);
            let mut b = tar::Builder::new(Vec::new());
            append_member(&mut b, &format!("{key}.jpg"), b"img").unwrap();
            append_member(&mut b, &format!("{key}.cls"), b"0").unwrap();
            let bytes = b.into_inner().unwrap();
            let samples: Vec<_> = crate::data::webdataset::SampleReader::new(&bytes[..], "t")
                .map(|s| s.unwrap())
                .collect();
            assert_eq!(samples.len(), 1, "key of {key_len} bytes");
            assert_eq!(samples[0].key, key, "key of {key_len} bytes");
        }
    }

    #[test]
    fn plan_cuts_at_the_size_cap_and_gives_big_samples_their_own_shard() {
        let classes = vec!["n0".to_string()];
        let file = |stem: &str, bytes: u64| SourceFile {
            class: 0,
            rel: format!("train/n0/{stem}.JPEG"),
            path: PathBuf::new(),
            stem: stem.into(),
            is_png: false,
            bytes,
        };
        let files = vec![
            file("a", 1000),
            file("b", 1000),
            file("c", 10_000),
            file("d", 100),
        ];
        let sizes: Vec<u64> = files.iter().map(|f| f.tar_bytes(&classes)).collect();
        // a: 512+1024 (jpg) + 512+512 (cls) + 512+512 (json) = 3584
        assert_eq!(sizes[0], 3584);
        let cap = END_OF_ARCHIVE_BYTES + sizes[0] + sizes[1];
        let plans = plan_split("train", &files, &classes, cap);
        let got: Vec<_> = plans
            .iter()
            .map(|p| (p.index, p.range.clone(), p.bytes))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0..2, cap),
                (1, 2..3, END_OF_ARCHIVE_BYTES + sizes[2]), // larger than the cap on its own
                (2, 3..4, END_OF_ARCHIVE_BYTES + sizes[3]),
            ]
        );
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
                        class_counts: vec![1, 2],
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
