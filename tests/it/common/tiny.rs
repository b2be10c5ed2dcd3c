//! Real data for the tests about it: classes of Tiny ImageNet from
//! `../shared/data/tiny-imagenet-200.tar.gz`, their shards, and a run configuration with the real
//! zero-shot split, the real skip-gram word2vec vectors and WordNet's hierarchy. Every caller is a
//! test ignored without `../shared` (see the `common` module docs).
use super::shared_dir;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `train/` and `val/` of the given Tiny ImageNet wnids from
/// `../shared/data/tiny-imagenet-200.tar.gz`, extracted once per target directory into
/// `CARGO_TARGET_TMPDIR` (a `done` marker makes an interrupted extraction start over). Returns
/// the ImageFolder root `.../tiny-imagenet-200` (with `train/<wnid>/`, `val/<wnid>/`).
pub fn tiny_classes(wnids: &[&str]) -> PathBuf {
    // Tests run in parallel threads (and test binaries in parallel processes): extract into a
    // private folder and rename it into place, under a lock for this process.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let shared = shared_dir();
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("devise-tiny-{}", wnids.join("-")));
    if !out.join("done").exists() {
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let mut cmd = std::process::Command::new("tar");
        cmd.arg("xzf")
            .arg(shared.join("data/tiny-imagenet-200.tar.gz"))
            .arg("-C")
            .arg(&tmp);
        for w in wnids {
            cmd.arg(format!("tiny-imagenet-200/train/{w}"))
                .arg(format!("tiny-imagenet-200/val/{w}"));
        }
        let status = cmd.status().expect("running tar");
        assert!(status.success(), "tar failed: {status}");
        std::fs::write(tmp.join("done"), b"").unwrap();
        let _ = std::fs::remove_dir_all(&out);
        if std::fs::rename(&tmp, &out).is_err() {
            // Another process published it first.
            assert!(
                out.join("done").exists(),
                "cannot publish {}",
                out.display()
            );
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    out.join("tiny-imagenet-200")
}

/// The first 4 classes of the fixed split: goldfish, European fire salamander, bullfrog (seen),
/// tailed frog (unseen).
pub const WNIDS: [&str; 4] = ["n01443537", "n01629819", "n01641577", "n01644900"];

/// Shards of the 4 classes, built once per test binary: the folder holding them and their
/// URL.
pub fn shards() -> &'static (tempfile::TempDir, PathBuf) {
    static SHARDS: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    SHARDS.get_or_init(|| {
        let tree = tiny_classes(&WNIDS);
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("shards");
        let opts = devise::data::shards::BuildOptions {
            splits: vec!["train".into(), "val".into()],
            classes: None,
            shard_size_bytes: 1 << 20,
            seed: 0,
            progress: false,
        };
        let m = devise::data::shards::build_shards(&tree, dst.to_str().unwrap(), &opts).unwrap();
        assert_eq!(m.classes.len(), 4);
        assert_eq!(m.splits["train"].samples, 2000);
        assert_eq!(m.splits["val"].samples, 200);
        (dir, dst)
    })
}

/// A small but complete run configuration over [`shards`] (3 steps per stage).
pub fn config_toml(shards: &Path, run_dir: &Path) -> String {
    let shared = shared_dir();
    let labels_and_text = format!(
        "[labels]\nsplit = \"{shared}/data/tiny-imagenet-200-zero-shot-split.tsv\"\nlimit = 4\n\n[text]\nvectors = \"{shared}/data/vectors/wiki-skipgram-300d.bin\"\nnames = \"{shared}/data/imagenet-meta/words.txt\"\n",
        shared = shared.display(),
    );
    let hierarchy = shared.join("data/imagenet-meta/wordnet.is_a.txt");
    super::small_run_toml("it-train", run_dir, shards, &labels_and_text, &hierarchy)
}

/// One run of [`config_toml`] over [`shards`] trained by `devise train` (all stages, 9 steps,
/// hierarchy set, also evaluated every 2 steps), shared by the tests: its folder and run
/// directory.
pub fn trained_run() -> &'static (tempfile::TempDir, PathBuf) {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    RUN.get_or_init(|| {
        let (_, shard_dir) = shards();
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let config = dir.path().join("run.toml");
        // Also evaluate every 2 steps (mid-stage), besides each stage's end.
        let toml = config_toml(shard_dir, &run).replace("[eval]\n", "[eval]\nevery_steps = 2\n");
        std::fs::write(&config, toml).unwrap();
        let out = Command::new(super::launch::devise())
            .args(["train", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", super::launch::text(&out));
        (dir, run)
    })
}
