//! Crash-safe checkpoints under the run directory:
//!
//! ```text
//! <run dir>/checkpoints/step-000001000/model.safetensors      every model variable, torchvision-style names
//!                                      optimizer.safetensors  the current stage's optimizer state
//!                                      label_embedding.safetensors  the training labels' vectors
//!                                                             (text::label_embedding's format)
//!                                      train_state.json       step, stage, data cursor, samples seen, seed
//!                                      config.toml            the resolved run configuration
//!                                      manifest.json          size + sha256 of each file above (written last)
//! <run dir>/checkpoints/LATEST          "step-000001000" (written after the step is published)
//! ```
//!
//! Publishing: on a local file system the step is written as `step-N.tmp/` and renamed to
//! `step-N/` in one `rename(2)`, so a reader sees all of it or none. On object stores (no rename)
//! the files are written in place and `manifest.json` is written last: a step without a manifest
//! is incomplete. Either way a reader never trusts a step without its manifest and verifies every
//! file's size and sha256 before loading. `LATEST`, written last, is the commit point: it names
//! the step to resume from, verified like any other; when it is missing or broken, the newest step
//! that verifies is used ([`find_latest`]).
//!
//! Failure: any I/O error aborts the save with the error (nothing is swallowed); the previous
//! checkpoints are untouched, and retention deletes old steps only after the new one is published,
//! verified and named by `LATEST`. A kill at any instant of a save leaves the previous checkpoint
//! loadable (tested: the whole group SIGKILLed 10 times at four points of the write, on the local
//! file system and on S3). Only rank 0 writes; every rank loads the step rank 0 chose.
//!
//! `label_embedding.safetensors` is the `[seen, dim]` matrix the hinge loss trained against, with
//! its wnids and provenance; evaluation ranks the training labels with it. Checkpoints written
//! without one still load ([`Loaded::label_embedding`] is then `None`).
//!
//! State: model and optimizer tensors, and `train_state.json`. RNG state is not stored because
//! none is carried: libtorch's generator is re-seeded from `(seed, step)` before every step and the
//! data order and augmentation come from `(seed, epoch, slot)`. The data cursor is one value for
//! all ranks (the global sample order, independent of the world size; ranks take disjoint shares
//! of each global batch), checked equal on every rank every `dist.check_params_every_steps`; so a
//! checkpoint resumes on any world size that divides the global batch.
use crate::data::reader::Cursor;
use crate::storage::tensors::{safetensors_to_tensors, tensors_to_safetensors};
use crate::storage::Store;
use crate::text::label_embedding::{self, LabelEmbeddingMatrix};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use tch::Tensor;

/// `[checkpoint]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Save every this many optimizer steps (0: only at the end of each stage and on preemption).
    #[serde(default)]
    pub every_steps: u64,
    /// Keep the newest this many checkpoints (at least 1). The checkpoint at the end of each
    /// stage is always kept.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Also keep every checkpoint whose step is a multiple of this (0: none).
    #[serde(default)]
    pub keep_every_steps: u64,
}

fn default_keep_last() -> usize {
    3
}

impl Default for Config {
    fn default() -> Self {
        Config {
            every_steps: 0,
            keep_last: default_keep_last(),
            keep_every_steps: 0,
        }
    }
}

impl Config {
    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.keep_last == 0 {
            bail!("checkpoint.keep_last must be at least 1");
        }
        Ok(())
    }
}

/// Everything besides tensors that a resume needs. All randomness is derived, not stored: the
/// libtorch generator is re-seeded from `(seed, step)` before every step, and the data pipeline's
/// order and augmentation come from `(seed, cursor)` (see `data::reader`); so `seed`, `step` and `cursor` are the
/// complete RNG state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed, counted across stages.
    pub step: u64,
    /// The stage that step belongs to (`softmax`, `devise`, `finetune`).
    pub stage: crate::model::StageKind,
    /// Position of the training stream after `step` (shared by all ranks: the global order).
    pub cursor: Cursor,
    /// Training images consumed so far, all ranks together.
    pub samples_seen: u64,
    /// The run's seed.
    pub seed: u64,
    /// World size the checkpoint was written with.
    pub world_size: usize,
    /// `Manifest::fingerprint()` of the training shards: the cursor only means something for
    /// the same shard build, so a resume against rebuilt shards is refused.
    pub shards_fingerprint: String,
    /// What a resume must agree on (see `train::check_resumable`).
    pub resume_key: ResumeKey,
    /// Wall time of training + evaluation so far, all sessions of the run together, seconds.
    #[serde(default)]
    pub train_seconds: f64,
    /// Steps whose update was skipped for a non-finite loss or gradient (`train.non_finite =
    /// "skip"`), all sessions together.
    #[serde(default)]
    pub skipped_steps: u64,
}

