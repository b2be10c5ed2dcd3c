//! Where a run starts, and the checkpoints it leaves: rank 0 picks the checkpoint (`--resume
//! auto | never | URL`), every rank loads it and checks it can continue this plan (same shards,
//! label vectors, batch size, seed and stage layout), or the run starts fresh (from
//! `train.init_from`'s encoder and classifier when set).
use crate::checkpoint::{self, TrainState};
use crate::collective::Collective;
use crate::config::plan::Plan;
use crate::model::DeviseModel;
use crate::optim::Optimizer;
use crate::storage::Store;
use crate::text::label_embedding;
use anyhow::{bail, Context, Result};

/// Where to start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The latest complete checkpoint of the run directory, else a fresh start.
    Auto,
    /// A fresh start; an existing checkpoint in the run directory is an error.
    Never,
    /// This checkpoint step directory URL.
    From(String),
}

impl std::str::FromStr for Resume {
    type Err = String;
    /// `auto`, `never`, or a checkpoint step directory URL (`.../checkpoints/step-NNNNNNNNN`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Resume::Auto),
            "never" => Ok(Resume::Never),
            url if url.trim_end_matches('/').rsplit('/').next().is_some_and(|d| d.starts_with("step-")) => {
                Ok(Resume::From(url.to_string()))
            }
            other => Err(format!(
                "'{other}' is not auto, never, or a checkpoint step URL (.../checkpoints/step-NNNNNNNNN)"
            )),
        }
    }
}

/// The state the loop starts from: the checkpoint's, its weights loaded into `model`, after
/// checking it can continue `plan`; or a fresh one (with `train.init_from`'s weights loaded).
pub(crate) fn start_state(
    plan: &Plan,
    model: &mut DeviseModel,
    resumed: Option<&checkpoint::Loaded>,
) -> Result<TrainState> {
    let cfg = &plan.config;
    Ok(match resumed {
        Some(ck) => {
            if ck.cursor_of_unpartitioned_stream {
                bail!(
                    "{}: its data cursor ({{epoch, position}}) belongs to the earlier training stream in which every rank \
                     read every shard; this devise partitions the shards between ranks and cannot place that cursor. \
                     Start a new run.dir, with train.init_from = \"{}\" to start from its weights",
                    ck.url,
                    ck.url
                );
            }
            check_resume_label_vectors(ck, plan, &cfg.text.vectors)?;
            model
                .load_state_dict(&ck.model)
                .with_context(|| format!("loading {}/model.safetensors", ck.url))?;
            if ck.state.shards_fingerprint != plan.manifest.fingerprint() {
                bail!(
                    "{}: written for a different shard build than {} (its data cursor would point at other samples); \
                     resume with the shards it was trained on, or start a new run.dir",
                    ck.url,
                    cfg.data.shards
                );
            }
            check_resumable(&ck.state, &resume_key(plan))
                .with_context(|| format!("cannot resume from {}", ck.url))?;
            tracing::info!("resumed from {} at step {}", ck.url, ck.state.step);
            if ck.state.world_size != plan.world_size {
                tracing::info!(
                    "the checkpoint was written by {} rank(s), resuming on {}: the global sample \
                     order does not depend on the world size (no sample repeated or skipped); \
                     losses differ from an unchanged world only by float summation order",
                    ck.state.world_size,
                    plan.world_size
                );
            }
            let mut state = ck.state.clone();
            state.resume_key = resume_key(plan);
            state.world_size = plan.world_size;
            state
        }
        None => {
            if let Some(url) = &cfg.train.init_from {
                let init = checkpoint::load_url(url)
                    .with_context(|| format!("train.init_from = {url}"))?;
                let n = model
                    .load_prefixes(&init.model, &["encoder.", "classifier."])
                    .with_context(|| format!("train.init_from = {url}: {url}/model.safetensors"))?;
                tracing::info!("initialised {n} encoder/classifier tensors from {url}");
            }
            fresh_state(plan)
        }
    })
}

fn fresh_state(plan: &Plan) -> TrainState {
    let cfg = &plan.config;
    TrainState {
        step: 0,
        stage: plan.stages[0].kind,
        cursor: Default::default(),
        samples_seen: 0,
        seed: cfg.run.seed,
        world_size: plan.world_size,
        shards_fingerprint: plan.manifest.fingerprint(),
        resume_key: resume_key(plan),
        train_seconds: 0.0,
        skipped_steps: 0,
    }
}

fn resume_key(plan: &Plan) -> checkpoint::ResumeKey {
    checkpoint::ResumeKey {
        global_batch_size: plan.global_batch_size,
        seed: plan.config.run.seed,
        seen: plan.seen.clone(),
        stages: plan
            .stages
            .iter()
            .map(|s| (s.kind.name().to_string(), s.first_step, s.last_step))
            .collect(),
    }
}

