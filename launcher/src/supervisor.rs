//! The process supervisor: starts this node's workers, relays their output, forwards signals,
//! stops the whole group when one worker fails, restarts it, and turns the outcome into the
//! launcher's exit code.
//!
//! # Processes
//!
//! Each worker is a child in its OWN process group (pgid = its pid), stdin `/dev/null`, stdout
//! and stderr piped. Own group: a terminal's Ctrl-C goes to the foreground group, which holds
//! the launcher but not the workers, so a worker gets SIGINT exactly once, from the launcher
//! (a devise worker exits 130 at once, without checkpointing, on a second signal more than
//! [`REPEAT_WINDOW`] after the first). Every signal the launcher sends goes to the worker's
//! whole group (`killpg`): helpers a worker started (a `sh -c` wrapper's children) are
//! signalled too and SIGKILL leaves nothing behind. When a
//! worker exits, whatever is left in its group is SIGKILLed at once (no orphans; reported). On
//! Linux each worker also gets SIGTERM if the launcher itself dies (`PR_SET_PDEATHSIG`), so a
//! SIGKILLed launcher does not leave workers holding GPUs. Every child is reaped (no zombies)
//! before the launcher exits or restarts.
//!
//! # Output
//!
//! Two threads per worker read its stdout and stderr line by line and write `[rank R] line` to
//! the launcher's stdout and stderr: one write per line, so lines of different workers never
//! mix. A last line without a newline is printed with one; bytes pass as they are (no UTF-8
//! requirement). With `--log-dir`, both streams also go, unprefixed, to `DIR/rank-R.log`,
//! appended across attempts and runs, after one header line per attempt. Write errors (closed
//! terminal, full disk) are ignored and reading goes on, so a worker never blocks on a full
//! pipe. After a group ends, its readers get 2 s to drain; a pipe still held open by a process
//! that escaped the group (setsid) is then abandoned with a warning.
//!
//! # Signals (to the launcher)
//!
//! The preemption signal ([`Spec::preempt`], `--preempt-signal`: `SIGUSR1` by default, or
//! `SIGUSR2`), SIGINT and SIGTERM are forwarded, the same signal, to every worker not yet
//! exited; SIGHUP (terminal closed) is forwarded as SIGTERM. The launcher then waits, without a
//! time limit, for the workers to checkpoint and exit 75 (preempted). The preemption signal is
//! forwarded once per receipt and never kills. The other user signal (`SIGUSR2` when the
//! preemption signal is `SIGUSR1`, and both with `--preempt-signal term`) is relayed to the
//! workers as is and changes nothing else (a worker that does not handle it dies of it, a
//! failure like any other); NCCL's `NCCL_PROXY_DUMP_SIGNAL`, for one, reaches the workers this
//! way.
//!
//! SIGINT / SIGTERM / SIGHUP within [`REPEAT_WINDOW`] (5 s) of the first one are the same stop
//! and are not forwarded again (a preemption under SLURM sends the launcher SIGTERM twice:
//! slurmstepd's and the step abort's); the workers count repeats within the same window as one
//! ([`devise_launch::signal`]). One after that window SIGKILLs every worker, and the launcher
//! exits 130. While the group is stopping on its own (a failure: the workers got the
//! launcher's SIGTERM; a worker's own 75: they got SLURM's signal), a signal is not forwarded,
//! since it would be the workers' second, but it counts: a SIGINT/SIGTERM after the window
//! kills. Any signal to the launcher rules out a restart. Signals are polled every 20 ms: two
//! identical signals within one poll count once.
//!
//! Known limit, SLURM: `slurmstepd` delivers signals to a job step by signalling its whole
//! container (`proctrack_g_signal(step->cont_id, sig)`: with proctrack/cgroup every process of
//! the step), so preemption, time-limit, `scancel --signal` and srun-forwarded signals reach
//! the workers directly AND the launcher, and the launcher's forward is the workers' second
//! signal. The launcher cannot tell (the batch step's `scancel --full` uses killpg, which
//! misses the workers' own groups), so the worker handles it: `devise train` treats a repeat of
//! a stop signal within [`REPEAT_WINDOW`] as the same event (src/main.rs), and only a later one
//! exits at once (130).
//!
//! # Failure
//!
//! A worker fails when it exits non-zero (other than 75) or dies by a signal, unless the
//! launcher caused it (its SIGKILL after the stop timeout; anything after its failure SIGTERM).
//! First failure: a message naming rank, pid and exit code or signal; SIGTERM to every other
//! worker; after `--stop-timeout-secs`, SIGKILL to survivors; reap all. A worker exiting 75
//! with no signal from the launcher (SLURM signalled the workers directly) puts the group in
//! preemption: the others (signalled too) get `--stop-timeout-secs` to follow, survivors are
//! SIGKILLed, and the launcher exits 75 (a survivor it had to kill does not change that). A
//! failure while the group stops after a forwarded signal starts the same timeout, without
//! another SIGTERM (that would be the workers' second signal).
//!
//! # Hangs
//!
//! Each worker gets a heartbeat file ([`devise_launch::heartbeat`]); `devise train` touches it at every
//! step and evaluation batch. A worker whose last beat is older than `--heartbeat-timeout-secs`
//! (default 600; armed at its first beat) is a failure like a crash: a message naming its rank,
//! pid and the age of its last beat, SIGTERM to the whole group (the hung worker included),
//! SIGKILL after `--stop-timeout-secs`, and a restart when restarts are left.
//!
//! # Restarts
//!
//! After a failure, with restarts left (`--max-restarts`), the whole local group is started
//! again with `DEVISE_RESTART_ATTEMPT` incremented (workers resume from their checkpoint
//! themselves). Never after success or preemption, nor when any signal reached the launcher
//! during the attempt or while the failed group was being stopped.
//!
//! # Exit codes ([`Exit::code`])
//!
//! 0 every worker exited 0; 75 preempted (a forwarded signal or a worker's own 75, and every
//! worker exited 0 or 75, or was killed after the preemption timeout); 1 a worker failed and no
//! restart is left (or the group was stopping when it failed); 2 a worker could not be started
//! (command not found) or `--log-dir` is unusable; 130 a second interrupt after the repeat
//! window.
use crate::resolve::{Token, World};
use anyhow::{Context, Result};
use devise_launch::heartbeat::{self, Watch};
use devise_launch::signal::{signal_name, PreemptSignal, REPEAT_WINDOW};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A worker's (and the launcher's) exit code for "preempted: checkpoint written, requeue me".
pub const EXIT_PREEMPTED: i32 = 75;

