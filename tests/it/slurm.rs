//! Scope: the SLURM recipes under a real SLURM: Debian's slurm-wlm 22.05 daemons (munged,
//! slurmctld, slurmd) on 127.0.0.1, one node with 8 CPUs and two fake GPUs, started by
//! `scripts/slurm-local.sh` (scripts/test.sh starts it before `cargo test` and stops it after):
//! - `cluster/slurm/train.sbatch` (devise-launch, 2 workers) and `train-per-gpu.sbatch` (2 srun
//!   tasks), submitted with `sbatch` and a CPU-only site's overrides, are each stopped four times
//!   while they train, every time in another of SLURM's ways: `scancel --signal=USR1 --batch`,
//!   the time limit's `--signal=B:USR1@90`, a preemption by a higher-priority partition's job
//!   with `GraceTime` and `preempt_send_user_signal` (PreemptMode REQUEUE and CANCEL),
//!   `scancel --signal=TERM --batch` (SIGTERM to the batch script only) and a preemption without
//!   grace time (SIGTERM to every process of the job, SIGKILL after KillWait). Each stop must
//!   write a checkpoint at the stop step, exit 75 and requeue; the requeued job (its ~120 s
//!   hold released at once) resumes, and the finished run has the uninterrupted run's losses
//!   and weights, bit for bit;
//! - real `srun` in the step shapes of worlds without the launcher (one task per GPU, a step
//!   with fewer tasks than its job, several tasks per node): the environment each task gets, and
//!   the rank, world size and local rank `devise train --dry-run` resolves from it.
//!
//! The runs train on the synthetic shapes (`common::synthetic`). The tests share the daemons and
//! take one lock. Without a local SLURM they print `SKIP:`;
//! under `CI=true` they fail.
use crate::common::launch::{
    devise, final_weights, launcher, losses, processes_of, run_dir, run_launcher, text,
    write_config,
};
use devise::storage::Store;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One test at a time uses the daemons (jobs of two tests would compete for the node).
static DAEMONS: Mutex<()> = Mutex::new(());

/// The local SLURM of `scripts/slurm-local.sh`, held for one test.
struct Slurm {
    /// `slurm.conf`: clients find the controller through `SLURM_CONF`.
    conf: PathBuf,
    _lock: MutexGuard<'static, ()>,
}

/// The running local SLURM, or `None` with a printed `SKIP:` (a failure under `CI=true`).
fn slurm() -> Option<Slurm> {
    let lock = DAEMONS.lock().unwrap_or_else(|e| e.into_inner());
    let conf = std::env::var_os("SLURM_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dir = std::env::var("DEVISE_SLURM_DIR").unwrap_or("/tmp/devise-slurm".into());
            Path::new(&dir).join("slurm.conf")
        });
    let up = conf.is_file()
        && Command::new("scontrol")
            .arg("ping")
            .env("SLURM_CONF", &conf)
            .output()
            .is_ok_and(|o| o.status.success());
    if !up {
        let why = format!(
            "no local SLURM answers (SLURM_CONF={}); start one with `bash scripts/slurm-local.sh start`",
            conf.display()
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but {why} (scripts/test.sh starts it)");
        }
        eprintln!("SKIP: {why}");
        return None;
    }
    Some(Slurm { conf, _lock: lock })
}

impl Slurm {
    fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    /// `sbatch --parsable` with the local SLURM's configuration.
    fn sbatch(&self) -> Command {
        let mut cmd = self.cmd("sbatch");
        cmd.arg("--parsable");
        cmd
    }

    /// Runs `program args`, which must succeed; its stdout.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.cmd(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sbatch --parsable ...` (from [`Slurm::sbatch`]): the job id.
    fn submit(&self, mut sbatch: Command) -> u32 {
        let out = sbatch.output().unwrap();
        assert!(out.status.success(), "sbatch: {}", text(&out));
        let id = String::from_utf8_lossy(&out.stdout);
        let id = id.trim().split(';').next().unwrap_or_default();
        id.parse()
            .unwrap_or_else(|_| panic!("sbatch printed no job id: {}", text(&out)))
    }

