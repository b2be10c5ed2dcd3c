//! The training loop, top to bottom: resume, then
//! `for step in first..=last { next batch; step; apply or skip; cadenced actions }`, then the
//! report. [`train`] holds the whole loop; each concern lives in its own file under `src/train/`:
//!
//! | file | what lives there |
//! |---|---|
//! | `batches.rs` | what each step trains on: the training stream, or the feature cache |
//! | `feature_cache.rs` | the frozen encoder's features, for a `devise` stage with `cache_features` |
//! | `step.rs` | one optimizer step, the ranks' vote, the stage's optimizer, the replicas' upkeep |
//! | `nonfinite.rs` | `train.non_finite`: apply, skip or stop on a NaN or infinity |
//! | `cadence.rs` | when a periodic action is due (every N steps or minutes) |
//! | `metrics.rs` | metrics lines and evaluations in `metrics.jsonl` and the log |
//! | `resume.rs` | where a run starts (`--resume`), and the checkpoints it writes |
//! | `trace.rs` | `train.trace_samples`: which samples each step read |
//! | `fault.rs` | fault injection for tests (`DEVISE_FAULT`) |
//! | `bench.rs` | `devise bench-step`: the step timed alone |
//!
//! Stages follow the paper's recipe (§3.3): `softmax` (encoder + classifier, cross-entropy: the
//! pretraining and the softmax baseline), `devise` (projection only, encoder frozen), `finetune`
//! (encoder + projection). Steps are numbered globally across stages; each stage gets a fresh
//! optimizer. At the end of each stage the model is evaluated (`eval/<stage>.json`) and a
//! checkpoint is written.
//!
//! Exact resume: weights, optimizer state, the data cursor and the step are checkpointed, and all
//! randomness is derived from `(seed, step)` (libtorch generator, re-seeded before each step) and
//! `(seed, data cursor)` (data order and augmentation), so a resumed run continues with the same
//! batches, the same random choices and the same losses as an uninterrupted one. On another
//! world size that divides the run's data partitions and the global batch, every step trains on
//! the same samples; the losses then differ only by the order in which the gradient mean is
//! summed.
//!
//! Each step, after backward and the gradient all-reduce, one small all-reduce carries the loss,
//! every rank's non-finite verdict on its own loss and gradients, and the stop votes (a signal
//! reaching any rank): so every rank applies or skips the update (`train.non_finite`), fails, or
//! stops to checkpoint at the same step. Progress is reported to `devise-launch` by a heartbeat
//! each step and each evaluation batch (`devise_launch::heartbeat`).
mod batches;
pub mod bench;
pub mod cadence;
pub mod command;
pub mod fault;
mod feature_cache;
mod metrics;
mod nonfinite;
pub mod resume;
mod step;
mod trace;

use crate::collective::Collective;
use crate::config::device::select_device;
use crate::config::plan::{Plan, StageKind};
use crate::config::RunConfig;
use crate::eval::{self, Heads};
use crate::model::DeviseModel;
use crate::storage::Store;
use anyhow::{bail, Result};
use batches::Batches;
use cadence::Cadence;
use metrics::{Metrics, Window};
pub use nonfinite::NonFinite;
use nonfinite::NonFinitePolicy;
pub use resume::Resume;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use step::{Replicas, StageOptimizer, Stepper};
use tch::Device;