/// How often signals and worker exits are polled.
const TICK: Duration = Duration::from_millis(20);

/// How long output readers may drain after their group ended.
const READER_GRACE: Duration = Duration::from_secs(2);

/// What to supervise.
pub struct Spec<'a> {
    /// The worker command: program, then arguments. Not empty.
    pub command: &'a [String],
    /// The resolved world (ranks, rendezvous).
    pub world: &'a World,
    /// The rendezvous token, fixed for the launcher's lifetime.
    pub token: &'a Token,
    /// Group restarts allowed after failures.
    pub max_restarts: u32,
    /// Grace between SIGTERM (or a preemption) and SIGKILL.
    pub stop_timeout: Duration,
    /// Where `rank-R.log` files go, if anywhere.
    pub log_dir: Option<&'a Path>,
    /// A worker whose last heartbeat is older than this counts as failed (hung); zero: never.
    /// See [`devise_launch::heartbeat`].
    pub heartbeat_timeout: Duration,
    /// The signal that means "preempted" (module docs, Signals).
    pub preempt: PreemptSignal,
    /// Start the workers with `DEVISE__RUN__PREEMPT_SIGNAL` set to [`Spec::preempt`]
    /// (`--preempt-signal` was given), so their `run.preempt_signal` agrees.
    pub pass_preempt: bool,
}

