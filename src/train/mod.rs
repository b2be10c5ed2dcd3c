//! The training loop, top to bottom: resume, then
//! `for step in first..=last { train_step(..); log / eval / checkpoint when due }`, then the report.
//!
//! Stages follow the paper's recipe (§3.3): `softmax` (encoder + classifier, cross-entropy: the
//! pretraining and the softmax baseline), `devise` (projection only, encoder frozen), `finetune`
//! (encoder + projection). Steps are numbered globally across stages; each stage gets a fresh
//! optimizer. At the end of each stage the model is evaluated (`eval/<stage>.json`) and a
//! checkpoint is written.
//!
//! Exact resume: weights, optimizer state, the data cursor and the step are checkpointed, and all
//! randomness is derived from `(seed, step)` (libtorch generator, re-seeded before each step) and
//! `(seed, epoch, slot)` (data order and augmentation), so a resumed run continues with the same
//! batches, the same random choices and the same losses as an uninterrupted one. On another
//! world size (the global batch still divisible by it) every step trains on the same samples;
//! the losses then differ only by the order in which the gradient mean is summed.
//!
//! Each step, after backward and the gradient all-reduce, one small all-reduce carries the loss,
//! every rank's non-finite verdict on its own loss and gradients, and the stop votes (a signal
//! reaching any rank): so every rank applies or skips the update (`train.non_finite`), fails, or
//! stops to checkpoint at the same step. Progress is reported to `devise-launch` by a heartbeat
//! each step and each evaluation batch (`devise_launch::heartbeat`).
pub mod bench;
pub mod fault;
use crate::checkpoint::{self, TrainState};
use crate::collective::{ddp, Collective, ReduceOp};
use crate::config::plan::{Plan, StageKind, StagePlan};
use crate::config::{DeviceKind, RunConfig};
use crate::data::reader::TrainStream;
use crate::eval::{self, Heads, StageEval};
use crate::loss;
use crate::model::DeviseModel;
use crate::optim::Optimizer;
use crate::storage::Store;
use crate::text::label_embedding;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// `[train]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Images per optimizer step, all ranks together.
    pub global_batch_size: usize,
    /// Every rank appends the ids of the samples of each step to `run.dir/trace/rank-<R>.jsonl`
    /// (`{"step", "stage", "slots": [[epoch, position], ...]}` for image batches, `"rows"` for
    /// cached features): for tests and debugging of the sample order. Local run dirs only.
    #[serde(default)]
    pub trace_samples: bool,
    /// Write a metrics line (and a log line) every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every_steps: u64,
    /// `[train.softmax]`: classifier pretraining.
    pub softmax: StageConfig,
    /// `[train.devise]`: projection with the encoder frozen.
    pub devise: StageConfig,
    /// `[train.finetune]`: encoder + projection.
    pub finetune: StageConfig,
    /// Checkpoint step URL whose `encoder.*` and `classifier.*` weights initialise a fresh run
    /// (e.g. another run's softmax stage, reused with other word vectors; set
    /// `train.softmax.epochs = 0`). The classifier must have the same seen classes. Ignored when
    /// resuming from this run's own checkpoint.
    #[serde(default)]
    pub init_from: Option<String>,
    /// What every rank does when the loss or a gradient is NaN or infinite on any rank (checked
    /// before the optimizer step, so the weights never see it): `"stop"` (default: every rank
    /// fails with the step, the stage and the ranks in the message; the last checkpoint stays
    /// as it was) or `"skip"` (no rank applies the update; the batch is consumed, the step
    /// counts, the optimizer state and BatchNorm statistics stay as before the step).
    #[serde(default)]
    pub non_finite: NonFinite,
    /// With `non_finite = "skip"`: stop as with `"stop"` after this many skipped steps in a
    /// row (a diverged run does not recover by skipping).
    #[serde(default = "default_max_consecutive_skips")]
    pub max_consecutive_skips: u64,
}

/// `train.non_finite`: the policy for a non-finite loss or gradient on any rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Every rank stops with an error.
    #[default]
    Stop,
    /// Every rank skips the update and goes on.
    Skip,
}

fn default_log_every() -> u64 {
    10
}

fn default_max_consecutive_skips() -> u64 {
    5
}

/// One stage: how long, and with what optimizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Epochs over the seen-class training images (fractions allowed; 0 skips the stage).
    pub epochs: f64,
    /// Optimizer and learning-rate schedule.
    pub optimizer: crate::optim::Config,
    /// `devise` stage only: compute the frozen encoder's features of every training image once
    /// (eval transform, no augmentation) and train the projection on them, instead of decoding
    /// and encoding images every step. Memory: `images x feature_dim x 4` bytes per rank.
    #[serde(default)]
    pub cache_features: bool,
}

impl Config {
    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.global_batch_size == 0 {
            bail!("train.global_batch_size must be > 0");
        }
        if self.log_every_steps == 0 {
            bail!("train.log_every_steps must be > 0");
        }
        if self.max_consecutive_skips == 0 {
            bail!("train.max_consecutive_skips must be > 0");
        }
        for (name, st) in [
            ("softmax", &self.softmax),
            ("devise", &self.devise),
            ("finetune", &self.finetune),
        ] {
            if !(st.epochs.is_finite() && st.epochs >= 0.0) {
                bail!("train.{name}.epochs must be >= 0, got {}", st.epochs);
            }
            st.optimizer.validate(&format!("train.{name}.optimizer"))?;
            if st.cache_features && name != "devise" {
                bail!("train.{name}.cache_features: only the devise stage (frozen encoder) can cache features");
            }
        }
        Ok(())
    }
}

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

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps done, report written.
    Completed {
        /// URL of `report.md`.
        report: String,
    },
    /// Stopped by the stop flag (SIGTERM/SIGUSR1) after checkpointing.
    Preempted {
        /// URL of the checkpoint written.
        checkpoint: String,
    },
}

