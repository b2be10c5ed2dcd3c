//! Scope: building, verifying and indexing shard directories (`devise::data::{shards, ilsvrc,
//! verify, index}` and `devise data build-shards | verify | index`) on real images, and
//! interoperability with the Python `webdataset` library.
//!
//! - The ILSVRC-2012 validation layout: the 100 real ImageNet images of
//!   `../shared/data/imagenet-sample-100/` as a flat folder of symbolic links
//!   `ILSVRC2012_val_000000NN.JPEG` with a generated `LOC_val_solution.csv` whose label is each
//!   file's real wnid (its name prefix); alone and together with an ImageFolder train split.
//! - Parallel builds: byte-identical output (every shard and the manifest) with 1 and 2 threads.
//! - `verify` on good shards, and on shards damaged on disk (a JPEG payload byte flipped, a
//!   shard truncated, a shard deleted, a `.cls` overwritten): every damage is named with its
//!   shard and key, and the command exits 1.
//! - Python `webdataset` 1.0.2 (installed into `.deps/venv` by `scripts/setup.sh`; its absence is
//!   a failure, not a skip): it reads our shards with the keys, labels and image bytes we wrote;
//!   shards it writes (`ShardWriter`, `.jpg`/`.cls`/`.json`, no manifest) get a manifest from
//!   `devise data index`, pass `devise data verify`, and feed the reader's eval pass and
//!   training stream with the right labels.
//!
//! Tests skip (printing why) only when `../shared` is absent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use devise::data::ilsvrc::IlsvrcVal;
use devise::data::shards::{build_shards_from, BuildOptions, Sources};
use devise::data::verify::{verify_shards, VerifyOptions};
use devise::data::webdataset::SampleReader;
use devise::data::{
    eval_batches, read_manifest, Config, Cursor, Manifest, TrainStream, DEFAULT_MAX_PIXELS,
};
use sha2::{Digest, Sha256};

use crate::common::shared_dir;
use crate::common::tiny::tiny_classes;

fn devise() -> Command {
    Command::new(env!("CARGO_BIN_EXE_devise"))
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// `(wnid, path)` of the 100 real ImageNet images, sorted by file name.
fn sample_100() -> Vec<(String, PathBuf)> {
    let dir = shared_dir().join("data/imagenet-sample-100");
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            (name.split('_').next().unwrap().to_string(), path)
        })
        .collect();
    out.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(out.len(), 100);
    out
}

/// The standard ILSVRC-2012 class order (first column of `ilsvrc2012_wnids_names.tsv`).
fn ilsvrc_classes() -> (PathBuf, Vec<String>) {
    let path = shared_dir().join("data/imagenet-meta/ilsvrc2012_wnids_names.tsv");
    let wnids = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    (path, wnids)
}

/// The ILSVRC validation layout of `images` in `dir`: `val/ILSVRC2012_val_000000NN.JPEG`
/// (symbolic links, NN from 1 in the order given) and `LOC_val_solution.csv` (rows in reverse
/// order, every other row with two boxes). Returns the source and `ImageId -> (wnid, original)`.
fn flat_val(
    dir: &Path,
    images: &[(String, PathBuf)],
) -> (IlsvrcVal, BTreeMap<String, (String, PathBuf)>) {
    let images_dir = dir.join("val");
    std::fs::create_dir_all(&images_dir).unwrap();
    let mut truth = BTreeMap::new();
    let mut rows = Vec::new();
    for (i, (wnid, path)) in images.iter().enumerate() {
        let id = format!("ILSVRC2012_val_{:08}", i + 1);
        std::os::unix::fs::symlink(path, images_dir.join(format!("{id}.JPEG"))).unwrap();
        let boxes = if i % 2 == 0 {
            format!("{wnid} 10 20 110 220 ")
        } else {
            format!("{wnid} 1 2 30 40 {wnid} 5 6 70 80")
        };
        rows.push(format!("{id},{boxes}\n"));
        truth.insert(id, (wnid.clone(), path.clone()));
    }
    rows.reverse();
    let solution_csv = dir.join("LOC_val_solution.csv");
    std::fs::write(
        &solution_csv,
        format!("ImageId,PredictionString\n{}", rows.concat()),
    )
    .unwrap();
    let val = IlsvrcVal {
        images_dir,
        solution_csv,
        known_wnids: None,
    };
    (val, truth)
}