/// How the launcher ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every worker exited 0.
    Success,
    /// The group stopped for a preemption.
    Preempted,
    /// A worker failed; no restart left.
    Failed,
    /// Usage or environment error (worker command not startable, log dir unusable).
    Usage,
    /// A second interrupt, after the repeat window, killed the group.
    Interrupted,
}

impl Exit {
    /// The process exit code (module docs).
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Preempted => EXIT_PREEMPTED as u8,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Interrupted => 130,
        }
    }
}

/// Runs the group until it succeeds, is preempted or interrupted, or fails with no restart left.
pub fn run(spec: &Spec) -> Exit {
    // Installed before any worker exists: from here on SIGINT/SIGTERM no longer kill the
    // launcher (it would orphan the workers), they are forwarded.
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("devise-launch: cannot install signal handlers: {e}");
            return Exit::Usage;
        }
    };
    if let Some(dir) = spec.log_dir {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("devise-launch: --log-dir {}: {e}", dir.display());
            return Exit::Usage;
        }
    }
    let watch = match Watch::new(spec.heartbeat_timeout) {
        Ok(w) => w,
        Err(e) => {
            eprintln!(
                "devise-launch: cannot create the heartbeat folder under {}: {e}",
                std::env::temp_dir().display()
            );
            return Exit::Usage;
        }
    };
    let mut attempt = 0u32;
    loop {
        match run_attempt(spec, attempt, &mut signals, &watch) {
            Attempt::Succeeded => {
                eprintln!("devise-launch: every worker exited 0");
                return Exit::Success;
            }
            Attempt::Preempted => {
                eprintln!(
                    "devise-launch: preempted; exiting {EXIT_PREEMPTED} (requeue the job to resume)"
                );
                return Exit::Preempted;
            }
            Attempt::SpawnFailed => return Exit::Usage,
            Attempt::Interrupted => return Exit::Interrupted,
            Attempt::Failed { restartable: false } => {
                eprintln!("devise-launch: a worker failed while the group was stopping; exiting 1 (no restart)");
                return Exit::Failed;
            }
            Attempt::Failed { restartable: true } if attempt < spec.max_restarts => {
                if let Some(sig) = signals.pending().next() {
                    eprintln!(
                        "devise-launch: got {} while the failed group was stopping; not restarting",
                        signal_name(sig)
                    );
                    return Exit::Failed;
                }
                attempt += 1;
                eprintln!(
                    "devise-launch: restarting the group (attempt {attempt} of {})",
                    spec.max_restarts
                );
            }
            Attempt::Failed { restartable: true } => {
                eprintln!(
                    "devise-launch: a worker failed and no restart is left (--max-restarts {}); exiting 1",
                    spec.max_restarts
                );
                return Exit::Failed;
            }
        }
    }
}

/// How one attempt (one start of the group) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Succeeded,
    Preempted,
    /// `restartable`: the failure happened while the group was running normally (no forwarded
    /// signal, no preemption).
    Failed {
        restartable: bool,
    },
    SpawnFailed,
    Interrupted,
}

/// Why the group is no longer running normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// The launcher forwarded a signal: wait for the workers, however long they take.
    Forwarded,
    /// A worker failed: the others got SIGTERM.
    Failing,
    /// A worker exited 75 on its own: the others are expected to follow.
    Preempting,
}

/// One started worker.
struct Worker {
    rank: usize,
    /// Also its process group id.
    pid: u32,
    child: Child,
    /// Set once reaped.
    status: Option<ExitStatus>,
    /// The launcher sent its group SIGTERM because another worker failed.
    terminated: bool,
    /// The launcher sent its group SIGKILL.
    killed: bool,
    readers: Vec<JoinHandle<()>>,
    /// Its heartbeat file ([`devise_launch::heartbeat`]).
    heartbeat: PathBuf,
}

