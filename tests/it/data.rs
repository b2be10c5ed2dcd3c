//! Scope: `devise::data` and `devise::storage` end to end on real files.
//!
//! - Three classes of the synthetic shapes dataset (500 training and 50 validation images
//!   each, rendered once per test process): build shards, read them back, labels, determinism,
//!   sample-exact resume from a saved cursor (mid-epoch and across an epoch boundary), epochs
//!   differ, bounded streaming memory, ranks partition the global batch, eval covers every
//!   sample once, checksum / strict / I/O errors on a one-shard manifest, a truncated JPEG
//!   skipped by two ranks that stay aligned and resume exactly.
//! - The whole shapes dataset through the same path.
//! - Tiny ImageNet (3 classes of `../shared/data/tiny-imagenet-200.tar.gz`, extracted once into
//!   `CARGO_TARGET_TMPDIR`): greyscale JPEGs come out RGB.
//! - Field cases B01 B02 B04 B05 B06 B07 B08 B10 B27 of `../shared/field-cases/`
//!   (MANIFEST.json): each fixture tar is served through a one-shard manifest, so the real
//!   reader policy runs.
//! - `throughput_tiny_imagenet` (ignored; run with `--ignored --nocapture`) prints images/s.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use devise::data::image::{decode_rgb, DecodeOptions};
use devise::data::partition::Layout;
use devise::data::shards::{ShardInfo, SplitInfo, FORMAT};
use devise::data::synthetic::{generate_shapes, ShapesOptions};
use devise::data::webdataset::{SampleReader, ShardError};
use devise::data::{
    build_shards, eval_batches, read_manifest, BuildOptions, Config, Cursor, Manifest, TrainStream,
};
use devise::storage::Store;
use sha2::{Digest, Sha256};

use crate::common::shared_dir;

/// goldfish (no greyscale), tailed frog (2 greyscale train images), + n01698640 (4 train, 1 val).
const CLASSES: [&str; 3] = ["n01443537", "n01644900", "n01698640"];

/// `<tmp>/.../tiny-imagenet-200/{train,val}/<wnid>/*.JPEG` for [`CLASSES`], extracted once.
fn tiny_subset() -> PathBuf {
    crate::common::tiny::tiny_classes(&CLASSES)
}

/// Shards of the Tiny ImageNet subset (200 KB shards), built once per test process.
fn tiny_shards() -> (PathBuf, Manifest) {
    static SHARDS: OnceLock<(tempfile::TempDir, Manifest)> = OnceLock::new();
    let (dir, m) = SHARDS.get_or_init(|| {
        let src = tiny_subset();
        let dst = tempfile::tempdir().unwrap();
        let m = build_shards(&src, dst.path().to_str().unwrap(), &options(7)).unwrap();
        (dst, m)
    });
    (dir.path().to_path_buf(), m.clone())
}

/// Three classes of the synthetic shapes dataset, sorted; `blue_triangle` is one of the
/// dataset's unseen classes.
const SHAPE_CLASSES: [&str; 3] = ["blue_circle", "blue_triangle", "green_circle"];

/// `<tmp>/{train,val}/<id>/<id>_<i>.JPEG` for [`SHAPE_CLASSES`] only: 500 training and 50
/// validation images each, 32 px, rendered once per test process.
fn shapes_subset() -> PathBuf {
    static TREE: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = TREE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let opts = ShapesOptions {
            image_size: 32,
            train_per_class: 500,
            val_per_class: 50,
            seed: 7,
        };
        generate_shapes(dir.path(), &opts).unwrap();
        // Only the three classes stay in the tree: a build of it has exactly these classes.
        for split in ["train", "val"] {
            for e in std::fs::read_dir(dir.path().join(split)).unwrap() {
                let path = e.unwrap().path();
                if !SHAPE_CLASSES.iter().any(|c| path.ends_with(c)) {
                    std::fs::remove_dir_all(&path).unwrap();
                }
            }
        }
        dir
    });
    dir.path().to_path_buf()
}

/// Shards of the shapes subset (200 KB shards -> several per split), built once per test
/// process.
fn shapes_shards() -> (PathBuf, Manifest) {
    static SHARDS: OnceLock<(tempfile::TempDir, Manifest)> = OnceLock::new();
    let (dir, m) = SHARDS.get_or_init(|| {
        let src = shapes_subset();
        let dst = tempfile::tempdir().unwrap();
        let m = build_shards(&src, dst.path().to_str().unwrap(), &options(7)).unwrap();
        (dst, m)
    });
    (dir.path().to_path_buf(), m.clone())
}

/// A webdataset tar of the first `n` training images of the shapes subset, keys `000000`,
/// ..., sample `i` of class `i % 3`.
fn shapes_tar(n: usize) -> Vec<u8> {
    let src = shapes_subset();
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..n {
        let class = SHAPE_CLASSES[i % 3];
        let jpg = std::fs::read(src.join(format!("train/{class}/{class}_{i}.JPEG"))).unwrap();
        let key = format!("{i:06}");
        devise::data::webdataset::append_member(&mut b, &format!("{key}.jpg"), &jpg).unwrap();
        devise::data::webdataset::append_member(
            &mut b,
            &format!("{key}.cls"),
            (i % 3).to_string().as_bytes(),
        )
        .unwrap();
    }
    b.into_inner().unwrap()
}

fn options(seed: u64) -> BuildOptions {
    BuildOptions {
        splits: vec!["train".into(), "val".into()],
        classes: None,
        shard_size_bytes: 200_000,
        seed,
        progress: false,
    }
}

fn config(shards: &Path, size: u32) -> Config {
    let mut cfg = Config::new(shards.to_str().unwrap(), size);
    cfg.decode_threads = 2;
    cfg
}

fn all_labels(m: &Manifest) -> Vec<Option<i64>> {
    (0..m.classes.len() as i64).map(Some).collect()
}

/// The partition layout a training stream over split "train" of `m` uses with `partitions`.
fn layout_of(m: &Manifest, labels: &[Option<i64>], partitions: usize) -> Layout {
    let split = m.split("train").unwrap();
    let units: Vec<u64> = split
        .shards
        .iter()
        .map(|s| {
            s.class_counts
                .iter()
                .zip(labels)
                .filter(|(_, l)| l.is_some())
                .map(|(n, _)| n)
                .sum()
        })
        .collect();
    Layout::new(&split.shards, &units, partitions)
}

/// `stem -> class` of every file of `split` in the generated tree.
fn source_labels(root: &Path, split: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for c in SHAPE_CLASSES {
        for e in std::fs::read_dir(root.join(split).join(c)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            out.insert(name.trim_end_matches(".JPEG").to_string(), c.to_string());
        }
    }
    out
}

fn take(stream: &mut TrainStream, n: usize) -> Vec<(devise::data::Batch, Cursor)> {
    (0..n).map(|_| stream.next_batch().unwrap()).collect()
}