/// `[train]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Images per optimizer step, all ranks together.
    pub global_batch_size: usize,
    /// Every rank appends the ids of the samples of each step to `run.dir/trace/rank-<R>.jsonl`
    /// (`{"step", "stage", "slots": [global position, ...], "keys": [sample key, ...]}` for image batches, `"rows"` for
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
    /// The `[train.<stage>]` section of `kind`.
    pub fn stage(&self, kind: StageKind) -> &StageConfig {
        match kind {
            StageKind::Softmax => &self.softmax,
            StageKind::Devise => &self.devise,
            StageKind::Finetune => &self.finetune,
        }
    }

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
        for kind in StageKind::ALL {
            let (name, st) = (kind.name(), self.stage(kind));
            if !(st.epochs.is_finite() && st.epochs >= 0.0) {
                bail!("train.{name}.epochs must be >= 0, got {}", st.epochs);
            }
            st.optimizer.validate(&format!("train.{name}.optimizer"))?;
            if st.cache_features && kind != StageKind::Devise {
                bail!("train.{name}.cache_features: only the devise stage (frozen encoder) can cache features");
            }
        }
        Ok(())
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
    /// This process's rank among the workers of its node (picks its GPU: [`crate::config::device::select_device`]).
    pub local_rank: usize,
    /// Workers on this node.
    pub local_world_size: usize,
}

impl RunOptions {
    /// Whether this process was asked to stop after `step` (the stop flag, or
    /// `stop_after_step`).
    pub fn stop_requested(&self, step: u64) -> bool {
        self.stop.load(Ordering::SeqCst) || self.stop_after_step == Some(step)
    }
}