/// A checkpoint can be resumed by this plan when everything that determined its steps is the
/// same: batch size, seed, seen labels, and the layout of every stage that had started by the
/// checkpoint's step (the current stage's length sets its LR schedule). Later stages may change
/// (e.g. more devise epochs after a finished softmax stage). Errors name what differs.
pub fn check_resumable(state: &TrainState, now: &checkpoint::ResumeKey) -> Result<()> {
    let was = &state.resume_key;
    if was.global_batch_size != now.global_batch_size {
        bail!(
            "train.global_batch_size was {}, is now {}",
            was.global_batch_size,
            now.global_batch_size
        );
    }
    if was.seed != now.seed {
        bail!("run.seed was {}, is now {}", was.seed, now.seed);
    }
    if was.seen != now.seen {
        bail!("the seen labels differ (labels.split / labels.limit / labels.exclude / text.*): {} then, {} now", was.seen.len(), now.seen.len());
    }
    for stage in was
        .stages
        .iter()
        .filter(|(_, first, _)| *first <= state.step.max(1))
    {
        if !now.stages.contains(stage) {
            let (name, first, last) = stage;
            bail!("stage {name} ran steps {first}..={last} when the checkpoint was written; this configuration plans it differently (train.{name}.epochs?)");
        }
    }
    Ok(())
}

/// A resume keeps training against the label vectors the checkpoint was trained with: the current
/// vector file (`vectors`, read into `plan`) must have the checkpoint's dimension and give the
/// same vectors to its training labels (within [`label_embedding::SAME_VECTOR_TOLERANCE`]),
/// otherwise the resumed steps would silently train toward other targets. Checked on every rank
/// before any weight is loaded; errors name the vector file and the checkpoint. A checkpoint
/// that carries no label vectors is resumed with a warning that this cannot be checked.
fn check_resume_label_vectors(ck: &checkpoint::Loaded, plan: &Plan, vectors: &str) -> Result<()> {
    label_embedding::check_dim(vectors, plan.embed_dim, &ck.url, ck.embed_dim()?)
        .context("cannot resume")?;
    match &ck.label_embedding {
        Some(stored) => {
            let drift = stored.drift(
                |wnid| plan.labels.vector(wnid),
                label_embedding::SAME_VECTOR_TOLERANCE,
            );
            if !drift.is_same() {
                bail!(
                    "cannot resume from {}: the word-vector file {vectors} does not give its \
                     training labels the vectors it was trained with ({}): {}. Resume with the \
                     vector file it was trained with, or start a new run.dir (train.init_from \
                     reuses its encoder and classifier)",
                    ck.url,
                    label_embedding::FILE_NAME,
                    drift.describe()
                );
            }
        }
        None => tracing::warn!(
            "{} carries no {}: cannot check that {vectors} gives its training labels the vectors \
             it was trained with",
            ck.url,
            label_embedding::FILE_NAME
        ),
    }
    Ok(())
}

/// Rank 0 resolves `resume` to a checkpoint URL (or none) and broadcasts it; every rank loads it.
pub(crate) fn resolve_resume(
    run: &Store,
    resume: &Resume,
    collective: &dyn Collective,
) -> Result<Option<checkpoint::Loaded>> {
    let chosen = if collective.rank() == 0 {
        match resume {
            Resume::Auto => match checkpoint::find_latest(run)? {
                Some(step) => run.child_url(&format!("checkpoints/{}", checkpoint::step_dir_name(step))),
                None if !checkpoint::list_steps(run)?.is_empty() || run.exists("checkpoints/LATEST")? => bail!(
                    "{} has checkpoints but none is intact (see the warnings above); \
                     refusing to start over in it: use --resume URL, or a new run.dir with --resume never",
                    run.child_url("checkpoints")
                ),
                None => String::new(),
            },
            Resume::Never => {
                if let Some(step) = checkpoint::find_latest(run)? {
                    bail!(
                        "{} already has checkpoint step {step}; use --resume auto or a new run.dir",
                        run.url()
                    );
                }
                String::new()
            }
            Resume::From(url) => url.clone(),
        }
    } else {
        String::new()
    };
    let chosen = String::from_utf8(collective.broadcast_bytes(chosen.into_bytes())?)?;
    if chosen.is_empty() {
        return Ok(None);
    }
    Ok(Some(checkpoint::load_url(&chosen)?))
}

/// Rank 0 writes the checkpoint of `state` (every rank waits for it); returns its URL on rank 0,
/// an empty string elsewhere.
pub(crate) fn save_checkpoint(
    run: &Store,
    plan: &Plan,
    model: &DeviseModel,
    opt: &Optimizer,
    state: &TrainState,
    collective: &dyn Collective,
) -> Result<String> {
    let url = if collective.rank() == 0 {
        checkpoint::save(
            run,
            &plan.config.checkpoint,
            &model.state_dict(),
            &opt.state_dict(),
            &plan.seen_label_matrix(),
            state,
            &plan.config.to_toml(),
        )?
    } else {
        String::new()
    };
    collective.barrier()?;
    Ok(url)
}
