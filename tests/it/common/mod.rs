//! Shared setup of the integration tests. Test modules import from here, never from each other.
//!
//! - [`synthetic`]: data the project makes itself (rendered shapes, generated word vectors, a
//!   shape hierarchy) for every test of the machinery: launcher, multi-rank training, resume,
//!   checkpoints, object storage, reports, cluster recipes. They run on any machine.
//! - [`tiny`]: real Tiny ImageNet classes from `../shared`, for the tests about real data.
//! - [`launch`]: the `devise` and `devise-launch` binaries, run configurations for several
//!   processes, and what their run directories hold.
//! - [`ports`]: TCP ports for servers in child processes, reserved without a bind-drop race.
//! - [`s3`]: a local S3 server (`s3s-fs`).
//! - [`proxy`]: a proxy in front of it that counts the bytes each rank downloads.
//!
//! Tests that read `../shared` (the project's real ImageNet data, which users do not have)
//! carry `#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]`:
//! `build.rs` sets `devise_no_shared` when `../shared/data` is missing, so `cargo test` lists
//! them as ignored, with that reason, instead of passing them.
use std::path::PathBuf;

pub mod launch;
pub mod ports;
pub mod proxy;
pub mod s3;
pub mod synthetic;
pub mod tiny;

/// `../shared` beside the project root. Panics when it is missing: every caller is a test
/// marked with the `devise_no_shared` ignore (see the module docs), so it runs only when the
/// folder was there at build time (or under `--include-ignored`). With `CI=true`, a missing
/// `../shared` fails here and in `scripts/test.sh`.
pub fn shared_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    if dir.join("data").is_dir() {
        return dir.canonicalize().unwrap();
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but ../shared is missing at {}", dir.display());
    }
    panic!(
        "this test reads the project's real data folder, missing at {}{}",
        dir.display(),
        if cfg!(devise_no_shared) {
            " (it is ignored without it; --include-ignored runs it anyway)"
        } else {
            ": it was there when the tests were built; rebuild (`touch build.rs`) to mark its tests ignored"
        }
    );
}

/// libtorch's random generator is process-wide, and the trainer re-seeds it (weights init, every
/// step): two trainings in parallel test threads would draw from each other's sequence. Every
/// test that trains in-process holds this lock.
pub fn training_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tests were built with `../shared` missing exactly when it is missing now: a folder that
/// appeared after the build would otherwise leave its tests ignored without saying so.
#[test]
fn the_shared_folder_is_where_the_build_saw_it() {
    let present = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .is_dir();
    assert_eq!(
        present,
        !cfg!(devise_no_shared),
        "../shared/data {} now but {} when the tests were built: `touch build.rs` and run them again",
        if present { "exists" } else { "is missing" },
        if present { "was missing" } else { "existed" },
    );
}

/// The run configuration both small test runs share ([`synthetic::config_toml`] on the shapes,
/// [`tiny::config_toml`] on Tiny ImageNet): `name`, writing into `run_dir`, reading `shards`, with
/// their own `[labels]` and `[text]` sections: a convnet of widths 8 and 16 on 32 px images, 16
/// images per step, 3 steps per stage (1500 seen training images), a checkpoint every 2 steps,
/// hp@k on `hierarchy`.
pub fn small_run_toml(
    name: &str,
    run_dir: &std::path::Path,
    shards: &std::path::Path,
    labels_and_text: &str,
    hierarchy: &std::path::Path,
) -> String {
    format!(
        r#"
[run]
name = "{name}"
dir = "{run}"
seed = 3
threads = 2
device = "cpu"

[data]
shards = "{shards}"
image_size = 32
eval_resize = 36
decode_threads = 2
prefetch_batches = 2

{labels_and_text}
[model]
encoder = "convnet"
widths = [8, 16]

[train]
global_batch_size = 16
log_every_steps = 1
# 1500 seen training images / 16 per step: 0.032 epochs = 3 steps per stage.
softmax = {{ epochs = 0.032, optimizer = {{ algorithm = "sgd", lr = 0.05, warmup_steps = 1 }} }}
devise = {{ epochs = 0.032, optimizer = {{ algorithm = "adagrad", lr = 0.05 }} }}
finetune = {{ epochs = 0.032, optimizer = {{ algorithm = "sgd", lr = 0.01 }} }}

[checkpoint]
every_steps = 2
keep_last = 2

[eval]
batch_size = 64
hierarchy = "{hierarchy}"
"#,
        run = run_dir.display(),
        shards = shards.display(),
        hierarchy = hierarchy.display(),
    )
}