/// The parts of the plan that fix what each step computes up to the checkpoint: a resume with a
/// different value would silently train something else, so it is refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResumeKey {
    /// `train.global_batch_size`.
    pub global_batch_size: usize,
    /// `run.seed`.
    pub seed: u64,
    /// Seen labels in training-label order (the classifier rows and the hinge loss's labels).
    pub seen: Vec<String>,
    /// `(stage, first_step, last_step)` of every stage of the plan.
    pub stages: Vec<(String, u64, u64)>,
}

/// A loaded checkpoint.
pub struct Loaded {
    /// Step directory URL it was loaded from.
    pub url: String,
    /// Model variables by name.
    pub model: Vec<(String, Tensor)>,
    /// Optimizer state by name.
    pub optimizer: Vec<(String, Tensor)>,
    /// Train state.
    pub state: TrainState,
    /// The resolved run configuration it was written with (`config.toml`).
    pub config_toml: String,
    /// The training labels' vectors it was trained against (`label_embedding.safetensors`);
    /// `None` for a checkpoint written without one.
    pub label_embedding: Option<LabelEmbeddingMatrix>,
    /// The checkpoint's data cursor was written by a devise whose training stream read every
    /// shard on every rank (`{epoch, position}`): its weights load, but it cannot be resumed
    /// (`state.cursor` is then the default and means nothing).
    pub cursor_of_unpartitioned_stream: bool,
}

