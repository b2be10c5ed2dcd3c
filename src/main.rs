//! `devise` command line: parse, install signal handlers that set a stop flag, call the library,
//! map the result to an exit code.
//!
//! Exit codes: 0 done; 1 error; 2 usage error; 75 preempted (SIGTERM/SIGUSR1/SIGINT: the current
//! step finished and a checkpoint was written — requeue the job and it resumes).
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use devise::collective::WorkerEnv;
use devise::config::RunConfig;
use devise::plan::Plan;
use devise::train::{Outcome, Resume, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Exit code meaning "preempted, checkpoint saved, requeue me".
const EXIT_PREEMPTED: u8 = 75;

#[derive(Parser)]
#[command(
    name = "devise",
    version,
    about = "DeViSE trainer: CNN + projection into word-vector space, zero-shot evaluation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train all stages of a run configuration, evaluate, write the report.
    Train {
        /// TOML run configuration (configs/*.toml).
        #[arg(long)]
        config: String,
        /// Override a key: --set section.key=value (after DEVISE__SECTION__KEY variables).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
        set: Vec<String>,
        /// auto (latest complete checkpoint, else start), never, or a checkpoint step URL.
        #[arg(long, default_value = "auto")]
        resume: Resume,
        /// Print the resolved plan and exit.
        #[arg(long)]
        dry_run: bool,
        /// Stop as if preempted after this step (checkpoint, exit 75).
        #[arg(long)]
        stop_after_step: Option<u64>,
        /// Word-vector file format: auto, word2vec-binary, word2vec-text, glove, fasttext
        /// (same as --set text.vectors_format=...).
        #[arg(long, value_parser = ["auto", "word2vec-binary", "word2vec-text", "glove", "fasttext"])]
        vectors_format: Option<String>,
    },
    /// The embedded default: generate a shapes dataset, train, evaluate zero-shot, report.
    Demo {
        /// Output directory (data and run).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Override a key of configs/demo.toml.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
        set: Vec<String>,
    },
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// ImageFolder tree (<split>/<wnid>/*.JPEG) -> WebDataset tar shards + manifest.json.
    BuildShards {
        /// Source directory holding <split>/<wnid>/ folders.
        #[arg(long)]
        src: PathBuf,
        /// Destination URL (path or file://).
        #[arg(long)]
        dst: String,
        /// Splits to convert (comma-separated).
        #[arg(long, default_value = "train,val", value_delimiter = ',')]
        splits: Vec<String>,
        /// Only these classes: a file whose first column is the wnid (e.g. a split .tsv).
        #[arg(long)]
        classes: Option<PathBuf>,
        /// Only the first N classes of --classes.
        #[arg(long)]
        limit_classes: Option<usize>,
        /// Target shard size in bytes.
        #[arg(long, default_value_t = 64 << 20)]
        shard_size_bytes: u64,
        /// Seed of the sample shuffle before sharding.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// `--set` values must look like `section.key=value`.
fn parse_set(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() => Ok(s.to_string()),
        _ => Err(format!("'{s}': expected section.key=value")),
    }
}

/// Training commands turn SIGTERM/SIGUSR1/SIGINT into the stop flag (finish the step,
/// checkpoint, exit 75). A repeat within [`REPEAT_WINDOW`] of the first counts as the same event:
/// under SLURM one preemption can reach a worker twice (slurmstepd signals every process of the
/// step, and `devise-launch` forwards the signal it got too). A signal after that window exits at
/// once with 130. Other commands keep the default handlers: they are killed, and write nothing
/// that looks complete (build-shards writes its manifest last).
fn install_stop_handlers(stop: &Arc<AtomicBool>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGUSR1, SIGINT])?;
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("devise-signals".into())
        .spawn(move || {
            let mut first: Option<std::time::Instant> = None;
            for sig in signals.forever() {
                match first {
                    None => {
                        first = Some(std::time::Instant::now());
                        stop.store(true, std::sync::atomic::Ordering::SeqCst);
                        eprintln!("signal {sig}: finishing the current step, then checkpoint and exit 75 (signal again after {} s to exit at once)", REPEAT_WINDOW.as_secs());
                    }
                    Some(t) if t.elapsed() < REPEAT_WINDOW => {}
                    Some(_) => {
                        eprintln!("signal {sig} again: exiting at once (130), no checkpoint");
                        std::process::exit(130);
                    }
                }
            }
        })?;
    Ok(())
}

