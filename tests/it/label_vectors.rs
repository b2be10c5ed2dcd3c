//! Scope: the label vectors a checkpoint was trained against (`label_embedding.safetensors`,
//! `devise::text::label_embedding`) and what `devise eval`, `devise predict` and a resume do with
//! a word-vector file that no longer matches them:
//! - another dimension: an error naming the file, both dimensions and the checkpoint, never a
//!   panic inside libtorch (eval, eval --labels, predict, resume);
//! - the same words with other vectors: eval and predict warn (naming the file, the checkpoint,
//!   how many labels differ and by how much) and rank the training labels exactly as with the
//!   original file; `--strict` makes it an error; a resume refuses; a copy of the file rounded
//!   to 6 digits is the same file;
//! - a checkpoint without the file (as written by earlier versions) loads with a warning;
//! - a weights file whose tensors are F64: an error naming the file, the tensor and both dtypes.
//!
//! Machinery tests run on the synthetic shapes dataset with generated word vectors (no
//! `../shared` needed); the last test repeats the checks on the real Tiny ImageNet checkpoint of
//! `predict.rs` with vectors derived from `../shared/data/vectors/wiki-skipgram-300d.bin` and the
//! 100 full-size JPEGs.
use crate::common::launch::{devise, text};
use crate::common::shared_dir;
use crate::common::synthetic::{shape_words, write_text_vectors};
use devise::data::shards::{build_shards, BuildOptions};
use devise::data::synthetic::{generate_shapes, ShapesOptions};
use devise::text::label_embedding::{self, LabelEmbeddingMatrix};
use rand::{Rng, SeedableRng};
use sha2::Digest;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The word-vector dimension of the synthetic runs.
const DIM: usize = 8;

/// `words` with Gaussian-ish noise of `scale` times each vector's RMS added to every component.
fn perturbed(words: &[(String, Vec<f32>)], scale: f32, seed: u64) -> Vec<(String, Vec<f32>)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    words
        .iter()
        .map(|(w, v)| {
            let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
            let noisy = v
                .iter()
                .map(|x| {
                    let n: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() / 2.0;
                    x + scale * rms * n
                })
                .collect();
            (w.clone(), noisy)
        })
        .collect()
}

/// word2vec binary format (`count dim` header, `word<space><dim f32 LE>\n` records).
fn write_binary_vectors(
    path: &Path,
    words: &[String],
    dim: usize,
    vector: impl Fn(usize) -> Vec<f32>,
) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "{} {dim}", words.len()).unwrap();
    for (i, w) in words.iter().enumerate() {
        f.write_all(w.as_bytes()).unwrap();
        f.write_all(b" ").unwrap();
        for x in vector(i) {
            f.write_all(&x.to_le_bytes()).unwrap();
        }
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
}

/// A trained synthetic run: shapes (16 px, 8 training and 4 validation images per class),
/// generated `DIM`-d vectors in `vectors` (word2vec text), a tiny convnet, one step per stage.
struct Synthetic {
    _dir: tempfile::TempDir,
    config: PathBuf,
    vectors: PathBuf,
    run: PathBuf,
    /// Validation images, 4 per class.
    images: Vec<String>,
    /// The vectors `vectors` was written with.
    words: Vec<(String, Vec<f32>)>,
}

