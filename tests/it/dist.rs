//! Scope: data-parallel training for real, several processes on this machine, through the
//! `devise-launch` binary (built by `cargo test --workspace`; next to the `devise` binary) and
//! the `cpu` backend: rendezvous, ring all-reduce, parameter broadcast and checksum, the
//! world-size-independent sample order, the report written once, a SIGKILLed worker stopping
//! the group and `--max-restarts` resuming it exactly.
//!
//! The model uses GroupNorm (`model.norm = "group"`): it has no batch statistics, so a 2-rank
//! run with 8 images per rank computes the same function as a 1-rank run with 16 (BatchNorm
//! would normalise each rank's 8 images by their own statistics). The losses then agree within
//! float tolerance (the gradient mean is summed in another order), and the samples of every step
//! are identical.
use crate::common::shared_dir;
use crate::train::{config_toml, shards};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub(crate) fn devise() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_devise"))
}

/// `devise-launch`, built by the same `cargo test --workspace` into the same directory.
pub(crate) fn launcher() -> PathBuf {
    let path = devise().with_file_name("devise-launch");
    assert!(
        path.exists(),
        "{} not found: run the tests with `cargo test --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The train tests' small configuration with GroupNorm, one thread per process, the sample
/// trace, a parameter check every step, `softmax_epochs` of the softmax stage, and `extra` TOML
/// appended (new sections only: TOML forbids repeating a key).
pub(crate) fn write_config(dir: &Path, name: &str, softmax_epochs: f64, extra: &str) -> PathBuf {
    let (_, shard_dir) = shards().expect("checked by the caller");
    let run = dir.join(name);
    let toml = config_toml(shard_dir, &run)
        .replace("threads = 2", "threads = 1")
        .replace("decode_threads = 2", "decode_threads = 1")
        .replace("widths = [8, 16]", "widths = [8, 16]\nnorm = \"group\"")
        .replace(
            "log_every_steps = 1",
            "log_every_steps = 1\ntrace_samples = true",
        )
        .replace(
            "softmax = { epochs = 0.032,",
            &format!("softmax = {{ epochs = {softmax_epochs},"),
        )
        // The devise stage on cached features (assembled across ranks).
        .replace(
            "lr = 0.05 } }\nfinetune",
            "lr = 0.05 }, cache_features = true }\nfinetune",
        );
    assert!(
        toml.contains("cache_features = true"),
        "the devise override applied"
    );
    // The paper's first-violation hinge: its random label order is drawn per sample of the
    // global batch, so it too must not depend on the world size.
    let toml = format!(
        "{toml}\n[loss]\nmargin = 0.1\nstop_at_first_violation = true\n\n\
         [dist]\ncheck_params_every_steps = 1\ntimeout_secs = 60\n{extra}"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

pub(crate) fn run_dir(config: &Path) -> PathBuf {
    config.with_extension("")
}

/// `(step, train/loss)` of a run's metrics.
pub(crate) fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["train/loss"].as_f64()?)))
        .collect()
}

/// Step -> the sorted sample ids (slots `[epoch, position]` or cache rows) of all ranks
/// together; the last line per (rank, step) wins (a resumed run re-traces steps after its
/// checkpoint).
pub(crate) fn trace(run: &Path, world: usize) -> BTreeMap<u64, Vec<String>> {
    let mut per_rank: Vec<BTreeMap<u64, Vec<String>>> = vec![BTreeMap::new(); world];
    for (r, steps) in per_rank.iter_mut().enumerate() {
        let text = std::fs::read_to_string(run.join(format!("trace/rank-{r}.jsonl"))).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ids = v
                .get("slots")
                .or_else(|| v.get("rows"))
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|x| format!("{}:{x}", v["stage"]))
                .collect();
            steps.insert(v["step"].as_u64().unwrap(), ids);
        }
    }
    let mut all: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for steps in per_rank {
        for (step, ids) in steps {
            let entry = all.entry(step).or_default();
            let before = entry.len();
            entry.extend(ids);
            let unique: BTreeSet<&String> = entry.iter().collect();
            assert_eq!(
                unique.len(),
                entry.len(),
                "step {step}: two ranks used the same sample (had {before})"
            );
        }
    }
    for ids in all.values_mut() {
        ids.sort();
    }
    all
}

pub(crate) fn launch(args: &[&str], config: &Path) -> Output {
    let port = free_port().to_string();
    let mut cmd = Command::new(launcher());
    cmd.args([
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--stop-timeout-secs",
        "10",
    ])
    .args(args)
    .arg("--")
    .arg(devise())
    .args(["train", "--config", config.to_str().unwrap()]);
    cmd.output().unwrap()
}

pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub(crate) fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= 1e-4 * la.abs().max(1.0),
            "{what}: step {sa}: loss {la} vs {lb}"
        );
    }
}