fn run_attempt(spec: &Spec, attempt: u32, signals: &mut Signals, watch: &Watch) -> Attempt {
    let mut workers: Vec<Worker> = Vec::new();
    for local_rank in 0..spec.world.nproc_per_node.value {
        match spawn_worker(spec, local_rank, attempt, watch) {
            Ok(w) => workers.push(w),
            Err(e) => {
                eprintln!("devise-launch: error: {e:#}");
                kill_live(&mut workers);
                finish(&mut workers);
                return Attempt::SpawnFailed;
            }
        }
    }

    let timeout = spec.stop_timeout;
    let mut phase = Phase::Running;
    let mut deadline: Option<Instant> = None;
    let mut signalled = false; // a signal reached the launcher
    let mut first_stop: Option<Instant> = None; // the first SIGINT/SIGTERM/SIGHUP
    let mut failed = false; // a worker failed on its own
    let mut preempted = false; // a worker exited 75 on its own or after a forwarded signal
    let mut heartbeats_checked = Instant::now();
    loop {
        for sig in signals.pending() {
            let stop = matches!(sig, SIGINT | SIGTERM | SIGHUP);
            let preemption = sig == spec.preempt.number();
            if stop {
                if let Some(first) = first_stop {
                    let after = first.elapsed();
                    if after < REPEAT_WINDOW {
                        eprintln!(
                            "devise-launch: got {} again {:.1}s after the first stop signal: \
                             the same stop (repeats within {}s count once), not forwarded",
                            signal_name(sig),
                            after.as_secs_f64(),
                            REPEAT_WINDOW.as_secs()
                        );
                        continue;
                    }
                    eprintln!(
                        "devise-launch: got {} again while the group is stopping: killing every worker",
                        signal_name(sig)
                    );
                    kill_live(&mut workers);
                    finish(&mut workers);
                    return Attempt::Interrupted;
                }
                first_stop = Some(Instant::now());
            }
            signalled = true;
            let stopping_on_its_own = matches!(phase, Phase::Failing | Phase::Preempting);
            if stopping_on_its_own {
                // The workers already have a stop signal (ours after a failure, or their own
                // preemption): the launcher's would be their second one (exit 130 at once).
                eprintln!(
                    "devise-launch: got {} while the group is already stopping; not forwarded \
                     (it would be the workers' second signal); SIGINT/SIGTERM again after {}s \
                     kills them",
                    signal_name(sig),
                    REPEAT_WINDOW.as_secs()
                );
                continue;
            }
            let fwd = if sig == SIGHUP { SIGTERM } else { sig };
            let mut n = 0;
            for w in workers.iter().filter(|w| w.status.is_none()) {
                n += usize::from(signal_group(w.pid, fwd));
            }
            if !stop && !preemption {
                eprintln!(
                    "devise-launch: got {}: relayed to {n} worker(s) as is (the preemption \
                     signal is {})",
                    signal_name(sig),
                    spec.preempt.name()
                );
                continue;
            }
            phase = Phase::Forwarded;
            eprintln!(
                "devise-launch: got {}: forwarded {} to {n} worker(s); waiting for them to \
                 checkpoint and exit (SIGINT/SIGTERM again after {}s kills them)",
                signal_name(sig),
                signal_name(fwd),
                REPEAT_WINDOW.as_secs()
            );
        }

        let now = Instant::now();
        for i in 0..workers.len() {
            if workers[i].status.is_some() {
                continue;
            }
            let status = match workers[i].child.try_wait() {
                Ok(Some(st)) => st,
                Ok(None) => continue,
                Err(e) => {
                    // Cannot happen for our own unreaped child; count it as a failure.
                    eprintln!(
                        "devise-launch: cannot wait for rank {}: {e}",
                        workers[i].rank
                    );
                    ExitStatus::from_raw(1 << 8)
                }
            };
            reaped(&mut workers[i], status);
            let w = &workers[i];
            let (rank, pid, how) = (w.rank, w.pid, describe(status));
            let others = workers.iter().filter(|o| o.status.is_none()).count();
            match status.code() {
                Some(0) => {}
                Some(EXIT_PREEMPTED) if w.terminated => {}
                Some(EXIT_PREEMPTED) => {
                    preempted = true;
                    if phase == Phase::Running {
                        phase = Phase::Preempting;
                        deadline = Some(now + timeout);
                        eprintln!(
                            "devise-launch: rank {rank} (pid {pid}) exited {EXIT_PREEMPTED} \
                             (preempted) without a signal from devise-launch; waiting up to {}s \
                             for the other {others} worker(s)",
                            timeout.as_secs()
                        );
                    }
                }
                _ if w.killed => {}
                _ if w.terminated => {
                    eprintln!(
                        "devise-launch: rank {rank} (pid {pid}) {how} (stopped by devise-launch)"
                    );
                }
                _ if phase == Phase::Running => {
                    failed = true;
                    eprintln!(
                        "devise-launch: rank {rank} (pid {pid}) {how}; stopping the other {others} worker(s)"
                    );
                    for o in workers.iter_mut().filter(|o| o.status.is_none()) {
                        signal_group(o.pid, SIGTERM);
                        o.terminated = true;
                    }
                    phase = Phase::Failing;
                    deadline = Some(now + timeout);
                }
                _ => {
                    failed = true;
                    eprintln!(
                        "devise-launch: rank {rank} (pid {pid}) {how} while the group was stopping"
                    );
                    deadline.get_or_insert(now + timeout);
                }
            }
        }

        // A hung worker (no heartbeat within the timeout) fails the group like a crashed one.
        if phase == Phase::Running && now - heartbeats_checked >= Duration::from_secs(1) {
            heartbeats_checked = now;
            let running = || workers.iter().filter(|w| w.status.is_none());
            let any_stale = running().any(|w| watch.stale(&w.heartbeat).is_some());
            // Name every worker whose last beat is as old as the stale one's within the beats'
            // resolution (heartbeat::MIN_INTERVAL): a rank blocked in a collective by a hung peer
            // can look older than that peer by up to that much.
            let cutoff = watch.timeout().saturating_sub(heartbeat::MIN_INTERVAL);
            let hung: Vec<(usize, u32, Duration)> = running()
                .filter_map(|w| Some((w.rank, w.pid, watch.age(&w.heartbeat)?)))
                .filter(|&(_, _, age)| any_stale && age > cutoff)
                .collect();
            if !hung.is_empty() {
                failed = true;
                let names: Vec<String> = hung
                    .iter()
                    .map(|(rank, pid, age)| {
                        format!("rank {rank} (pid {pid}, last beat {}s ago)", age.as_secs())
                    })
                    .collect();
                eprintln!(
                    "devise-launch: no heartbeat for more than {}s from {} (hung?); stopping \
                     the group",
                    watch.timeout().as_secs(),
                    names.join(", ")
                );
                for o in workers.iter_mut().filter(|o| o.status.is_none()) {
                    signal_group(o.pid, SIGTERM);
                    o.terminated = true;
                }
                phase = Phase::Failing;
                deadline = Some(now + timeout);
            }
        }

        if let Some(d) = deadline {
            if now >= d {
                deadline = None;
                let live: Vec<String> = workers
                    .iter()
                    .filter(|w| w.status.is_none())
                    .map(|w| format!("{} (pid {})", w.rank, w.pid))
                    .collect();
                if !live.is_empty() {
                    let after = match phase {
                        Phase::Failing => "SIGTERM",
                        Phase::Preempting => "the preemption",
                        _ => "the failure",
                    };
                    eprintln!(
                        "devise-launch: rank(s) {} still running {}s after {after}; sending SIGKILL",
                        live.join(", "),
                        timeout.as_secs()
                    );
                    kill_live(&mut workers);
                }
            }
        }

        if workers.iter().all(|w| w.status.is_some()) {
            break;
        }
        std::thread::sleep(TICK);
    }
    finish(&mut workers);

    if failed {
        Attempt::Failed {
            restartable: !signalled && !preempted,
        }
    } else if workers
        .iter()
        .all(|w| w.status.and_then(|s| s.code()) == Some(0))
    {
        Attempt::Succeeded
    } else {
        // Every worker exited 0 or 75, or was SIGKILLed after the preemption timeout.
        Attempt::Preempted
    }
}