impl Synthetic {
    fn train() -> Synthetic {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let opts = ShapesOptions {
            image_size: 16,
            train_per_class: 8,
            val_per_class: 4,
            seed: 11,
        };
        generate_shapes(&src, &opts).unwrap();
        let shards = dir.path().join("shards");
        build_shards(
            &src,
            shards.to_str().unwrap(),
            &BuildOptions {
                splits: vec!["train".into(), "val".into()],
                classes: None,
                shard_size_bytes: 1 << 20,
                seed: 0,
                progress: false,
            },
        )
        .unwrap();
        let words = shape_words(DIM, 5);
        let vectors = dir.path().join("vectors.txt");
        write_text_vectors(&vectors, &words, 7);
        let run = dir.path().join("run");
        let config = dir.path().join("run.toml");
        // 20 seen classes x 8 images = 160; 0.2 epochs of 32 = one step per stage.
        std::fs::write(
            &config,
            format!(
                r#"
[run]
name = "it-label-vectors"
dir = "{run}"
seed = 1
threads = 1
device = "cpu"

[data]
shards = "{shards}"
image_size = 16
eval_resize = 16
decode_threads = 1
prefetch_batches = 2

[labels]
split = "{src}/split.tsv"

[text]
vectors = "{vectors}"
names = "{src}/names.tsv"

[model]
encoder = "convnet"
widths = [4, 8]

[train]
global_batch_size = 32
log_every_steps = 1
softmax = {{ epochs = 0.2, optimizer = {{ algorithm = "sgd", lr = 0.05 }} }}
devise = {{ epochs = 0.2, optimizer = {{ algorithm = "adagrad", lr = 0.1 }} }}
finetune = {{ epochs = 0.2, optimizer = {{ algorithm = "sgd", lr = 0.01 }} }}

[eval]
batch_size = 64
"#,
                run = run.display(),
                shards = shards.display(),
                src = src.display(),
                vectors = vectors.display(),
            ),
        )
        .unwrap();
        let out = Command::new(devise())
            .args(["train", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let mut images: Vec<String> = walk(&src.join("val"));
        images.sort();
        assert_eq!(images.len(), 100);
        Synthetic {
            _dir: dir,
            config,
            vectors,
            run,
            images,
            words,
        }
    }

    /// The step directory `LATEST` names.
    fn checkpoint(&self) -> PathBuf {
        let latest = std::fs::read_to_string(self.run.join("checkpoints/LATEST")).unwrap();
        self.run.join("checkpoints").join(latest.trim())
    }

    fn train_again(&self) -> Output {
        Command::new(devise())
            .args(["train", "--config", self.config.to_str().unwrap()])
            .output()
            .unwrap()
    }
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.to_str().unwrap().to_string());
        }
    }
    out
}

fn run_devise(args: &[&str], images: &[String]) -> Output {
    Command::new(devise())
        .args(args)
        .args(images)
        .output()
        .unwrap()
}

/// `devise predict --checkpoint CK --labels LABELS --device cpu --json EXTRA.. IMAGES..`.
fn predict(ck: &Path, labels: &str, extra: &[&str], images: &[String]) -> Output {
    let mut args = vec![
        "predict",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--labels",
        labels,
        "--device",
        "cpu",
        "--json",
    ];
    args.extend(extra);
    run_devise(&args, images)
}

/// Each image's `top` list (`[wnid, name, score]`, best first) of a successful `predict --json`.
fn tops(out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{}", text(out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["top"].clone())
        .collect()
}

/// `devise eval --checkpoint CK EXTRA..`; on success, the report's first evaluation's rows.
fn eval(ck: &Path, extra: &[&str]) -> (Output, Option<serde_json::Value>) {
    let mut args = vec!["eval", "--checkpoint", ck.to_str().unwrap()];
    args.extend(extra);
    let out = run_devise(&args, &[]);
    let rows = out.status.success().then(|| {
        let log = text(&out);
        let report = log
            .lines()
            .find_map(|l| l.strip_prefix("report: "))
            .unwrap_or_else(|| panic!("{log}"))
            .trim()
            .to_string();
        let json = Path::new(&report).with_file_name("report.json");
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        doc["evaluations"][0]["rows"].clone()
    });
    (out, rows)
}

