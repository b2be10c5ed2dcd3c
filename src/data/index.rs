//! `devise data index`: our `manifest.json` for WebDataset shards written by other tools, so
//! the reader can train from them and `devise data verify` can check them.
//!
//! The shards must be standard ImageNet-style WebDataset tars (e.g. written by Python's
//! `webdataset.TarWriter` / `ShardWriter`): per sample an image (`.jpg`, `.jpeg`, `.png` or
//! `.img`) and a `.cls` holding the class index in ASCII decimal; other fields (`.json`, ...)
//! are carried along untouched. `.cls` indexes a class file given by the user, one wnid per line
//! in its first column, e.g. `imagenet-meta/ilsvrc2012_wnids_names.tsv` (the standard ILSVRC-2012
//! order, which is sorted). The manifest requires sorted classes, so an unsorted class file is
//! refused (re-indexing the `.cls` values would change the shards' meaning).
//!
//! Which objects form which split:
//! - by default every `*.tar` object directly in the directory named `<split>-<anything>.tar`
//!   (the split is the name up to its last `-`: `train-000000.tar` -> `train`,
//!   `imagenet-val-0001.tar` -> `imagenet-val`), in name order;
//! - or, per split, a brace pattern as WebDataset writes them, relative to the directory:
//!   `train=train-{000000..000146}.tar` (expanded with the `brace-expansion` crate; every name it
//!   gives must exist).
//!
//! Every shard is read whole (in parallel on the current rayon pool) for its size, sha256,
//! sample count and class counts; images are not decoded here (`verify` does that). The manifest
//! is written last, and never over an existing one unless asked.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::shards::{read_class_column, Manifest, ShardInfo, SplitInfo, FORMAT, MANIFEST_NAME};
use super::verify::IMAGE_FIELDS;
use super::webdataset::SampleReader;
use crate::storage::Store;

/// What [`index_shards`] indexes.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// The classes a `.cls` value indexes, sorted and unique ([`read_sorted_classes`]).
    pub classes: Vec<String>,
    /// Where the class list came from, for error messages (e.g. the class file's path).
    pub classes_source: String,
    /// `(split, brace pattern)` pairs, e.g. `("train", "train-{000000..000012}.tar")`. Empty:
    /// discover `<split>-*.tar` objects (module docs).
    pub shards: Vec<(String, String)>,
    /// Replace an existing `manifest.json` (otherwise its presence is an error).
    pub overwrite: bool,
}

/// The first column of a class file ([`read_class_column`]), which must be sorted and unique
/// because a manifest's classes are.
///
/// Errors name the file and the line: unreadable file, no ids, a wnid not after the one before.
pub fn read_sorted_classes(path: &Path) -> Result<Vec<String>> {
    let column = read_class_column(path)?;
    for pair in column.windows(2) {
        let ((l0, a), (l1, b)) = (&pair[0], &pair[1]);
        if a >= b {
            bail!(
                "{}:{l1}: {b} is not after {a} (line {l0}): a manifest's classes are sorted and \
                 unique, and .cls values index this list as it is, so it must be sorted (the \
                 standard ILSVRC-2012 order is)",
                path.display()
            );
        }
    }
    Ok(column.into_iter().map(|(_, w)| w).collect())
}

/// Parses a `--shards` value `SPLIT=PATTERN` (split name and brace pattern, each trimmed).
///
/// Errors (naming the value): no `=`, an empty split name or pattern.
pub fn parse_split_pattern(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((split, pattern)) if !split.trim().is_empty() && !pattern.trim().is_empty() => {
            Ok((split.trim().to_string(), pattern.trim().to_string()))
        }
        _ => Err(format!(
            "'{s}': expected SPLIT=PATTERN, e.g. train=train-{{000000..000012}}.tar"
        )),
    }
}

/// Most names one shard pattern may expand to (a typo such as `{0..99999999}` is an error, not
/// a hundred million names).
pub const MAX_PATTERN_NAMES: usize = 1_000_000;

