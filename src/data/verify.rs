//! `devise data verify`: checks a shard directory against its `manifest.json`, down to every
//! image.
//!
//! For each shard of each split (or of one split), in parallel on the current rayon pool:
//!
//! 1. the object exists and reads;
//! 2. its byte count and sha256 are the manifest's;
//! 3. it parses as a WebDataset tar ([`SampleReader`]: truncation, bad headers, interleaved or
//!    duplicate members are reported with their byte offset), ends with its end-of-archive
//!    blocks, and holds the manifest's number of samples;
//! 4. every sample has an image (`.jpg`, `.jpeg`, `.png` or `.img`, as the reader accepts) and a
//!    `.cls` that is an index into the manifest's classes;
//! 5. every image decodes with [`decode_rgb`] (in parallel, the reader's decompression-bomb
//!    limit);
//!
//! and per shard and per split: the class counts of the `.cls` fields read are the manifest's
//! (the training stream plans from the per-shard ones), and no key
//! appears twice. A shard whose checks fail is still parsed as far as it goes, so a damaged shard
//! reports both "sha256 differs" and what is wrong inside it (which sample no longer decodes).
//!
//! Nothing is fatal except an unreadable or inconsistent manifest and an unknown split: every
//! other finding is a [`Problem`] naming the shard (and the sample key when there is one), and
//! [`VerifyReport::is_ok`] is false when there is any. Memory: a shard is held whole while it is
//! checked, by at most a few shards per thread.

use std::collections::HashMap;
use std::fmt;

use anyhow::Result;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::image::{decode_rgb, DecodeOptions};
use super::shards::{read_manifest, ShardInfo};
use super::webdataset::SampleReader;
use crate::storage::Store;

/// Sample fields holding the image, in the order the reader looks for them.
pub const IMAGE_FIELDS: &[&str] = &["jpg", "jpeg", "png", "img"];

/// What [`verify_shards`] checks.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Only this split; `None` = every split of the manifest.
    pub split: Option<String>,
    /// Decompression-bomb guard passed to [`decode_rgb`] (pixels, width x height); the reader's
    /// default is [`super::DEFAULT_MAX_PIXELS`].
    pub max_pixels: u64,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Split the shard belongs to.
    pub split: String,
    /// Shard object name (`train-000003.tar`), or `"(split)"` for split-wide findings (class
    /// counts, duplicate keys).
    pub shard: String,
    /// Sample key, when the finding is about one sample.
    pub key: Option<String>,
    /// What is wrong, e.g. `sha256 3f.. but the manifest says 9a..`.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{} {}: {}", self.shard, key, self.message),
            None => write!(f, "{}: {}", self.shard, self.message),
        }
    }
}

/// Per-split totals of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitSummary {
    /// Split name.
    pub split: String,
    /// Shards the manifest lists.
    pub shards: usize,
    /// Shards with at least one problem.
    pub bad_shards: usize,
    /// Samples the manifest says the split holds.
    pub manifest_samples: u64,
    /// Samples actually read from the shards.
    pub samples_read: u64,
    /// Images that decoded.
    pub images_decoded: u64,
}

/// The outcome of [`verify_shards`].
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// The shard directory verified.
    pub url: String,
    /// One summary per verified split, in name order.
    pub splits: Vec<SplitSummary>,
    /// Every finding: per split, the shards' in shard order, then the split-wide ones.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    /// The summary table, the problems (shard, key, message), and a one-line verdict.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "verify {}", self.url)?;
        writeln!(
            f,
            "{:<12} {:>7} {:>7} {:>7} {:>12} {:>12} {:>12}",
            "split", "shards", "ok", "bad", "manifest", "read", "decoded"
        )?;
        for s in &self.splits {
            writeln!(
                f,
                "{:<12} {:>7} {:>7} {:>7} {:>12} {:>12} {:>12}",
                s.split,
                s.shards,
                s.shards - s.bad_shards,
                s.bad_shards,
                s.manifest_samples,
                s.samples_read,
                s.images_decoded
            )?;
        }
        if !self.problems.is_empty() {
            writeln!(f, "problems:")?;
            for p in &self.problems {
                writeln!(f, "  {}/{p}", p.split)?;
            }
        }
        let shards: usize = self.splits.iter().map(|s| s.shards).sum();
        let samples: u64 = self.splits.iter().map(|s| s.samples_read).sum();
        if self.is_ok() {
            write!(
                f,
                "OK: {shards} shards, {samples} samples, every image decodes"
            )
        } else {
            let bad: usize = self.splits.iter().map(|s| s.bad_shards).sum();
            write!(
                f,
                "FAILED: {} problems ({bad} of {shards} shards bad)",
                self.problems.len()
            )
        }
    }
}

