//! `devise train`: its flags, and the steps from them to [`super::train`]: load the
//! configuration (`--set`, `--device`, `--vectors-format` layered over the file), let the stop
//! handlers catch the configured preemption signal, read the rank environment, build the plan
//! (`--dry-run` prints it and stops), pick this worker's device, join the process group through
//! [`crate::collective::init`], train.
use super::{select_device, train, Outcome, Resume, RunOptions};
use crate::collective::WorkerEnv;
use crate::config::plan::Plan;
use crate::config::{parse_set, RunConfig, WorkerArgs};
use anyhow::{Context, Result};
use devise_launch::signal::{PreemptSignal, WorkerStop};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// `devise train`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// TOML run configuration (configs/*.toml).
    #[arg(long)]
    pub config: String,
    /// Override a key: --set section.key=value (after DEVISE__SECTION__KEY variables).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
    pub set: Vec<String>,
    /// auto (latest complete checkpoint, else start), never, or a checkpoint step URL.
    #[arg(long, default_value = "auto")]
    pub resume: Resume,
    /// Stop as if preempted after this step (checkpoint, exit 75): for tests.
    #[arg(long, hide = true)]
    pub stop_after_step: Option<u64>,
    /// Word-vector file format (same as --set text.vectors_format=...).
    #[arg(long, value_enum)]
    pub vectors_format: Option<crate::text::Format>,
    /// --device, --dry-run.
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// Runs `devise train` to its [`Outcome`]; `None` after `--dry-run`. `signals`: the process's
/// stop handlers, which learn the preemption signal (`run.preempt_signal`) here; `stop` is the
/// flag they set.
pub fn run_command(
    args: &Args,
    stop: Arc<AtomicBool>,
    signals: Option<&WorkerStop>,
) -> Result<Option<Outcome>> {
    let mut set = args.set.clone();
    if let Some(format) = args.vectors_format {
        set.push(format!("text.vectors_format={:?}", format.name()));
    }
    let cfg = RunConfig::load_file(&args.config, &args.worker.with_device(set))?;
    catch_preempt(signals, cfg.run.preempt_signal)?;
    // The one place the rank environment is read (see devise_launch::world).
    let env = WorkerEnv::from_env().context("reading the rank environment")?;
    let plan = Plan::build(&cfg, env.rank, env.world_size)?;
    if args.worker.dry_run {
        println!("world: {env}");
        println!("{}", plan.summary());
        return Ok(None);
    }
    // Before any work: a worker without a GPU of its own stops here.
    let device = select_device(cfg.run.device, env.local_rank, env.local_world_size)
        .with_context(|| format!("choosing the GPU of {env}"))?;
    tracing::info!(
        "world: {env}; device {device:?}; preemption signal {}",
        cfg.run.preempt_signal.name()
    );
    let collective = crate::collective::init(&env, &cfg.dist, device)?;
    let opts = RunOptions {
        resume: args.resume.clone(),
        stop,
        stop_after_step: args.stop_after_step,
        local_rank: env.local_rank,
        local_world_size: env.local_world_size,
    };
    Ok(Some(train(&plan, &opts, collective.as_ref())?))
}

/// Adds the preemption signal `preempt` to the stop handlers `signals` (when there are any),
/// and logs a warning when `NCCL_PROXY_DUMP_SIGNAL` names a stop signal.
pub fn catch_preempt(signals: Option<&WorkerStop>, preempt: PreemptSignal) -> Result<()> {
    let Some(signals) = signals else {
        return Ok(());
    };
    if let Some(warning) = signals.catch_preempt(preempt, |k| std::env::var(k).ok())? {
        tracing::warn!("{warning}");
    }
    Ok(())
}