/// Options that are not configuration: how this process was started.
pub struct RunOptions {
    /// Where to start.
    pub resume: Resume,
    /// Set by a signal handler (or a test): finish the current step, checkpoint, return.
    pub stop: Arc<AtomicBool>,
    /// Stop (as if preempted) after this global step; for tests and debugging.
    pub stop_after_step: Option<u64>,
    /// This process's rank among the workers of its node (picks its GPU: [`select_device`]).
    pub local_rank: usize,
    /// Workers on this node.
    pub local_world_size: usize,
}

/// Runs (or resumes) training and evaluation to the end of the plan, then writes the report.
///
/// One training per process: libtorch's random generator is process-wide and this function
/// re-seeds it (weights init, every step), so two trainings in one process at the same time
/// would draw from each other's sequence and lose determinism.
pub fn train(
    cfg: &RunConfig,
    plan: &Plan,
    opts: &RunOptions,
    collective: &dyn Collective,
) -> Result<Outcome> {
    let started = Instant::now();
    let faults = fault::init()?;
    let device = select_device(cfg.run.device, opts.local_rank, opts.local_world_size)?;
    if device.is_cuda() && cfg.run.cudnn_benchmark {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    let is_rank0 = collective.rank() == 0;
    let run = Store::open(&cfg.run.dir)?;
    tch::manual_seed(cfg.run.seed as i64);
    let mut model = DeviseModel::new(
        &cfg.model,
        plan.seen.len() as i64,
        plan.embed_dim as i64,
        device,
    )?;
    let seen_labels = plan.seen_label_embedding().to(device); // [seen, embed_dim]

    // Resume: rank 0 picks the checkpoint, every rank loads the one it names.
    let resumed = resolve_resume(&run, &opts.resume, collective)?;
    let mut state = match &resumed {
        Some(ck) => {
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
            check_resumable(&ck.state, &resume_key(cfg, plan))
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
            state.resume_key = resume_key(cfg, plan);
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
            fresh_state(cfg, plan)
        }
    };
    // Every rank starts from rank 0's weights and buffers (fresh init or checkpoint alike).
    let bucket_bytes = cfg.dist.bucket_bytes();
    ddp::check_same_setup(collective, &cfg.to_toml(), &model.state_dict())?;
    let mut variables: Vec<Tensor> = model.state_dict().into_iter().map(|(_, t)| t).collect();
    ddp::broadcast_variables(collective, &mut variables, bucket_bytes)?;
    let mut buffers: Vec<Tensor> = variables
        .iter()
        .filter(|t| !t.requires_grad())
        .map(|t| t.shallow_clone())
        .collect();
    let reducer = ddp::GradientBuckets { bucket_bytes };
    let mut trace = SampleTrace::open(&run, cfg.train.trace_samples, collective.rank())?;
    let base_seconds = state.train_seconds; // earlier sessions of this run
    let mut metrics = Metrics::open(&run, state.step, is_rank0)?;
    let mut evals = read_evals(&run)?;
    evals.retain(|e| e.step <= state.step);
    if cfg.train.init_from.is_some() && state.step == 0 && plan.stages[0].kind != StageKind::Softmax
    {
        // The softmax heads came from elsewhere: evaluate them (baseline, ConSE) before training.
        let result = eval::evaluate(
            &model,
            plan,
            Heads::Softmax,
            collective,
            device,
            "softmax",
            0,
        )?;
        record_eval(result, &run, &mut metrics, &mut evals, is_rank0)?;
    }
    tracing::info!("plan:\n{}", plan.summary());
    if let Some(stop) = opts.stop_after_step.filter(|&s| s <= state.step) {
        tracing::warn!(
            "--stop-after-step {stop} is not after the resumed step {}: ignored",
            state.step
        );
    }
    if plan.stages[0].kind != StageKind::Softmax && cfg.train.init_from.is_none() && state.step == 0
    {
        tracing::warn!(
            "no softmax stage and no train.init_from: the encoder stays randomly initialised"
        );
    }

    let mut stream = TrainStream::start(
        &cfg.data,
        &plan.manifest,
        plan.train_label_map.clone(),
        plan.per_rank_batch_size,
        cfg.run.seed,
        state.cursor,
        collective.rank(),
        collective.world_size(),
    )?;
    let mut optimizer: Option<(StageKind, Optimizer)> = None;
    let mut cache: Option<FeatureCache> = None;
    let mut window = Window::default();
    let mut consecutive_skips = 0u64;

    for step in state.step + 1..=plan.total_steps {
        let stage = plan.stage_at(step);
        if optimizer.as_ref().map(|(k, _)| *k) != Some(stage.kind) {
            optimizer = Some((
                stage.kind,
                stage_optimizer(&model, stage, resumed.as_ref(), step)?,
            ));
        }
        let (_, opt) = optimizer.as_mut().expect("set above");

        let wait = Instant::now();
        let lr = stage
            .optimizer
            .lr_at(step - stage.first_step, stage.steps());
        let cached = stage.kind == StageKind::Devise && cfg.train.devise.cache_features;
        let input = if cached {
            if cache.is_none() {
                cache = Some(FeatureCache::compute(&model, plan, collective, device)?);
            }
            let c = cache.as_mut().expect("set above");
            let (input, rows) = c.batch(
                cfg.run.seed,
                step - stage.first_step,
                plan.per_rank_batch_size,
                collective,
            );
            trace.rows(step, stage.kind, &rows)?;
            input
        } else {
            let (batch, cursor) = stream
                .next_batch()
                .with_context(|| format!("step {step}: reading training data"))?;
            state.cursor = cursor;
            trace.slots(step, stage.kind, &batch.slots)?;
            let (images, labels) = eval::batch_tensors(&batch, device);
            Input::Images(images, labels)
        };
        let data_wait = wait.elapsed();
        let batch_images = input.len();
        if faults
            .hang
            .is_some_and(|(s, r)| s == step && r == collective.rank())
        {
            tracing::warn!("{}: hanging at step {step} (injected fault)", fault::ENV);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        devise_launch::heartbeat::beat();
        // BatchNorm statistics before the step, restored if the update is skipped.
        let buffers_before: Option<Vec<Tensor>> = (cfg.train.non_finite == NonFinite::Skip
            && stage.kind != StageKind::Devise)
            .then(|| buffers.iter().map(|b| b.copy()).collect());
        tch::manual_seed(step_seed(cfg.run.seed, step));
        let (local_loss, local_health, mut comm) = train_step(
            &model,
            opt,
            collective,
            &reducer,
            stage.kind,
            input,
            &seen_labels,
            &cfg.loss,
            step,
        )?;
        // One small all-reduce: the global batch's mean loss, the ranks whose loss or gradients
        // are not finite, and whether any rank was asked to stop (a signal may reach only some
        // ranks; all must checkpoint at the same step).
        let comm_started = Instant::now();
        let want_stop = opts.stop.load(Ordering::SeqCst) || opts.stop_after_step == Some(step);
        let votes = StepVotes::all_reduce(collective, local_loss, local_health, want_stop, device)?;
        comm += comm_started.elapsed();
        let skipped = if votes.unhealthy.is_empty() {
            opt.step(lr);
            consecutive_skips = 0;
            false
        } else {
            consecutive_skips += 1;
            let what = format!(
                "step {step} ({}): {}",
                stage.kind.name(),
                votes.describe_unhealthy()
            );
            if cfg.train.non_finite == NonFinite::Stop {
                bail!(
                    "{what}; every rank stops without applying the update (train.non_finite = \
                     \"stop\"; the last checkpoint is intact: lower the learning rate, or set \
                     train.non_finite = \"skip\")"
                );
            }
            if consecutive_skips > cfg.train.max_consecutive_skips {
                bail!(
                    "{what}; {consecutive_skips} steps in a row skipped, more than \
                     train.max_consecutive_skips = {}: every rank stops (the run diverged: lower \
                     the learning rate)",
                    cfg.train.max_consecutive_skips
                );
            }
            tracing::warn!(
                "{what}; every rank skips this update (train.non_finite = \"skip\", \
                 {consecutive_skips} in a row)"
            );
            if let Some(before) = &buffers_before {
                tch::no_grad(|| {
                    for (b, old) in buffers.iter_mut().zip(before) {
                        b.copy_(old);
                    }
                });
            }
            state.skipped_steps += 1;
            true
        };
        if stage.kind != StageKind::Devise && !skipped {
            // BatchNorm running statistics follow rank 0's (PyTorch DDP's broadcast_buffers).
            let started = Instant::now();
            ddp::broadcast_variables(collective, &mut buffers, bucket_bytes)?;
            comm += started.elapsed();
        }
        let loss = votes.mean_loss;
        let every = cfg.dist.check_params_every_steps;
        if every > 0 && step % every == 0 {
            ddp::check_identical(collective, &variables, step)?;
            // Ranks that read a shard differently (one saw a checksum mismatch the others did
            // not) keep the same batch count but walk different slots: their cursors differ.
            let cursor = (state.cursor.epoch << 40) ^ state.cursor.position;
            ddp::check_agree(collective, cursor, &format!("after step {step}: the data cursor"))
                .context("the ranks read the training data differently (a shard that failed its checksum or was truncated on some ranks only?)")?;
        }

        state.step = step;
        state.stage = stage.kind.name().to_string();
        state.samples_seen += plan.global_batch_size as u64;
        window.add(
            (!skipped).then_some(loss),
            batch_images,
            data_wait,
            comm,
            wait.elapsed(),
        );

        if step % cfg.train.log_every_steps == 0 || step == stage.last_step {
            let line = window.take(
                step,
                stage.kind,
                lr,
                &stream.stats(),
                collective.world_size(),
            );
            if is_rank0 {
                tracing::info!("{}", window_line(&line));
            }
            metrics.write(&line)?;
        }
        let stage_end = step == stage.last_step;
        let periodic = cfg.eval.every_steps > 0 && step % cfg.eval.every_steps == 0;
        if stage_end || periodic {
            let heads = if stage.kind == StageKind::Softmax {
                Heads::Softmax
            } else {
                Heads::Devise
            };
            let result = eval::evaluate(
                &model,
                plan,
                heads,
                collective,
                device,
                stage.kind.name(),
                step,
            )?;
            record_eval(result, &run, &mut metrics, &mut evals, is_rank0)?;
        }
        let stopping = votes.stop;
        let due = cfg.checkpoint.every_steps > 0 && step % cfg.checkpoint.every_steps == 0;
        if stage_end || due || stopping {
            state.train_seconds = base_seconds + started.elapsed().as_secs_f64();
            let url = save_checkpoint(&run, cfg, plan, &model, opt, &state, collective)?;
            if stopping {
                tracing::warn!("stopping after step {step}: checkpoint {url}");
                return Ok(Outcome::Preempted { checkpoint: url });
            }
        }
    }

    let report = if is_rank0 {
        crate::report::write(
            &run,
            cfg,
            plan,
            &evals,
            &metrics.lines,
            Duration::from_secs_f64(base_seconds + started.elapsed().as_secs_f64()),
            &stream.stats(),
        )?
    } else {
        String::new()
    };
    if collective.world_size() > 1 {
        ddp::check_identical(collective, &variables, plan.total_steps)?;
        if is_rank0 {
            tracing::info!(
                "parameters identical on all {} ranks at the end (checksum {:016x})",
                collective.world_size(),
                ddp::checksum(&variables)
            );
        }
    }
    collective.barrier()?;
    Ok(Outcome::Completed { report })
}

/// What a step trains on: images `[n, 3, s, s]` with labels `[n]`, or cached frozen-encoder
/// features `[n, feature_dim]` with labels `[n]` (devise stage with `cache_features`).
pub(crate) enum Input {
    Images(Tensor, Tensor),
    Features(Tensor, Tensor),
}

impl Input {
    fn len(&self) -> usize {
        match self {
            Input::Images(_, y) | Input::Features(_, y) => y.size()[0] as usize,
        }
    }
}

fn fresh_state(cfg: &RunConfig, plan: &Plan) -> TrainState {
    TrainState {
        step: 0,
        stage: plan.stages[0].kind.name().to_string(),
        cursor: Default::default(),
        samples_seen: 0,
        seed: cfg.run.seed,
        world_size: plan.world_size,
        shards_fingerprint: plan.manifest.fingerprint(),
        resume_key: resume_key(cfg, plan),
        train_seconds: 0.0,
        skipped_steps: 0,
    }
}

fn resume_key(cfg: &RunConfig, plan: &Plan) -> checkpoint::ResumeKey {
    checkpoint::ResumeKey {
        global_batch_size: plan.global_batch_size,
        seed: cfg.run.seed,
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

/// One optimizer step on one batch; returns the batch's loss (this rank's) and the time spent
/// averaging gradients across ranks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_step(
    model: &DeviseModel,
    opt: &mut Optimizer,
    collective: &dyn Collective,
    reducer: &ddp::GradientBuckets,
    kind: StageKind,
    input: Input,
    seen_labels: &Tensor,
    loss_cfg: &loss::Config,
    step: u64,
) -> Result<(f64, Health, Duration)> {
    opt.zero_grad();
    // The first-violation hinge's random label order: keys for the whole global batch
    // `[batch * world_size, classes]`, this rank keeping rows `rank, rank + world_size, ...` (its
    // samples' rows), so every sample gets the same draw whatever the world size.
    let order_keys = (kind != StageKind::Softmax && loss_cfg.stop_at_first_violation).then(|| {
        let (w, r) = (collective.world_size() as i64, collective.rank() as i64);
        let global = input.len() as i64 * w;
        let classes = seen_labels.size()[0];
        Tensor::rand([global, classes], (tch::Kind::Float, seen_labels.device()))
            .slice(0, r, global, w)
    });
    let order_keys = order_keys.as_ref();
    let loss = match (kind, input) {
        (StageKind::Softmax, Input::Images(images, labels)) => {
            loss::softmax_cross_entropy(&model.logits(&model.features(&images, true)), &labels)
        }
        (StageKind::Devise, Input::Images(images, labels)) => {
            // Frozen encoder: running statistics, no graph through it.
            let features = tch::no_grad(|| model.features(&images, false));
            loss::hinge_rank_loss(
                &model.image_embedding(&features),
                seen_labels,
                &labels,
                loss_cfg,
                order_keys,
            )
        }
        (StageKind::Devise, Input::Features(features, labels)) => loss::hinge_rank_loss(
            &model.image_embedding(&features),
            seen_labels,
            &labels,
            loss_cfg,
            order_keys,
        ),
        (StageKind::Finetune, Input::Images(images, labels)) => {
            let features = model.features(&images, true);
            loss::hinge_rank_loss(
                &model.image_embedding(&features),
                seen_labels,
                &labels,
                loss_cfg,
                order_keys,
            )
        }
        (kind, Input::Features(..)) => {
            bail!("stage {} cannot train on cached features", kind.name())
        }
    };
    let rank = collective.rank();
    let faults = fault::get();
    let loss = if faults.nan_loss == Some((step, rank)) {
        tracing::warn!("{}: NaN loss at step {step} (injected fault)", fault::ENV);
        loss * f64::NAN
    } else {
        loss
    };
    loss.backward();
    let mut grads = opt.grads();
    if faults.inf_grad == Some((step, rank)) {
        tracing::warn!(
            "{}: +inf gradient at step {step} (injected fault)",
            fault::ENV
        );
        tch::no_grad(|| {
            let _ = grads[0].view([-1]).get(0).fill_(f64::INFINITY);
        });
    }
    // Checked on this rank's own gradients, before the all-reduce mixes them: the vote below
    // names the rank where it happened.
    let loss = f64::try_from(&loss)?;
    let health = if !loss.is_finite() {
        Health::NonFiniteLoss
    } else if !all_finite(&grads)? {
        Health::NonFiniteGradients
    } else {
        Health::Finite
    };
    let comm = Instant::now();
    reducer.all_reduce_mean(collective, &mut grads)?;
    Ok((loss, health, comm.elapsed()))
}

/// Whether every element of every tensor is finite (one host sync for all of them): one
/// `aminmax` pass per tensor (NaN propagates to both, an infinity shows in one), then the sum
/// of those extremes in float64 (finite float32 extremes cannot overflow it). 7x cheaper than
/// `isfinite().all()`, which writes and re-reads a bool tensor of every gradient's size
/// (BENCHMARKS.md, training step).
fn all_finite(tensors: &[Tensor]) -> Result<bool> {
    let extremes: Vec<Tensor> = tensors
        .iter()
        .filter(|t| t.numel() > 0)
        .flat_map(|t| {
            let (min, max) = t.aminmax(None::<i64>, false);
            [
                min.to_kind(tch::Kind::Double),
                max.to_kind(tch::Kind::Double),
            ]
        })
        .collect();
    if extremes.is_empty() {
        return Ok(true);
    }
    Ok(f64::try_from(Tensor::stack(&extremes, 0).sum(tch::Kind::Double))?.is_finite())
}

/// One rank's loss and gradients before the all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Finite,
    NonFiniteLoss,
    NonFiniteGradients,
}

/// What the ranks agreed on after a step's backward pass (one all-reduce of `2 + world_size`
/// floats).
pub(crate) struct StepVotes {
    /// Mean of the ranks' losses (finite ones only; NaN when none is).
    pub(crate) mean_loss: f64,
    /// Some rank was asked to stop.
    stop: bool,
    /// `(rank, what)` of every rank whose loss or gradients were not finite.
    pub(crate) unhealthy: Vec<(usize, Health)>,
}

impl StepVotes {
    pub(crate) fn all_reduce(
        collective: &dyn Collective,
        loss: f64,
        health: Health,
        want_stop: bool,
        device: Device,
    ) -> Result<Self> {
        let (w, r) = (collective.world_size(), collective.rank());
        // [sum of finite losses, ranks with a finite loss, stop votes, health code per rank]
        let mut values = vec![0f32; 3 + w];
        if loss.is_finite() {
            values[0] = loss as f32;
            values[1] = 1.0;
        }
        values[2] = f32::from(u8::from(want_stop));
        values[3 + r] = match health {
            Health::Finite => 0.0,
            Health::NonFiniteLoss => 1.0,
            Health::NonFiniteGradients => 2.0,
        };
        if w > 1 {
            let mut t = Tensor::from_slice(&values).to_device(device);
            collective.all_reduce(&mut t, ReduceOp::Sum)?;
            values = Vec::<f32>::try_from(t.to_device(Device::Cpu))?;
        }
        let unhealthy = values[3..]
            .iter()
            .enumerate()
            .filter_map(|(rank, &code)| match code as u8 {
                0 => None,
                1 => Some((rank, Health::NonFiniteLoss)),
                _ => Some((rank, Health::NonFiniteGradients)),
            })
            .collect();
        Ok(StepVotes {
            mean_loss: if values[1] > 0.0 {
                f64::from(values[0]) / f64::from(values[1])
            } else {
                f64::NAN
            },
            stop: values[2] > 0.0,
            unhealthy,
        })
    }

    /// `non-finite loss on rank(s) 1; non-finite gradients (finite loss) on rank(s) 0, 3`.
    fn describe_unhealthy(&self) -> String {
        let ranks = |h: Health| -> Vec<String> {
            self.unhealthy
                .iter()
                .filter(|(_, x)| *x == h)
                .map(|(r, _)| r.to_string())
                .collect()
        };
        let mut parts = Vec::new();
        for (h, what) in [
            (Health::NonFiniteLoss, "non-finite loss (NaN/inf)"),
            (
                Health::NonFiniteGradients,
                "non-finite gradients (finite loss)",
            ),
        ] {
            let r = ranks(h);
            if !r.is_empty() {
                parts.push(format!("{what} on rank(s) {}", r.join(", ")));
            }
        }
        parts.join("; ")
    }
}

/// The optimizer for `stage`: fresh, or with the checkpoint's state when resuming inside the
/// stage the checkpoint was written in.
/// The parameter name prefixes a stage trains.
pub(crate) fn stage_parameters(kind: StageKind) -> &'static [&'static str] {
    match kind {
        StageKind::Softmax => &["encoder.", "classifier."],
        StageKind::Devise => &["projection."],
        StageKind::Finetune => &["encoder.", "projection."],
    }
}

fn stage_optimizer(
    model: &DeviseModel,
    stage: &StagePlan,
    resumed: Option<&checkpoint::Loaded>,
    step: u64,
) -> Result<Optimizer> {
    let mut opt = Optimizer::new(
        &stage.optimizer,
        model.parameters(stage_parameters(stage.kind)),
    );
    if let Some(ck) = resumed {
        if ck.state.step + 1 == step
            && ck.state.stage == stage.kind.name()
            && ck.state.step != stage.last_step
        {
            opt.load_state_dict(&ck.optimizer)
                .with_context(|| format!("optimizer state of {}", ck.url))?;
        }
    }
    Ok(opt)
}

fn save_checkpoint(
    run: &Store,
    cfg: &RunConfig,
    plan: &Plan,
    model: &DeviseModel,
    opt: &Optimizer,
    state: &TrainState,
    collective: &dyn Collective,
) -> Result<String> {
    let url = if collective.rank() == 0 {
        checkpoint::save(
            run,
            &cfg.checkpoint,
            &model.state_dict(),
            &opt.state_dict(),
            &plan.seen_label_matrix(),
            state,
            &cfg.to_toml(),
        )?
    } else {
        String::new()
    };
    collective.barrier()?;
    Ok(url)
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
fn resolve_resume(
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

/// The frozen encoder's features of every training image (eval transform), computed once per
/// process when the devise stage starts (or resumes): the encoder does not change during that
/// stage, so recomputing on resume gives the same cache.
///
/// Each rank encodes its share of the images (`i % world_size == rank` of the split's accepted
/// samples), then the shares are assembled on every rank (one all-reduce of a zero-filled
/// `[n, feature_dim]` matrix: simple, and once per stage), so that the rows, and hence every
/// step's global batch, are the same whatever the world size. Memory: `n x feature_dim x 4`
/// bytes per rank (Tiny ImageNet with the convnet: 77 MB; ImageNet-1k with ResNet-50: 10 GB,
/// then prefer `cache_features = false`).
struct FeatureCache {
    features: Tensor, // [n, feature_dim]
    labels: Tensor,   // [n]
    /// The row order of the current pass over the cache: `(pass, permutation [n])`.
    order: Option<(u64, Tensor)>,
}

impl FeatureCache {
    fn compute(
        model: &DeviseModel,
        plan: &Plan,
        collective: &dyn Collective,
        device: Device,
    ) -> Result<Self> {
        let started = Instant::now();
        let batches = crate::data::reader::eval_batches(
            &plan.data,
            &plan.manifest,
            &plan.data.train_split,
            plan.train_label_map.clone(),
            plan.eval_batch_size,
            collective.rank(),
            collective.world_size(),
        )?;
        // Each batch's features go straight into a preallocated matrix (one row per sample slot
        // of the split; rows of this rank's share filled, others zero): keeping a small tensor
        // per batch alive until the end pinned the heap regions of that batch's freed
        // activations under glibc malloc, and RSS grew by ~17 MiB per batch (BENCHMARKS.md,
        // memory). Labels are stored as label + 1 so rows nobody filled (images that failed to
        // decode, other ranks' rows before the all-reduce) stay 0 and are dropped below.
        let capacity = plan.manifest.split(&plan.data.train_split)?.samples as i64;
        let dim = model.feature_dim;
        let mut all_features = Tensor::zeros([capacity, dim], (tch::Kind::Float, device));
        let mut all_labels = Tensor::zeros([capacity], (tch::Kind::Float, device));
        let mut rows = Vec::new();
        for batch in batches {
            let batch = batch.context("caching features of the training images")?;
            devise_launch::heartbeat::beat();
            let batch_rows: Vec<i64> = batch.slots.iter().map(|c| c.position as i64).collect();
            if let Some(&bad) = batch_rows.iter().find(|&&r| r >= capacity) {
                bail!(
                    "caching features: sample slot {bad} is outside split '{}' ({capacity} samples)",
                    plan.data.train_split
                );
            }
            let (images, y) = eval::batch_tensors(&batch, device);
            let index = Tensor::from_slice(&batch_rows).to(device);
            tch::no_grad(|| {
                let _ = all_features.index_copy_(0, &index, &model.features(&images, false));
                let _ = all_labels.index_copy_(0, &index, &(y + 1).to_kind(tch::Kind::Float));
            });
            rows.extend(batch_rows);
        }
        let [n] = all_reduce_max_rows(collective, &rows, device)?;
        if n == 0 {
            bail!("no training images to cache features of");
        }
        let all_features = all_features.narrow(0, 0, n);
        let mut all_labels = all_labels.narrow(0, 0, n);
        if collective.world_size() > 1 {
            let mut flat = all_features.view([-1]);
            collective.all_reduce(&mut flat, ReduceOp::Sum)?;
            collective.all_reduce(&mut all_labels, ReduceOp::Sum)?;
        }
        let present = all_labels.gt(0.5).nonzero().view([-1]); // [kept]
        let cache = FeatureCache {
            features: all_features.index_select(0, &present),
            labels: (all_labels.index_select(0, &present) - 1.0).to_kind(tch::Kind::Int64),
            order: None,
        };
        tracing::info!(
            "cached frozen-encoder features of {} training images ({:?}) in {:.1} s",
            cache.labels.size()[0],
            cache.features.size(),
            started.elapsed().as_secs_f64()
        );
        Ok(cache)
    }

    /// This rank's part of global batch `stage_step` (0-based within the stage): the global
    /// batch is `per_rank_batch_size * world_size` rows of a per-pass permutation (seeded by
    /// `(seed, pass)`), batches running on across passes, so it depends only on the step (exact
    /// resume needs no cursor) and not on the world size; rank `r` takes its `j % world_size == r`
    /// rows. Returns the input and the row ids.
    fn batch(
        &mut self,
        seed: u64,
        stage_step: u64,
        per_rank_batch_size: usize,
        collective: &dyn Collective,
    ) -> (Input, Vec<i64>) {
        let (w, r) = (collective.world_size() as i64, collective.rank() as i64);
        let global = per_rank_batch_size as u64 * w as u64;
        let n = self.labels.size()[0] as u64;
        let mut parts = Vec::new(); // slices of pass permutations
        let mut position = stage_step * global;
        let end = position + global;
        while position < end {
            let pass = position / n;
            let take = (end - position).min(n - position % n);
            parts.push(
                self.pass_order(seed, pass)
                    .narrow(0, (position % n) as i64, take as i64),
            );
            position += take;
        }
        let index = Tensor::cat(&parts, 0).slice(0, r, global as i64, w); // [per_rank_batch_size]
        let rows = Vec::<i64>::try_from(&index).unwrap_or_default();
        let index = index.to(self.features.device());
        (
            Input::Features(
                self.features.index_select(0, &index),
                self.labels.index_select(0, &index),
            ),
            rows,
        )
    }

    /// The permutation of pass `pass`, drawn once per pass from a generator seeded by
    /// `(seed, pass)` (the loop re-seeds the generator before each step anyway).
    fn pass_order(&mut self, seed: u64, pass: u64) -> Tensor {
        if self.order.as_ref().map(|(p, _)| *p) != Some(pass) {
            let n = self.labels.size()[0];
            tch::manual_seed(step_seed(seed ^ 0xFEA7_CAC4E, pass));
            self.order = Some((
                pass,
                Tensor::randperm(n, (tch::Kind::Int64, tch::Device::Cpu)),
            ));
        }
        self.order.as_ref().expect("set above").1.shallow_clone()
    }
}

/// libtorch generator seed for `step`: a SplitMix64 mix of (seed, step), so every step's random
/// choices are independent of how the run got there.
pub fn step_seed(seed: u64, step: u64) -> i64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// `run.device` as a libtorch device for local worker `local_rank` of `local_world_size`
/// (see [`choose_device`]), on this machine: CUDA as libtorch sees it, and this process's
/// `CUDA_VISIBLE_DEVICES`.
pub fn select_device(
    device: DeviceKind,
    local_rank: usize,
    local_world_size: usize,
) -> Result<Device> {
    let cuda_devices = match device {
        DeviceKind::Cpu => 0,
        DeviceKind::Cuda | DeviceKind::Auto if tch::Cuda::is_available() => {
            tch::Cuda::device_count().max(0) as usize
        }
        DeviceKind::Cuda | DeviceKind::Auto => 0,
    };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    choose_device(
        device,
        local_rank,
        local_world_size,
        visible.as_deref(),
        cuda_devices,
    )
}

/// The device of local worker `local_rank` of `local_world_size` for `run.device` = `device`,
/// given `cuda_visible_devices` (the process's `CUDA_VISIBLE_DEVICES`, `None` when unset) and
/// `cuda_devices` (the GPUs libtorch sees): the CPU for `cpu`, and for `auto` without a GPU;
/// else `cuda:N`, N the worker's position in its visible list
/// ([`devise_launch::world::cuda_ordinal`]: 0 when it sees exactly one GPU).
///
/// Errors, before any work: `cuda` with no GPU visible; more workers on the node than GPUs
/// visible to this one (unless exactly one is visible).
pub fn choose_device(
    device: DeviceKind,
    local_rank: usize,
    local_world_size: usize,
    cuda_visible_devices: Option<&str>,
    cuda_devices: usize,
) -> Result<Device> {
    match device {
        DeviceKind::Cpu => return Ok(Device::Cpu),
        DeviceKind::Auto if cuda_devices == 0 => return Ok(Device::Cpu),
        DeviceKind::Cuda | DeviceKind::Auto => {}
    }
    let ordinal = devise_launch::world::cuda_ordinal(
        local_rank,
        local_world_size,
        cuda_visible_devices,
        cuda_devices,
    )
    .with_context(|| format!("run.device = {}", device_name(device)))?;
    Ok(Device::Cuda(ordinal))
}

/// `cpu`, `cuda`, `auto`: as TOML spells it.
fn device_name(device: DeviceKind) -> &'static str {
    match device {
        DeviceKind::Cpu => "cpu",
        DeviceKind::Cuda => "cuda",
        DeviceKind::Auto => "auto",
    }
}

/// The number of rows of the assembled cache: 1 + the largest row id any rank holds.
fn all_reduce_max_rows(
    collective: &dyn Collective,
    rows: &[i64],
    device: Device,
) -> Result<[i64; 1]> {
    // A sum of per-rank maxima is not a maximum: use one slot per rank.
    let w = collective.world_size();
    let mut per_rank = vec![0f64; w];
    per_rank[collective.rank()] = rows.iter().max().map_or(0.0, |&m| (m + 1) as f64);
    let mut t = Tensor::from_slice(&per_rank)
        .to_kind(tch::Kind::Float)
        .to_device(device);
    if w > 1 {
        collective.all_reduce(&mut t, ReduceOp::Sum)?;
    }
    let v = Vec::<f32>::try_from(t.to_device(Device::Cpu))?;
    Ok([v.iter().fold(0f32, |a, &b| a.max(b)) as i64])
}

/// `train.trace_samples`: this rank's sample ids per step, one JSON line each, appended to
/// `run.dir/trace/rank-<R>.jsonl` (a resumed run appends after the checkpoint's step; lines
/// past it from the interrupted session stay: readers keep the last line per step).
struct SampleTrace {
    file: Option<std::fs::File>,
}

impl SampleTrace {
    fn open(run: &Store, enabled: bool, rank: usize) -> Result<Self> {
        if !enabled {
            return Ok(SampleTrace { file: None });
        }
        let Some(dir) = run.local_path() else {
            bail!(
                "train.trace_samples needs a local run.dir, got {}",
                run.url()
            );
        };
        let dir = dir.join("trace");
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        let path = dir.join(format!("rank-{rank}.jsonl"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| path.display().to_string())?;
        Ok(SampleTrace { file: Some(file) })
    }

    fn write(&mut self, line: serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            use std::io::Write;
            writeln!(f, "{line}").context("writing the sample trace")?;
        }
        Ok(())
    }

    fn slots(
        &mut self,
        step: u64,
        kind: StageKind,
        slots: &[crate::data::reader::Cursor],
    ) -> Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        let ids: Vec<[u64; 2]> = slots.iter().map(|c| [c.epoch, c.position]).collect();
        self.write(serde_json::json!({"step": step, "stage": kind.name(), "slots": ids}))
    }

    fn rows(&mut self, step: u64, kind: StageKind, rows: &[i64]) -> Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        self.write(serde_json::json!({"step": step, "stage": kind.name(), "rows": rows}))
    }
}