    /// `scontrol -o show job ID` as key -> value (JobState, Reason, Restarts, ExitCode, ...).
    fn job(&self, id: u32) -> BTreeMap<String, String> {
        let line = self.ok("scontrol", &["-o", "show", "job", &id.to_string()]);
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Polls job `id` until `done` holds; past `limit`, fails with the job and its log.
    fn wait(
        &self,
        id: u32,
        log: &Path,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let started = Instant::now();
        loop {
            let job = self.job(id);
            if done(&job) {
                return job;
            }
            assert!(
                started.elapsed() < limit,
                "job {id}: not {what} after {limit:?}: {job:?}\n{}",
                read(log)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A SLURM time (`2026-12-06T22:09:51`, local time) in seconds since the epoch (`date -d`).
fn epoch_secs(time: &str) -> i64 {
    let out = Command::new("date")
        .args(["-d", time, "+%s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "date -d {time}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cluster/slurm")
        .join(name)
}

/// The newest step in a run's metrics (0 before the first).
fn last_step(run: &Path) -> u64 {
    read(&run.join("metrics.jsonl"))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// The lines of run `i` (0-based; runs start at "devise: job ... restart count") of a job log
/// that show how the stop travelled: the batch script's, srun's, slurmstepd's, the launcher's
/// and the workers' signal and stop lines.
fn signal_lines(log: &str, i: usize) -> Vec<&str> {
    log.split("restart count ")
        .nth(i + 1)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            [
                "devise: got",
                "devise: SLURM",
                "srun:",
                "slurmstepd",
                "devise-launch: got",
            ]
            .iter()
            .any(|p| l.starts_with(p))
                || l.contains("] signal ")
                || l.contains(": signal ")
                || l.contains("stopping after step")
        })
        .collect()
}

/// How a running job is stopped.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// `scancel --signal=USR1 --batch JOB`: SIGUSR1 to the batch script.
    Usr1ToBatch,
    /// The time limit lowered to 1 minute: the header's `--signal=B:USR1@90` sends SIGUSR1 to
    /// the batch script at SLURM's next time-limit check (every 30 s; the workers are paused
    /// meanwhile).
    TimeLimit,
    /// A job of partition `urgent` (a higher priority tier) needs the whole node while the job
    /// runs in this partition (`debug`: PreemptMode=REQUEUE, `cancel`: PreemptMode=CANCEL; both
    /// GraceTime=30): with `preempt_send_user_signal` SLURM sends the job's `--signal` (SIGUSR1
    /// to the batch script) when the grace time starts.
    Preempted(&'static str),
    /// `scancel --signal=TERM --batch JOB`: SIGTERM to the batch script only.
    TermToBatch,
    /// Preempted in partition `nograce` (PreemptMode=REQUEUE, GraceTime=0): SLURM requeues the
    /// job at once, sends SIGCONT and SIGTERM to every process of it (the batch script, srun,
    /// launcher and workers) and SIGKILL after KillWait (30 s).
    TermToAll,
}

impl Stop {
    /// The partition the job runs in when this stop comes.
    fn partition(self) -> &'static str {
        match self {
            Stop::Preempted(p) => p,
            Stop::TermToAll => "nograce",
            _ => "debug",
        }
    }

    /// The batch script's line for the signal it got.
    fn script_line(self) -> &'static str {
        match self {
            Stop::Usr1ToBatch | Stop::TimeLimit | Stop::Preempted(_) => {
                "devise: got USR1, passing it to the job step"
            }
            Stop::TermToBatch => "devise: got TERM, passing it to the job step",
            Stop::TermToAll => "devise: got TERM",
        }
    }

    /// Stops job `id`, which trains with `config` and logs to `log`. The workers are paused
    /// (SIGSTOP) from just before the stop is asked for until the batch script reports the
    /// signal it got: SLURM answers in its own time (time limits are checked every 30 s, a
    /// preemption waits for the scheduler), and this short run (~100 steps a second) must still
    /// be training when the signal comes, with room left for the next stops (a real run's stop
    /// comes hours into it). Signals sent meanwhile stay pending and are handled on SIGCONT.
    fn trigger(self, slurm: &Slurm, id: u32, config: &Path, log: &Path) {
        let workers = workers_of(config);
        assert!(!workers.is_empty(), "no worker of {}", config.display());
        signal(&workers, "STOP");
        let before = read(log).matches(self.script_line()).count();
        let job = id.to_string();
        match self {
            Stop::Usr1ToBatch => {
                slurm.ok("scancel", &["--signal=USR1", "--batch", &job]);
            }
            Stop::TermToBatch => {
                slurm.ok("scancel", &["--signal=TERM", "--batch", &job]);
            }
            Stop::TimeLimit => {
                slurm.ok(
                    "scontrol",
                    &["update", &format!("JobId={id}"), "TimeLimit=1"],
                );
            }
            Stop::Preempted(_) | Stop::TermToAll => {
                slurm.ok(
                    "sbatch",
                    &[
                        "--partition=urgent",
                        "--ntasks=8",
                        "--output=/dev/null",
                        "--wrap=sleep 1",
                    ],
                );
            }
        }
        let asked = Instant::now();
        while read(log).matches(self.script_line()).count() == before {
            if asked.elapsed() > Duration::from_secs(60) {
                signal(&workers, "CONT");
                panic!(
                    "{self:?}: the batch script got no signal within 60 s:\n{}",
                    read(log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "{self:?}: the batch script got its signal {:.1}s after the stop was asked for",
            asked.elapsed().as_secs_f64()
        );
        // A worker SLURM already ended (SIGKILL after KillWait) is no error here.
        let _ = Command::new("kill")
            .arg("-CONT")
            .args(workers.iter().map(|p| p.to_string()))
            .status();
    }
}

/// The `devise train` processes (workers, not launchers) whose command line names `config`.
fn workers_of(config: &Path) -> Vec<i32> {
    processes_of(config)
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            Path::new(std::str::from_utf8(program).unwrap_or_default())
                .file_name()
                .is_some_and(|n| n == "devise")
        })
        .collect()
}

/// `kill -SIG pids`.
fn signal(pids: &[i32], sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(|p| p.to_string()))
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pids:?}");
}

/// Epochs of the softmax stage (1 epoch: 94 steps of 16 images): room for four stops, each at
/// least 3 steps after the last.
const SOFTMAX_EPOCHS: f64 = 3.0;

/// The uninterrupted 2-rank run of `write_config(dir, "reference", SOFTMAX_EPOCHS, "")` (launcher on this
/// machine, no SLURM): its run directory.
fn reference(dir: &Path) -> PathBuf {
    let config = write_config(dir, "reference", SOFTMAX_EPOCHS, "");
    let t = Instant::now();
    let out = run_launcher(|port| {
        let mut cmd = Command::new(launcher());
        cmd.args(["--nproc-per-node", "2", "--master-port", port])
            .arg("--")
            .arg(devise())
            .args(["train", "--config", config.to_str().unwrap()]);
        cmd
    });
    assert!(out.status.success(), "{}", text(&out));
    eprintln!(
        "uninterrupted reference run: {} steps in {:.1}s",
        last_step(&run_dir(&config)),
        t.elapsed().as_secs_f64()
    );
    run_dir(&config)
}

/// Submits `script` with `overrides` and `env`, stops it with each of `stops` in turn (each
/// after at least 3 more steps), checks the checkpoint at every stop and the requeue, releases
/// the requeued job at once, and compares the finished run with `reference`.
fn stopped_and_requeued_equals_uninterrupted(
    slurm: &Slurm,
    dir: &Path,
    reference: &Path,
    script: &str,
    overrides: &[&str],
    env: &[(&str, &str)],
    stops: &[Stop],
) {
    let name = script.trim_end_matches(".sbatch");
    let config = write_config(dir, name, SOFTMAX_EPOCHS, "");
    let run = run_dir(&config);
    let log = dir.join(format!("{name}.log"));
    let mut sbatch = slurm.sbatch();
    sbatch
        .arg(format!(
            "--partition={}",
            stops.first().map_or("debug", |s| s.partition())
        ))
        .arg(format!("--output={}", log.display()))
        .arg(format!("--chdir={}", dir.display()))
        .args(overrides)
        .arg(recipe(script))
        .arg(&config)
        .env("DEVISE", devise())
        .env("DEVISE_LAUNCH", launcher())
        .envs(env.iter().copied());
    let id = slurm.submit(sbatch);
    let started = Instant::now();

    let mut stopped_at = 0;
    for (i, &stop) in stops.iter().enumerate() {
        let restarts = i.to_string();
        let want = stopped_at + 3;
        slurm.wait(
            id,
            &log,
            &format!("running at step {want} or later (before stop {i}, {stop:?})"),
            Duration::from_secs(240),
            |job| {
                let state = job.get("JobState").map(String::as_str);
                assert!(
                    matches!(state, Some("RUNNING" | "PENDING" | "CONFIGURING")),
                    "job {id} ended before stop {i} ({stop:?}): {job:?}\n{}",
                    read(&log)
                );
                state == Some("RUNNING")
                    && job.get("Restarts") == Some(&restarts)
                    && last_step(&run) >= want
            },
        );
        let t = Instant::now();
        stop.trigger(slurm, id, &config, &log);
        // The batch script ends (its last lines: the step's exit code, the requeue) and the job
        // is pending again, requeued.
        let ended = "devise: job step exited";
        let requeued = (i + 1).to_string();
        let job = slurm.wait(
            id,
            &log,
            &format!("requeued after stop {i} ({stop:?})"),
            Duration::from_secs(120),
            |job| {
                let text = read(&log);
                let Some(exit) = text.lines().filter(|l| l.starts_with(ended)).nth(i) else {
                    return false;
                };
                // Another exit code fails below at once; 75 waits for the requeue.
                exit != "devise: job step exited 75"
                    || (job.get("JobState").map(String::as_str) == Some("PENDING")
                        && job.get("Restarts") == Some(&requeued))
            },
        );
        let took = t.elapsed();
        let text = read(&log);
        let exit_line = text.lines().filter(|l| l.starts_with(ended)).nth(i);
        assert_eq!(
            exit_line,
            Some("devise: job step exited 75"),
            "stop {i} ({stop:?}): the job step's exit\n{text}"
        );
        assert!(
            text.matches(stop.script_line()).count() > 0,
            "stop {i} ({stop:?}): no '{}' in\n{text}",
            stop.script_line()
        );
        let reached = last_step(&run);
        let store = Store::open(run.to_str().unwrap()).unwrap();
        let checkpoint = devise::checkpoint::find_latest(&store).unwrap();
        assert_eq!(
            checkpoint,
            Some(reached),
            "stop {i} ({stop:?}): a checkpoint at the step it stopped at\n{text}"
        );
        assert!(reached > stopped_at, "stop {i}: no progress since the last");
        // SLURM holds a requeued job (EligibleTime ~120 s after the requeue, reason BeginTime);
        // released here at once, moved to the next stop's partition, given back a time limit.
        let requeued_at = epoch_secs(&job["SubmitTime"]);
        let hold = epoch_secs(&job["EligibleTime"]) - requeued_at;
        assert!((100..=200).contains(&hold), "held {hold}s: {job:?}");
        // Not in the second of the requeue itself: slurmd refuses to start a job in the second
        // its previous run's credential was revoked ("Job credential revoked"), which is what
        // the hold protects against.
        while now_secs() < requeued_at + 2 {
            std::thread::sleep(Duration::from_millis(100));
        }
        let next = stops.get(i + 1).map_or("debug", |s| s.partition());
        slurm.ok(
            "scontrol",
            &[
                "update",
                &format!("JobId={id}"),
                &format!("Partition={next}"),
                "TimeLimit=30",
                "StartTime=now",
            ],
        );
        eprintln!(
            "{script}: stop {i} ({stop:?}) at step {reached}: checkpoint, exit 75 and requeue \
             {:.1}s after the signal; the log's signal lines:\n  {}",
            took.as_secs_f64(),
            signal_lines(&text, i).join("\n  ")
        );
        stopped_at = reached;
    }

    let job = slurm.wait(id, &log, "finished", Duration::from_secs(300), |job| {
        let state = job.get("JobState").map(String::as_str);
        assert!(
            matches!(
                state,
                Some("RUNNING" | "PENDING" | "CONFIGURING" | "COMPLETING" | "COMPLETED")
            ),
            "job {id}: {job:?}\n{}",
            read(&log)
        );
        state == Some("COMPLETED")
    });
    let text = read(&log);
    assert_eq!(
        job.get("ExitCode").map(String::as_str),
        Some("0:0"),
        "{text}"
    );
    assert_eq!(
        text.matches("devise: preempted with a checkpoint written; requeueing job")
            .count(),
        stops.len(),
        "{text}"
    );
    assert_eq!(
        text.matches("resumed from").count(),
        // train.sbatch: one line per worker; train-per-gpu.sbatch too (`--label` prefixes).
        2 * stops.len(),
        "{text}"
    );
    assert_eq!(
        losses(&run),
        losses(reference),
        "{script}: per-step losses after {} stops\n{text}",
        stops.len()
    );
    assert!(
        final_weights(&run) == final_weights(reference),
        "{script}: final weights differ"
    );
    eprintln!(
        "{script}: {} stops, finished in {:.0}s",
        stops.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Both recipes under the real SLURM, in one test (they share the daemons): see the module
/// docs. CPU-only overrides as a site without GPUs writes them: `--gpus-per-node=0` (the header
/// asks for 8 GPUs) and a `--cpus-per-task` the node has (the header asks for 64 or 8).
#[test]
fn the_sbatch_recipes_under_real_slurm_checkpoint_requeue_and_resume_exactly_on_every_stop() {
    let Some(slurm) = slurm() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    stopped_and_requeued_equals_uninterrupted(
        &slurm,
        dir.path(),
        &reference,
        "train.sbatch",
        &["--gpus-per-node=0", "--cpus-per-task=2"],
        &[("NPROC_PER_NODE", "2")],
        &[
            Stop::Usr1ToBatch,
            Stop::Preempted("debug"),
            Stop::TermToBatch,
            Stop::TermToAll,
        ],
    );
    stopped_and_requeued_equals_uninterrupted(
        &slurm,
        dir.path(),
        &reference,
        "train-per-gpu.sbatch",
        &[
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
        ],
        &[],
        &[
            Stop::TimeLimit,
            Stop::Preempted("cancel"),
            Stop::TermToBatch,
            Stop::TermToAll,
        ],
    );
}

/// One step shape: `sbatch ALLOC --wrap "srun STEP ..."`, and what each task must resolve.
struct Shape {
    name: &'static str,
    alloc: &'static [&'static str],
    step: &'static [&'static str],
    /// Per task (by SLURM_PROCID): `(rank, world_size, local_rank, local_world_size)`.
    want: &'static [(usize, usize, usize, usize)],
    /// GPUs each task sees (entries of its CUDA_VISIBLE_DEVICES). The CUDA ordinal a worker
    /// takes is its position in that list: `cuda:0` when it sees exactly one GPU, else
    /// `cuda:local_rank`; more local ranks than visible GPUs is an error before any work (the
    /// last shape).
    visible: usize,
    /// The CUDA ordinal each task takes by that rule from the environment srun gave it
    /// (`devise_launch::world::cuda_ordinal`, which `devise train` uses); `None`: refused.
    ordinals: &'static [Option<usize>],
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "one task per GPU (--gpus-per-task=1)",
        alloc: &["--ntasks=2", "--gpus-per-task=1", "--cpus-per-task=1"],
        step: &[],
        want: &[(0, 2, 0, 2), (1, 2, 1, 2)],
        visible: 1,
        ordinals: &[Some(0), Some(0)],
    },
    Shape {
        name: "one task per GPU (--ntasks-per-gpu=1)",
        alloc: &["--gpus=2", "--ntasks-per-gpu=1", "--cpus-per-task=1"],
        step: &[],
        want: &[(0, 2, 0, 2), (1, 2, 1, 2)],
        visible: 1,
        ordinals: &[Some(0), Some(0)],
    },
    Shape {
        name: "a step of 2 tasks in a job of 4 (srun -n 2)",
        alloc: &["--ntasks=4", "--gpus-per-node=2"],
        step: &["--ntasks=2"],
        want: &[(0, 2, 0, 2), (1, 2, 1, 2)],
        visible: 2,
        ordinals: &[Some(0), Some(1)],
    },
    Shape {
        name: "train-per-gpu.sbatch's shape: 2 tasks per node, each sees the node's 2 GPUs",
        alloc: &[
            "--ntasks-per-node=2",
            "--gpus-per-node=2",
            "--cpus-per-task=1",
        ],
        step: &["--kill-on-bad-exit=0", "--label"],
        want: &[(0, 2, 0, 2), (1, 2, 1, 2)],
        visible: 2,
        ordinals: &[Some(0), Some(1)],
    },
    Shape {
        name: "4 tasks per node on 2 GPUs",
        alloc: &["--ntasks=4", "--gpus-per-node=2"],
        step: &[],
        want: &[(0, 4, 0, 4), (1, 4, 1, 4), (2, 4, 2, 4), (3, 4, 3, 4)],
        visible: 2,
        ordinals: &[None, None, None, None],
    },
];

/// `rank R of W (local L of LW` from `devise train --dry-run`'s `world:` line.
fn resolved(dry_run: &str) -> Option<(usize, usize, usize, usize)> {
    let line = dry_run
        .lines()
        .find_map(|l| l.strip_prefix("world: rank "))?;
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(4)
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    match nums[..] {
        [rank, world, local, local_world] => Some((rank, world, local, local_world)),
        _ => None,
    }
}

/// Real `srun` in the step shapes of worlds without the launcher: every task's environment
/// (printed, for the record) and the world `devise train --dry-run` resolves from it.
#[test]
fn real_srun_step_shapes_give_each_task_its_rank_world_and_gpus() {
    let Some(slurm) = slurm() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "shapes", 0.2, "");
    for (n, shape) in SHAPES.iter().enumerate() {
        let out_dir = dir.path().join(format!("shape{n}"));
        std::fs::create_dir_all(&out_dir).unwrap();
        // Each task writes its SLURM/CUDA variables and its dry run to files of its own.
        let task = format!(
            "env | grep -E '^(SLURM|CUDA|GPU_DEVICE)' | sort > {d}/env.$SLURM_PROCID; \
             \"$DEVISE\" train --config {c} --dry-run > {d}/dry.$SLURM_PROCID 2>&1",
            d = out_dir.display(),
            c = config.display()
        );
        let wrap = format!(
            "srun {} bash -c {}",
            shape.step.join(" "),
            shell_quote(&task)
        );
        let mut sbatch = slurm.cmd("sbatch");
        sbatch
            .args(["--wait", "--nodes=1"])
            .args(shape.alloc)
            .arg(format!("--output={}", out_dir.join("job.log").display()))
            .arg(format!("--chdir={}", dir.path().display()))
            .arg(format!("--wrap={wrap}"))
            .env("DEVISE", devise());
        let out: Output = sbatch.output().unwrap();
        let log = read(&out_dir.join("job.log"));
        assert!(
            out.status.success(),
            "{}: {}\n{log}",
            shape.name,
            text(&out)
        );
        for (procid, want) in shape.want.iter().enumerate() {
            let env = read(&out_dir.join(format!("env.{procid}")));
            let dry = read(&out_dir.join(format!("dry.{procid}")));
            eprintln!("{} / task {procid}:\n{env}", shape.name);
            let var = |k: &str| {
                env.lines()
                    .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                    .unwrap_or_default()
            };
            assert_eq!(
                resolved(&dry),
                Some(*want),
                "{}: task {procid} resolved (rank, world_size, local_rank, \
                 local_world_size)\n{dry}\n{env}",
                shape.name
            );
            // The GPUs SLURM binds: what the CUDA ordinal rule starts from.
            let visible: Vec<&str> = var("CUDA_VISIBLE_DEVICES").split(',').collect();
            assert_eq!(
                visible.len(),
                shape.visible,
                "{}: task {procid}'s CUDA_VISIBLE_DEVICES\n{env}",
                shape.name
            );
            assert_eq!(var("SLURM_STEP_NUM_TASKS"), want.1.to_string(), "{env}");
            // CUDA enumerates exactly the GPUs CUDA_VISIBLE_DEVICES lists.
            let ordinal = devise_launch::world::cuda_ordinal(
                want.2,
                want.3,
                Some(var("CUDA_VISIBLE_DEVICES")),
                visible.len(),
            );
            assert_eq!(
                ordinal.as_ref().ok().copied(),
                shape.ordinals[procid],
                "{}: task {procid}'s CUDA ordinal: {ordinal:?}\n{env}",
                shape.name
            );
        }
        assert!(
            !out_dir.join(format!("env.{}", shape.want.len())).exists(),
            "{}: more tasks than expected",
            shape.name
        );
    }
}

/// `s` as one single-quoted shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
