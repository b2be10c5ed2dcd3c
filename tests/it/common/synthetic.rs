//! Data the project makes itself, for the tests of the machinery (no `../shared` needed):
//!
//! - the shapes dataset of `devise::data::synthetic` (25 colour/shape classes, 20 seen and 5
//!   unseen), rendered at 32 px with 75 training and 10 validation images per class: 1500 seen
//!   training images, so the 16-image steps of [`config_toml`] give the step counts the tests
//!   were written for (0.032 epochs = 3 steps);
//! - word vectors for the dataset's 10 words (`red`, ..., `cross`), 50 components each drawn
//!   from a seeded generator, in word2vec text format;
//! - a shape hierarchy for hp@k, in `wordnet.is_a.txt`'s `parent child` format:
//!   `shape -> circle -> red_circle`, ...
//!
//! All of it is generated once per test process into a temporary folder.
use devise::data::shards::{build_shards, BuildOptions};
use devise::data::synthetic::{generate_shapes, ShapesOptions, COLOURS, SHAPES};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Components of the generated word vectors (GloVe 6B 50d's dimension).
pub const DIM: usize = 50;

/// The generated dataset, its shards, vectors and hierarchy.
pub struct Shapes {
    _dir: tempfile::TempDir,
    /// ImageFolder tree (`train/<id>/`, `val/<id>/`) with `names.tsv` and `split.tsv`.
    pub tree: PathBuf,
    /// Shards of `train` and `val` (1 MiB each).
    pub shards: PathBuf,
    /// word2vec text file of the 10 words.
    pub vectors: PathBuf,
    /// `parent child` lines.
    pub hierarchy: PathBuf,
}

/// The dataset of the module docs, generated on first use.
pub fn shapes() -> &'static Shapes {
    static SHAPES_DATA: OnceLock<Shapes> = OnceLock::new();
    SHAPES_DATA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("shapes");
        let opts = ShapesOptions {
            image_size: 32,
            train_per_class: 75,
            val_per_class: 10,
            seed: 3,
        };
        let ds = generate_shapes(&tree, &opts).unwrap();
        assert_eq!((ds.seen.len(), ds.unseen.len()), (20, 5));
        let shards = dir.path().join("shards");
        let m = build_shards(
            &tree,
            shards.to_str().unwrap(),
            &BuildOptions {
                splits: vec!["train".into(), "val".into()],
                classes: None,
                // About 20 training shards: enough for 4 data partitions of several shards.
                shard_size_bytes: 1 << 17,
                seed: 0,
                progress: false,
            },
        )
        .unwrap();
        assert_eq!(m.classes.len(), 25);
        assert!(m.splits["train"].shards.len() >= 16);
        assert_eq!(m.splits["train"].samples, 25 * 75);
        assert_eq!(m.splits["val"].samples, 25 * 10);
        let vectors = dir.path().join("vectors.txt");
        write_text_vectors(&vectors, &shape_words(DIM, 1), 6);
        let hierarchy = dir.path().join("is_a.txt");
        let mut lines = String::new();
        for shape in SHAPES {
            lines.push_str(&format!("shape {shape}\n"));
            for (colour, _) in COLOURS {
                lines.push_str(&format!("{shape} {colour}_{shape}\n"));
            }
        }
        std::fs::write(&hierarchy, lines).unwrap();
        Shapes {
            _dir: dir,
            tree,
            shards,
            vectors,
            hierarchy,
        }
    })
}

/// The 10 words of the shapes dataset's names with `dim`-d vectors drawn from `seed`.
pub fn shape_words(dim: usize, seed: u64) -> Vec<(String, Vec<f32>)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    COLOURS
        .iter()
        .map(|(c, _)| *c)
        .chain(SHAPES)
        .map(|w| {
            let v = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            (w.to_string(), v)
        })
        .collect()
}

/// word2vec text format (`count dim` header), values written with `digits` decimals.
pub fn write_text_vectors(path: &Path, words: &[(String, Vec<f32>)], digits: usize) {
    let mut s = format!("{} {}\n", words.len(), words[0].1.len());
    for (w, v) in words {
        s.push_str(w);
        for x in v {
            s.push_str(&format!(" {x:.digits$}"));
        }
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// A small but complete run configuration over `shards` (the [`shapes`] shards, or a copy of
/// them at another URL) writing into `run_dir`: a convnet of widths 8 and 16 on 32 px images,
/// 16 images per step, 3 steps per stage, a checkpoint every 2 steps, hp@k on the shape
/// hierarchy.
pub fn config_toml(shards: &Path, run_dir: &Path) -> String {
    let data = shapes();
    let labels_and_text = format!(
        "[labels]\nsplit = \"{tree}/split.tsv\"\n\n[text]\nvectors = \"{vectors}\"\nnames = \"{tree}/names.tsv\"\n",
        tree = data.tree.display(),
        vectors = data.vectors.display(),
    );
    super::small_run_toml(
        "it-shapes",
        run_dir,
        shards,
        &labels_and_text,
        &data.hierarchy,
    )
}

/// One run of [`config_toml`] trained by `devise train` (all stages, 9 steps, also evaluated
/// every 2 steps), shared by the tests that read a finished run: its folder and run directory.
pub fn trained_run() -> &'static (tempfile::TempDir, PathBuf) {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let config = dir.path().join("run.toml");
        let toml =
            config_toml(&shapes().shards, &run).replace("[eval]\n", "[eval]\nevery_steps = 2\n");
        std::fs::write(&config, toml).unwrap();
        let out = Command::new(super::launch::devise())
            .args(["train", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", super::launch::text(&out));
        (dir, run)
    })
}