#[test]
fn two_ranks_through_the_launcher_match_one_rank_with_twice_the_batch() {
    if shared_dir().is_none() || shards().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let one = write_config(dir.path(), "one", 0.032, "");
    let two = write_config(dir.path(), "two", 0.032, "");

    let out = Command::new(devise())
        .args(["train", "--config", one.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = launch(&[], &two);
    let log = text(&out);
    assert!(out.status.success(), "{log}");

    // Same samples at every step (slots of the streaming stages, rows of the feature cache),
    // the ranks' shares disjoint (checked inside `trace`).
    let (t1, t2) = (trace(&run_dir(&one), 1), trace(&run_dir(&two), 2));
    assert_eq!(t1.len(), 9, "3 steps per stage");
    assert_eq!(
        t1, t2,
        "a 2-rank run sees the 1-rank run's samples at every step"
    );
    // No sample twice within an epoch: all 9 steps are inside epoch 0 of the 1500 images (slots
    // of the softmax and finetune steps) and inside pass 0 of the feature cache (rows of the
    // devise steps; ids carry the stage, so the two id spaces do not collide).
    let ids: Vec<&String> = t2.values().flatten().collect();
    assert_eq!(ids.len(), 9 * 16);
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        9 * 16,
        "a sample used twice"
    );

    // Same loss sequence within float tolerance (GroupNorm: see the module docs).
    assert_close(
        &losses(&run_dir(&one)),
        &losses(&run_dir(&two)),
        "1 rank x 16 vs 2 ranks x 8",
    );

    // Parameters identical across ranks: checked every step (dist.check_params_every_steps = 1)
    // and at the end, where rank 0 logs it.
    assert!(log.contains("parameters identical on all 2 ranks"), "{log}");
    // The report is written once, by rank 0.
    assert!(run_dir(&two).join("report.md").exists());
    assert_eq!(log.matches("report: ").count(), 1, "{log}");
    assert!(
        log.contains("[rank 0]") && log.contains("[rank 1]"),
        "{log}"
    );
}

/// Linux: the pid of the `devise train` worker with `RANK=rank` whose command line names
/// `config`.
pub(crate) fn worker_pid(config: &Path, rank: usize) -> Option<i32> {
    let want_env = format!("RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains(config.to_str().unwrap()) || cmdline.contains("devise-launch") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ
            .split(|b| *b == 0)
            .any(|kv| kv == want_env.as_bytes())
        {
            return Some(pid);
        }
    }
    None
}

/// Waits until rank 1 of the run of `config` has traced step 15 (checkpoints were written), then
/// SIGKILLs that worker; returns when.
fn kill_rank_1_after_step_15(config: &Path) -> Instant {
    let trace1 = run_dir(config).join("trace/rank-1.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&trace1)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 15
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run never reached step 15"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = worker_pid(config, 1).expect("rank 1's pid");
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    killed_at
}

#[test]
fn a_sigkilled_worker_stops_the_group_and_max_restarts_resumes_it_exactly() {
    if shared_dir().is_none() || shards().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 0.6 epochs of softmax = 56 steps, checkpoint every 2 steps.
    let reference = write_config(dir.path(), "reference", 0.6, "");
    let out = launch(&[], &reference);
    assert!(out.status.success(), "{}", text(&out));

    for restarts in ["0", "1"] {
        let config = write_config(dir.path(), &format!("killed{restarts}"), 0.6, "");
        let port = free_port().to_string();
        let child = Command::new(launcher())
            .args([
                "--nproc-per-node",
                "2",
                "--master-port",
                &port,
                "--stop-timeout-secs",
                "10",
            ])
            .args(["--max-restarts", restarts])
            .arg("--")
            .arg(devise())
            .args(["train", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let killed_at = kill_rank_1_after_step_15(&config);
        let out = child.wait_with_output().unwrap();
        let log = text(&out);
        assert!(
            log.contains("SIGKILL"),
            "the launcher names the signal:\n{log}"
        );
        if restarts == "0" {
            assert_eq!(out.status.code(), Some(1), "{log}");
            assert!(
                killed_at.elapsed() < Duration::from_secs(30),
                "the group took too long to stop"
            );
        } else {
            assert!(out.status.success(), "{log}");
            assert!(log.contains("restarting"), "{log}");
            assert!(log.contains("resumed from"), "{log}");
            // Resumed from the last checkpoint: the same losses as the uninterrupted run, bit
            // for bit (same world size, same reduction order).
            assert_eq!(losses(&run_dir(&config)), losses(&run_dir(&reference)));
            assert!(
                crate::resume::final_weights(&run_dir(&config))
                    == crate::resume::final_weights(&run_dir(&reference)),
                "final weights differ from the uninterrupted run's"
            );
        }
    }
}

/// Two launchers with `--nnodes 2` on this host stand in for two nodes (one worker each). Killing
/// node 1's worker: node 1's launcher restarts its group (attempt 1), whose worker waits while
/// node 0's store still serves attempt 0; node 0's worker fails as its ring neighbour vanished,
/// its launcher restarts too, and both attempt-1 workers meet, resume from the checkpoint and
/// finish with the uninterrupted run's losses.
#[test]
fn two_launchers_as_two_nodes_restart_together_after_a_kill() {
    if shared_dir().is_none() || shards().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reference = write_config(dir.path(), "reference", 0.6, "");
    let out = launch(&[], &reference);
    assert!(out.status.success(), "{}", text(&out));

    let config = write_config(dir.path(), "nodes", 0.6, "");
    let port = free_port().to_string();
    let nodes: Vec<std::process::Child> = (0..2)
        .map(|node| {
            Command::new(launcher())
                .args([
                    "--nnodes",
                    "2",
                    "--node-rank",
                    &node.to_string(),
                    "--nproc-per-node",
                    "1",
                ])
                .args([
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    &port,
                    "--run-id",
                    "it-nodes",
                ])
                .args(["--max-restarts", "1", "--stop-timeout-secs", "10"])
                .env("DEVISE_RDZV_TOKEN", "it-nodes-secret")
                .arg("--")
                .arg(devise())
                .args(["train", "--config", config.to_str().unwrap()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    kill_rank_1_after_step_15(&config);
    for (node, child) in nodes.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let log = text(&out);
        assert!(out.status.success(), "node {node}:\n{log}");
        assert!(
            log.contains("restarting"),
            "node {node} restarted its group:\n{log}"
        );
    }
    assert_eq!(losses(&run_dir(&config)), losses(&run_dir(&reference)));
}
