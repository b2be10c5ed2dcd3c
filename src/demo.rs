//! The embedded default run (`devise demo`): a fresh machine has no ImageNet, so this generates a
//! small dataset of rendered coloured shapes whose class names ("red circle", ...) have real GloVe
//! vectors, holds out one colour/shape combination per colour and per shape, and runs the whole
//! pipeline — shards, three training stages, checkpoints, evaluation, report — showing zero-shot
//! transfer to the held-out combinations. Configuration: `configs/demo.toml`, compiled in.
use crate::collective::SingleProcess;
use crate::config::plan::Plan;
use crate::config::RunConfig;
use crate::data::shards::{build_shards, BuildOptions};
use crate::data::synthetic::{generate_shapes, ShapesOptions};
use crate::train::{train, Outcome, Resume, RunOptions};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// `configs/demo.toml`, embedded.
pub const DEMO_TOML: &str = include_str!("../configs/demo.toml");

/// Generates the data under `<out>/data` (once), then trains into `<out>/run` (resuming if a
/// previous demo was interrupted). `overrides` are `--set` items applied after the paths.
pub fn run(out: &Path, overrides: &[String], stop: Arc<AtomicBool>) -> Result<Outcome> {
    let user_vectors = overrides
        .iter()
        .any(|o| o.trim_start().starts_with("text.vectors="));
    let vectors = if user_vectors {
        Default::default()
    } else {
        glove_path()?
    };
    let data = out.join("data");
    let images = data.join("shapes");
    let shards = data.join("shards");
    if !images.is_dir() {
        // Rendered under a temporary name and renamed: an interrupted render is never mistaken
        // for a complete dataset.
        let tmp = data.join("shapes.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        let opts = ShapesOptions {
            image_size: 32,
            train_per_class: 240,
            val_per_class: 40,
            seed: 7,
        };
        tracing::info!("rendering the shapes dataset into {}", images.display());
        let ds = generate_shapes(&tmp, &opts).context("generating the shapes dataset")?;
        std::fs::rename(&tmp, &images)
            .with_context(|| format!("publishing {}", images.display()))?;
        tracing::info!(
            "{} classes: {} seen, {} unseen {:?}",
            ds.classes.len(),
            ds.seen.len(),
            ds.unseen.len(),
            ds.unseen
        );
    }
    let shards_url = shards.to_string_lossy().to_string();
    // Shards built by an older devise lack the per-shard class counts the training stream plans
    // from: they are rebuilt from the rendered images (in place; the images stay).
    if shards.join("manifest.json").exists()
        && !crate::data::read_manifest(&shards_url)?
            .splits
            .values()
            .all(|s| s.shards.iter().all(|k| !k.class_counts.is_empty()))
    {
        tracing::warn!(
            "{}: rebuilding the demo's shards (their manifest has no per-shard class counts)",
            shards.display()
        );
        std::fs::remove_file(shards.join("manifest.json"))
            .with_context(|| format!("removing {}/manifest.json", shards.display()))?;
    }
    if !shards.join("manifest.json").exists() {
        let opts = BuildOptions {
            splits: vec!["train".into(), "val".into()],
            classes: None,
            shard_size_bytes: 1 << 20,
            seed: 0,
            progress: true,
        };
        build_shards(&images, &shards_url, &opts).context("building shards")?;
    }
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("interrupted before training started");
    }
    set_aside_unresumable_run(&out.join("run"))?;
    let mut all = vec![
        format!("run.dir={}", quote(&out.join("run").to_string_lossy())),
        format!("data.shards={}", quote(&shards_url)),
        format!(
            "labels.split={}",
            quote(&images.join("split.tsv").to_string_lossy())
        ),
        format!(
            "text.names={}",
            quote(&images.join("names.tsv").to_string_lossy())
        ),
    ];
    if !user_vectors {
        all.push(format!(
            "text.vectors={}",
            quote(&vectors.to_string_lossy())
        ));
    }
    all.extend(overrides.iter().cloned());
    let cfg = RunConfig::load(DEMO_TOML, "configs/demo.toml (embedded)", &all)?;
    let plan = Plan::build(&cfg, 0, 1)?;
    let opts = RunOptions {
        resume: Resume::Auto,
        stop,
        stop_after_step: None,
        local_rank: 0,
        local_world_size: 1,
    };
    train(&plan, &opts, &SingleProcess)
}

/// A demo run directory whose latest checkpoint cannot be resumed by this devise (its data
/// cursor is the earlier unpartitioned stream's) is renamed to `run.before-partitions[-N]`, kept
/// as it was, so the demo starts a new run instead of failing.
pub fn set_aside_unresumable_run(run: &Path) -> Result<()> {
    if !run.join("checkpoints").is_dir() {
        return Ok(());
    }
    let store = crate::storage::Store::open(&run.to_string_lossy())?;
    let Some(&last) = crate::checkpoint::list_steps(&store)?.last() else {
        return Ok(());
    };
    let Ok(loaded) = crate::checkpoint::load(&store, last) else {
        return Ok(()); // training's own resume logic reports or skips a broken checkpoint
    };
    if !loaded.cursor_of_unpartitioned_stream {
        return Ok(());
    }
    let mut aside = run.with_extension("before-partitions");
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = run.with_extension(format!("before-partitions-{n}"));
    }
    std::fs::rename(run, &aside)
        .with_context(|| format!("renaming {} to {}", run.display(), aside.display()))?;
    tracing::warn!(
        "{} was written by an earlier devise whose checkpoints this one cannot resume; kept as {}, starting a new demo run",
        run.display(),
        aside.display()
    );
    Ok(())
}

/// GloVe 6B 50d as `scripts/setup.sh` installs it: `.deps/vectors/` under the current directory
/// (README runs from the repository root), else under the repository this binary was built from.
fn glove_path() -> Result<std::path::PathBuf> {
    let rel = Path::new(".deps/vectors/glove.6B.50d.txt");
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    for candidate in [rel.to_path_buf(), built_from.clone()] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "GloVe vectors not found at {} or {}: run scripts/setup.sh first (or --set text.vectors=PATH)",
        rel.display(),
        built_from.display()
    )
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}
