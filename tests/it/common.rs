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
    // Tests run in parallel threads (and test binaries in parallel processes): extract into a
    // private folder and rename it into place, under a lock for this process.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let shared = shared_dir()?;
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
    Some(out.join("tiny-imagenet-200"))
}

/// libtorch's random generator is process-wide, and the trainer re-seeds it (weights init, every
/// step): two trainings in parallel test threads would draw from each other's sequence. Every
/// test that trains in-process holds this lock.
#[allow(dead_code)]
pub fn training_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