#[test]
fn build_shards_writes_webdataset_tars_and_a_consistent_manifest() {
    let src = shapes_subset();
    let (dir, m) = shapes_shards();
    assert_eq!(m.format, FORMAT);
    assert_eq!(m.classes, SHAPE_CLASSES);
    let train = &m.splits["train"];
    let val = &m.splits["val"];
    assert_eq!((train.samples, val.samples), (1500, 150));
    assert_eq!(train.class_counts, [500, 500, 500]);
    assert_eq!(val.class_counts, [50, 50, 50]);
    assert!(
        train.shards.len() > 3,
        "several shards: {}",
        train.shards.len()
    );
    assert_eq!(read_manifest(dir.to_str().unwrap()).unwrap(), m);

    let store = Store::open(dir.to_str().unwrap()).unwrap();
    let mut first_shard_classes = BTreeSet::new();
    for (split, info) in [("train", train), ("val", val)] {
        let labels = source_labels(&src, split);
        let mut seen = 0;
        for (i, shard) in info.shards.iter().enumerate() {
            assert_eq!(shard.name, format!("{split}-{i:06}.tar"));
            let bytes = store.get(&shard.name).unwrap();
            assert_eq!(bytes.len() as u64, shard.bytes);
            assert!(shard.bytes <= 200_000);
            assert_eq!(hex::encode(Sha256::digest(&bytes)), shard.sha256);
            let samples: Vec<_> = SampleReader::new(&bytes[..], &shard.name)
                .map(|s| s.unwrap())
                .collect();
            assert_eq!(samples.len() as u64, shard.samples);
            for s in samples {
                assert_eq!(s.fields.keys().collect::<Vec<_>>(), ["cls", "jpg", "json"]);
                let wnid = &labels[&s.key];
                let cls: usize = std::str::from_utf8(&s.fields["cls"])
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(&m.classes[cls], wnid, "{}", s.key);
                let meta: serde_json::Value = serde_json::from_slice(&s.fields["json"]).unwrap();
                let source = format!("{split}/{wnid}/{}.JPEG", s.key);
                assert_eq!(meta["wnid"], wnid.as_str());
                assert_eq!(meta["source"], source.as_str());
                // ORIGINAL bytes, not re-encoded.
                let original = std::fs::read(src.join(&source)).unwrap();
                assert!(s.fields["jpg"] == original, "{source} was re-encoded");
                if split == "train" && i == 0 {
                    first_shard_classes.insert(cls);
                }
                seen += 1;
            }
        }
        assert_eq!(seen, info.samples);
    }
    assert_eq!(
        first_shard_classes.len(),
        3,
        "shuffled before sharding: shards mix classes"
    );

    // Same tree, same seed -> byte-identical shards; another seed -> another order.
    let again = tempfile::tempdir().unwrap();
    let m2 = build_shards(&src, again.path().to_str().unwrap(), &options(7)).unwrap();
    assert_eq!(m2, m);
    let other = tempfile::tempdir().unwrap();
    let m3 = build_shards(&src, other.path().to_str().unwrap(), &options(8)).unwrap();
    assert_ne!(m3.splits["train"].shards[0].sha256, train.shards[0].sha256);

    // Restricting classes; a typo is an error.
    let mut opts = options(7);
    opts.classes = Some(vec!["green_circle".into()]);
    let sub = tempfile::tempdir().unwrap();
    let m4 = build_shards(&src, sub.path().to_str().unwrap(), &opts).unwrap();
    assert_eq!(m4.classes, ["green_circle"]);
    assert_eq!(m4.splits["train"].samples, 500);
    opts.classes = Some(vec!["orange_circle".into()]);
    let err = build_shards(&src, sub.path().to_str().unwrap(), &opts).unwrap_err();
    assert!(err.to_string().contains("orange_circle"), "{err}");
    opts.classes = None;
    opts.splits = vec!["test".into()];
    assert!(build_shards(&src, sub.path().to_str().unwrap(), &opts).is_err());
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn greyscale_images_come_out_rgb() {
    let src = tiny_subset();
    let dir = src.join("train/n01698640");
    let mut grey = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        // one-component JPEG: SOF0 component count byte
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        if bytes[sof + 9] != 1 {
            continue;
        }
        grey += 1;
        let img = decode_rgb(&bytes, &DecodeOptions::new(1 << 20)).unwrap();
        assert_eq!(img.dimensions(), (64, 64));
        assert!(img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    }
    assert_eq!(grey, 4, "the subset's greyscale images");
}

#[test]
fn train_stream_is_deterministic_and_covers_each_epoch_once() {
    let (dir, m) = shapes_shards();
    let mut cfg = config(&dir, 32);
    cfg.eval_resize = Some(36);
    let start = |seed| {
        TrainStream::start(&cfg, &m, all_labels(&m), 50, seed, Cursor::default(), 0, 1).unwrap()
    };
    let (mut a, mut b, mut c) = (start(1), start(1), start(2));
    let (ba, bb, bc) = (take(&mut a, 30), take(&mut b, 30), take(&mut c, 3));
    assert_eq!(
        ba, bb,
        "same seed, same batches (keys, labels, pixels, cursors)"
    );
    assert_ne!(ba[0].0.keys, bc[0].0.keys, "another seed, another order");

    // The default partitions of these shards leave nothing out: 1500 samples / 50 = 30 batches
    // = exactly one epoch, every sample once.
    let partitions = ba[0].1.partitions;
    let layout = layout_of(&m, &all_labels(&m), partitions);
    assert_eq!((layout.leftover, layout.epoch_positions()), (0, 1500));
    assert_eq!(
        ba[0].1,
        Cursor {
            partitions,
            position: 50
        }
    );
    assert_eq!(ba[29].1.position, 1500);
    let epoch0: Vec<&String> = ba.iter().flat_map(|(b, _)| &b.keys).collect();
    let unique: BTreeSet<_> = epoch0.iter().collect();
    assert_eq!(unique.len(), 1500);
    let positions: Vec<u64> = ba.iter().flat_map(|(b, _)| b.positions.clone()).collect();
    assert_eq!(positions, (0..1500).collect::<Vec<u64>>());
    let mut labels = [0; 3];
    for (batch, _) in &ba {
        assert_eq!(batch.n, 50);
        assert_eq!(batch.image_size, 32);
        assert_eq!(batch.images.len(), 50 * 3 * 32 * 32);
        assert!(batch.images.iter().all(|v| v.is_finite()));
        for l in &batch.labels {
            labels[*l as usize] += 1;
        }
    }
    assert_eq!(labels, [500, 500, 500]);
    // Labels match the source tree.
    let src = shapes_subset();
    let truth = source_labels(&src, "train");
    for (batch, _) in &ba[..3] {
        for (k, l) in batch.keys.iter().zip(&batch.labels) {
            assert_eq!(truth[k], SHAPE_CLASSES[*l as usize]);
        }
    }
    // The next epoch visits the samples in another order.
    let next = take(&mut a, 2);
    let e1: Vec<&String> = next.iter().flat_map(|(b, _)| &b.keys).collect();
    assert_ne!(e1, epoch0[..100].to_vec());
    let s = a.stats();
    assert_eq!(
        (s.samples, s.decode_errors, s.shard_errors, s.filtered),
        (1600, 0, 0, 0)
    );
}

#[test]
fn resume_from_a_saved_cursor_is_sample_exact() {
    let (dir, m) = shapes_shards();
    // Shuffle buffer larger than a shard (a uniform shuffle of it) and smaller (a streaming
    // buffer that refills while slots are taken): resume is exact either way.
    for (shuffle_buffer, prefetch_shards) in [(1000, 1), (5, 3)] {
        let mut cfg = config(&dir, 24);
        cfg.prefetch_batches = 2;
        cfg.shuffle_buffer = shuffle_buffer;
        cfg.prefetch_shards = prefetch_shards;
        resume_exact(&cfg, &m);
    }
}

fn resume_exact(cfg: &Config, m: &Manifest) {
    // 37 does not divide 1500: batches straddle the epoch boundary (after batch 40).
    let start = |cursor| TrainStream::start(cfg, m, all_labels(m), 37, 11, cursor, 0, 1).unwrap();
    let mut full = start(Cursor::default());
    let reference = take(&mut full, 46);
    assert_eq!(reference[40].1.position, 41 * 37);
    for k in [0usize, 12, 39, 40] {
        let saved = reference[k].1;
        let mut resumed = start(saved);
        let got = take(&mut resumed, 45 - k);
        for (i, (g, r)) in got.iter().zip(&reference[k + 1..]).enumerate() {
            assert_eq!(
                g.0.keys,
                r.0.keys,
                "resume from batch {k}: batch {} keys",
                k + 1 + i
            );
            assert!(
                g.0.images == r.0.images,
                "resume from batch {k}: batch {} pixels",
                k + 1 + i
            );
            assert_eq!(g.1, r.1);
        }
    }
}

#[test]
fn streaming_memory_stays_bounded_by_the_buffers_not_the_shards() {
    // 1 MiB shards (about 250 samples each, the last one too), so that "never held whole" is
    // not decided by a last shard of a few samples.
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(7);
    opts.shard_size_bytes = 1 << 20;
    let m = build_shards(&shapes_subset(), dir.path().to_str().unwrap(), &opts).unwrap();
    let mut cfg = config(dir.path(), 16);
    cfg.shuffle_buffer = 5;
    cfg.shard_readahead = 2;
    cfg.prefetch_shards = 1;
    let batch = 8;
    let mut s =
        TrainStream::start(&cfg, &m, all_labels(&m), batch, 5, Cursor::default(), 0, 1).unwrap();
    let split = m.split("train").unwrap();
    for _ in 0..(2 * split.samples as usize / batch) {
        s.next_batch().unwrap(); // two epochs
    }
    let stats = s.stats();
    // Held at most, per partition of the rank: the shuffle buffer, two streaming shards'
    // channels (+1 sample each being sent); and a batch of candidates with its top-ups.
    let per_partition = cfg.shuffle_buffer + 2 * (cfg.shard_readahead + 1);
    let samples_bound = (stats.partitions as usize * per_partition + 2 * batch) as u64;
    assert!(stats.partitions >= 1);
    let largest_image = 8_000; // the 32x32 shapes JPEGs are 1-1.5 KB
    assert!(stats.peak_buffered_bytes > 0);
    assert!(
        stats.peak_buffered_bytes <= samples_bound * largest_image,
        "peak {} bytes > {samples_bound} samples",
        stats.peak_buffered_bytes
    );
    let smallest_shard = split.shards.iter().map(|s| s.bytes).min().unwrap();
    assert!(
        stats.peak_buffered_bytes < smallest_shard / 2,
        "peak {} bytes: a shard ({smallest_shard} bytes) is never held whole",
        stats.peak_buffered_bytes
    );
}

#[test]
fn label_map_filters_before_decoding_and_ranks_partition_global_batches() {
    let (dir, m) = shapes_shards();
    let mut cfg = config(&dir, 16);
    // The same partitions on 1 and 2 ranks (the default depends on the world size).
    cfg.partitions = Some(2);
    // Class 1 (blue_triangle, unseen in the shapes split) held out, as a zero-shot class is.
    let map = vec![Some(0), None, Some(1)];
    let mut one =
        TrainStream::start(&cfg, &m, map.clone(), 40, 3, Cursor::default(), 0, 1).unwrap();
    let mut r0 = TrainStream::start(&cfg, &m, map.clone(), 20, 3, Cursor::default(), 0, 2).unwrap();
    let mut r1 = TrainStream::start(&cfg, &m, map.clone(), 20, 3, Cursor::default(), 1, 2).unwrap();
    for _ in 0..30 {
        let (g, cg) = one.next_batch().unwrap();
        let (a, ca) = r0.next_batch().unwrap();
        let (b, cb) = r1.next_batch().unwrap();
        assert!(g.labels.iter().all(|l| *l == 0 || *l == 1));
        assert_eq!(cg, ca);
        assert_eq!(ca, cb, "ranks agree on the cursor");
        let even: Vec<_> = g.keys.iter().step_by(2).cloned().collect();
        let odd: Vec<_> = g.keys.iter().skip(1).step_by(2).cloned().collect();
        assert_eq!(
            a.keys, even,
            "rank 0 takes the even positions of the global batch"
        );
        assert_eq!(b.keys, odd);
        assert!(a.positions.iter().all(|p| p % 2 == 0));
        let rows = 3 * 16 * 16;
        assert!(a.images[..rows] == g.images[..rows]);
    }
    let s = one.stats();
    assert_eq!(s.samples, 1200);
    // 1200 accepted, read from shards that hold about 600 blue_triangles as well.
    assert!((550..=700).contains(&s.filtered), "{s:?}");
    // A label map that accepts nothing is refused up front.
    let err = TrainStream::start(&cfg, &m, vec![None; 3], 8, 0, Cursor::default(), 0, 1)
        .err()
        .unwrap();
    assert!(err.to_string().contains("label map"), "{err}");
    assert!(TrainStream::start(&cfg, &m, vec![Some(0); 2], 8, 0, Cursor::default(), 0, 1).is_err());
    // A cursor without partitions but with a position; partitions 3 ranks cannot share; a
    // data.partitions different from the cursor's.
    let no_partitions = Cursor {
        partitions: 0,
        position: 8,
    };
    assert!(TrainStream::start(&cfg, &m, map.clone(), 8, 0, no_partitions, 0, 1).is_err());
    let two = Cursor {
        partitions: 2,
        position: 8,
    };
    let err = TrainStream::start(&cfg, &m, map.clone(), 8, 0, two, 0, 3)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("World sizes that work: 1, 2"), "{err}");
    let mut other = cfg.clone();
    other.partitions = Some(1);
    let err = TrainStream::start(&other, &m, map, 8, 0, two, 0, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("data.partitions = 1"), "{err}");
}

