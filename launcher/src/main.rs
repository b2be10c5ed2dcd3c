//! `devise-launch`: a torchrun-like launcher. One per node; it starts one worker process per
//! GPU with the rank environment `devise_launch::world` reads, relays their output, forwards
//! signals, stops the group when a worker fails and restarts it (`--max-restarts`).
//!
//! Reading order: parse flags -> resolve the world ([`resolve`]: flags, SLURM variables,
//! defaults) -> choose the rendezvous token -> `--dry-run`, or spawn and supervise
//! ([`supervisor`]) -> exit code.
//!
//! Exit codes: 0 every worker exited 0; 75 preempted (the launcher forwarded a signal, or a
//! worker exited 75 on its own, and every worker exited 0 or 75); 1 a worker failed and
//! restarts are exhausted; 2 usage or environment error (bad flags, malformed SLURM
//! variables, worker command not found, unusable `--log-dir`); 130 a second interrupt, more
//! than 5 s after the first, while stopping. `--dry-run` exits with the worker's code.
mod resolve;
mod supervisor;

use clap::Parser;
use devise_launch::signal::{self, PreemptSignal};
use resolve::{Flags, Token};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use supervisor::{Exit, Spec};

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    every worker exited 0
  75   preempted: a signal was forwarded (or a worker exited 75 on its own) and every
       worker exited 0 or 75 (checkpoint written; requeue the job to resume)
  1    a worker failed (non-zero exit or killed by a signal) and --max-restarts is exhausted
  2    usage or environment error: bad flags, malformed SLURM variables, command not found
  130  a second SIGINT/SIGTERM, more than 5 s after the first, while the group was stopping
       (workers SIGKILLed)
  With --dry-run: the worker's own exit code.

Environment read: SLURM_JOB_ID, SLURM_STEP_NUM_NODES / SLURM_JOB_NUM_NODES / SLURM_NNODES,
SLURM_NODEID, SLURM_LOCALID, SLURM_GPUS_ON_NODE and the node list (SLURM_STEP_NODELIST,
SLURM_JOB_NODELIST, SLURM_NODELIST) under SLURM, for the defaults above; CUDA_VISIBLE_DEVICES
(workers per node outside SLURM); DEVISE_RDZV_TOKEN; DEVISE__RUN__PREEMPT_SIGNAL (the preemption
signal without --preempt-signal: usr1, usr2 or term); NCCL_PROXY_DUMP_SIGNAL (warned about when
it names a stop signal). The workers inherit the whole environment.

Workers get RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
MASTER_PORT, DEVISE_RUN_ID, DEVISE_RESTART_ATTEMPT and DEVISE_RDZV_TOKEN (passed through when
set; random per launch on one node; unset on several nodes: export
DEVISE_RDZV_TOKEN=$(openssl rand -hex 16) before srun), and DEVISE__RUN__PREEMPT_SIGNAL with
--preempt-signal.

Signals: the preemption signal (--preempt-signal, SIGUSR1 by default), SIGINT and SIGTERM are
forwarded to the workers, which finish their step, checkpoint and exit 75. Repeats of
SIGINT/SIGTERM within 5 s of the first count as the same stop (under SLURM a preemption sends
the launcher SIGTERM twice); one after 5 s kills the workers (exit 130). The other of
SIGUSR1/SIGUSR2 is relayed to the workers as is. Warns when NCCL_PROXY_DUMP_SIGNAL names a
stop signal (NCCL would take it over). Under SLURM run one launcher per node
(srun --ntasks-per-node=1 devise-launch -- devise train ...); no flags are needed.";