/// Starts local worker `local_rank` in its own process group, with its readers.
fn spawn_worker(spec: &Spec, local_rank: usize, attempt: u32, watch: &Watch) -> Result<Worker> {
    let rank = spec.world.rank_of(local_rank);
    let heartbeat = watch
        .arm(rank)
        .with_context(|| format!("cannot create rank {rank}'s heartbeat file"))?;
    let (program, args) = spec
        .command
        .split_first()
        .context("no worker command given")?;
    let log = match spec.log_dir {
        Some(dir) => {
            let path = dir.join(format!("rank-{rank}.log"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("--log-dir: cannot open {}", path.display()))?;
            Some(Arc::new(Mutex::new(file)))
        }
        None => None,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(spec.world.worker_env(local_rank, attempt, spec.token))
        .env(heartbeat::ENV, &heartbeat)
        .envs(
            spec.pass_preempt
                .then_some((devise_launch::signal::ENV, spec.preempt.key())),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    die_with_launcher(&mut cmd);
    let child = cmd.spawn().map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::NotFound {
            " (not found: is it on PATH?)"
        } else {
            ""
        };
        anyhow::anyhow!("cannot start rank {rank}: {program:?}: {e}{hint}")
    })?;
    let pid = child.id();
    if let Some(log) = &log {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Ok(mut f) = log.lock() {
            let _ = writeln!(
                f,
                "==== devise-launch: run {} attempt {attempt} rank {rank} pid {pid} started at unix time {secs} ====",
                spec.world.run_id.value
            );
        }
    }
    let mut worker = Worker {
        rank,
        pid,
        child,
        status: None,
        terminated: false,
        killed: false,
        readers: Vec::new(),
        heartbeat,
    };
    let prefix = format!("[rank {rank}] ");
    let (stdout, stderr) = (worker.child.stdout.take(), worker.child.stderr.take());
    let started = (|| -> Result<()> {
        if let Some(pipe) = stdout {
            worker
                .readers
                .push(relay(pipe, prefix.clone(), false, log.clone())?);
        }
        if let Some(pipe) = stderr {
            worker.readers.push(relay(pipe, prefix, true, log)?);
        }
        Ok(())
    })();
    if let Err(e) = started {
        let mut one = vec![worker];
        kill_live(&mut one);
        finish(&mut one);
        return Err(e).context(format!("cannot start an output thread for rank {rank}"));
    }
    Ok(worker)
}

/// Linux: the worker gets SIGTERM when the launcher dies (even by SIGKILL).
#[cfg(target_os = "linux")]
fn die_with_launcher(cmd: &mut Command) {
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The launcher died between fork and prctl: nobody would ever signal us.
            if libc::getppid() != launcher {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_cmd: &mut Command) {}

/// Starts a thread relaying `pipe` line by line to the launcher's stdout (or stderr) with
/// `prefix`, and unprefixed to `log`.
fn relay(
    pipe: impl Read + Send + 'static,
    prefix: String,
    to_stderr: bool,
    log: Option<Arc<Mutex<File>>>,
) -> Result<JoinHandle<()>> {
    let name = format!("{}{}", prefix.trim(), if to_stderr { "err" } else { "out" });
    let handle = std::thread::Builder::new().name(name).spawn(move || {
        relay_lines(pipe, |line| {
            let mut out = Vec::with_capacity(prefix.len() + line.len());
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(line);
            // One write_all under the lock: a line is never split by another worker's.
            let _ = if to_stderr {
                io::stderr().lock().write_all(&out)
            } else {
                io::stdout().lock().write_all(&out)
            };
            if let Some(log) = &log {
                if let Ok(mut f) = log.lock() {
                    let _ = f.write_all(line);
                }
            }
        })
    })?;
    Ok(handle)
}

/// Calls `emit` with each line of `pipe`, newline included (added to a last partial line).
/// Stops at end of file or a read error.
fn relay_lines(pipe: impl Read, mut emit: impl FnMut(&[u8])) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        emit(&line);
    }
}

