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

/// Extracts `train/` and `val/` of the given Tiny ImageNet wnids from
/// `../shared/data/tiny-imagenet-200.tar.gz` into `dst` (an ImageFolder tree
/// `dst/tiny-imagenet-200/{train,val}/<wnid>/`). Returns the tree's root.
#[allow(dead_code)]
pub fn extract_tiny_classes(
    shared: &std::path::Path,
    wnids: &[&str],
    dst: &std::path::Path,
) -> PathBuf {
    let mut cmd = std::process::Command::new("tar");
    cmd.arg("xzf")
        .arg(shared.join("data/tiny-imagenet-200.tar.gz"))
        .arg("-C")
        .arg(dst);
    for w in wnids {
        cmd.arg(format!("tiny-imagenet-200/train/{w}"))
            .arg(format!("tiny-imagenet-200/val/{w}"));
    }
    let status = cmd.status().expect("running tar");
    assert!(status.success(), "tar failed: {status}");
    dst.join("tiny-imagenet-200")
}
