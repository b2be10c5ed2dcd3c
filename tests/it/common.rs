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