/// Checks every shard of `url` (or of `opts.split`) against `url/manifest.json`; see the module
/// docs for the checks.
///
/// Errors (as opposed to problems in the report): the manifest is missing, unreadable or
/// inconsistent ([`read_manifest`]), or `opts.split` is not one of its splits.
pub fn verify_shards(url: &str, opts: &VerifyOptions) -> Result<VerifyReport> {
    let manifest = read_manifest(url)?;
    let store = Store::open_existing(url)?;
    let splits: Vec<&String> = match &opts.split {
        Some(name) => {
            manifest.split(name)?;
            manifest.splits.keys().filter(|k| *k == name).collect()
        }
        None => manifest.splits.keys().collect(),
    };
    let n_classes = manifest.classes.len();
    let mut report = VerifyReport {
        url: store.url().to_string(),
        splits: Vec::new(),
        problems: Vec::new(),
    };
    for split in splits {
        let info = &manifest.splits[split];
        let checks: Vec<ShardCheck> = info
            .shards
            .par_iter()
            .map(|shard| check_shard(&store, split, shard, n_classes, opts.max_pixels))
            .collect();
        let mut summary = SplitSummary {
            split: split.clone(),
            shards: info.shards.len(),
            bad_shards: 0,
            manifest_samples: info.samples,
            samples_read: 0,
            images_decoded: 0,
        };
        let mut class_counts = vec![0u64; n_classes];
        let mut first_shard_of_key: HashMap<String, usize> = HashMap::new();
        let mut split_problems = Vec::new();
        for (i, check) in checks.into_iter().enumerate() {
            if !check.problems.is_empty() {
                summary.bad_shards += 1;
            }
            summary.samples_read += check.keys.len() as u64;
            summary.images_decoded += check.images_decoded;
            let shard = &info.shards[i];
            if !shard.class_counts.is_empty() && check.class_counts != shard.class_counts {
                let differ: Vec<String> = (0..n_classes)
                    .filter(|&c| check.class_counts[c] != shard.class_counts[c])
                    .take(5)
                    .map(|c| {
                        format!(
                            "class {c} ({}): {} read, manifest {}",
                            manifest.classes[c], check.class_counts[c], shard.class_counts[c]
                        )
                    })
                    .collect();
                report.problems.push(Problem {
                    split: split.clone(),
                    shard: shard.name.clone(),
                    key: None,
                    message: format!(
                        "per-shard class counts differ from the manifest's: {}",
                        differ.join("; ")
                    ),
                });
            }
            for (c, n) in check.class_counts.iter().enumerate() {
                class_counts[c] += n;
            }
            for key in check.keys {
                if let Some(&first) = first_shard_of_key.get(&key) {
                    split_problems.push(Problem {
                        split: split.clone(),
                        shard: "(split)".into(),
                        key: Some(key),
                        message: format!(
                            "key in both {} and {}",
                            info.shards[first].name, info.shards[i].name
                        ),
                    });
                } else {
                    first_shard_of_key.insert(key, i);
                }
            }
            report.problems.extend(check.problems);
        }
        for (c, (&got, &want)) in class_counts.iter().zip(&info.class_counts).enumerate() {
            if got != want {
                split_problems.push(Problem {
                    split: split.clone(),
                    shard: "(split)".into(),
                    key: None,
                    message: format!(
                        "class {c} ({}): {got} samples in the shards, the manifest says {want}",
                        manifest.classes[c]
                    ),
                });
            }
        }
        report.problems.extend(split_problems);
        report.splits.push(summary);
    }
    Ok(report)
}