/// Records a worker's exit and SIGKILLs whatever it left in its process group.
fn reaped(w: &mut Worker, status: ExitStatus) {
    w.status = Some(status);
    // Right after the reap: the group id is still in use if anything is left in it, so it
    // cannot name someone else's group.
    if signal_group(w.pid, libc::SIGKILL) {
        eprintln!(
            "devise-launch: rank {} (pid {}) left processes in its process group; killed them",
            w.rank, w.pid
        );
    }
}

/// SIGKILLs the group of every worker not yet reaped.
fn kill_live(workers: &mut [Worker]) {
    for w in workers.iter_mut().filter(|w| w.status.is_none()) {
        signal_group(w.pid, libc::SIGKILL);
        w.killed = true;
    }
}

/// Reaps every worker (blocking: call after SIGKILL or once all exited) and lets the output
/// readers drain for up to [`READER_GRACE`].
fn finish(workers: &mut [Worker]) {
    for w in workers.iter_mut().filter(|w| w.status.is_none()) {
        let status = w
            .child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(1 << 8));
        reaped(w, status);
    }
    let until = Instant::now() + READER_GRACE;
    for w in workers.iter_mut() {
        while w.readers.iter().any(|r| !r.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if w.readers.iter().any(|r| !r.is_finished()) {
            eprintln!(
                "devise-launch: output of rank {} is still held open by a process outside its group; not waiting for it",
                w.rank
            );
        }
        for r in std::mem::take(&mut w.readers) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }
}