/// `devise-launch [OPTIONS] [--] CMD [ARGS...]`
#[derive(Parser, Debug)]
#[command(
    name = "devise-launch",
    version,
    override_usage = "devise-launch [OPTIONS] [--] CMD [ARGS...]",
    about = "Start one devise worker per GPU on this node (torchrun-like, SLURM-aware)",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// Workers to start on this node, one per GPU [default: SLURM_GPUS_ON_NODE under SLURM,
    /// else the number of CUDA_VISIBLE_DEVICES entries, else 1]
    #[arg(long, value_name = "N")]
    nproc_per_node: Option<usize>,

    /// Nodes in the job, one launcher each [default: SLURM_JOB_NUM_NODES (or SLURM_NNODES)
    /// under SLURM, else 1]
    #[arg(long, value_name = "N")]
    nnodes: Option<usize>,

    /// This node's index, 0..nnodes [default: SLURM_NODEID under SLURM, else 0]
    #[arg(long, value_name = "N")]
    node_rank: Option<usize>,

    /// Host of the rendezvous store, on node rank 0 [default: first host of
    /// SLURM_JOB_NODELIST under SLURM, else 127.0.0.1; required for --nnodes > 1 outside SLURM]
    #[arg(long, value_name = "HOST")]
    master_addr: Option<String>,

    /// TCP port of the rendezvous store [default: 10000 + SLURM_JOB_ID % 20000 under SLURM,
    /// else 29500]
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    master_port: Option<u16>,

    /// Restart the whole local group this many times after a worker fails (never after
    /// success or preemption); workers resume from their latest checkpoint
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_restarts: u32,

    /// Names the run and keys the rendezvous [default: SLURM_JOB_ID under SLURM, else
    /// local-<pid>-<time>; required for --nnodes > 1 outside SLURM]
    #[arg(long, value_name = "ID")]
    run_id: Option<String>,

    /// Also write each worker's output, unprefixed, to DIR/rank-<R>.log (appended across
    /// restarts, a header line per attempt)
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,

    /// Seconds between SIGTERM and SIGKILL when stopping the group after a failure (and the
    /// time the others get after a worker's own preemption exit)
    #[arg(long, value_name = "S", default_value_t = 30)]
    stop_timeout_secs: u64,

    /// A worker that sent no heartbeat for this long counts as failed (hung): the group is
    /// stopped and, with restarts left, restarted. Armed at the worker's first beat (`devise
    /// train` beats every step and evaluation batch); 0 disables it
    #[arg(long, value_name = "S", default_value_t = 600)]
    heartbeat_timeout_secs: u64,

    /// The signal a site sends before it stops the job (usr1: SIGUSR1, usr2: SIGUSR2, term:
    /// SIGTERM only): forwarded to the workers as a preemption (checkpoint, exit 75) and passed
    /// to them as DEVISE__RUN__PREEMPT_SIGNAL, which overrides the config file's
    /// run.preempt_signal (a --set of the worker overrides it in turn) [default:
    /// DEVISE__RUN__PREEMPT_SIGNAL from the environment, else usr1]
    #[arg(long, value_name = "SIGNAL", value_enum)]
    preempt_signal: Option<PreemptSignal>,

    /// Print the resolved world and each local worker's ranks, then run the worker command
    /// once with local worker 0's environment and `--dry-run` appended, and exit with its code.
    /// The worker must accept it: devise train (prints its plan), eval, predict and bench-step
    /// (print the world, the device and what they would run) do. Starts no training
    #[arg(long)]
    dry_run: bool,

    /// The worker command and its arguments, after `--` or simply last (everything from the
    /// first non-option word on belongs to the worker)
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    // clap exits 2 on usage errors, 0 on --help / --version.
    let cli = Cli::parse();
    let flags = Flags {
        nproc_per_node: cli.nproc_per_node,
        nnodes: cli.nnodes,
        node_rank: cli.node_rank,
        master_addr: cli.master_addr.clone(),
        master_port: cli.master_port,
        run_id: cli.run_id.clone(),
    };
    let env = |k: &str| std::env::var(k).ok();
    let preempt = match cli.preempt_signal {
        Some(s) => s,
        None => match PreemptSignal::from_vars(env) {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => return usage_error(e),
        },
    };
    if let Some(warning) = signal::nccl_dump_signal_clash(preempt, env) {
        eprintln!("devise-launch: warning: {warning}");
    }
    let world = match resolve::resolve(&flags, env, local_run_id) {
        Ok(w) => w,
        Err(e) => return usage_error(e),
    };
    let token = match Token::choose(env, world.nnodes.value, random_token) {
        Ok(t) => t,
        Err(e) => return usage_error(e),
    };
    if token == Token::DerivedByWorkers {
        eprintln!(
            "devise-launch: warning: DEVISE_RDZV_TOKEN is not set in a {}-node job: workers \
             derive the rendezvous token from the run id, so anyone who knows it can join; \
             run `export DEVISE_RDZV_TOKEN=$(openssl rand -hex 16)` before srun",
            world.nnodes.value
        );
    }

    if cli.dry_run {
        return dry_run(&cli.command, &world, &token, cli.preempt_signal);
    }

    eprintln!(
        "devise-launch: {} max_restarts={} preempt_signal={}",
        world.summary(),
        cli.max_restarts,
        preempt.key()
    );
    let exit = supervisor::run(&Spec {
        command: &cli.command,
        world: &world,
        token: &token,
        max_restarts: cli.max_restarts,
        stop_timeout: Duration::from_secs(cli.stop_timeout_secs),
        log_dir: cli.log_dir.as_deref(),
        heartbeat_timeout: Duration::from_secs(cli.heartbeat_timeout_secs),
        preempt,
        pass_preempt: cli.preempt_signal.is_some(),
    });
    ExitCode::from(exit.code())
}

fn usage_error(e: anyhow::Error) -> ExitCode {
    eprintln!("devise-launch: error: {e:#}");
    ExitCode::from(Exit::Usage.code())
}

/// Prints the world, then runs the worker command once with `--dry-run` appended and local
/// worker 0's environment (attempt 0, and the preemption signal when `--preempt-signal` was
/// given), inheriting stdio; returns its exit code.
fn dry_run(
    command: &[String],
    world: &resolve::World,
    token: &Token,
    preempt: Option<PreemptSignal>,
) -> ExitCode {
    println!("devise-launch dry run (nothing is trained):");
    for line in world.describe(token) {
        println!("  {line}");
    }
    for local_rank in 0..world.nproc_per_node.value {
        println!(
            "  local worker {local_rank}: RANK={} LOCAL_RANK={local_rank}",
            world.rank_of(local_rank)
        );
    }
    let Some((program, args)) = command.split_first() else {
        return usage_error(anyhow::anyhow!("no worker command given"));
    };
    println!(
        "  running once with local worker 0's environment: {} --dry-run",
        command.join(" ")
    );
    let status = Command::new(program)
        .args(args)
        .arg("--dry-run")
        .envs(world.worker_env(0, 0, token))
        .envs(preempt.map(|s| (signal::ENV, s.key())))
        .status();
    match status {
        Ok(st) => match st.code() {
            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            None => {
                eprintln!("devise-launch: the dry run of {program:?} ended with {st}");
                ExitCode::from(1)
            }
        },
        Err(e) => usage_error(anyhow::anyhow!("cannot start {program:?}: {e}")),
    }
}

/// The run id outside SLURM: unique enough to tell launches apart in logs.
fn local_run_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("local-{}-{secs}", std::process::id())
}

/// 128 random bits as 32 hex digits, from the OS.
fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("cannot read random bytes for DEVISE_RDZV_TOKEN: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