fn options(shard_size_bytes: u64) -> BuildOptions {
    BuildOptions {
        splits: Vec::new(),
        classes: None,
        shard_size_bytes,
        seed: 11,
        progress: false,
    }
}

/// `(key, cls, image sha256)` of every sample of a split, in manifest shard order.
fn read_split(dir: &Path, m: &Manifest, split: &str) -> Vec<(String, usize, String)> {
    let mut out = Vec::new();
    for shard in &m.splits[split].shards {
        let bytes = std::fs::read(dir.join(&shard.name)).unwrap();
        for s in SampleReader::new(&bytes[..], &shard.name) {
            let s = s.unwrap();
            let cls: usize = std::str::from_utf8(&s.fields["cls"])
                .unwrap()
                .parse()
                .unwrap();
            out.push((s.key, cls, hex::encode(Sha256::digest(&s.fields["jpg"]))));
        }
    }
    out
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn ilsvrc_val_folder_becomes_split_val_with_real_labels() {
    let images = sample_100();
    // One of these Tiny ImageNet classes (n01944390, snail) is also among the 100 images.
    let tree = tiny_classes(&["n01443537", "n01944390"]);
    let tmp = tempfile::tempdir().unwrap();
    let (val, truth) = flat_val(tmp.path(), &images);
    let dst = tmp.path().join("shards");
    let sources = Sources {
        image_folder: Some(tree.clone()),
        ilsvrc_val: Some(val.clone()),
    };
    let mut opts = options(2_000_000);
    opts.splits = vec!["train".into()];
    let m = build_shards_from(&sources, dst.to_str().unwrap(), &opts).unwrap();

    // Classes: the sorted union of both sources (100 + goldfish; snail is in both).
    let mut union: Vec<String> = images.iter().map(|(w, _)| w.clone()).collect();
    union.push("n01443537".into());
    union.sort();
    union.dedup();
    assert_eq!(m.classes, union);
    assert_eq!(m.classes.len(), 101);
    assert_eq!(m.splits["train"].samples, 1000);
    let val_info = &m.splits["val"];
    assert_eq!(val_info.samples, 100);
    assert!(
        val_info.shards.len() > 3,
        "{} shards",
        val_info.shards.len()
    );
    let goldfish = m.classes.iter().position(|c| c == "n01443537").unwrap();
    let snail = m.classes.iter().position(|c| c == "n01944390").unwrap();
    assert_eq!(val_info.class_counts[goldfish], 0);
    assert_eq!(val_info.class_counts[snail], 1);
    assert_eq!(m.splits["train"].class_counts[snail], 500);

    // Every val sample: the label of its real wnid, the original bytes, its source file name.
    let mut seen = 0;
    for shard in &val_info.shards {
        let bytes = std::fs::read(dst.join(&shard.name)).unwrap();
        for s in SampleReader::new(&bytes[..], &shard.name) {
            let s = s.unwrap();
            let (wnid, original) = &truth[&s.key];
            let cls: usize = std::str::from_utf8(&s.fields["cls"])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(&m.classes[cls], wnid, "{}", s.key);
            assert!(s.fields["jpg"] == std::fs::read(original).unwrap());
            let meta: serde_json::Value = serde_json::from_slice(&s.fields["json"]).unwrap();
            assert_eq!(meta["wnid"], wnid.as_str());
            assert_eq!(meta["source"], format!("{}.JPEG", s.key));
            seen += 1;
        }
    }
    assert_eq!(seen, 100);

    // val from both sources is refused, by the library and by the CLI.
    opts.splits = vec!["train".into(), "val".into()];
    let e = build_shards_from(&sources, dst.to_str().unwrap(), &opts).unwrap_err();
    assert!(e.to_string().contains("would come from both"), "{e}");
    let cli = |extra: &[&str]| {
        devise()
            .args(["data", "build-shards", "--dst"])
            .arg(tmp.path().join("cli"))
            .arg("--ilsvrc-val-dir")
            .arg(&val.images_dir)
            .arg("--ilsvrc-val-solution")
            .arg(&val.solution_csv)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = cli(&["--src", tree.to_str().unwrap(), "--splits", "train,val"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("would come from both"),
        "{}",
        text(&out)
    );

    // --classes restricts; --limit-classes keeps the first N; a CSV wnid outside the class file
    // is an error naming the CSV line.
    let classes = tmp.path().join("classes.txt");
    let listed: Vec<&str> = images.iter().map(|(w, _)| w.as_str()).collect();
    std::fs::write(&classes, listed.join("\n")).unwrap();
    let out = cli(&[
        "--classes",
        classes.to_str().unwrap(),
        "--limit-classes",
        "10",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let m = read_manifest(tmp.path().join("cli").to_str().unwrap()).unwrap();
    let mut first10: Vec<String> = listed[..10].iter().map(|s| s.to_string()).collect();
    first10.sort();
    assert_eq!(m.classes, first10);
    assert_eq!(m.splits.keys().collect::<Vec<_>>(), ["val"]);
    assert_eq!(m.splits["val"].samples, 10);
    std::fs::write(&classes, listed[1..].join("\n")).unwrap();
    let out = cli(&["--classes", classes.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Row of image 1 is the last line: header + 100 rows -> line 101.
    let want = format!(
        "LOC_val_solution.csv:101: ImageId ILSVRC2012_val_00000001: wnid {} is not in the class list",
        listed[0]
    );
    assert!(text(&out).contains(&want), "{}", text(&out));
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn parallel_builds_are_byte_identical_for_1_and_2_threads() {
    let images = sample_100();
    let tree = tiny_classes(&["n01443537", "n01944390"]);
    let tmp = tempfile::tempdir().unwrap();
    let (val, _) = flat_val(tmp.path(), &images);
    let sources = Sources {
        image_folder: Some(tree),
        ilsvrc_val: Some(val),
    };
    let mut opts = options(1_000_000);
    opts.splits = vec!["train".into()];
    let mut outputs = Vec::new();
    for threads in [1, 2] {
        let dst = tmp.path().join(format!("threads-{threads}"));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let start = Instant::now();
        let m = pool
            .install(|| build_shards_from(&sources, dst.to_str().unwrap(), &opts))
            .unwrap();
        let secs = start.elapsed().as_secs_f64();
        let shards: usize = m.splits.values().map(|s| s.shards.len()).sum();
        println!("build-shards, {threads} thread(s): {shards} shards, 1100 images in {secs:.2} s");
        // Every object written, name -> sha256 (the manifest included).
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(&dst).unwrap() {
            let path = e.unwrap().path();
            files.insert(
                path.file_name().unwrap().to_str().unwrap().to_string(),
                sha256_file(&path),
            );
        }
        assert_eq!(files.len(), shards + 1);
        for s in m.splits.values().flat_map(|s| &s.shards) {
            assert_eq!(files[&s.name], s.sha256);
        }
        outputs.push((m, files));
    }
    assert!(outputs[0].0.splits["train"].shards.len() > 2);
    assert!(outputs[0].0.splits["val"].shards.len() > 5);
    assert_eq!(outputs[0].0, outputs[1].0);
    assert_eq!(
        outputs[0].1, outputs[1].1,
        "same bytes with 1 and 2 threads"
    );
}

/// Flips byte `at` of `path` in place.
fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0xFF;
    std::fs::write(path, bytes).unwrap();
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn verify_passes_good_shards_and_names_every_damage() {
    let images = sample_100();
    let tmp = tempfile::tempdir().unwrap();
    let (val, _) = flat_val(tmp.path(), &images);
    let dst = tmp.path().join("shards");
    let sources = Sources {
        image_folder: None,
        ilsvrc_val: Some(val),
    };
    let m = build_shards_from(&sources, dst.to_str().unwrap(), &options(2_000_000)).unwrap();
    let shards = &m.splits["val"].shards;
    assert!(shards.len() >= 4, "{} shards", shards.len());
    let opts = VerifyOptions {
        split: None,
        max_pixels: DEFAULT_MAX_PIXELS,
    };

    let report = verify_shards(dst.to_str().unwrap(), &opts).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.splits.len(), 1);
    let s = &report.splits[0];
    assert_eq!(
        (s.shards, s.bad_shards, s.samples_read, s.images_decoded),
        (shards.len(), 0, 100, 100)
    );
    let out = devise()
        .args(["data", "verify"])
        .arg(&dst)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("OK: {} shards, 100 samples", shards.len())),
        "{stdout}"
    );

    // Damage four shards in four ways.
    let first_sample = |name: &str| {
        let bytes = std::fs::read(dst.join(name)).unwrap();
        SampleReader::new(&bytes[..], name).next().unwrap().unwrap()
    };
    // 0: the first byte of the first JPEG payload (its SOI marker); the member header is 512
    //    bytes (short name), so the payload starts 512 bytes after the sample's offset.
    let s0 = first_sample(&shards[0].name);
    flip(&dst.join(&shards[0].name), s0.offset as usize + 512);
    // 1: cut in the middle of its first JPEG payload.
    let s1 = first_sample(&shards[1].name);
    let p1 = dst.join(&shards[1].name);
    let len1 = std::fs::metadata(&p1).unwrap().len();
    let cut1 = s1.offset + 512 + s1.fields["jpg"].len() as u64 / 2;
    let f = std::fs::OpenOptions::new().write(true).open(&p1).unwrap();
    f.set_len(cut1).unwrap();
    drop(f);
    // 2: deleted.
    std::fs::remove_file(dst.join(&shards[2].name)).unwrap();
    // 3: the first sample's .cls (member order jpg, cls, json) overwritten with "x..." of the
    //    same length, so the tar framing stays valid.
    let s3 = first_sample(&shards[3].name);
    let jpg_len = s3.fields["jpg"].len() as u64;
    let cls_at = s3.offset + 512 + jpg_len.div_ceil(512) * 512 + 512;
    let p3 = dst.join(&shards[3].name);
    let mut b3 = std::fs::read(&p3).unwrap();
    assert_eq!(
        &b3[cls_at as usize..][..s3.fields["cls"].len()],
        &s3.fields["cls"][..]
    );
    b3[cls_at as usize] = b'x';
    std::fs::write(&p3, b3).unwrap();

    let report = verify_shards(dst.to_str().unwrap(), &opts).unwrap();
    assert!(!report.is_ok());
    let s = &report.splits[0];
    assert_eq!(s.bad_shards, 4, "{report}");
    let lines: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    let has = |shard: &str, key: Option<&str>, needle: &str| {
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.shard == shard && p.key.as_deref() == key && p.message.contains(needle)),
            "no problem ({shard}, {key:?}, {needle:?}) in:\n{report}"
        );
    };
    has(&shards[0].name, None, "sha256");
    has(&shards[0].name, Some(&s0.key), "image does not decode");
    has(
        &shards[1].name,
        None,
        &format!("{cut1} bytes but the manifest says {len1}"),
    );
    has(&shards[1].name, None, &format!("truncated at byte {cut1}"));
    has(&shards[1].name, None, "samples read but the manifest says");
    has(&shards[2].name, None, "cannot be read");
    has(&shards[2].name, None, "not found");
    has(&shards[3].name, Some(&s3.key), "is not a class index");
    has("(split)", None, "samples in the shards, the manifest says");
    // Nothing else is reported about the damaged shards' intact samples, and the undamaged
    // shards have no problem at all.
    for p in &report.problems {
        assert!(
            shards[..4].iter().any(|s| s.name == p.shard) || p.shard == "(split)",
            "unexpected: {p}"
        );
    }
    assert!(
        lines
            .iter()
            .filter(|l| l.contains("does not decode"))
            .count()
            == 1,
        "{report}"
    );

    // The CLI prints the table and the problems, and exits 1.
    let out = devise()
        .args(["data", "verify", "--split", "val"])
        .arg(&dst)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "val/{} {}: image does not decode",
            shards[0].name, s0.key
        )),
        "{stdout}"
    );
    let out = devise()
        .args(["data", "verify", "--split", "train"])
        .arg(&dst)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no split \"train\""), "{}", text(&out));
}