/// Sends `sig` to process group `pgid`; true when at least one process got it.
fn signal_group(pgid: u32, sig: i32) -> bool {
    match libc::pid_t::try_from(pgid) {
        // 0 and 1 would mean our own group and init's: never a worker's.
        // SAFETY: killpg has no memory-safety preconditions.
        Ok(pgid) if pgid > 1 => unsafe { libc::killpg(pgid, sig) == 0 },
        _ => false,
    }
}

/// "exited with code 3", "was killed by SIGKILL".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!(
            "was killed by {}{}",
            signal_name(sig),
            if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        ),
        _ => format!("ended ({status})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_order_and_partial_last_line_gets_a_newline() {
        let mut got = Vec::new();
        relay_lines(&b"a\n\nb\xff\nlast"[..], |l| got.push(l.to_vec()));
        assert_eq!(
            got,
            vec![
                b"a\n".to_vec(),
                b"\n".to_vec(),
                b"b\xff\n".to_vec(),
                b"last\n".to_vec()
            ]
        );
        let mut n = 0;
        relay_lines(&b""[..], |_| n += 1);
        assert_eq!(n, 0);
    }

    #[test]
    fn statuses_and_signals_are_named() {
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exited with code 3");
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL)),
            "was killed by SIGKILL"
        );
        assert_eq!(signal_name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(signal_name(77), "signal 77");
        assert_eq!(
            [
                Exit::Success,
                Exit::Preempted,
                Exit::Failed,
                Exit::Usage,
                Exit::Interrupted
            ]
            .map(Exit::code),
            [0, 75, 1, 2, 130]
        );
    }

    #[test]
    fn signal_group_refuses_our_own_and_inits_group() {
        assert!(!signal_group(0, 0));
        assert!(!signal_group(1, 0));
        assert!(!signal_group(u32::MAX, 0));
    }
}