/// Key -> shard name of every sample of split "train".
fn shard_of_keys(dir: &Path, m: &Manifest) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for shard in &m.split("train").unwrap().shards {
        let bytes = std::fs::read(dir.join(&shard.name)).unwrap();
        for sample in SampleReader::new(&bytes[..], &shard.name) {
            out.insert(sample.unwrap().key, shard.name.clone());
        }
    }
    out
}

/// The partitioned plan on 4 partitions: each global batch of 16 draws from at least 4 shards;
/// which samples share a batch changes between epochs; every sample at most once per epoch;
/// each rank reads only its partitions' shards; and a cursor written on 2 ranks resumes on 1
/// and on 4 with the same global batches, sample for sample.
#[test]
fn partitions_mix_shards_change_batches_per_epoch_and_resume_on_other_world_sizes() {
    let (dir, m) = shapes_shards();
    let shard_of = shard_of_keys(&dir, &m);
    let mut cfg = config(&dir, 16);
    cfg.partitions = Some(4);
    let labels = all_labels(&m);
    let layout = layout_of(&m, &labels, 4);
    let epoch = layout.epoch_positions();
    assert!(layout.leftover * 10 <= 1500, "{layout:?}");
    let global = 16usize;
    let start = |world: usize, rank: usize, cursor: Cursor| {
        TrainStream::start(
            &cfg,
            &m,
            labels.clone(),
            global / world,
            3,
            cursor,
            rank,
            world,
        )
        .unwrap()
    };
    // Steps of the reference run on 2 ranks: (cursor after, position -> key).
    let steps = (2 * epoch as usize).div_ceil(global) + 1;
    let mut ranks: Vec<TrainStream> = (0..2).map(|r| start(2, r, Cursor::default())).collect();
    let mut reference: Vec<(Cursor, BTreeMap<u64, String>)> = Vec::new();
    let mut rank_shards = vec![BTreeSet::new(); 2];
    for _ in 0..steps {
        let mut batch = BTreeMap::new();
        let mut cursor = None;
        for (r, s) in ranks.iter_mut().enumerate() {
            let (b, c) = s.next_batch().unwrap();
            assert!(cursor.is_none_or(|x| x == c));
            cursor = Some(c);
            for (p, k) in b.positions.iter().zip(&b.keys) {
                rank_shards[r].insert(shard_of[k].clone());
                assert!(batch.insert(*p, k.clone()).is_none());
            }
        }
        reference.push((cursor.unwrap(), batch));
    }
    // Each rank read only the shards of its partitions (0, 2 or 1, 3).
    for (r, read) in rank_shards.iter().enumerate() {
        let names: BTreeSet<String> = [r, r + 2]
            .iter()
            .flat_map(|&p| layout.owned[p].iter())
            .map(|&k| m.splits["train"].shards[k].name.clone())
            .collect();
        assert_eq!(
            read, &names,
            "rank {r} reads exactly its partitions' shards"
        );
    }
    // Mixing: every global batch spans at least min(P, shards) = 4 shards.
    for (i, (_, batch)) in reference.iter().enumerate() {
        let shards: BTreeSet<&String> = batch.values().map(|k| &shard_of[k]).collect();
        assert!(shards.len() >= 4, "step {i}: {} shards", shards.len());
    }
    // Every sample at most once per epoch; batch composition differs between epochs 0 and 1.
    let mut by_epoch: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); 2];
    for (_, batch) in &reference {
        for (p, k) in batch {
            if let Some(e) = by_epoch.get_mut((p / epoch) as usize) {
                assert!(
                    e.insert(k.clone(), p % epoch / global as u64).is_none(),
                    "{k} twice in an epoch"
                );
            }
        }
    }
    assert_eq!(by_epoch[0].len() as u64, epoch);
    assert_eq!(by_epoch[1].len() as u64, epoch);
    let (mut pairs, mut again) = (0, 0);
    let keys: Vec<&String> = by_epoch[0].keys().collect();
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            if by_epoch[0][*a] == by_epoch[0][*b] {
                pairs += 1;
                if by_epoch[1]
                    .get(*a)
                    .is_some_and(|x| Some(x) == by_epoch[1].get(*b))
                {
                    again += 1;
                }
            }
        }
    }
    assert!(
        pairs > 0 && again * 10 < pairs,
        "{again} of {pairs} pairs share a batch again"
    );
    // Resume the 2-rank cursor after step 5 and after the first epoch boundary on 1 and 4 ranks.
    let boundary = (epoch as usize).div_ceil(global);
    for k in [5usize, boundary] {
        let saved = reference[k - 1].0;
        for world in [1usize, 4] {
            let mut streams: Vec<TrainStream> =
                (0..world).map(|r| start(world, r, saved)).collect();
            for (step, (cursor, want)) in reference.iter().enumerate().skip(k).take(4) {
                let mut got = BTreeMap::new();
                for s in streams.iter_mut() {
                    let (b, c) = s.next_batch().unwrap();
                    assert_eq!(&c, cursor);
                    got.extend(b.positions.iter().copied().zip(b.keys.iter().cloned()));
                }
                assert_eq!(
                    &got, want,
                    "step {step} resumed from {k} on {world} rank(s)"
                );
            }
        }
    }
}