/// Running totals between two metric lines.
#[derive(Default)]
struct Window {
    loss_sum: f64,
    steps: u64,
    /// Steps whose update was skipped (non-finite): not in `loss_sum`.
    skipped: u64,
    images: u64,
    data_wait: Duration,
    comm: Duration,
    elapsed: Duration,
}

impl Window {
    /// `loss` None: the step's update was skipped.
    fn add(
        &mut self,
        loss: Option<f64>,
        images: usize,
        data_wait: Duration,
        comm: Duration,
        elapsed: Duration,
    ) {
        self.comm += comm;
        match loss {
            Some(l) => self.loss_sum += l,
            None => self.skipped += 1,
        }
        self.steps += 1;
        self.images += images as u64;
        self.data_wait += data_wait;
        self.elapsed += elapsed;
    }

    fn take(
        &mut self,
        step: u64,
        kind: StageKind,
        lr: f64,
        stats: &crate::data::reader::DataStats,
        world_size: usize,
    ) -> serde_json::Value {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let line = serde_json::json!({
            "step": step,
            "stage": kind.name(),
            // Mean over the window's applied steps (null when every one was skipped).
            "train/loss": self.loss_sum / (self.steps - self.skipped) as f64,
            "train/skipped_steps": self.skipped,
            "train/lr": lr,
            // This rank's images, and all ranks' (every rank's batch is the same size).
            "throughput/images_per_sec": self.images as f64 / secs,
            "throughput/global_images_per_sec": (self.images * world_size as u64) as f64 / secs,
            "time/step_ms": 1000.0 * secs / self.steps.max(1) as f64,
            "time/data_wait_pct": 100.0 * self.data_wait.as_secs_f64() / secs,
            "time/allreduce_pct": 100.0 * self.comm.as_secs_f64() / secs,
            "data/decode_errors": stats.decode_errors,
            "data/shard_errors": stats.shard_errors,
            "data/buffered_mb": stats.buffered_bytes as f64 / 1e6,
            "data/peak_buffered_mb": stats.peak_buffered_bytes as f64 / 1e6,
        });
        let mut line = line;
        for (reason, n) in stats.skipped_by_reason() {
            line[format!("data/skipped_samples/{reason}")] = n.into();
        }
        *self = Window::default();
        line
    }
}

