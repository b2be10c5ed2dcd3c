//! `devise` command line: parse, install the stop handlers of training commands, call the
//! library, map the result to an exit code ([`EXIT_CODES`]). Every command's work is a library
//! function; the one that joins a process group does it through `devise::collective::init`.
use anyhow::Result;
use clap::{Parser, Subcommand};
use devise::config::parse_set;
use devise::train::Outcome;
use devise_launch::signal::{PreemptSignal, WorkerStop};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What each exit code means.
const EXIT_CODES: &str = "\
Exit codes:
  0    done
  1    error (the message names the file, key or variable)
  2    usage error (bad flags)
  75   preempted: SIGTERM, SIGINT or the preemption signal (run.preempt_signal, SIGUSR1 by
       default) arrived, the current step finished and a checkpoint was written; requeue the
       job and it resumes
  130  a second stop signal more than 5 s after the first: exited at once, no checkpoint
";

/// The text every `--help` ends with: exit codes, environment, configuration choices.
fn after_help() -> String {
    let choices = devise::config::choices_help();
    format!(
        "{EXIT_CODES}\n{}\n{choices}",
        devise::config::ENVIRONMENT_HELP
    )
}

#[derive(Parser)]
#[command(name = "devise", version, after_help = after_help(),
    about = "DeViSE trainer: CNN + projection into word-vector space, zero-shot evaluation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train all stages of a run configuration, evaluate, write the report.
    #[command(after_help = after_help())]
    Train(devise::train::command::Args),
    /// The embedded default: generate a shapes dataset, train, evaluate zero-shot, report.
    Demo {
        /// Output directory (data and run).
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Override a key of configs/demo.toml.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_set)]
        set: Vec<String>,
    },
    /// Evaluate a checkpoint (hit@k, and hp@k with eval.hierarchy) on its run's label split or
    /// on any label list; writes <run dir>/eval/<step>[-<labels>]/report.{json,md}.
    #[command(after_help = after_help())]
    Eval(devise::eval::checkpoint::Args),
    /// Zero-shot labelling: rank any label list for images (local paths or object-store URLs)
    /// with a checkpoint's model; print the top-k labels with cosine scores. Images whose file
    /// name holds a candidate wnid (ImageNet naming) are scored: hit@1 and hit@5.
    #[command(after_help = after_help())]
    Predict(devise::eval::predict::Args),
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        command: devise::data::cli::Command,
    },
    /// Benchmark: time the training loop's step on one synthetic batch kept on the device (no
    /// data pipeline); prints one JSON line (bench/gpu.sh, bench/train_step.sh).
    #[command(after_help = after_help())]
    BenchStep(devise::train::bench::Args),
}

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
    let mut signals = None;
    if matches!(cli.command, Command::Train { .. } | Command::Demo { .. }) {
        match WorkerStop::install(&stop) {
            Ok(handlers) => signals = Some(handlers),
            Err(e) => {
                eprintln!("error: cannot install signal handlers: {e}");
                return ExitCode::from(1);
            }
        }
    }
    match run(cli, stop, signals.as_ref()) {
        Ok(Some(Outcome::Preempted { checkpoint })) if checkpoint.is_empty() => {
            eprintln!("preempted: rank 0 wrote the checkpoint; requeue to resume");
            ExitCode::from(75)
        }
        Ok(Some(Outcome::Preempted { checkpoint })) => {
            eprintln!("preempted: checkpoint {checkpoint} written; requeue to resume");
            ExitCode::from(75)
        }
        Ok(Some(Outcome::Completed { report })) => print_report(&report),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Prints the report URL (rank 0 only: the other ranks write none, and return "").
fn print_report(report: &str) -> ExitCode {
    if !report.is_empty() {
        println!("report: {report}");
    }
    ExitCode::SUCCESS
}

/// Runs a command; `signals`: the stop handlers of training commands.
fn run(cli: Cli, stop: Arc<AtomicBool>, signals: Option<&WorkerStop>) -> Result<Option<Outcome>> {
    match cli.command {
        Command::Train(args) => devise::train::command::run_command(&args, stop, signals),
        Command::Demo { out, set } => {
            // The demo's configuration is assembled inside; its preemption signal comes from
            // DEVISE__RUN__PREEMPT_SIGNAL, else the default.
            let preempt = PreemptSignal::from_vars(|k| std::env::var(k).ok())?;
            devise::train::command::catch_preempt(signals, preempt.unwrap_or_default())?;
            Ok(Some(devise::demo::run(&out, &set, stop)?))
        }
        Command::Eval(args) => {
            print_report(&devise::eval::checkpoint::run_command(&args)?);
            Ok(None)
        }
        Command::Predict(args) => devise::eval::predict::run_command(&args).map(|()| None),
        Command::Data { command } => devise::data::cli::run(command).map(|()| None),
        Command::BenchStep(args) => devise::train::bench::run_command(&args).map(|()| None),
    }
}