#[test]
fn eval_covers_every_accepted_sample_once_across_ranks() {
    let (dir, m) = shapes_shards();
    let src = shapes_subset();
    let truth = source_labels(&src, "val");
    let cfg = config(&dir, 56);
    let mut keys = Vec::new();
    for rank in 0..3 {
        let it = eval_batches(&cfg, &m, "val", all_labels(&m), 16, rank, 3).unwrap();
        assert_eq!(it.expected_samples(), 50);
        let batches: Vec<_> = it.map(|b| b.unwrap()).collect();
        let sizes: Vec<usize> = batches.iter().map(|b| b.n).collect();
        assert_eq!(sizes, [16, 16, 16, 2], "last batch partial");
        for b in batches {
            assert_eq!(b.images.len(), b.n * 3 * 56 * 56);
            for (k, l) in b.keys.iter().zip(&b.labels) {
                assert_eq!(truth[k], SHAPE_CLASSES[*l as usize]);
            }
            keys.extend(b.keys);
        }
    }
    let unique: BTreeSet<_> = keys.iter().collect();
    assert_eq!((keys.len(), unique.len()), (150, 150));
    // Deterministic: the same pass twice gives identical pixels.
    let a: Vec<_> = eval_batches(&cfg, &m, "val", all_labels(&m), 64, 0, 1)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    let b: Vec<_> = eval_batches(&cfg, &m, "val", all_labels(&m), 64, 0, 1)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(a, b);
    assert!(eval_batches(&cfg, &m, "test", all_labels(&m), 8, 0, 1).is_err());
}