fn window_line(v: &serde_json::Value) -> String {
    format!(
        "step {:>6} {:<8} loss {:.4} lr {:.2e} {:.0} img/s (all ranks) data wait {:.0}% all-reduce {:.0}%",
        v["step"],
        v["stage"].as_str().unwrap_or(""),
        v["train/loss"].as_f64().unwrap_or(f64::NAN),
        v["train/lr"].as_f64().unwrap_or(f64::NAN),
        v["throughput/global_images_per_sec"].as_f64().unwrap_or(0.0),
        v["time/data_wait_pct"].as_f64().unwrap_or(0.0),
        v["time/allreduce_pct"].as_f64().unwrap_or(0.0)
    )
}

fn eval_line(e: &StageEval) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("step".into(), e.step.into());
    m.insert("stage".into(), e.stage.clone().into());
    for (row, hits) in &e.rows {
        for (k, v) in &hits.hit_at_k {
            m.insert(format!("eval/{row}/hit_at_{k}"), (*v).into());
        }
    }
    serde_json::Value::Object(m)
}

fn log_eval(e: &StageEval) {
    for (row, hits) in &e.rows {
        let ks: Vec<String> = hits
            .hit_at_k
            .iter()
            .map(|(k, v)| format!("@{k} {:.3}", v))
            .collect();
        tracing::info!(
            "eval after {} (step {}): {row} ({} images, {} candidates) hit{}",
            e.stage,
            e.step,
            hits.images,
            hits.candidates,
            ks.join(" ")
        );
    }
}

