//! End-to-end tests of the `devise-launch` binary with `sh -c` scripts as fake workers. Each
//! launcher runs with a cleared environment (PATH and the test's own variables only), so the
//! machine's SLURM / CUDA variables cannot leak in. Every wait is bounded; a hung launcher is
//! SIGKILLed (its workers then get SIGTERM from PR_SET_PDEATHSIG) and the test fails.
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_devise-launch");

/// The launcher with a clean environment; `D` (the test's scratch dir) is added by callers.
fn launcher(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("D", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child` for at most `limit`; SIGKILLs it and panics past that.
fn finish(child: Child, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => (out.expect("wait for the launcher"), start.elapsed()),
        Err(_) => {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("devise-launch did not exit within {limit:?}");
        }
    }
}

fn run(cmd: &mut Command, limit: Duration) -> (Output, Duration) {
    finish(cmd.spawn().expect("start devise-launch"), limit)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("launcher exited normally")
}

/// Waits until every path exists (workers signal readiness through files).
fn wait_for_files(paths: &[std::path::PathBuf], limit: Duration) {
    let start = Instant::now();
    while !paths.iter().all(|p| p.exists()) {
        assert!(start.elapsed() < limit, "workers not ready: {paths:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids the workers wrote to `dir/pid.*`.
fn worker_pids(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("pid.")
        {
            pids.push(
                std::fs::read_to_string(&path)
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap(),
            );
        }
    }
    pids
}

/// No process (not even a zombie) with this pid exists.
fn gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) != 0 }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

#[test]
fn workers_get_their_environment_and_prefixed_output() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let script = r#"echo "R=$RANK L=$LOCAL_RANK W=$WORLD_SIZE LW=$LOCAL_WORLD_SIZE GR=$GROUP_RANK A=$MASTER_ADDR P=$MASTER_PORT ID=$DEVISE_RUN_ID AT=$DEVISE_RESTART_ATTEMPT T=$DEVISE_RDZV_TOKEN"; echo "err $RANK" >&2; printf 'partial %s' "$RANK""#;
    let (out, _) = run(
        launcher(dir.path())
            .args(["--nproc-per-node", "3", "--run-id", "envtest", "--log-dir"])
            .arg(&logs)
            .args(["--", "sh", "-c", script]),
        Duration::from_secs(20),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(code(&out), 0, "{stderr}");
    let mut tokens = Vec::new();
    for r in 0..3 {
        let want =
            format!("[rank {r}] R={r} L={r} W=3 LW=3 GR=0 A=127.0.0.1 P=29500 ID=envtest AT=0 T=");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&want))
            .unwrap_or_else(|| panic!("no {want:?} in\n{stdout}"));
        tokens.push(line[want.len()..].to_string());
        assert!(
            stdout
                .lines()
                .any(|l| l == format!("[rank {r}] partial {r}")),
            "{stdout}"
        );
        assert!(
            stderr.lines().any(|l| l == format!("[rank {r}] err {r}")),
            "{stderr}"
        );

        let log = std::fs::read_to_string(logs.join(format!("rank-{r}.log"))).unwrap();
        assert!(
            log.starts_with("==== devise-launch: run envtest attempt 0 rank"),
            "{log}"
        );
        assert!(log.contains(&format!("\nR={r} L={r} W=3")), "{log}");
        assert!(log.contains(&format!("\nerr {r}\n")), "{log}");
        assert!(
            log.ends_with(&format!("partial {r}\n")) || log.contains(&format!("\npartial {r}\n")),
            "{log}"
        );
        assert!(!log.contains("[rank"), "{log}");
    }
    assert_eq!(tokens[0].len(), 32, "{tokens:?}");
    assert!(
        tokens[0].chars().all(|c| c.is_ascii_hexdigit()),
        "{tokens:?}"
    );
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
    assert!(
        stderr.contains("world_size=3"),
        "start-up line missing:\n{stderr}"
    );
}

#[test]
fn command_without_double_dash_keeps_its_own_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = run(
        launcher(dir.path())
            .env("DEVISE_RDZV_TOKEN", "given")
            .args(["--nproc-per-node", "1", "sh", "-c"])
            .arg(r#"echo "args $* tok $DEVISE_RDZV_TOKEN""#)
            .args(["sh", "--max-restarts", "x"]),
        Duration::from_secs(10),
    );
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("[rank 0] args --max-restarts x tok given"));
}

#[test]
fn a_killed_worker_stops_the_group_without_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"echo $$ > "$D/pid.$LOCAL_RANK"
if [ "$LOCAL_RANK" = 1 ]; then
  while [ "$(ls "$D" | grep -c '^pid\.')" -lt 3 ]; do sleep 0.05; done
  sleep 0.3; kill -9 $$
fi
exec sleep 60"#;
    let (out, took) = run(
        launcher(dir.path()).args([
            "--nproc-per-node",
            "3",
            "--stop-timeout-secs",
            "3",
            "--",
            "sh",
            "-c",
            script,
        ]),
        Duration::from_secs(20),
    );
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 1, "{stderr}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    let pids = worker_pids(dir.path());
    assert_eq!(pids.len(), 3);
    let msg = format!(
        "rank 1 (pid {}) was killed by SIGKILL; stopping the other 2 worker(s)",
        {
            std::fs::read_to_string(dir.path().join("pid.1"))
                .unwrap()
                .trim()
                .to_string()
        }
    );
    assert!(stderr.contains(&msg), "no {msg:?} in\n{stderr}");
    for pid in pids {
        assert!(gone(pid), "worker {pid} survived the launcher\n{stderr}");
    }
}

#[test]
fn a_worker_ignoring_sigterm_is_killed_after_the_stop_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"case $LOCAL_RANK in
0) trap '' TERM; echo $$ > "$D/pid.0"; while :; do sleep 0.1; done ;;
1) while [ ! -e "$D/pid.0" ]; do sleep 0.05; done; exit 3 ;;
esac"#;
    let (out, took) = run(
        launcher(dir.path()).args([
            "--nproc-per-node",
            "2",
            "--stop-timeout-secs",
            "1",
            "--",
            "sh",
            "-c",
            script,
        ]),
        Duration::from_secs(20),
    );
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 1, "{stderr}");
    assert!(
        stderr.contains("exited with code 3; stopping the other 1 worker(s)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("still running 1s after SIGTERM; sending SIGKILL"),
        "{stderr}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    for pid in worker_pids(dir.path()) {
        assert!(gone(pid), "worker {pid} survived\n{stderr}");
    }
}

#[test]
fn failed_groups_are_restarted_while_restarts_are_left() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"echo "attempt $DEVISE_RESTART_ATTEMPT token $DEVISE_RDZV_TOKEN"
if [ "$DEVISE_RESTART_ATTEMPT" = 0 ] && [ "$LOCAL_RANK" = 1 ]; then exit 3; fi"#;
    let args = [
        "--nproc-per-node",
        "2",
        "--stop-timeout-secs",
        "2",
        "--",
        "sh",
        "-c",
        script,
    ];

    let (out, _) = run(
        launcher(dir.path())
            .args(["--max-restarts", "1"])
            .args(args),
        Duration::from_secs(20),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(code(&out), 0, "{stderr}");
    assert!(
        stderr.contains("restarting the group (attempt 1 of 1)"),
        "{stderr}"
    );
    let tokens: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split(" token ").nth(1))
        .collect();
    assert!(
        tokens.len() >= 3 && tokens.iter().all(|t| *t == tokens[0]),
        "{stdout}"
    );
    for r in 0..2 {
        assert!(
            stdout.contains(&format!("[rank {r}] attempt 1 token")),
            "{stdout}"
        );
    }

    let (out, _) = run(
        launcher(dir.path())
            .args(["--max-restarts", "0"])
            .args(args),
        Duration::from_secs(20),
    );
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 1, "{stderr}");
    assert!(stderr.contains("rank 1 (pid "), "{stderr}");
    assert!(stderr.contains("exited with code 3"), "{stderr}");
    assert!(!stderr.contains("restarting"), "{stderr}");

    // Always failing: every restart is used, then 1.
    let (out, _) = run(
        launcher(dir.path()).args(["--max-restarts", "2", "--", "sh", "-c", "exit 5"]),
        Duration::from_secs(20),
    );
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 1, "{stderr}");
    assert!(
        stderr.contains("restarting the group (attempt 2 of 2)"),
        "{stderr}"
    );
    assert!(!stderr.contains("attempt 3"), "{stderr}");
}

#[test]
fn signals_are_forwarded_once_and_preemption_exits_75() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"trap 'echo got >> "$D/usr1.$LOCAL_RANK"; exit 75' USR1
echo $$ > "$D/pid.$LOCAL_RANK"; echo ready > "$D/ready.$LOCAL_RANK"
while :; do sleep 0.05; done"#;
    let child = launcher(dir.path())
        .args(["--nproc-per-node", "2", "--", "sh", "-c", script])
        .spawn()
        .unwrap();
    wait_for_files(
        &[dir.path().join("ready.0"), dir.path().join("ready.1")],
        Duration::from_secs(10),
    );
    signal(&child, libc::SIGUSR1);
    let (out, _) = finish(child, Duration::from_secs(15));
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 75, "{stderr}");
    assert!(
        stderr.contains("got SIGUSR1: forwarded SIGUSR1 to 2 worker(s)"),
        "{stderr}"
    );
    for r in 0..2 {
        let got = std::fs::read_to_string(dir.path().join(format!("usr1.{r}"))).unwrap();
        assert_eq!(
            got,
            "got\n",
            "rank {r} got SIGUSR1 {} times",
            got.lines().count()
        );
    }
    for pid in worker_pids(dir.path()) {
        assert!(gone(pid));
    }
}

#[test]
fn a_workers_own_preemption_waits_for_the_others_then_exits_75() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"case $LOCAL_RANK in
0) sleep 0.3; exit 75 ;;
1) echo $$ > "$D/pid.1"; exec sleep 60 ;;
esac"#;
    let (out, took) = run(
        launcher(dir.path()).args([
            "--nproc-per-node",
            "2",
            "--stop-timeout-secs",
            "1",
            "--",
            "sh",
            "-c",
            script,
        ]),
        Duration::from_secs(20),
    );
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 75, "{stderr}");
    assert!(
        stderr.contains("exited 75 (preempted) without a signal"),
        "{stderr}"
    );
    assert!(
        stderr.contains("still running 1s after the preemption"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    for pid in worker_pids(dir.path()) {
        assert!(gone(pid));
    }
}

/// A repeat of SIGINT within the 5 s window is the same stop (not forwarded); one after the
/// window SIGKILLs every worker and the launcher exits 130.
#[test]
fn a_second_interrupt_after_the_window_kills_the_group_and_exits_130() {
    second_stop_after_the_window_kills(libc::SIGINT, "INT", "SIGINT");
}

/// The same for SIGTERM: a preemption's second SIGTERM within the window is harmless (next
/// test), one after it still escalates.
#[test]
fn a_second_sigterm_after_the_window_kills_the_group_and_exits_130() {
    second_stop_after_the_window_kills(libc::SIGTERM, "TERM", "SIGTERM");
}

/// Workers that trap `trap_name` and keep running; `sig` to the launcher, again at once (the
/// same stop), and again after the window (kills).
fn second_stop_after_the_window_kills(sig: i32, trap_name: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"trap 'echo got >> "$D/got.$LOCAL_RANK"' {trap_name}
echo $$ > "$D/pid.$LOCAL_RANK"; echo ready > "$D/ready.$LOCAL_RANK"
while :; do sleep 0.05; done"#
    );
    let child = launcher(dir.path())
        .args(["--nproc-per-node", "2", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let d = dir.path();
    wait_for_files(
        &[d.join("ready.0"), d.join("ready.1")],
        Duration::from_secs(10),
    );
    let first = Instant::now();
    signal(&child, sig);
    wait_for_files(&[d.join("got.0"), d.join("got.1")], Duration::from_secs(10));
    signal(&child, sig); // within the window: the same stop
    std::thread::sleep(Duration::from_millis(5300).saturating_sub(first.elapsed()));
    signal(&child, sig);
    let (out, _) = finish(child, Duration::from_secs(15));
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 130, "{stderr}");
    assert!(
        stderr.contains(&format!("got {name} again"))
            && stderr.contains("the same stop (repeats within 5s count once), not forwarded"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "got {name} again while the group is stopping: killing every worker"
        )),
        "{stderr}"
    );
    for r in 0..2 {
        let got = std::fs::read_to_string(d.join(format!("got.{r}"))).unwrap();
        assert_eq!(got, "got\n", "rank {r}");
    }
    for pid in worker_pids(d) {
        assert!(gone(pid), "worker {pid} survived\n{stderr}");
    }
}

/// A preemption under SLURM sends the launcher SIGTERM twice (slurmstepd's, then the step
/// abort's) within a moment: the workers still checkpoint and exit 75, and so does the
/// launcher; each worker gets SIGTERM once from it.
#[test]
fn two_sigterms_100ms_apart_are_one_preemption_and_exit_75() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"trap 'echo term >> "$D/term.$LOCAL_RANK"; sleep 1; exit 75' TERM
echo $$ > "$D/pid.$LOCAL_RANK"; echo ready > "$D/ready.$LOCAL_RANK"
while :; do sleep 0.05; done"#;
    let child = launcher(dir.path())
        .args(["--nproc-per-node", "2", "--", "sh", "-c", script])
        .spawn()
        .unwrap();
    let d = dir.path();
    wait_for_files(
        &[d.join("ready.0"), d.join("ready.1")],
        Duration::from_secs(10),
    );
    signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    signal(&child, libc::SIGTERM);
    let (out, _) = finish(child, Duration::from_secs(15));
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 75, "{stderr}");
    assert!(
        stderr.contains("got SIGTERM: forwarded SIGTERM to 2 worker(s)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("got SIGTERM again") && stderr.contains("the same stop"),
        "{stderr}"
    );
    for r in 0..2 {
        let got = std::fs::read_to_string(d.join(format!("term.{r}"))).unwrap();
        assert_eq!(got, "term\n", "rank {r}");
    }
    for pid in worker_pids(d) {
        assert!(gone(pid), "worker {pid} survived\n{stderr}");
    }
}

/// `--preempt-signal usr2`: SIGUSR2 is the preemption (forwarded, workers exit 75, launcher
/// exits 75), the workers learn it through DEVISE__RUN__PREEMPT_SIGNAL, SIGUSR1 (NCCL's dump
/// signal here) is relayed as is without stopping anything, and NCCL_PROXY_DUMP_SIGNAL=12
/// (SIGUSR2) is warned about at start.
#[test]
fn preempt_signal_usr2_is_forwarded_as_the_preemption() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"trap 'echo usr1 >> "$D/usr1.$LOCAL_RANK"' USR1
trap 'echo usr2 >> "$D/usr2.$LOCAL_RANK"; exit 75' USR2
echo "$DEVISE__RUN__PREEMPT_SIGNAL" > "$D/env.$LOCAL_RANK"
echo $$ > "$D/pid.$LOCAL_RANK"; echo ready > "$D/ready.$LOCAL_RANK"
while :; do sleep 0.05; done"#;
    let child = launcher(dir.path())
        .env("NCCL_PROXY_DUMP_SIGNAL", "12")
        .args([
            "--nproc-per-node",
            "2",
            "--preempt-signal",
            "usr2",
            "--",
            "sh",
            "-c",
            script,
        ])
        .spawn()
        .unwrap();
    let d = dir.path();
    wait_for_files(
        &[d.join("ready.0"), d.join("ready.1")],
        Duration::from_secs(10),
    );
    signal(&child, libc::SIGUSR1);
    wait_for_files(
        &[d.join("usr1.0"), d.join("usr1.1")],
        Duration::from_secs(10),
    );
    signal(&child, libc::SIGUSR2);
    let (out, _) = finish(child, Duration::from_secs(15));
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 75, "{stderr}");
    assert!(
        stderr.contains("warning: NCCL_PROXY_DUMP_SIGNAL=12 names SIGUSR2, the preemption signal"),
        "{stderr}"
    );
    assert!(
        stderr.contains("got SIGUSR1: relayed to 2 worker(s) as is"),
        "{stderr}"
    );
    assert!(
        stderr.contains("got SIGUSR2: forwarded SIGUSR2 to 2 worker(s)"),
        "{stderr}"
    );
    for r in 0..2 {
        let read = |name: &str| std::fs::read_to_string(d.join(format!("{name}.{r}"))).unwrap();
        assert_eq!(read("env"), "usr2\n", "rank {r}");
        assert_eq!(read("usr1"), "usr1\n", "rank {r}");
        assert_eq!(read("usr2"), "usr2\n", "rank {r}");
    }
    for pid in worker_pids(d) {
        assert!(gone(pid), "worker {pid} survived\n{stderr}");
    }
}

/// Without `--preempt-signal` the launcher still survives SIGUSR2 (it used to die of it,
/// leaving its workers without a checkpoint): it relays it, and a worker that handles it and
/// exits 75 makes the launcher exit 75.
#[test]
fn sigusr2_without_the_flag_is_relayed_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"trap 'exit 75' USR2
echo $$ > "$D/pid.$LOCAL_RANK"; echo ready > "$D/ready.$LOCAL_RANK"
while :; do sleep 0.05; done"#;
    let child = launcher(dir.path())
        .args(["--nproc-per-node", "2", "--", "sh", "-c", script])
        .spawn()
        .unwrap();
    let d = dir.path();
    wait_for_files(
        &[d.join("ready.0"), d.join("ready.1")],
        Duration::from_secs(10),
    );
    signal(&child, libc::SIGUSR2);
    let (out, _) = finish(child, Duration::from_secs(15));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{:?}\n{stderr}", out.status);
    assert!(
        stderr.contains(
            "got SIGUSR2: relayed to 2 worker(s) as is (the preemption signal is SIGUSR1)"
        ),
        "{stderr}"
    );
}

#[test]
fn a_bad_preempt_signal_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = run(
        launcher(dir.path()).args(["--preempt-signal", "hup", "--", "true"]),
        Duration::from_secs(10),
    );
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("usr1"), "{}", text(&out.stderr));
    let (out, _) = run(
        launcher(dir.path())
            .env("DEVISE__RUN__PREEMPT_SIGNAL", "SIGUSR2")
            .args(["--", "true"]),
        Duration::from_secs(10),
    );
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 2, "{stderr}");
    assert!(
        stderr.contains("DEVISE__RUN__PREEMPT_SIGNAL=\"SIGUSR2\" is not a preemption signal"),
        "{stderr}"
    );
}

#[test]
fn dry_run_prints_the_world_and_runs_the_command_once() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"echo "child args=$* RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE AT=$DEVISE_RESTART_ATTEMPT"
echo once >> "$D/count"; exit 4"#;
    let (out, _) = run(
        launcher(dir.path()).args([
            "--nproc-per-node",
            "2",
            "--dry-run",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ]),
        Duration::from_secs(10),
    );
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 4, "{}", text(&out.stderr));
    for want in [
        "nnodes = 1 (from default)",
        "nproc_per_node = 2 (from --nproc-per-node)",
        "world_size = 2",
        "master = 127.0.0.1:29500",
        "local worker 0: RANK=0 LOCAL_RANK=0",
        "local worker 1: RANK=1 LOCAL_RANK=1",
        "child args=--dry-run RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 AT=0",
    ] {
        assert!(stdout.contains(want), "no {want:?} in\n{stdout}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("count")).unwrap(),
        "once\n"
    );
}

#[test]
fn slurm_environment_needs_no_flags() {
    let dir = tempfile::tempdir().unwrap();
    let slurm = [
        ("SLURM_JOB_ID", "77"),
        ("SLURM_JOB_NUM_NODES", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[01-02]"),
        ("SLURM_GPUS_ON_NODE", "2"),
    ];
    let script = r#"echo "child RANK=$RANK LOCAL_RANK=$LOCAL_RANK WS=$WORLD_SIZE MA=$MASTER_ADDR MP=$MASTER_PORT ID=$DEVISE_RUN_ID TOK=${DEVISE_RDZV_TOKEN:-unset}""#;
    let (out, _) = run(
        launcher(dir.path())
            .envs(slurm)
            .args(["--dry-run", "--", "sh", "-c", script, "sh"]),
        Duration::from_secs(10),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(code(&out), 0, "{stderr}");
    for want in [
        "nnodes = 2 (from SLURM_JOB_NUM_NODES)",
        "node_rank = 1 (from SLURM_NODEID)",
        "nproc_per_node = 2 (from SLURM_GPUS_ON_NODE)",
        "world_size = 4",
        "master = gpu01:10077 (addr from SLURM_JOB_NODELIST, port from 10000 + SLURM_JOB_ID % 20000)",
        "run_id = 77 (from SLURM_JOB_ID)",
        "local worker 0: RANK=2 LOCAL_RANK=0",
        "local worker 1: RANK=3 LOCAL_RANK=1",
        "child RANK=2 LOCAL_RANK=0 WS=4 MA=gpu01 MP=10077 ID=77 TOK=unset",
    ] {
        assert!(stdout.contains(want), "no {want:?} in\n{stdout}");
    }
    assert!(
        stderr.contains("export DEVISE_RDZV_TOKEN=$(openssl rand -hex 16)"),
        "{stderr}"
    );

    // An exported token is passed through, and silences the warning.
    let (out, _) = run(
        launcher(dir.path())
            .envs(slurm)
            .env("DEVISE_RDZV_TOKEN", "abc")
            .args(["--dry-run", "--", "sh", "-c", script, "sh"]),
        Duration::from_secs(10),
    );
    assert!(text(&out.stdout).contains("TOK=abc"));
    assert!(!text(&out.stderr).contains("openssl"));

    let (out, _) = run(
        launcher(dir.path())
            .envs(slurm)
            .env("SLURM_JOB_NODELIST", "gpu[01-")
            .args(["--dry-run", "--", "sh", "-c", "echo ran"]),
        Duration::from_secs(10),
    );
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 2, "{stderr}");
    assert!(stderr.contains("SLURM_JOB_NODELIST"), "{stderr}");
    assert!(!text(&out.stdout).contains("ran"));
}

#[test]
fn usage_and_environment_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = run(&mut launcher(dir.path()), Duration::from_secs(10));
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));

    let (out, _) = run(
        launcher(dir.path()).args(["--nproc-per-node", "0", "--", "true"]),
        Duration::from_secs(10),
    );
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("--nproc-per-node"));

    let (out, _) = run(
        launcher(dir.path()).args(["--node-rank", "1", "--", "true"]),
        Duration::from_secs(10),
    );
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("--node-rank"));

    let (out, _) = run(
        launcher(dir.path()).args(["--nproc-per-node", "2", "--", "/nonexistent/worker"]),
        Duration::from_secs(10),
    );
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("/nonexistent/worker"));

    let (out, _) = run(launcher(dir.path()).arg("--help"), Duration::from_secs(10));
    assert_eq!(code(&out), 0);
    assert!(text(&out.stdout).contains("Exit codes:"));
}

#[test]
fn an_interrupt_while_a_failed_group_stops_is_not_forwarded_and_the_next_kills() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stderr_path = d.join("launcher.err");
    let script = r#"case $LOCAL_RANK in
0) trap '' TERM; trap 'echo int >> "$D/int.0"' INT; echo $$ > "$D/pid.0"; while :; do sleep 0.05; done ;;
1) while [ ! -e "$D/pid.0" ]; do sleep 0.05; done; exit 3 ;;
esac"#;
    let child = launcher(d)
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .args([
            "--nproc-per-node",
            "2",
            "--stop-timeout-secs",
            "30",
            "--",
            "sh",
            "-c",
            script,
        ])
        .spawn()
        .unwrap();
    let start = Instant::now();
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap();
    while !stderr().contains("stopping the other 1 worker(s)") {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = Instant::now();
    signal(&child, libc::SIGINT);
    while !stderr().contains("not forwarded") {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    // After the repeat window (a repeat within it is the same stop).
    std::thread::sleep(Duration::from_millis(5300).saturating_sub(first.elapsed()));
    signal(&child, libc::SIGINT);
    let (out, _) = finish(child, Duration::from_secs(40));
    assert_eq!(code(&out), 130, "{}", stderr());
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "waited for the stop timeout"
    );
    assert!(
        !d.join("int.0").exists(),
        "the interrupt reached the stopping worker"
    );
    for pid in worker_pids(d) {
        assert!(gone(pid), "worker {pid} survived\n{}", stderr());
    }
}