#[test]
fn shapes_dataset_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ShapesOptions {
        image_size: 32,
        train_per_class: 12,
        val_per_class: 4,
        seed: 5,
    };
    let t = Instant::now();
    let ds = generate_shapes(&dir.path().join("src"), &opts).unwrap();
    eprintln!("shapes: 25 x 16 images rendered in {:?}", t.elapsed());
    assert_eq!(ds.classes.len(), 25);
    assert_eq!(
        ds.unseen,
        [
            "blue_triangle",
            "green_square",
            "purple_cross",
            "red_circle",
            "yellow_star"
        ]
    );
    assert_eq!(ds.seen.len(), 20);
    for word in [
        "red", "green", "blue", "yellow", "purple", "circle", "square", "triangle", "star", "cross",
    ] {
        let n = ds
            .seen
            .iter()
            .filter(|c| c.split('_').any(|w| w == word))
            .count();
        assert_eq!(n, 4, "{word} appears in 4 seen classes");
    }
    let split = std::fs::read_to_string(dir.path().join("src/split.tsv")).unwrap();
    assert!(
        split.starts_with("# wnid\tsplit\tnames\nblue_circle\tseen\tblue circle\n"),
        "{split}"
    );
    assert!(split.contains("red_circle\tunseen\tred circle\n"));
    let names = std::fs::read_to_string(dir.path().join("src/names.tsv")).unwrap();
    assert_eq!(names.lines().count(), 25);
    assert!(names.contains("purple_star\tpurple star\n"));
    let img = dir.path().join("src/train/red_star/red_star_11.JPEG");
    let rgb = decode_rgb(&std::fs::read(&img).unwrap(), &DecodeOptions::new(1 << 20)).unwrap();
    assert_eq!(rgb.dimensions(), (32, 32));

    // Deterministic: same seed, same bytes.
    let again = tempfile::tempdir().unwrap();
    generate_shapes(again.path(), &opts).unwrap();
    assert_eq!(
        std::fs::read(&img).unwrap(),
        std::fs::read(again.path().join("train/red_star/red_star_11.JPEG")).unwrap()
    );

    // Through shards and the train stream, with unseen classes filtered out.
    let shards = dir.path().join("shards");
    let m = build_shards(
        &dir.path().join("src"),
        shards.to_str().unwrap(),
        &BuildOptions {
            splits: vec!["train".into(), "val".into()],
            classes: None,
            shard_size_bytes: 64 * 1024,
            seed: 0,
            progress: true, // exercises the progress bar template
        },
    )
    .unwrap();
    assert_eq!(m.classes, ds.classes);
    let map: Vec<Option<i64>> = {
        let mut next = 0;
        m.classes
            .iter()
            .map(|c| {
                ds.seen.contains(c).then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect()
    };
    let cfg = config(&shards, 32);
    let mut stream = TrainStream::start(&cfg, &m, map, 16, 0, Cursor::default(), 0, 1).unwrap();
    for _ in 0..20 {
        let (b, _) = stream.next_batch().unwrap();
        assert!(b.labels.iter().all(|l| (0..20).contains(l)));
        assert!(b
            .keys
            .iter()
            .all(|k| !ds.unseen.iter().any(|u| k.starts_with(u.as_str()))));
    }
}

// ---------------------------------------------------------------------------------------------
// Field cases

/// Bytes of `../shared/field-cases/<name>`.
fn field(name: &str) -> Vec<u8> {
    std::fs::read(shared_dir().join("field-cases").join(name)).unwrap()
}

/// Serves `tar` as the only shard of split "train" (and "val") with `n_classes` classes and a
/// manifest claiming `samples` samples, sha256 of the bytes as given (so the content policy,
/// not the checksum, is what runs). Returns (dir, manifest).
fn one_shard(tar: &[u8], samples: u64, n_classes: usize) -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    store
        .put("train-000000.tar", Bytes::copy_from_slice(tar))
        .unwrap();
    let mut class_counts = vec![0; n_classes];
    class_counts[0] = samples;
    let split = SplitInfo {
        samples,
        shards: vec![ShardInfo {
            name: "train-000000.tar".into(),
            samples,
            bytes: tar.len() as u64,
            sha256: hex::encode(Sha256::digest(tar)),
            class_counts: class_counts.clone(),
        }],
        class_counts,
    };
    let m = Manifest {
        format: FORMAT.into(),
        classes: (0..n_classes).map(|i| format!("c{i:04}")).collect(),
        splits: BTreeMap::from([("train".into(), split.clone()), ("val".into(), split)]),
    };
    store
        .put(
            "manifest.json",
            Bytes::from(serde_json::to_vec(&m).unwrap()),
        )
        .unwrap();
    (dir, m)
}

/// A shard directory with two one-class shards of `samples` samples each (split "train").
fn two_shards(first: &[u8], second: &[u8], samples: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let mut shards = Vec::new();
    for (i, tar) in [first, second].into_iter().enumerate() {
        let name = format!("train-{i:06}.tar");
        store.put(&name, Bytes::copy_from_slice(tar)).unwrap();
        shards.push(ShardInfo {
            name,
            samples,
            bytes: tar.len() as u64,
            sha256: hex::encode(Sha256::digest(tar)),
            class_counts: vec![samples],
        });
    }
    let split = SplitInfo {
        samples: 2 * samples,
        shards,
        class_counts: vec![2 * samples],
    };
    let m = Manifest {
        format: FORMAT.into(),
        classes: vec!["c0000".into()],
        splits: BTreeMap::from([("train".into(), split)]),
    };
    store
        .put(
            "manifest.json",
            Bytes::from(serde_json::to_vec(&m).unwrap()),
        )
        .unwrap();
    dir
}

/// A single-rank training stream over a 3-class fixture manifest, every class mapped, seed 0.
fn fixture_stream(cfg: &Config, m: &Manifest, batch: usize) -> TrainStream {
    TrainStream::start(
        cfg,
        m,
        vec![Some(0), Some(1), Some(2)],
        batch,
        0,
        Cursor::default(),
        0,
        1,
    )
    .unwrap()
}