/// What one shard contributed.
struct ShardCheck {
    problems: Vec<Problem>,
    /// Keys of the samples read, in tar order.
    keys: Vec<String>,
    /// Valid `.cls` values counted per class.
    class_counts: Vec<u64>,
    images_decoded: u64,
}

fn check_shard(
    store: &Store,
    split: &str,
    shard: &ShardInfo,
    n_classes: usize,
    max_pixels: u64,
) -> ShardCheck {
    let mut out = ShardCheck {
        problems: Vec::new(),
        keys: Vec::new(),
        class_counts: vec![0; n_classes],
        images_decoded: 0,
    };
    let problem = |key: Option<&str>, message: String| Problem {
        split: split.to_string(),
        shard: shard.name.clone(),
        key: key.map(str::to_string),
        message,
    };
    let bytes = match store.get(&shard.name) {
        Ok(b) => b,
        Err(e) => {
            out.problems
                .push(problem(None, format!("cannot be read: {e:#}")));
            return out;
        }
    };
    if bytes.len() as u64 != shard.bytes {
        out.problems.push(problem(
            None,
            format!(
                "{} bytes but the manifest says {}",
                bytes.len(),
                shard.bytes
            ),
        ));
    }
    let sha256 = hex::encode(Sha256::digest(&bytes));
    if sha256 != shard.sha256 {
        out.problems.push(problem(
            None,
            format!("sha256 {sha256} but the manifest says {}", shard.sha256),
        ));
    }

    let mut images: Vec<(String, Vec<u8>)> = Vec::new();
    let mut reader = SampleReader::new(&bytes[..], &shard.name);
    for item in &mut reader {
        let mut sample = match item {
            Ok(s) => s,
            Err(e) => {
                out.problems.push(problem(None, e.to_string()));
                break;
            }
        };
        let key = std::mem::take(&mut sample.key);
        match sample.fields.get("cls") {
            None => out
                .problems
                .push(problem(Some(&key), "no .cls field".into())),
            Some(cls) => {
                let text = String::from_utf8_lossy(cls).trim().to_string();
                match text.parse::<usize>() {
                    Ok(c) if c < n_classes => out.class_counts[c] += 1,
                    _ => out.problems.push(problem(
                        Some(&key),
                        format!(".cls {text:?} is not a class index (the manifest has {n_classes} classes)"),
                    )),
                }
            }
        }
        match IMAGE_FIELDS.iter().find_map(|f| sample.fields.remove(*f)) {
            Some(image) => images.push((key.clone(), image)),
            None => out.problems.push(problem(
                Some(&key),
                format!("no image field (one of {IMAGE_FIELDS:?})"),
            )),
        }
        out.keys.push(key);
    }
    if reader.missing_end_of_archive() {
        out.problems.push(problem(
            None,
            "no end-of-archive blocks (a writer stopped before closing the tar?)".into(),
        ));
    }
    if out.keys.len() as u64 != shard.samples {
        out.problems.push(problem(
            None,
            format!(
                "{} samples read but the manifest says {}",
                out.keys.len(),
                shard.samples
            ),
        ));
    }
    let decode_errors: Vec<Option<Problem>> = images
        .par_iter()
        .map(|(key, data)| {
            decode_rgb(data, &DecodeOptions::new(max_pixels))
                .err()
                .map(|e| problem(Some(key), format!("image does not decode: {e:#}")))
        })
        .collect();
    for p in decode_errors {
        match p {
            Some(p) => out.problems.push(p),
            None => out.images_decoded += 1,
        }
    }
    out
}