/// `.deps/venv/bin/python` with `webdataset` importable; a failure (never a skip) otherwise.
fn python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".deps/venv/bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import webdataset"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import webdataset: run `bash scripts/setup.sh`",
        python.display()
    );
    python
}

fn interop_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/webdataset_interop.py")
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn python_webdataset_reads_our_shards() {
    let images = sample_100();
    let python = python();
    let tmp = tempfile::tempdir().unwrap();
    // An ImageFolder train split (symbolic links to the 100 images, one class folder each) and
    // the flat validation layout of the same images.
    let tree = tmp.path().join("tree");
    for (wnid, path) in &images {
        let dir = tree.join("train").join(wnid);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let (val, _) = flat_val(tmp.path(), &images);
    let dst = tmp.path().join("shards");
    let mut opts = options(3_000_000);
    opts.splits = vec!["train".into()];
    let sources = Sources {
        image_folder: Some(tree),
        ilsvrc_val: Some(val),
    };
    let m = build_shards_from(&sources, dst.to_str().unwrap(), &opts).unwrap();

    for split in ["train", "val"] {
        let shards: Vec<PathBuf> = m.splits[split]
            .shards
            .iter()
            .map(|s| dst.join(&s.name))
            .collect();
        assert!(shards.len() > 1);
        let out = Command::new(&python)
            .arg(interop_script())
            .arg("read")
            .args(&shards)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let theirs: Vec<(String, usize, String)> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(
                    v["fields"],
                    serde_json::json!(["cls", "jpg", "json"]),
                    "{l}"
                );
                let cls = v["cls"].as_u64().unwrap() as usize;
                assert_eq!(v["wnid"].as_str().unwrap(), m.classes[cls], "{l}");
                (
                    v["key"].as_str().unwrap().to_string(),
                    cls,
                    v["image_sha256"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let ours = read_split(&dst, &m, split);
        assert_eq!(ours.len(), 100);
        assert_eq!(theirs, ours, "{split}: webdataset sees what we wrote");
        // And what we wrote is the original files with their real labels.
        let originals: BTreeMap<String, (String, String)> = images
            .iter()
            .map(|(w, p)| (sha256_file(p), (w.clone(), p.display().to_string())))
            .collect();
        for (key, cls, sha) in &theirs {
            let (wnid, path) = &originals[sha];
            assert_eq!(&m.classes[*cls], wnid, "{key} ({path})");
        }
    }
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn python_written_shards_are_indexed_verified_and_read() {
    let images = sample_100();
    let python = python();
    let (class_file, wnids) = ilsvrc_classes();
    let cls_of = |wnid: &str| wnids.iter().position(|w| w == wnid).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wds");
    std::fs::create_dir(&dir).unwrap();

    // Python writes train (80 images, 30 per shard -> 3 shards) and val (20 images, 1 shard),
    // keys = file stems, cls = index in the standard ILSVRC-2012 order.
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for (split, part) in [("train", &images[..80]), ("val", &images[80..])] {
        let listing = tmp.path().join(format!("{split}.tsv"));
        let mut rows = String::new();
        for (wnid, path) in part {
            let key = path.file_stem().unwrap().to_str().unwrap();
            let cls = cls_of(wnid);
            rows.push_str(&format!("{key}\t{}\t{cls}\t{wnid}\n", path.display()));
            expected.insert(key.to_string(), cls);
        }
        std::fs::write(&listing, rows).unwrap();
        let out = Command::new(&python)
            .arg(interop_script())
            .arg("write")
            .arg(dir.join(format!("{split}-%06d.tar")))
            .arg("30")
            .arg(&listing)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    assert!(dir.join("train-000002.tar").is_file() && !dir.join("train-000003.tar").exists());
    assert!(!dir.join("manifest.json").exists());

    let index = |extra: &[&str]| {
        devise()
            .args(["data", "index"])
            .arg(&dir)
            .arg("--classes")
            .arg(&class_file)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = index(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let m = read_manifest(dir.to_str().unwrap()).unwrap();
    assert_eq!(m.classes, wnids);
    assert_eq!(m.splits["train"].samples, 80);
    assert_eq!(m.splits["val"].samples, 20);
    assert_eq!(m.splits["train"].shards.len(), 3);
    for (split, part) in [("train", &images[..80]), ("val", &images[80..])] {
        let info = &m.splits[split];
        for (wnid, _) in part {
            assert_eq!(info.class_counts[cls_of(wnid)], 1, "{split} {wnid}");
        }
        for s in &info.shards {
            let path = dir.join(&s.name);
            assert_eq!(s.bytes, std::fs::metadata(&path).unwrap().len());
            assert_eq!(s.sha256, sha256_file(&path));
        }
    }

    // verify passes (every image decodes, counts agree).
    let out = devise()
        .args(["data", "verify"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK: 4 shards, 100 samples"));

    // An existing manifest is not replaced unless asked; brace patterns give the same manifest;
    // a pattern naming a missing shard, an unsorted or too short class file are errors.
    let out = index(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    let out = index(&[
        "--overwrite",
        "--shards",
        "train=train-{000000..000002}.tar",
        "--shards",
        "val=val-000000.tar",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(read_manifest(dir.to_str().unwrap()).unwrap(), m);
    let out = index(&[
        "--overwrite",
        "--shards",
        "train=train-{000000..000004}.tar",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("train-000003.tar: not found (from the pattern"),
        "{}",
        text(&out)
    );
    let unsorted = tmp.path().join("unsorted.tsv");
    std::fs::write(&unsorted, "n02\tb\nn01\ta\n").unwrap();
    let out = devise()
        .args(["data", "index", "--overwrite", "--classes"])
        .arg(&unsorted)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("unsorted.tsv:2: n01 is not after n02"),
        "{}",
        text(&out)
    );
    let short = tmp.path().join("short.tsv");
    std::fs::write(&short, wnids[..10].join("\n")).unwrap();
    let out = devise()
        .args(["data", "index", "--overwrite", "--classes"])
        .arg(&short)
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("is not an index into the 10 classes of"),
        "{}",
        text(&out)
    );
    assert_eq!(
        read_manifest(dir.to_str().unwrap()).unwrap(),
        m,
        "a failed index leaves the manifest alone"
    );

    // The reader: one eval pass over val and a training batch from train, labels by key.
    let mut cfg = Config::new(dir.to_str().unwrap(), 32);
    cfg.decode_threads = 2;
    let label_map: Vec<Option<i64>> = (0..wnids.len() as i64).map(Some).collect();
    let mut keys = Vec::new();
    for batch in eval_batches(&cfg, &m, "val", label_map.clone(), 8, 0, 1).unwrap() {
        let b = batch.unwrap();
        for (key, label) in b.keys.iter().zip(&b.labels) {
            assert_eq!(*label as usize, expected[key], "{key}");
            keys.push(key.clone());
        }
    }
    keys.sort();
    let mut want: Vec<String> = images[80..]
        .iter()
        .map(|(_, p)| p.file_stem().unwrap().to_str().unwrap().to_string())
        .collect();
    want.sort();
    assert_eq!(keys, want);
    let mut stream =
        TrainStream::start(&cfg, &m, label_map, 16, 0, Cursor::default(), 0, 1).unwrap();
    let (b, _) = stream.next_batch().unwrap();
    assert_eq!(b.n, 16);
    assert_eq!(b.images.len(), 16 * 3 * 32 * 32);
    for (key, label) in b.keys.iter().zip(&b.labels) {
        assert_eq!(*label as usize, expected[key], "{key}");
    }
}