/// A failed command: exit 1 (not libtorch's panic, 101), no "panicked" anywhere, and every
/// `wanted` text in its output.
fn assert_clean_error(out: &Output, wanted: &[&str]) {
    let log = text(out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    for w in wanted {
        assert!(log.contains(w), "expected {w:?} in:\n{log}");
    }
}

/// Replaces (`Some`) or removes (`None`) `file` of the step directory `step` and updates its
/// `manifest.json` to match (size and sha256), as a checkpoint written that way would be.
fn rewrite_in_checkpoint(step: &Path, file: &str, bytes: Option<Vec<u8>>) {
    let manifest_path = step.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let files = manifest["files"].as_object_mut().unwrap();
    match bytes {
        Some(bytes) => {
            files.insert(
                file.to_string(),
                serde_json::json!({
                    "bytes": bytes.len(),
                    "sha256": hex::encode(sha2::Sha256::digest(&bytes)),
                }),
            );
            std::fs::write(step.join(file), bytes).unwrap();
        }
        None => {
            assert!(files.remove(file).is_some(), "{file} not in the manifest");
            std::fs::remove_file(step.join(file)).unwrap();
        }
    }
    std::fs::write(manifest_path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

/// Copies step directory `step` into `<run>/checkpoints/` of a new run directory under `dir`;
/// returns the copy.
fn copy_checkpoint(step: &Path, dir: &Path, run_name: &str) -> PathBuf {
    let dst = dir
        .join(run_name)
        .join("checkpoints")
        .join(step.file_name().unwrap());
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(step).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// The unit vector of `v`.
fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|&x| (f64::from(x) / n) as f32).collect()
}

#[test]
fn a_vector_file_of_another_dimension_is_an_error_naming_both_dimensions_never_a_panic() {
    let s = Synthetic::train();
    let ck = s.checkpoint();
    let ck_name = ck.to_str().unwrap();
    // The same words, 5-d: eval, eval --labels, predict and a resume each name the file, both
    // dimensions and the checkpoint.
    write_text_vectors(&s.vectors, &shape_words(5, 9), 7);
    let file = s.vectors.to_str().unwrap();
    let wanted = [file, "dimension 5", "dimension 8", ck_name];
    assert_clean_error(&eval(&ck, &[]).0, &wanted);
    assert_clean_error(&eval(&ck, &["--labels", "unseen"]).0, &wanted);
    assert_clean_error(&predict(&ck, "seen", &[], &s.images[..3]), &wanted);
    let out = s.train_again();
    assert_clean_error(&out, &["cannot resume", file, "dimension 5", "dimension 8"]);
}

#[test]
fn a_changed_vector_file_warns_keeps_the_training_labels_and_strict_refuses() {
    let s = Synthetic::train();
    let ck = s.checkpoint();
    let ck_name = ck.to_str().unwrap();
    let file = s.vectors.to_str().unwrap();

    // The checkpoint carries the label vectors it trained against: the 20 seen labels, each the
    // unit mean of its colour's and shape's vectors ("red circle"), with how they were made.
    let stored = LabelEmbeddingMatrix::from_safetensors(
        &std::fs::read(ck.join(label_embedding::FILE_NAME)).unwrap(),
        "checkpoint",
    )
    .unwrap();
    let manifest = std::fs::read_to_string(ck.join("manifest.json")).unwrap();
    assert!(manifest.contains(label_embedding::FILE_NAME), "{manifest}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("train_state.json")).unwrap()).unwrap();
    assert_eq!(
        serde_json::json!(stored.wnids),
        state["resume_key"]["seen"],
        "rows in training-label order"
    );
    assert_eq!((stored.len(), stored.dim), (20, DIM));
    let word = |w: &str| &s.words.iter().find(|(x, _)| x == w).unwrap().1;
    for wnid in &stored.wnids {
        let (colour, shape) = wnid.split_once('_').unwrap();
        let mean: Vec<f32> = word(colour)
            .iter()
            .zip(word(shape))
            .map(|(a, b)| ((f64::from(*a) + f64::from(*b)) / 2.0) as f32)
            .collect();
        let want = unit(&mean);
        let got = stored.row(wnid).unwrap();
        assert!(
            want.iter().zip(got).all(|(a, b)| (a - b).abs() < 1e-6),
            "{wnid}: {got:?} vs {want:?}"
        );
    }
    assert_eq!(stored.made_by.params["vectors"], file);
    assert_eq!(stored.made_by.params["vectors_format"], "word2vec-text");
    assert_eq!(
        stored.made_by.embedder,
        label_embedding::EmbedderKind::WordVectors
    );

    // With the vector file it was trained with: no warning.
    let original = predict(&ck, "seen", &[], &s.images);
    assert!(!text(&original).contains("differ"), "{}", text(&original));
    let original_tops = tops(&original);
    let (out, original_rows) = eval(&ck, &[]);
    let original_rows = original_rows.unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(!text(&out).contains("differ"), "{}", text(&out));

    // The same words, other vectors (noise of 0.5 RMS on every word): a warning naming the
    // file, the checkpoint and how many training labels differ; the training labels ranked
    // exactly as before (same scores, bit for bit).
    write_text_vectors(&s.vectors, &perturbed(&s.words, 0.5, 3), 7);
    let changed = predict(&ck, "seen", &[], &s.images);
    let log = text(&changed);
    for w in [
        file,
        ck_name,
        "the vectors of 20 of 20 training labels differ",
        "largest L2 distance",
        "--strict",
    ] {
        assert!(log.contains(w), "expected {w:?} in:\n{log}");
    }
    assert_eq!(tops(&changed), original_tops);
    let (out, rows) = eval(&ck, &[]);
    let rows = rows.unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(
        text(&out).contains("20 of 20 training labels differ"),
        "{}",
        text(&out)
    );
    assert_eq!(rows["seen/devise"], original_rows["seen/devise"]);
    // --strict: an error naming the file and the checkpoint.
    let wanted = [file, ck_name, "20 of 20 training labels differ", "--strict"];
    assert_clean_error(
        &predict(&ck, "seen", &["--strict"], &s.images[..2]),
        &wanted,
    );
    assert_clean_error(&eval(&ck, &["--strict"]).0, &wanted);
    assert_clean_error(&eval(&ck, &["--labels", "unseen", "--strict"]).0, &wanted);
    // A resume would train toward other targets: refused.
    assert_clean_error(
        &s.train_again(),
        &["cannot resume", file, "20 of 20 training labels differ"],
    );

    // The original vectors rounded to 5 decimals: the same vectors within the tolerance.
    write_text_vectors(&s.vectors, &s.words, 5);
    let rounded = predict(&ck, "seen", &["--strict"], &s.images);
    assert!(!text(&rounded).contains("differ"), "{}", text(&rounded));
    assert_eq!(tops(&rounded), original_tops);
}

#[test]
fn a_checkpoint_without_label_vectors_loads_with_a_warning() {
    let s = Synthetic::train();
    let dir = tempfile::tempdir().unwrap();
    let ck = copy_checkpoint(&s.checkpoint(), dir.path(), "old");
    rewrite_in_checkpoint(&ck, label_embedding::FILE_NAME, None);
    let ck_name = ck.to_str().unwrap();
    let file = s.vectors.to_str().unwrap();
    let out = predict(&ck, "seen", &[], &s.images);
    let log = text(&out);
    for w in [ck_name, "carries no label_embedding.safetensors", file] {
        assert!(log.contains(w), "expected {w:?} in:\n{log}");
    }
    assert_eq!(
        tops(&out),
        tops(&predict(&s.checkpoint(), "seen", &[], &s.images))
    );
    let (out, rows) = eval(&ck, &[]);
    assert!(rows.is_some(), "{}", text(&out));
    assert!(text(&out).contains("carries no"), "{}", text(&out));
    let wanted = [
        ck_name,
        "carries no label_embedding.safetensors",
        "--strict",
    ];
    assert_clean_error(
        &predict(&ck, "seen", &["--strict"], &s.images[..1]),
        &wanted,
    );
    assert_clean_error(&eval(&ck, &["--strict"]).0, &wanted);
}

#[test]
fn weights_of_another_dtype_are_an_error_naming_the_file_the_tensor_and_both_dtypes() {
    let s = Synthetic::train();
    let dir = tempfile::tempdir().unwrap();
    let ck = copy_checkpoint(&s.checkpoint(), dir.path(), "f64");
    let model = ck.join("model.safetensors");
    let tensors =
        devise::storage::tensors::safetensors_to_tensors(&std::fs::read(&model).unwrap(), "model")
            .unwrap();
    let doubled: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(tch::Kind::Double)))
        .collect();
    rewrite_in_checkpoint(
        &ck,
        "model.safetensors",
        Some(devise::storage::tensors::tensors_to_safetensors(&doubled).unwrap()),
    );
    let wanted = [
        model.to_str().unwrap(),
        "tensor '",
        "dtype F64 in the weights, F32 expected",
    ];
    assert_clean_error(&predict(&ck, "seen", &[], &s.images[..1]), &wanted);
    assert_clean_error(&eval(&ck, &[]).0, &wanted);
    // Resuming the run from it.
    let out = Command::new(devise())
        .args(["train", "--config", s.config.to_str().unwrap()])
        .args(["--resume", ck.to_str().unwrap()])
        .output()
        .unwrap();
    assert_clean_error(&out, &wanted);
}

/// The checks on the real Tiny ImageNet checkpoint (300-d skip-gram vectors, the split's first 4
/// classes):
/// a 100-d copy of the vector file is an error for eval and predict; a copy with noise on every
/// vector warns, ranks the training labels for the 100 full-size JPEGs exactly as the original
/// file does, and reproduces the training-time seen/devise row; `--strict` refuses it.
#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn the_real_checkpoint_refuses_other_dimensions_and_keeps_its_training_labels() {
    let shared = shared_dir();
    let (_, run) = crate::common::tiny::trained_run();
    let original_ck = run.join("checkpoints/step-000000009");
    let source = shared.join("data/vectors/wiki-skipgram-300d.bin");
    let (vectors, _) = devise::text::vectors::read_vectors_file(
        source.to_str().unwrap(),
        devise::text::vectors::Format::Auto,
        None,
    )
    .unwrap();
    assert_eq!(vectors.dim, 300);
    let dir = tempfile::tempdir().unwrap();
    let row = |i: usize| &vectors.data[i * 300..(i + 1) * 300];
    let short = dir.path().join("wiki-skipgram-100d.bin");
    write_binary_vectors(&short, &vectors.words, 100, |i| row(i)[..100].to_vec());
    let noisy = dir.path().join("wiki-skipgram-300d-noisy.bin");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let noise: Vec<f32> = (0..vectors.data.len())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    write_binary_vectors(&noisy, &vectors.words, 300, |i| {
        let v = row(i);
        let rms = (v.iter().map(|x| x * x).sum::<f32>() / 300.0).sqrt();
        v.iter()
            .zip(&noise[i * 300..])
            .map(|(x, n)| x + 0.8 * rms * n)
            .collect()
    });
    // Copies of the checkpoint whose config.toml names each file (eval and reports write
    // beside the copies, never beside the shared run).
    let config = std::fs::read_to_string(original_ck.join("config.toml")).unwrap();
    let with_vectors = |name: &str, path: &Path| {
        let ck = copy_checkpoint(&original_ck, dir.path(), name);
        let toml = config.replace(source.to_str().unwrap(), path.to_str().unwrap());
        assert_ne!(toml, config);
        rewrite_in_checkpoint(&ck, "config.toml", Some(toml.into_bytes()));
        ck
    };
    let ck_short = with_vectors("short", &short);
    let ck_noisy = with_vectors("noisy", &noisy);
    let ck_same = copy_checkpoint(&original_ck, dir.path(), "same");
    let one_k = shared.join("data/imagenet-meta/zero-shot-splits/1k.txt");
    let one_k = one_k.to_str().unwrap();
    let mut images: Vec<String> = walk(&shared.join("data/imagenet-sample-100"));
    images.sort();
    assert_eq!(images.len(), 100);

    // Another dimension.
    let wanted = |ck: &Path| {
        vec![
            short.to_str().unwrap().to_string(),
            "dimension 100".to_string(),
            "dimension 300".to_string(),
            ck.to_str().unwrap().to_string(),
        ]
    };
    let w = wanted(&ck_short);
    assert_clean_error(&predict(&ck_short, one_k, &[], &images[..2]), &refs(&w));
    assert_clean_error(&eval(&ck_short, &[]).0, &refs(&w));
    let set = format!("text.vectors={}", short.display());
    let w = wanted(&ck_same);
    assert_clean_error(&eval(&ck_same, &["--set", &set]).0, &refs(&w));
    assert_clean_error(
        &eval(&ck_same, &["--set", &set, "--labels", one_k]).0,
        &refs(&w),
    );

    // The same words, other vectors: every training label (of the split's first 4, those with
    // a vector and training images) differs.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(original_ck.join("train_state.json")).unwrap())
            .unwrap();
    let seen = state["resume_key"]["seen"].as_array().unwrap().len();
    assert!(seen >= 2, "{state}");
    let all_differ = format!("the vectors of {seen} of {seen} training labels differ");
    let top_k = seen.to_string();
    let original = tops(&predict(&ck_same, "seen", &["--top-k", &top_k], &images));
    let changed = predict(&ck_noisy, "seen", &["--top-k", &top_k], &images);
    let log = text(&changed);
    for w in [
        noisy.to_str().unwrap(),
        ck_noisy.to_str().unwrap(),
        all_differ.as_str(),
    ] {
        assert!(log.contains(w), "expected {w:?} in:\n{log}");
    }
    assert_eq!(tops(&changed), original);
    let out = predict(&ck_noisy, one_k, &[], &images);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&all_differ), "{}", text(&out));
    assert_clean_error(
        &predict(&ck_noisy, one_k, &["--strict"], &images[..2]),
        &[noisy.to_str().unwrap(), &all_differ, "--strict"],
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    let at_training = &report["evaluations"][2]["rows"]["seen/devise"];
    let set = format!("text.vectors={}", noisy.display());
    let (out, rows) = eval(&ck_same, &["--set", &set]);
    let rows = rows.unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(text(&out).contains(&all_differ), "{}", text(&out));
    assert_eq!(&rows["seen/devise"], at_training);
    assert_clean_error(
        &eval(&ck_same, &["--set", &set, "--strict"]).0,
        &[noisy.to_str().unwrap(), &all_differ, "--strict"],
    );
}