impl Loaded {
    /// Dimension of the word space the model projects into: the first dimension of
    /// `projection.weight` (`[embed_dim, feature_dim]`). Errors when the checkpoint has no such
    /// 2-d tensor.
    pub fn embed_dim(&self) -> Result<usize> {
        let (_, w) = self
            .model
            .iter()
            .find(|(name, _)| name == "projection.weight")
            .with_context(|| format!("{}/model.safetensors has no projection.weight", self.url))?;
        match w.size().as_slice() {
            &[dim, _] => Ok(dim as usize),
            other => bail!(
                "{}/model.safetensors: projection.weight has shape {other:?}, expected [embed_dim, feature_dim]",
                self.url
            ),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    step: u64,
    files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    bytes: u64,
    sha256: String,
}

/// `step-000001000` for step 1000.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:09}")
}

fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() == 9 && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse().ok()
    } else {
        None
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Writes checkpoint `step` under `<run>/checkpoints/`, publishes it atomically, updates
/// `LATEST`, then applies retention. Returns the step directory's URL. Only rank 0 calls this.
/// `label_embedding`: the `[seen, dim]` label vectors the model trains against (rows in
/// training-label order).
pub fn save(
    run: &Store,
    cfg: &Config,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    label_embedding: &LabelEmbeddingMatrix,
    state: &TrainState,
    config_toml: &str,
) -> Result<String> {
    let name = step_dir_name(state.step);
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("model.safetensors", tensors_to_safetensors(model)?),
        ("optimizer.safetensors", tensors_to_safetensors(optimizer)?),
        (
            label_embedding::FILE_NAME,
            label_embedding.to_safetensors()?,
        ),
        ("train_state.json", serde_json::to_vec_pretty(state)?),
        ("config.toml", config_toml.as_bytes().to_vec()),
    ];
    let manifest = Manifest {
        step: state.step,
        files: files
            .iter()
            .map(|(n, d)| {
                (
                    n.to_string(),
                    FileEntry {
                        bytes: d.len() as u64,
                        sha256: sha256_hex(d),
                    },
                )
            })
            .collect(),
    };
    files.push(("manifest.json", serde_json::to_vec_pretty(&manifest)?));

    if let Some(root) = run.local_path() {
        // Local file system: write step-N.tmp/, then one atomic rename to step-N/.
        let dir = root.join("checkpoints");
        let tmp = dir.join(format!("{name}.tmp"));
        let fin = dir.join(&name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        for (file, data) in &files {
            let path = tmp.join(file);
            let mut f = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::io::Write::write_all(&mut f, data)
                .with_context(|| format!("writing {}", path.display()))?;
            f.sync_all()
                .with_context(|| format!("syncing {}", path.display()))?;
            write_pause();
        }
        if fin.exists() {
            // Same step written again (e.g. preempted exactly at a stage end): replace it.
            std::fs::remove_dir_all(&fin)
                .with_context(|| format!("replacing {}", fin.display()))?;
        }
        std::fs::rename(&tmp, &fin)
            .with_context(|| format!("publishing {} -> {}", tmp.display(), fin.display()))?;
        // The rename itself is durable only once the directory is synced.
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    } else {
        // Object store: files in place, manifest last (a step without manifest is incomplete).
        // The same step written again (a resume from an older step, explicitly chosen) loses
        // its old manifest first, so old and new files never pass for one complete step.
        let manifest = format!("checkpoints/{name}/manifest.json");
        if run.exists(&manifest)? {
            run.delete(&manifest)?;
        }
        for (file, data) in files {
            run.put(&format!("checkpoints/{name}/{file}"), data.into())?;
            write_pause();
        }
    }
    write_pause();
    verify(run, state.step)
        .with_context(|| format!("verifying freshly written checkpoint {name}"))?;
    run.put("checkpoints/LATEST", format!("{name}\n").into())?;
    write_pause();

    // Only steps up to this one: newer steps are the abandoned future of a run rewound with
    // `--resume URL`; they are overwritten when the run reaches them, never counted as "newest".
    let steps: Vec<u64> = list_steps(run)?
        .into_iter()
        .filter(|&s| s <= state.step)
        .collect();
    let stage_ends: Vec<u64> = state
        .resume_key
        .stages
        .iter()
        .map(|(_, _, last)| *last)
        .collect();
    for old in retention(&steps, cfg.keep_last, cfg.keep_every_steps, &stage_ends) {
        if old == state.step {
            continue;
        }
        delete_step(run, old)?;
    }
    Ok(run.child_url(&format!("checkpoints/{name}")))
}

static WRITE_PAUSE: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// Fault injection for tests that kill a save part-way: from now on [`save`] sleeps `pause` after
/// each file, after publishing and after `LATEST` (`DEVISE_FAULT`'s `checkpoint_pause_ms`).
/// The first call wins; without one, saving never pauses.
pub fn set_write_pause(pause: std::time::Duration) {
    let _ = WRITE_PAUSE.set(pause);
}

fn write_pause() {
    if let Some(d) = WRITE_PAUSE.get() {
        std::thread::sleep(*d);
    }
}

/// Steps that have a directory (complete or not) under `checkpoints/`, ascending. `.tmp` folders
/// are never listed.
pub fn list_steps(run: &Store) -> Result<Vec<u64>> {
    let mut steps: Vec<u64> = run
        .list("checkpoints/")?
        .into_iter()
        .filter_map(|(path, _)| {
            let mut parts = path.split('/');
            let (_, dir) = (parts.next()?, parts.next()?);
            parse_step_dir(dir)
        })
        .collect();
    steps.sort_unstable();
    steps.dedup();
    Ok(steps)
}

/// Which checkpoints to delete (a pure function, unit-tested): everything except the newest
/// `keep_last` steps, the steps that are multiples of `keep_every` (when > 0), and the `kept`
/// steps (the ends of training stages: a finished softmax stage is what `train.init_from`
/// reuses). The newest step is always kept.
pub fn retention(steps: &[u64], keep_last: usize, keep_every: u64, kept: &[u64]) -> Vec<u64> {
    let mut sorted = steps.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let keep_from = sorted.len().saturating_sub(keep_last.max(1));
    sorted
        .iter()
        .enumerate()
        .filter(|&(i, &s)| {
            i < keep_from && !(keep_every > 0 && s % keep_every == 0) && !kept.contains(&s)
        })
        .map(|(_, &s)| s)
        .collect()
}

fn delete_step(run: &Store, step: u64) -> Result<()> {
    let name = step_dir_name(step);
    if let Some(root) = run.local_path() {
        let dir = root.join("checkpoints").join(&name);
        std::fs::remove_dir_all(&dir).with_context(|| format!("deleting {}", dir.display()))
    } else {
        // Manifest first, so a half-deleted step is never mistaken for a complete one.
        run.delete(&format!("checkpoints/{name}/manifest.json"))?;
        for (path, _) in run.list(&format!("checkpoints/{name}/"))? {
            run.delete(&path)?;
        }
        Ok(())
    }
}

/// Checks that step `step` has a manifest and every file matches its size and sha256. Returns
/// the files' bytes by name.
fn verify(run: &Store, step: u64) -> Result<BTreeMap<String, bytes::Bytes>> {
    let name = step_dir_name(step);
    let manifest_bytes = run
        .get(&format!("checkpoints/{name}/manifest.json"))
        .with_context(|| format!("checkpoint {name} has no manifest.json (incomplete)"))?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("checkpoint {name}: manifest.json is not valid"))?;
    if manifest.step != step {
        bail!("checkpoint {name}: manifest says step {}", manifest.step);
    }
    let mut out = BTreeMap::new();
    for (file, entry) in &manifest.files {
        let data = run.get(&format!("checkpoints/{name}/{file}"))?;
        if data.len() as u64 != entry.bytes {
            bail!(
                "checkpoint {name}/{file}: {} bytes, manifest says {}",
                data.len(),
                entry.bytes
            );
        }
        if sha256_hex(&data) != entry.sha256 {
            bail!("checkpoint {name}/{file}: sha256 mismatch (corrupt)");
        }
        out.insert(file.clone(), data);
    }
    for needed in [
        "model.safetensors",
        "optimizer.safetensors",
        "train_state.json",
    ] {
        if !out.contains_key(needed) {
            bail!("checkpoint {name}: manifest lists no {needed}");
        }
    }
    Ok(out)
}