/// One eval pass over the fixture shard: (keys, labels, stats).
fn eval_fixture(
    tar: &[u8],
    samples: u64,
    n_classes: usize,
    size: u32,
) -> (Vec<String>, Vec<i64>, devise::data::DataStats) {
    let (dir, m) = one_shard(tar, samples, n_classes);
    let cfg = config(dir.path(), size);
    let mut it = eval_batches(
        &cfg,
        &m,
        "val",
        (0..n_classes as i64).map(Some).collect(),
        8,
        0,
        1,
    )
    .unwrap();
    let (mut keys, mut labels) = (Vec::new(), Vec::new());
    for b in &mut it {
        let b = b.unwrap();
        assert_eq!(
            b.images.len(),
            b.n * 3 * (size * size) as usize,
            "every image 3 x s x s"
        );
        keys.extend(b.keys);
        labels.extend(b.labels);
    }
    (keys, labels, it.stats())
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b01_truncated_shard_yields_complete_samples_then_a_shard_error() {
    let (full, cut) = (
        field("B01_full_shard.tar"),
        field("B01_truncated_shard.tar"),
    );
    let (keys, labels, stats) = eval_fixture(&full, 3, 3, 16);
    assert_eq!(
        (keys, labels),
        (
            vec!["000000".into(), "000001".into(), "000002".into()],
            vec![0, 1, 2]
        )
    );
    assert_eq!(stats.shard_errors, 0);

    let items: Vec<_> = SampleReader::new(&cut[..], "B01_truncated_shard.tar")
        .map(|i| i.map(|s| s.key))
        .collect();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].as_ref().unwrap(), "000000");
    assert_eq!(items[1].as_ref().unwrap(), "000001");
    let err = items[2].as_ref().unwrap_err();
    assert!(
        matches!(err, ShardError::Truncated { offset: 6059, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("6059"));

    let (keys, labels, stats) = eval_fixture(&cut, 3, 3, 16);
    assert_eq!(
        (keys, labels),
        (vec!["000000".into(), "000001".into()], vec![0, 1])
    );
    assert_eq!(stats.shard_errors, 1);

    // Training continues past it: two good samples per epoch, the shard error counted per visit.
    let (dir, m) = one_shard(&cut, 3, 3);
    let cfg = config(dir.path(), 16);
    let mut s = fixture_stream(&cfg, &m, 3);
    let (b, c) = s.next_batch().unwrap();
    let set: BTreeSet<_> = b.keys.iter().cloned().collect();
    assert_eq!(set.len(), 2, "{:?}", b.keys); // 000000 + 000001 (+ one of them again from epoch 1)
    assert!(b.keys.iter().all(|k| k == "000000" || k == "000001"));
    assert_eq!(
        c.position, 3,
        "one epoch: the 3 samples the manifest promises"
    );
    assert!(s.stats().lost_to_shard_errors >= 1);
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b02_missing_cls_is_skipped_never_labelled_zero() {
    let (missing, unclosed) = (
        field("B02_missing_cls.tar"),
        field("B02_unclosed_shard.tar"),
    );
    let (keys, labels, stats) = eval_fixture(&missing, 3, 3, 16);
    assert_eq!(keys, ["000000", "000002"]);
    assert_eq!(labels, [0, 2]);
    assert_eq!(stats.incomplete_samples, 1);
    assert_eq!(stats.shard_errors, 0);
    // Strict mode: the training stream fails on that sample, naming it.
    let (dir, m) = one_shard(&missing, 3, 3);
    let mut cfg = config(dir.path(), 16);
    cfg.strict = true;
    let mut s = fixture_stream(&cfg, &m, 2);
    // The slot order is shuffled: the bad sample comes within the first two batches.
    let err = (0..2)
        .find_map(|_| s.next_batch().err())
        .map(|e| format!("{e:#}"))
        .expect("strict mode fails on the incomplete sample");
    assert!(
        err.contains("sample 000001")
            && err.contains("missing component cls")
            && err.contains("data.strict"),
        "{err}"
    );

    let mut r = SampleReader::new(&unclosed[..], "B02_unclosed_shard.tar");
    let keys: Vec<String> = (&mut r).map(|s| s.unwrap().key).collect();
    assert_eq!(keys, ["000000", "000001"]);
    assert!(r.missing_end_of_archive());
    let (keys, _, stats) = eval_fixture(&unclosed, 2, 3, 16);
    assert_eq!(keys, ["000000"]);
    assert_eq!(stats.incomplete_samples, 1, "000001 reported incomplete");
    assert_eq!(
        stats.shard_errors, 0,
        "EOF on a header boundary is tolerated"
    );
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b04_noncontiguous_and_duplicate_members_are_shard_errors() {
    let (noncontig, dup) = (
        field("B04_noncontiguous.tar"),
        field("B04_duplicate_member.tar"),
    );
    let items: Vec<_> = SampleReader::new(&noncontig[..], "B04_noncontiguous.tar").collect();
    let oks = items.iter().filter(|i| i.is_ok()).count();
    assert!(oks <= 1, "no regrouped half-samples: {items:?}");
    let err = items.last().unwrap().as_ref().unwrap_err();
    assert!(
        matches!(err, ShardError::NonContiguous { key, .. } if key == "000000"),
        "{err:?}"
    );
    let (keys, _, stats) = eval_fixture(&noncontig, 2, 3, 16);
    assert!(keys.is_empty());
    assert_eq!(stats.shard_errors, 1);

    let items: Vec<_> = SampleReader::new(&dup[..], "B04_duplicate_member.tar").collect();
    assert_eq!(items.len(), 1);
    let err = items[0].as_ref().unwrap_err();
    assert!(
        err.to_string()
            .contains("duplicate field jpg in sample 000000"),
        "{err}"
    );
    let (keys, _, stats) = eval_fixture(&dup, 2, 3, 16);
    assert!(keys.is_empty());
    assert_eq!(stats.shard_errors, 1);
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b05_cmyk_jpeg_decodes_to_rgb_like_pil() {
    let (jpg, tar) = (field("B05_cmyk.jpg"), field("B05_cmyk_shard.tar"));
    let img = decode_rgb(&jpg, &DecodeOptions::new(1 << 20)).unwrap();
    assert_eq!(img.dimensions(), (32, 32));
    let mut mean = [0f64; 3];
    for p in img.pixels() {
        for c in 0..3 {
            mean[c] += p[c] as f64 / 1024.0;
        }
    }
    let pil = [200.0, 92.0, 92.1];
    eprintln!("B05 mean RGB {mean:.1?} (PIL {pil:?})");
    for c in 0..3 {
        assert!(
            (mean[c] - pil[c]).abs() < 10.0,
            "mean RGB {mean:?} vs PIL {pil:?}"
        );
    }
    let (keys, labels, stats) = eval_fixture(&tar, 1, 3, 32);
    assert_eq!(
        (keys, labels),
        (vec!["n01440764_cmyk".to_string()], vec![0])
    );
    assert_eq!(stats.decode_errors, 0);
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b06_png_named_jpg_is_decoded_as_png() {
    let (png, tar) = (field("B06_png_named.jpg"), field("B06_png_named_shard.tar"));
    assert_eq!(
        decode_rgb(&png, &DecodeOptions::new(1 << 20))
            .unwrap()
            .dimensions(),
        (20, 20)
    );
    let (keys, labels, stats) = eval_fixture(&tar, 1, 1000, 16);
    assert_eq!(
        (keys, labels),
        (vec!["n02105855_2933".to_string()], vec![228])
    );
    assert_eq!(stats.decode_errors, 0);
    // The same shard with a manifest of 100 classes: cls 228 is not a class -> skipped, reported.
    let (keys, _, stats) = eval_fixture(&tar, 1, 100, 16);
    assert!(keys.is_empty());
    assert_eq!(stats.invalid_labels, 1);
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b07_truncated_jpegs_are_skipped_not_fatal() {
    let (cut, headers, good, tar) = (
        field("B07_truncated_60pct.jpg"),
        field("B07_headers_only.jpg"),
        field("B07_good.jpg"),
        field("B07_truncated_shard.tar"),
    );
    assert!(decode_rgb(&good, &DecodeOptions::new(1 << 20)).is_ok());
    let e = decode_rgb(&cut, &DecodeOptions::new(1 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    assert!(decode_rgb(&headers, &DecodeOptions::new(1 << 20)).is_err());
    let (keys, labels, stats) = eval_fixture(&tar, 2, 3, 16);
    assert_eq!((keys, labels), (vec!["000001".to_string()], vec![1]));
    assert_eq!(stats.decode_errors, 1);

    // In training the bad sample is topped up: full batches, only 000001.
    let (dir, m) = one_shard(&tar, 2, 3);
    let cfg = config(dir.path(), 16);
    let mut s = fixture_stream(&cfg, &m, 3);
    let (b, _) = s.next_batch().unwrap();
    assert_eq!(b.keys, ["000001", "000001", "000001"]);
    assert!(s.stats().decode_errors >= 1);
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b08_mixed_channel_layouts_stack_into_one_batch() {
    let tar = field("B08_mixed_channels_shard.tar");
    for name in [
        "B08_gray.jpg",
        "B08_gray16.png",
        "B08_la.png",
        "B08_palette_trns.png",
        "B08_rgba.png",
    ] {
        let img = decode_rgb(&field(name), &DecodeOptions::new(1 << 20)).unwrap();
        assert_eq!(img.dimensions(), (24, 24), "{name}");
    }
    // 16-bit grey is scaled, not clipped or wrapped: its mean stays in range and non-trivial.
    let g16 = decode_rgb(&field("B08_gray16.png"), &DecodeOptions::new(1 << 20)).unwrap();
    let max = g16.pixels().map(|p| p[0]).max().unwrap();
    let min = g16.pixels().map(|p| p[0]).min().unwrap();
    assert!(max > min, "16-bit grey kept its contrast ({min}..{max})");
    let (keys, labels, stats) = eval_fixture(&tar, 5, 5, 224);
    assert_eq!(keys, ["000000", "000001", "000002", "000003", "000004"]);
    assert_eq!(labels, [0, 1, 2, 3, 4]);
    assert_eq!(stats.decode_errors, 0);
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b10_decompression_bombs_are_rejected_from_the_header() {
    let (png, jpg) = (
        field("B10_png_30000x30000.png"),
        field("B10_jpeg_sof_65000.jpg"),
    );
    let t = Instant::now();
    let e = decode_rgb(&png, &DecodeOptions::new(89_478_485))
        .unwrap_err()
        .to_string();
    assert!(e.contains("image 30000x30000 exceeds max_pixels"), "{e}");
    let e = decode_rgb(&jpg, &DecodeOptions::new(89_478_485))
        .unwrap_err()
        .to_string();
    assert!(e.contains("image 65000x65000 exceeds max_pixels"), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "rejected quickly: {:?}",
        t.elapsed()
    );
    // Inside a shard: skipped and counted, the stream goes on.
    let mut b = tar::Builder::new(Vec::new());
    for (key, data, cls) in [("bomb", &png, "0"), ("ok", &field("B07_good.jpg"), "1")] {
        devise::data::webdataset::append_member(&mut b, &format!("{key}.png"), data).unwrap();
        devise::data::webdataset::append_member(&mut b, &format!("{key}.cls"), cls.as_bytes())
            .unwrap();
    }
    let bytes = b.into_inner().unwrap();
    let (keys, _, stats) = eval_fixture(&bytes, 2, 2, 16);
    assert_eq!(keys, ["ok"]);
    assert_eq!(stats.decode_errors, 1);
}

#[test]
fn sha_mismatch_is_a_shard_error_strict_mode_fails_and_io_errors_are_fatal() {
    let full = shapes_tar(3);
    // Shards are streamed: a checksum mismatch is known at the end of the shard, after its
    // samples were used; it is counted (and warned with the shard URL).
    let (dir, mut m) = one_shard(&full, 3, 3);
    let mut cfg = config(dir.path(), 16);
    m.splits.get_mut("val").unwrap().shards[0].sha256 = "00".repeat(32);
    let labels = vec![Some(0), Some(1), Some(2)];
    let mut it = eval_batches(&cfg, &m, "val", labels.clone(), 8, 0, 1).unwrap();
    assert_eq!(it.next().unwrap().unwrap().n, 3);
    assert!(it.next().is_none());
    assert_eq!(it.stats().shard_errors, 1);
    // Strict mode: the same shard fails the pass, naming the shard and the cause.
    cfg.strict = true;
    let mut it = eval_batches(&cfg, &m, "val", labels, 8, 0, 1).unwrap();
    let err = format!("{:#}", it.next().unwrap().unwrap_err());
    assert!(
        err.contains("train-000000.tar")
            && err.contains("does not match")
            && err.contains("data.strict"),
        "{err}"
    );
    // Every sample undecodable: the train stream errors instead of spinning forever.
    let mut b = tar::Builder::new(Vec::new());
    for key in ["000000", "000001", "000002"] {
        devise::data::webdataset::append_member(&mut b, &format!("{key}.jpg"), b"not an image")
            .unwrap();
        devise::data::webdataset::append_member(&mut b, &format!("{key}.cls"), b"0").unwrap();
    }
    let (dir, m) = one_shard(&b.into_inner().unwrap(), 3, 3);
    let cfg = config(dir.path(), 16);
    let mut s = fixture_stream(&cfg, &m, 2);
    let err = format!("{:#}", s.next_batch().unwrap_err());
    assert!(err.contains("no usable sample"), "{err}");
    assert!(s.next_batch().is_err(), "stays failed");
    // A missing shard object is an I/O error naming the URL, surfaced by next_batch.
    let (dir, m) = one_shard(&full, 3, 3);
    std::fs::remove_file(dir.path().join("train-000000.tar")).unwrap();
    let cfg = config(dir.path(), 16);
    let mut s = fixture_stream(&cfg, &m, 2);
    let err = format!("{:#}", s.next_batch().unwrap_err());
    assert!(err.contains("train-000000.tar"), "{err}");
    drop(s); // and dropping a failed stream does not hang
}

#[test]
fn dropping_a_stream_mid_flight_stops_its_thread() {
    let (dir, m) = shapes_shards();
    let cfg = config(&dir, 16);
    let t = Instant::now();
    for _ in 0..5 {
        let mut s =
            TrainStream::start(&cfg, &m, all_labels(&m), 64, 0, Cursor::default(), 0, 1).unwrap();
        s.next_batch().unwrap();
        drop(s);
    }
    assert!(t.elapsed() < Duration::from_secs(30));
}

/// Rendering speed of the demo dataset at its intended size (25 classes x 300 images, 32 px):
/// `cargo test --test it data::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run it with --ignored --nocapture"]
fn throughput_shapes_render() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ShapesOptions {
        image_size: 32,
        train_per_class: 260,
        val_per_class: 40,
        seed: 0,
    };
    let t = Instant::now();
    generate_shapes(dir.path(), &opts).unwrap();
    eprintln!(
        "generate_shapes: 7500 images of 32 px in {:.2}s",
        t.elapsed().as_secs_f64()
    );
}

/// Throughput of the train stream on Tiny ImageNet (64px JPEGs), 2 decode threads:
/// `cargo test --test it data::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run it with --ignored --nocapture"]
fn throughput_tiny_imagenet() {
    let (dir, m) = tiny_shards();
    for (size, augment) in [(64u32, true), (56, true), (64, false)] {
        let mut cfg = config(&dir, size);
        cfg.augment = augment;
        let mut s =
            TrainStream::start(&cfg, &m, all_labels(&m), 128, 0, Cursor::default(), 0, 1).unwrap();
        s.next_batch().unwrap(); // warm-up: first shard, thread start
        let t = Instant::now();
        let n = 40;
        for _ in 0..n {
            s.next_batch().unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "TrainStream image_size {size} augment {augment}: {:.0} images/s ({} images in {secs:.2}s, 2 decode threads)",
            (n * 128) as f64 / secs,
            n * 128
        );
    }
}

#[test]
fn decode_failures_with_two_ranks_keep_cursors_aligned_and_resume_exact() {
    // A shapes JPEG, and the same one cut at 60% of its bytes.
    let good = std::fs::read(shapes_subset().join("train/blue_circle/blue_circle_0.JPEG")).unwrap();
    let bad = good[..good.len() * 6 / 10].to_vec();
    assert!(decode_rgb(&good, &DecodeOptions::new(1 << 20)).is_ok());
    assert!(decode_rgb(&bad, &DecodeOptions::new(1 << 20)).is_err());
    // Two shards of 7 samples, one per rank's partition; s3 undecodable.
    let shard = |prefix: &str, bad_at: Option<usize>| {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..7 {
            let data = if Some(i) == bad_at { &bad } else { &good };
            let key = format!("{prefix}{i}");
            devise::data::webdataset::append_member(&mut b, &format!("{key}.jpg"), data).unwrap();
            devise::data::webdataset::append_member(&mut b, &format!("{key}.cls"), b"0").unwrap();
        }
        b.into_inner().unwrap()
    };
    let dir = two_shards(&shard("s", Some(3)), &shard("t", None), 7);
    let m = read_manifest(dir.path().to_str().unwrap()).unwrap();
    let cfg = config(dir.path(), 16);
    let start =
        |rank, cursor| TrainStream::start(&cfg, &m, vec![Some(0)], 2, 9, cursor, rank, 2).unwrap();
    let (mut r0, mut r1) = (start(0, Cursor::default()), start(1, Cursor::default()));
    let (a, b) = (take(&mut r0, 12), take(&mut r1, 12));
    for ((ba, ca), (bb, cb)) in a.iter().zip(&b) {
        assert_eq!(ca, cb, "ranks agree on every cursor");
        assert_eq!((ba.n, bb.n), (2, 2), "batches stay full");
        assert!(!ba.keys.contains(&"s3".to_string()) && !bb.keys.contains(&"s3".to_string()));
    }
    let failures = r0.stats().decode_errors + r1.stats().decode_errors;
    assert!(failures >= 3, "s3 came up in several epochs: {failures}");
    // Resume each rank from a shared cursor: identical continuation.
    for k in [2usize, 5] {
        for (rank, reference) in [(0, &a), (1, &b)] {
            let mut s = start(rank, reference[k].1);
            let got = take(&mut s, 11 - k);
            for (g, r) in got.iter().zip(&reference[k + 1..]) {
                assert_eq!(g.0.keys, r.0.keys, "rank {rank} resumed from batch {k}");
                assert!(g.0.images == r.0.images);
            }
        }
    }
}

#[test]
fn images_stay_with_their_keys_when_decodes_fail_inside_a_batch() {
    // Two shards of 9 distinct JPEGs each, three of them cut short (at the start, in the
    // middle and at the end of a batch of 6): every image of every batch equals the eval
    // transform of its own key's JPEG, so no pixels are lost or shifted when failed ones drop.
    let src = shapes_subset().join("train/blue_circle");
    let mut jpegs = std::collections::HashMap::new();
    let shard = |prefix: &str,
                 bad: &[usize],
                 jpegs: &mut std::collections::HashMap<String, Vec<u8>>| {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..9 {
            let n = if prefix == "s" { i } else { 9 + i };
            let mut data = std::fs::read(src.join(format!("blue_circle_{n}.JPEG"))).unwrap();
            if bad.contains(&i) {
                data.truncate(data.len() * 6 / 10);
            }
            let key = format!("{prefix}{i}");
            devise::data::webdataset::append_member(&mut b, &format!("{key}.jpg"), &data).unwrap();
            devise::data::webdataset::append_member(&mut b, &format!("{key}.cls"), b"0").unwrap();
            jpegs.insert(key, data);
        }
        b.into_inner().unwrap()
    };
    let (first, second) = (
        shard("s", &[0, 4], &mut jpegs),
        shard("t", &[8], &mut jpegs),
    );
    let dir = two_shards(&first, &second, 9);
    let m = read_manifest(dir.path().to_str().unwrap()).unwrap();
    let mut cfg = config(dir.path(), 16);
    cfg.augment = false;
    let mut stream =
        TrainStream::start(&cfg, &m, vec![Some(0)], 6, 3, Cursor::default(), 0, 1).unwrap();
    let img = 3 * 16 * 16;
    let mut checked = 0;
    for (batch, _) in take(&mut stream, 9) {
        assert_eq!((batch.n, batch.images.len()), (6, 6 * img));
        for (j, key) in batch.keys.iter().enumerate() {
            let mut want = vec![0f32; img];
            devise::data::image::decode_eval(&jpegs[key], &cfg, &mut want).unwrap();
            assert!(
                batch.images[j * img..(j + 1) * img] == want[..],
                "slot {j} holds {key}'s image"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 54);
    assert!(
        stream.stats().decode_errors >= 3,
        "the cut JPEGs came up: {:?}",
        stream.stats()
    );
}

/// Field case B27: 145 samples in 10 uneven shards (9 x 15 + 1 x 10), 3 ranks, 16 images per
/// rank. Naive per-rank shard assignment gives the ranks 4/3/3 steps and hangs the collective
/// (SCENARIO.json). Here 3 partitions own 55/45/45 samples, each contributes 45 to every epoch
/// (an epoch is 135 positions; 10 samples of the largest partition are left out of each epoch,
/// different ones each epoch), and rank `r` takes the positions `i % 3 == r` of each global
/// batch of 48, so: every rank yields a batch at every step (same count by construction,
/// without reading another rank's shards), the ranks' batches are disjoint and together are
/// exactly the 1-rank stream's batch of 48 (the order does not depend on the world size), and
/// every position of epoch 0 holds a different sample.
#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn b27_uneven_shards_every_rank_same_steps_same_global_batches_leftover_bounded() {
    let shared = shared_dir();
    let dir = shared.join("field-cases/B27_uneven_shards");
    let scenario: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("SCENARIO.json")).unwrap()).unwrap();
    // A manifest for the fixture's shards as they are (read in place; class = the .cls value).
    let mut shards = Vec::new();
    let mut counts = vec![0u64; 16];
    for i in 0..10 {
        let name = format!("shard-{i:06}.tar");
        let bytes = std::fs::read(dir.join(&name)).unwrap();
        let mut samples = 0;
        let mut shard_counts = vec![0u64; 16];
        let mut archive = tar::Archive::new(&bytes[..]);
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry
                .path()
                .unwrap()
                .extension()
                .is_some_and(|e| e == "cls")
            {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
                let class = text.trim().parse::<usize>().unwrap();
                counts[class] += 1;
                shard_counts[class] += 1;
                samples += 1;
            }
        }
        shards.push(ShardInfo {
            name,
            samples,
            bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
            class_counts: shard_counts,
        });
    }
    let sizes: Vec<u64> = shards.iter().map(|s| s.samples).collect();
    let expected_sizes: Vec<u64> = serde_json::from_value(scenario["shard_sizes"].clone()).unwrap();
    assert_eq!(sizes, expected_sizes);
    let n_classes = counts.iter().rposition(|&c| c > 0).unwrap() + 1;
    counts.truncate(n_classes);
    for shard in &mut shards {
        shard.class_counts.truncate(n_classes);
    }
    let split = SplitInfo {
        samples: sizes.iter().sum(),
        shards,
        class_counts: counts,
    };
    assert_eq!(split.samples, 145);
    let m = Manifest {
        format: FORMAT.into(),
        classes: (0..n_classes).map(|i| format!("c{i:04}")).collect(),
        splits: BTreeMap::from([("train".into(), split)]),
    };
    let mut cfg = config(&dir, 16);
    cfg.partitions = Some(3); // the default on 3 ranks; the 1-rank stream must use the same
    let labels: Vec<Option<i64>> = (0..n_classes as i64).map(Some).collect();
    let layout = layout_of(&m, &labels, 3);
    assert_eq!(
        (
            layout.epoch_units,
            layout.epoch_positions(),
            layout.leftover
        ),
        (45, 135, 10)
    );
    let (world, per_rank) = (3usize, 16usize);
    let start = |batch, rank, world| {
        TrainStream::start(
            &cfg,
            &m,
            labels.clone(),
            batch,
            5,
            Cursor::default(),
            rank,
            world,
        )
        .unwrap()
    };
    let mut ranks: Vec<TrainStream> = (0..world).map(|r| start(per_rank, r, world)).collect();
    let mut single = start(per_rank * world, 0, 1);
    let mut epoch0 = BTreeMap::<u64, String>::new();
    for step in 0..4 {
        let (global, global_cursor) = single.next_batch().unwrap();
        let mut union = BTreeMap::new();
        for (r, stream) in ranks.iter_mut().enumerate() {
            let (b, cursor) = stream.next_batch().unwrap();
            assert_eq!(b.n, per_rank, "step {step}: every rank gets a full batch");
            assert_eq!(
                cursor, global_cursor,
                "step {step}: the ranks agree on the cursor"
            );
            for (p, k) in b.positions.iter().zip(&b.keys) {
                assert_eq!(*p as usize % world, r, "rank {r} takes its own positions");
                assert!(
                    union.insert(*p, k.clone()).is_none(),
                    "step {step}: ranks overlap"
                );
            }
        }
        let expected: BTreeMap<u64, String> = global
            .positions
            .iter()
            .copied()
            .zip(global.keys.iter().cloned())
            .collect();
        assert_eq!(
            union, expected,
            "step {step}: 3 x 16 = the 1-rank batch of 48, sample for sample"
        );
        epoch0.extend(expected.into_iter().filter(|(p, _)| *p < 135));
    }
    assert_eq!(epoch0.len(), 135, "every position of epoch 0 is used");
    let distinct: BTreeSet<&String> = epoch0.values().collect();
    assert_eq!(distinct.len(), 135, "no sample twice in epoch 0");
}