/// Expands a brace pattern as bash does (`train-{000000..000003}.tar` -> 4 names, zero-padded
/// like the bounds; `{a,b}` alternatives, nesting, `\{` escapes) with the `brace-expansion`
/// crate, on any Unicode text. A pattern without braces is itself.
///
/// Errors (naming the pattern): braces that expand nothing (unbalanced, `{a}`), no names, more
/// than [`MAX_PATTERN_NAMES`] names.
pub fn expand_pattern(pattern: &str) -> Result<Vec<String>> {
    if !pattern.contains(['{', '}']) {
        return Ok(vec![pattern.to_string()]);
    }
    let names = brace_expansion::expand_with_max(pattern, MAX_PATTERN_NAMES + 1);
    if names.len() > MAX_PATTERN_NAMES {
        bail!("shard pattern {pattern:?} expands to more than {MAX_PATTERN_NAMES} names");
    }
    if names.is_empty() {
        bail!("shard pattern {pattern:?} names no shard");
    }
    if names.len() == 1 && names[0] == pattern {
        bail!(
            "shard pattern {pattern:?}: cannot expand it (unbalanced braces, or braces around \
             one item; a range is {{000000..000012}}, alternatives {{a,b}})"
        );
    }
    Ok(names)
}

/// Scans the shards of `url` and writes `url/manifest.json` for them (module docs).
///
/// Errors (each naming the shard URL, and the sample key where there is one): an existing
/// manifest without `opts.overwrite`, no shards found, a pattern naming a missing object, an
/// object in two splits, a shard that does not parse to its end (truncation, bad header, ...)
/// or lacks its end-of-archive blocks, a sample without `.cls` or an image, a `.cls` that is not
/// an index into `opts.classes`, write failures.
pub fn index_shards(url: &str, opts: &IndexOptions) -> Result<Manifest> {
    let store = Store::open_existing(url)?;
    if !opts.overwrite && store.exists(MANIFEST_NAME)? {
        bail!(
            "{} already exists (pass --overwrite to replace it)",
            store.child_url(MANIFEST_NAME)
        );
    }
    if opts.classes.windows(2).any(|w| w[0] >= w[1]) {
        bail!("{}: classes are not sorted and unique", opts.classes_source);
    }
    let listed: BTreeMap<String, u64> = store.list("")?.into_iter().collect();

    // split -> shard names, in order.
    let mut splits: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if opts.shards.is_empty() {
        for name in listed.keys() {
            let Some(stem) = name.strip_suffix(".tar") else {
                continue;
            };
            match stem.rsplit_once('-') {
                Some((split, _)) if !split.is_empty() && !name.contains('/') => splits
                    .entry(split.to_string())
                    .or_default()
                    .push(name.clone()),
                _ => tracing::warn!(
                    "{}: not named <split>-*.tar, ignored",
                    store.child_url(name)
                ),
            }
        }
        if splits.is_empty() {
            bail!("no <split>-*.tar shards in {}", store.url());
        }
    } else {
        let mut owner: HashMap<String, String> = HashMap::new();
        for (split, pattern) in &opts.shards {
            for name in expand_pattern(pattern)? {
                if !listed.contains_key(&name) {
                    bail!(
                        "{}: not found (from the pattern {pattern:?} of split {split})",
                        store.child_url(&name)
                    );
                }
                if let Some(other) = owner.insert(name.clone(), split.clone()) {
                    bail!(
                        "{}: in split {other} and in split {split}",
                        store.child_url(&name)
                    );
                }
                splits.entry(split.clone()).or_default().push(name);
            }
        }
    }

    let n_classes = opts.classes.len();
    let mut manifest_splits = BTreeMap::new();
    for (split, names) in splits {
        let scanned: Vec<(ShardInfo, Vec<u64>)> = names
            .par_iter()
            .map(|name| scan_shard(&store, name, n_classes, &opts.classes_source))
            .collect::<Result<_>>()?;
        let mut class_counts = vec![0u64; n_classes];
        let mut shards = Vec::with_capacity(scanned.len());
        for (info, counts) in scanned {
            for (total, n) in class_counts.iter_mut().zip(counts) {
                *total += n;
            }
            shards.push(info);
        }
        let samples = shards.iter().map(|s| s.samples).sum();
        manifest_splits.insert(
            split,
            SplitInfo {
                samples,
                shards,
                class_counts,
            },
        );
    }
    let manifest = Manifest {
        format: FORMAT.to_string(),
        classes: opts.classes.clone(),
        splits: manifest_splits,
    };
    manifest.check()?;
    let json = serde_json::to_vec_pretty(&manifest)?;
    store.put(MANIFEST_NAME, Bytes::from(json))?;
    Ok(manifest)
}