/// The step to resume from, or None: the step `LATEST` names when it verifies (`LATEST` is the
/// commit point: a complete step written after it, by a save killed before updating `LATEST`,
/// is ignored and written again by the resumed run; so are the newer steps of a run rewound
/// with `--resume URL`); when `LATEST` is missing, unreadable or names a broken step, the newest
/// step that verifies, with a warning per broken one.
pub fn find_latest(run: &Store) -> Result<Option<u64>> {
    let mut candidates = list_steps(run)?;
    candidates.reverse();
    if run.exists("checkpoints/LATEST")? {
        let text = run.get("checkpoints/LATEST")?;
        match std::str::from_utf8(&text)
            .ok()
            .and_then(|s| parse_step_dir(s.trim()))
        {
            Some(step) => {
                candidates.retain(|&s| s != step);
                candidates.insert(0, step);
            }
            None => tracing::warn!(
                "{}: LATEST is unreadable; scanning",
                run.child_url("checkpoints/LATEST")
            ),
        }
    }
    for step in candidates {
        match verify(run, step) {
            Ok(_) => return Ok(Some(step)),
            Err(e) => tracing::warn!("skipping checkpoint {}: {e:#}", step_dir_name(step)),
        }
    }
    Ok(None)
}

/// Loads and verifies step `step` of run directory `run`.
pub fn load(run: &Store, step: u64) -> Result<Loaded> {
    let files = verify(run, step)?;
    let url = run.child_url(&format!("checkpoints/{}", step_dir_name(step)));
    let model = safetensors_to_tensors(
        &files["model.safetensors"],
        &format!("{url}/model.safetensors"),
    )?;
    let optimizer = safetensors_to_tensors(
        &files["optimizer.safetensors"],
        &format!("{url}/optimizer.safetensors"),
    )?;
    let mut state: serde_json::Value = serde_json::from_slice(&files["train_state.json"])
        .with_context(|| format!("{url}/train_state.json"))?;
    let cursor_of_unpartitioned_stream = state["cursor"].get("epoch").is_some();
    if cursor_of_unpartitioned_stream {
        state["cursor"] = serde_json::to_value(Cursor::default())?;
    }
    let state: TrainState =
        serde_json::from_value(state).with_context(|| format!("{url}/train_state.json"))?;
    let config_toml = config_text(&files, &url)?;
    let label_embedding = match files.get(label_embedding::FILE_NAME) {
        Some(bytes) => {
            let source = format!("{url}/{}", label_embedding::FILE_NAME);
            let m = LabelEmbeddingMatrix::from_safetensors(bytes, &source)?;
            if m.wnids != state.resume_key.seen {
                bail!("{source}: its labels are not the checkpoint's training labels (train_state.json)");
            }
            Some(m)
        }
        None => None,
    };
    let loaded = Loaded {
        cursor_of_unpartitioned_stream,
        url,
        model,
        optimizer,
        state,
        config_toml,
        label_embedding,
    };
    if let Some(m) = &loaded.label_embedding {
        let dim = loaded.embed_dim()?;
        if m.dim != dim {
            bail!(
                "{}: {} has dimension {}, its projection.weight maps to {dim}",
                loaded.url,
                label_embedding::FILE_NAME,
                m.dim
            );
        }
    }
    Ok(loaded)
}

fn config_text(files: &BTreeMap<String, bytes::Bytes>, url: &str) -> Result<String> {
    let bytes = files
        .get("config.toml")
        .with_context(|| format!("{url}: the manifest lists no config.toml"))?;
    String::from_utf8(bytes.to_vec()).with_context(|| format!("{url}/config.toml is not UTF-8"))
}