/// Runs (or resumes) training and evaluation to the end of `plan` (its configuration
/// `plan.config`), then writes the report.
///
/// One training per process: libtorch's random generator is process-wide and this function
/// re-seeds it (weights init, every step), so two trainings in one process at the same time
/// would draw from each other's sequence and lose determinism.
pub fn train(plan: &Plan, opts: &RunOptions, collective: &dyn Collective) -> Result<Outcome> {
    let (cfg, started) = (&plan.config, Instant::now());
    let faults = fault::init()?;
    let device = start_device(cfg, opts)?;
    let run = Store::open(&cfg.run.dir)?;
    tch::manual_seed(cfg.run.seed as i64);
    let (classes, embed_dim) = (plan.seen.len() as i64, plan.embed_dim as i64);
    let mut model = DeviseModel::new(&cfg.model, classes, embed_dim, device)?;
    // Rank 0 picks the checkpoint, every rank loads the one it names.
    let resumed = resume::resolve_resume(&run, &opts.resume, collective)?;
    let mut state = resume::start_state(plan, &mut model, resumed.as_ref())?;
    // The stream starts as soon as its cursor is known: its first batches download and decode
    // while the replicas are synchronised and the run's files opened.
    let trace = trace::SampleTrace::open(&run, cfg.train.trace_samples, collective.rank())?;
    let mut batches = Batches::start(plan, state.cursor, collective, device, trace)?;
    let bucket_bytes = cfg.dist.bucket_bytes();
    let mut replicas = Replicas::start(collective, &cfg.to_toml(), &model, bucket_bytes)?;
    let seen_labels = plan.seen_label_embedding().to(device); // [seen, embed_dim]
    let stepper = Stepper::new(&model, collective, seen_labels, &cfg.loss, cfg.run.seed);
    let base_seconds = state.train_seconds; // earlier sessions of this run
    let mut metrics = Metrics::open(&run, state.step, collective.rank() == 0)?;
    let mut evals = metrics::read_evals(&run)?;
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
            StageKind::Softmax,
            0,
        )?;
        metrics.record_eval(result, &mut evals)?;
    }
    announce(plan, opts, state.step);
    let mut optimizers = StageOptimizer::default();
    let mut non_finite =
        NonFinitePolicy::new(cfg.train.non_finite, cfg.train.max_consecutive_skips);
    let mut window = Window::default();
    let mut log_every = Cadence::steps(cfg.train.log_every_steps);
    let mut eval_every = Cadence::steps(cfg.eval.every_steps);
    let mut checkpoint_every = Cadence::steps(cfg.checkpoint.every_steps);
    let mut check_every = Cadence::steps(cfg.dist.check_params_every_steps);

    for step in state.step + 1..=plan.total_steps {
        // The batch.
        let stage = plan.stage_at(step);
        let (opt, reducer) = optimizers.for_stage(
            &model,
            stage,
            resumed.as_ref(),
            step,
            collective,
            cfg.dist.reduce_plan(),
        )?;
        let wait = Instant::now();
        let lr = stage.lr_at(step);
        let input = batches.next(step, stage, &model, &mut state.cursor)?;
        let (data_wait, images) = (wait.elapsed(), input.len());
        faults.hang_if_due(step, collective.rank());
        devise_launch::heartbeat::beat();
        // The step (gradients averaged, BatchNorm statistics from rank 0 where the stage
        // changes them), and the ranks' vote on its loss, its finiteness and stopping.
        let snapshot = non_finite.snapshot(stage.kind, &replicas.buffers);
        let buffers = match stage.kind {
            StageKind::Devise => &mut [][..],
            _ => &mut replicas.buffers[..],
        };
        let want_stop = || opts.stop_requested(step);
        let (votes, comm) =
            stepper.step(opt, reducer, stage.kind, input, step, &want_stop, buffers)?;
        // Apply or skip, on every rank alike.
        let applied =
            non_finite.verdict(&votes, step, stage.kind, snapshot, &mut replicas.buffers)?;
        if applied {
            opt.step(lr);
        } else {
            state.skipped_steps += 1;
        }
        let now = Instant::now();
        if check_every.due(step, now) {
            replicas.check(collective, step, &state.cursor)?;
        }
        state.step = step;
        state.stage = stage.kind;
        state.samples_seen += plan.global_batch_size as u64;
        window.add(
            applied.then_some(votes.mean_loss),
            images,
            data_wait,
            comm,
            wait.elapsed(),
        );
        // Cadenced actions; each also at the end of a stage.
        let stage_end = step == stage.last_step;
        if log_every.due(step, now) || stage_end {
            let stats = batches.stats();
            metrics.log(window.take(step, stage.kind, lr, &stats, collective.world_size()))?;
        }
        if eval_every.due(step, now) || stage_end {
            let heads = Heads::after(stage.kind);
            let result = eval::evaluate(&model, plan, heads, collective, device, stage.kind, step)?;
            metrics.record_eval(result, &mut evals)?;
        }
        if checkpoint_every.due(step, now) || stage_end || votes.stop {
            state.train_seconds = base_seconds + started.elapsed().as_secs_f64();
            let url = resume::save_checkpoint(&run, plan, &model, opt, &state, collective)?;
            if votes.stop {
                tracing::warn!("stopping after step {step}: checkpoint {url}");
                return Ok(Outcome::Preempted { checkpoint: url });
            }
        }
    }

    let report = if collective.rank() == 0 {
        let wall = Duration::from_secs_f64(base_seconds + started.elapsed().as_secs_f64());
        let facts = plan.report_facts()?;
        crate::report::write(&run, &facts, &evals, &metrics.lines, wall, &batches.stats())?
    } else {
        String::new()
    };
    replicas.check_end(collective, plan.total_steps)?;
    collective.barrier()?;
    Ok(Outcome::Completed { report })
}

/// This worker's device ([`select_device`]), with `run.cudnn_benchmark` and `run.threads`
/// applied.
fn start_device(cfg: &RunConfig, opts: &RunOptions) -> Result<Device> {
    let device = select_device(cfg.run.device, opts.local_rank, opts.local_world_size)?;
    if device.is_cuda() && cfg.run.cudnn_benchmark {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    Ok(device)
}

/// Logs the plan, and warns of options that will have no effect or a surprising one.
fn announce(plan: &Plan, opts: &RunOptions, resumed_step: u64) {
    tracing::info!("plan:\n{}", plan.summary());
    if let Some(stop) = opts.stop_after_step.filter(|&s| s <= resumed_step) {
        tracing::warn!(
            "--stop-after-step {stop} is not after the resumed step {resumed_step}: ignored"
        );
    }
    if plan.stages[0].kind != StageKind::Softmax
        && plan.config.train.init_from.is_none()
        && resumed_step == 0
    {
        tracing::warn!(
            "no softmax stage and no train.init_from: the encoder stays randomly initialised"
        );
    }
}