/// `metrics.jsonl` in the run directory: one JSON object per line. On resume, lines past the
/// checkpoint's step are dropped, so the file reads as one uninterrupted run.
struct Metrics<'a> {
    run: &'a Store,
    lines: Vec<serde_json::Value>,
    enabled: bool,
    /// Local run directories append to the file (O(1) per line); object stores rewrite it.
    append: Option<std::fs::File>,
}

impl<'a> Metrics<'a> {
    fn open(run: &'a Store, resumed_step: u64, enabled: bool) -> Result<Self> {
        let mut lines = Vec::new();
        if enabled && run.exists("metrics.jsonl")? {
            let text = run.get("metrics.jsonl")?;
            for (i, line) in String::from_utf8_lossy(&text).lines().enumerate() {
                let v: serde_json::Value = serde_json::from_str(line).with_context(|| {
                    format!("{} line {}", run.child_url("metrics.jsonl"), i + 1)
                })?;
                if v["step"].as_u64().is_some_and(|s| s <= resumed_step) {
                    lines.push(v);
                }
            }
        }
        let mut metrics = Metrics {
            run,
            lines,
            enabled,
            append: None,
        };
        if enabled {
            metrics.rewrite()?;
            if let Some(dir) = run.local_path() {
                let path = dir.join("metrics.jsonl");
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {} for appending", path.display()))?;
                metrics.append = Some(file);
            }
        }
        Ok(metrics)
    }