/// The run configuration (`config.toml`) of the checkpoint at step directory URL `url`, checked
/// against its manifest, without reading the tensors.
pub fn config_at(url: &str) -> Result<String> {
    let (run, step) = split_step_url(url)?;
    let name = step_dir_name(step);
    let manifest: Manifest = serde_json::from_slice(
        &run.get(&format!("checkpoints/{name}/manifest.json"))
            .with_context(|| format!("{url} has no manifest.json (incomplete)"))?,
    )
    .with_context(|| format!("{url}/manifest.json is not valid"))?;
    let entry = manifest
        .files
        .get("config.toml")
        .with_context(|| format!("{url}: the manifest lists no config.toml"))?;
    let data = run.get(&format!("checkpoints/{name}/config.toml"))?;
    if data.len() as u64 != entry.bytes || sha256_hex(&data) != entry.sha256 {
        bail!("{url}/config.toml does not match its manifest (corrupt)");
    }
    config_text(&BTreeMap::from([("config.toml".to_string(), data)]), url)
}

/// The checkpoint step directory URL that `arg` names: `arg` itself when it is one
/// (`.../checkpoints/step-NNNNNNNNN`), else, `arg` read as a run directory, the checkpoint its
/// `checkpoints/LATEST` names ([`find_latest`]: the newest that verifies when `LATEST` is broken).
/// Errors name `arg`: a run directory without a complete checkpoint, or neither.
pub fn resolve_step_url(arg: &str) -> Result<String> {
    let trimmed = arg.trim_end_matches('/');
    let last = trimmed.rsplit('/').next().unwrap_or(trimmed);
    if parse_step_dir(last).is_some() {
        return Ok(trimmed.to_string());
    }
    let run = Store::open_existing(trimmed).with_context(|| {
        format!("{arg}: neither a checkpoint step directory (.../checkpoints/step-NNNNNNNNN) nor a run directory")
    })?;
    match find_latest(&run)? {
        Some(step) => Ok(run.child_url(&format!("checkpoints/{}", step_dir_name(step)))),
        None => bail!(
            "{arg}: neither a checkpoint step directory (.../checkpoints/step-NNNNNNNNN) nor a run \
             directory holding a complete checkpoint (checkpoints/LATEST)"
        ),
    }
}

/// Loads a checkpoint given its step directory URL (`.../checkpoints/step-000001000`).
pub fn load_url(url: &str) -> Result<Loaded> {
    let (run, step) = split_step_url(url)?;
    load(&run, step)
}

/// `.../<run>/checkpoints/step-N` -> (the run directory's store, N).
pub fn split_step_url(url: &str) -> Result<(Store, u64)> {
    let trimmed = url.trim_end_matches('/');
    let (parent, dir) = trimmed
        .rsplit_once('/')
        .context("checkpoint URL has no '/'")?;
    let step = parse_step_dir(dir)
        .with_context(|| format!("{url}: expected a step directory named step-NNNNNNNNN"))?;
    let run_url = parent
        .strip_suffix("/checkpoints")
        .with_context(|| format!("{url}: expected .../checkpoints/{dir}"))?;
    Ok((Store::open(run_url)?, step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_last_and_every() {
        assert_eq!(
            retention(&[100, 200, 300, 400, 500], 2, 0, &[]),
            vec![100, 200, 300]
        );
        assert_eq!(
            retention(&[100, 200, 300, 400, 500], 2, 200, &[]),
            vec![100, 300]
        );
        assert_eq!(retention(&[500], 1, 0, &[]), Vec::<u64>::new());
        assert_eq!(retention(&[], 3, 0, &[]), Vec::<u64>::new());
        // Stage ends are kept.
        assert_eq!(
            retention(&[100, 200, 300, 400, 500], 2, 0, &[200]),
            vec![100, 300]
        );
        // keep_last 0 still keeps the newest.
        assert_eq!(retention(&[1, 2], 0, 0, &[]), vec![1]);
    }

    #[test]
    fn step_names_round_trip() {
        assert_eq!(step_dir_name(1000), "step-000001000");
        assert_eq!(parse_step_dir("step-000001000"), Some(1000));
        assert_eq!(parse_step_dir("step-000001000.tmp"), None);
        assert_eq!(parse_step_dir("LATEST"), None);
    }

    #[test]
    fn safetensors_round_trip_is_bit_exact() {
        let a = Tensor::randn([3, 4], (tch::Kind::Float, tch::Device::Cpu));
        let b = Tensor::from_slice(&[1i64, -2, 3]);
        let bytes = tensors_to_safetensors(&[
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ])
        .unwrap();
        let back = safetensors_to_tensors(&bytes, "mem").unwrap();
        assert_eq!(back[0].0, "a");
        assert!(back[0].1.equal(&a));
        assert!(back[1].1.equal(&b));
    }
}