/// One shard's manifest entry and its per-class sample counts.
fn scan_shard(
    store: &Store,
    name: &str,
    n_classes: usize,
    classes_source: &str,
) -> Result<(ShardInfo, Vec<u64>)> {
    let shard_url = store.child_url(name);
    let bytes = store.get(name)?;
    let mut counts = vec![0u64; n_classes];
    let mut samples = 0u64;
    let mut reader = SampleReader::new(&bytes[..], name);
    for item in &mut reader {
        let sample = item.map_err(|e| anyhow!("{shard_url}: {e}"))?;
        let key = &sample.key;
        let cls = sample
            .fields
            .get("cls")
            .with_context(|| format!("{shard_url}: sample {key}: no .cls field"))?;
        let text = String::from_utf8_lossy(cls).trim().to_string();
        let class = match text.parse::<usize>() {
            Ok(c) if c < n_classes => c,
            _ => bail!(
                "{shard_url}: sample {key}: .cls {text:?} is not an index into the {n_classes} classes of {classes_source}"
            ),
        };
        if !IMAGE_FIELDS.iter().any(|f| sample.fields.contains_key(*f)) {
            bail!("{shard_url}: sample {key}: no image field (one of {IMAGE_FIELDS:?})");
        }
        counts[class] += 1;
        samples += 1;
    }
    if reader.missing_end_of_archive() {
        bail!("{shard_url}: no end-of-archive blocks (a writer stopped before closing the tar?)");
    }
    let info = ShardInfo {
        name: name.to_string(),
        samples,
        bytes: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(&bytes)),
        class_counts: counts.clone(),
    };
    Ok((info, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brace_patterns_expand_like_webdataset() {
        assert_eq!(
            expand_pattern("train-{000000..000003}.tar").unwrap(),
            [
                "train-000000.tar",
                "train-000001.tar",
                "train-000002.tar",
                "train-000003.tar"
            ]
        );
        assert_eq!(
            expand_pattern("{a,b}-{08..10}.tar").unwrap(),
            ["a-08.tar", "a-09.tar", "a-10.tar", "b-08.tar", "b-09.tar", "b-10.tar"]
        );
        assert_eq!(
            expand_pattern("val-000000.tar").unwrap(),
            ["val-000000.tar"]
        );
        let e = expand_pattern("train-{000000..000003.tar").unwrap_err();
        assert!(e.to_string().contains("train-{000000..000003.tar"), "{e}");
    }

    #[test]
    fn class_files_must_be_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("classes.tsv");
        std::fs::write(&path, "# wnids\nn01\tone\n\nn03\tthree\nn02\ttwo\n").unwrap();
        let e = read_sorted_classes(&path).unwrap_err().to_string();
        assert!(
            e.contains("classes.tsv:5: n02 is not after n03 (line 4)"),
            "{e}"
        );
        std::fs::write(&path, "n01\nn01\n").unwrap();
        let e = read_sorted_classes(&path).unwrap_err().to_string();
        assert!(e.contains("classes.tsv:2: n01 is not after n01"), "{e}");
        std::fs::write(&path, "n01\tone\nn02 two\n").unwrap();
        assert_eq!(read_sorted_classes(&path).unwrap(), ["n01", "n02"]);
    }
}