    fn rewrite(&self) -> Result<()> {
        let mut text = String::new();
        for l in &self.lines {
            text.push_str(&l.to_string());
            text.push('\n');
        }
        self.run.put("metrics.jsonl", text.into_bytes().into())
    }

    fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        self.lines.push(line.clone());
        match &mut self.append {
            Some(file) => {
                use std::io::Write;
                writeln!(file, "{line}").with_context(|| self.run.child_url("metrics.jsonl"))
            }
            None => self.rewrite(),
        }
    }
}

/// Logs an evaluation; rank 0 writes it to `eval/<stage>.json` and `metrics.jsonl`.
fn record_eval(
    result: StageEval,
    run: &Store,
    metrics: &mut Metrics,
    evals: &mut Vec<StageEval>,
    is_rank0: bool,
) -> Result<()> {
    if is_rank0 {
        log_eval(&result);
        run.put(
            &format!("eval/{}.json", result.stage),
            serde_json::to_vec_pretty(&result)?.into(),
        )?;
        metrics.write(&eval_line(&result))?;
    }
    evals.retain(|e| e.stage != result.stage);
    evals.push(result);
    Ok(())
}

fn read_evals(run: &Store) -> Result<Vec<StageEval>> {
    let mut out = Vec::new();
    for kind in [StageKind::Softmax, StageKind::Devise, StageKind::Finetune] {
        let name = format!("eval/{}.json", kind.name());
        if run.exists(&name)? {
            let bytes = run.get(&name)?;
            out.push(serde_json::from_slice(&bytes).with_context(|| run.child_url(&name))?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run.device` with the GPUs a SLURM task sees: a task with one GPU of its own takes
    /// cuda:0 whatever its local rank; a task seeing the node's GPUs takes its local rank's;
    /// more workers than visible GPUs is an error naming `run.device` and the variable.
    #[test]
    fn the_device_follows_the_visible_gpus_not_the_local_rank() {
        let pick = |device, local_rank, local_world_size, visible: Option<&str>, count| {
            choose_device(device, local_rank, local_world_size, visible, count)
                .map_err(|e| format!("{e:#}"))
        };
        assert_eq!(pick(DeviceKind::Cpu, 3, 4, Some("3"), 1), Ok(Device::Cpu));
        assert_eq!(pick(DeviceKind::Auto, 3, 4, None, 0), Ok(Device::Cpu));
        // srun --gpus-per-task=1: task 3 sees only its GPU (physical 3) as cuda:0.
        assert_eq!(
            pick(DeviceKind::Auto, 3, 4, Some("3"), 1),
            Ok(Device::Cuda(0))
        );
        assert_eq!(
            pick(DeviceKind::Cuda, 3, 4, Some("3"), 1),
            Ok(Device::Cuda(0))
        );
        // srun --gres=gpu:4: every task sees the node's four.
        assert_eq!(
            pick(DeviceKind::Cuda, 2, 4, Some("0,1,2,3"), 4),
            Ok(Device::Cuda(2))
        );
        let e = pick(DeviceKind::Cuda, 3, 4, Some("0,1"), 2).unwrap_err();
        assert!(
            e.contains("run.device = cuda") && e.contains("CUDA_VISIBLE_DEVICES=\"0,1\""),
            "{e}"
        );
        let e = pick(DeviceKind::Cuda, 0, 1, None, 0).unwrap_err();
        assert!(
            e.contains("run.device = cuda") && e.contains("no CUDA device"),
            "{e}"
        );
    }

    #[test]
    fn all_finite_sees_any_nan_or_infinity_and_nothing_else() {
        let t = |v: &[f32]| Tensor::from_slice(v);
        let big = f32::MAX;
        // Finite extremes of float32 in many tensors do not overflow the check.
        let finite: Vec<Tensor> = (0..64).map(|_| t(&[big, -big, 1.0])).collect();
        assert!(all_finite(&finite).unwrap());
        assert!(all_finite(&[]).unwrap());
        assert!(all_finite(&[t(&[]), t(&[0.0])]).unwrap());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(
                !all_finite(&[t(&[1.0, 2.0]), t(&[0.5, bad, 3.0])]).unwrap(),
                "{bad}"
            );
        }
        // +inf in one tensor and -inf in another do not cancel.
        assert!(!all_finite(&[t(&[f32::INFINITY]), t(&[f32::NEG_INFINITY])]).unwrap());
        // A 2-d gradient.
        let m = Tensor::zeros([3, 4], (tch::Kind::Float, Device::Cpu));
        let _ = m.get(2).get(1).fill_(f64::NAN);
        assert!(!all_finite(&[m]).unwrap());
    }
}