/// Repeats of a stop signal within this window count as one (see [`install_stop_handlers`]).
const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let stop = Arc::new(AtomicBool::new(false));
    if matches!(cli.command, Command::Train { .. } | Command::Demo { .. }) {
        if let Err(e) = install_stop_handlers(&stop) {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    }
    match run(cli, stop) {
        Ok(Some(Outcome::Preempted { checkpoint })) => {
            if checkpoint.is_empty() {
                eprintln!("preempted: rank 0 wrote the checkpoint; requeue to resume");
            } else {
                eprintln!("preempted: checkpoint {checkpoint} written; requeue to resume");
            }
            ExitCode::from(EXIT_PREEMPTED)
        }
        Ok(Some(Outcome::Completed { report })) => {
            if !report.is_empty() {
                println!("report: {report}"); // rank 0 only: the others write none
            }
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli, stop: Arc<AtomicBool>) -> Result<Option<Outcome>> {
    match cli.command {
        Command::Train {
            config,
            mut set,
            resume,
            dry_run,
            stop_after_step,
            vectors_format,
        } => {
            if let Some(format) = vectors_format {
                set.push(format!("text.vectors_format={format:?}"));
            }
            let cfg = RunConfig::load_file(&config, &set)?;
            // The one place the rank environment is read (see devise_launch::world).
            let env = WorkerEnv::from_env().context("reading the rank environment")?;
            let plan = Plan::build(&cfg, env.rank, env.world_size)?;
            if dry_run {
                println!("world: {env}");
                println!("{}", plan.summary());
                return Ok(None);
            }
            let cuda = match cfg.run.device.as_str() {
                "cuda" => true,
                "cpu" => false,
                _ => tch::Cuda::is_available(),
            };
            let collective = devise::collective::init(&env, &cfg.dist, cuda)?;
            let opts = RunOptions {
                resume,
                stop,
                stop_after_step,
                local_rank: env.local_rank,
            };
            Ok(Some(devise::train::train(
                &cfg,
                &plan,
                &opts,
                collective.as_ref(),
            )?))
        }
        Command::Demo { out, set } => Ok(Some(devise::demo::run(&out, &set, stop)?)),
        Command::Data {
            command:
                DataCommand::BuildShards {
                    src,
                    dst,
                    splits,
                    classes,
                    limit_classes,
                    shard_size_bytes,
                    seed,
                },
        } => {
            let classes = match classes {
                Some(path) => Some(read_class_list(&path, limit_classes)?),
                None => None,
            };
            let opts = devise::data::shards::BuildOptions {
                splits,
                classes,
                shard_size_bytes,
                seed,
                progress: true,
            };
            let manifest = devise::data::shards::build_shards(&src, &dst, &opts)?;
            for (name, split) in &manifest.splits {
                println!(
                    "{name}: {} samples in {} shards",
                    split.samples,
                    split.shards.len()
                );
            }
            println!(
                "manifest: {}/manifest.json ({} classes)",
                dst.trim_end_matches('/'),
                manifest.classes.len()
            );
            Ok(None)
        }
    }
}

/// First column of each non-comment line; the first `limit` of them.
fn read_class_list(path: &PathBuf, limit: Option<usize>) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--classes {}", path.display()))?;
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    if let Some(n) = limit {
        out.truncate(n);
    }
    if out.is_empty() {
        anyhow::bail!("--classes {}: no class ids", path.display());
    }
    Ok(out)
}
