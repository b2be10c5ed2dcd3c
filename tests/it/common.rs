//! Shared helpers for the integration tests: where `../shared` is.
use std::path::PathBuf;

/// `../shared` beside the project root, or `None` with a printed reason. In CI (`CI=true`) a
/// missing `../shared` is a failure, never a skip.
#[allow(dead_code)]
pub fn shared_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    if dir.join("data").is_dir() {
        return Some(dir.canonicalize().unwrap());
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but ../shared is missing at {}", dir.display());
    }
    eprintln!("SKIP: ../shared not found at {}", dir.display());
    None
}

/// `train/` and `val/` of the given Tiny ImageNet wnids from
/// `../shared/data/tiny-imagenet-200.tar.gz`, extracted once per target directory into
/// `CARGO_TARGET_TMPDIR` (a `done` marker makes an interrupted extraction start over). Returns
/// the ImageFolder root `.../tiny-imagenet-200` (with `train/<wnid>/`, `val/<wnid>/`), or `None`
/// with a printed reason when `../shared` is absent.
#[allow(dead_code)]
pub fn tiny_classes(wnids: &[&str]) -> Option<PathBuf> {
    let shared = shared_dir()?;
    let out =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("devise-tiny-{}", wnids.join("-")));
    if !out.join("done").exists() {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let mut cmd = std::process::Command::new("tar");
        cmd.arg("xzf")
            .arg(shared.join("data/tiny-imagenet-200.tar.gz"))
            .arg("-C")
            .arg(&out);
        for w in wnids {
            cmd.arg(format!("tiny-imagenet-200/train/{w}"))
                .arg(format!("tiny-imagenet-200/val/{w}"));
        }
        let status = cmd.status().expect("running tar");
        assert!(status.success(), "tar failed: {status}");
        std::fs::write(out.join("done"), b"").unwrap();
    }
    Some(out.join("tiny-imagenet-200"))
}
