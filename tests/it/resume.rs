//! Scope (preemption, resume, restarts): 2 worker processes through `devise-launch` with the
//! `cpu` backend, run directories on the local file system and in the local S3 server:
//! - a run stopped at several steps (mid-stage, between checkpoints, at a stage end, inside the
//!   cached-feature stage) and resumed each time gives the uninterrupted run's per-step losses
//!   and final weights, bit for bit;
//! - a 2-rank checkpoint resumed on 1 rank and on 4 ranks: every step trains on exactly the
//!   samples of the uninterrupted run (no repeat, no skip), losses within float tolerance; from
//!   shards on this disk, and from shards in the local S3 server read in 4 partitions;
//! - the whole group SIGKILLed in the middle of checkpoint writes (10 times per store, at four
//!   different points of the write) always leaves a loadable checkpoint no older than the last
//!   one, and the run then completes with the uninterrupted run's weights;
//! - a hung worker is noticed by the launcher's heartbeat watch, the group restarts and resumes;
//! - a NaN loss or an infinite gradient on one rank stops every rank, or is skipped by every
//!   rank, naming the step and rank;
//! - the shipped Tiny ImageNet configuration, stopped by SIGUSR1, resumes with `--resume auto`;
//! - SIGUSR2 as the configured preemption signal (`run.preempt_signal`, `devise-launch
//!   --preempt-signal usr2`) checkpoints and exits 75, with and without the launcher.
//!
//! Every run is on the synthetic shapes (`common::synthetic`) except the shipped Tiny ImageNet
//! configuration's, which needs `../shared`. Faults are injected with `DEVISE_FAULT`
//! (src/train/fault.rs).
use crate::common::launch::{
    assert_close, devise, final_weights, launcher, losses, processes_of, run_dir, text, trace,
    write_config,
};
use crate::common::ports;
use crate::common::s3::{build_small_shards, s3_env, start_server, S3Server};
use crate::common::synthetic::shapes;
use crate::common::tiny;
use devise::storage::Store;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where a run directory lives: its URL for the config, its files on this disk for the test.
struct RunAt {
    url: String,
    disk: PathBuf,
    s3_port: Option<u16>,
}

impl RunAt {
    /// The run directory as a store, opened on this disk: `s3s-fs` keeps each object as a file
    /// at its key, so the checkpoint code reads exactly the bytes the workers wrote through S3
    /// (and the test process needs no S3 credentials in its environment).
    fn store(&self) -> Store {
        Store::open(self.disk.to_str().unwrap()).unwrap()
    }
}

/// `write_config`'s run, moved to `s3://devise/<name>` (no sample trace there).
fn at_s3(config: &Path, server: &S3Server) -> (PathBuf, RunAt) {
    let name = run_dir(config)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let local = run_dir(config);
    let url = format!("s3://devise/{name}");
    let toml = std::fs::read_to_string(config)
        .unwrap()
        .replace(
            &format!("dir = \"{}\"", local.display()),
            &format!("dir = \"{url}\""),
        )
        .replace("trace_samples = true", "trace_samples = false");
    assert!(toml.contains(&url));
    let path = config.with_file_name(format!("{name}-s3.toml"));
    std::fs::write(&path, toml).unwrap();
    let disk = server.root.path().join("devise").join(&name);
    (
        path,
        RunAt {
            url,
            disk,
            s3_port: Some(server.port),
        },
    )
}

fn local(config: &Path) -> RunAt {
    let disk = run_dir(config);
    RunAt {
        url: disk.to_str().unwrap().to_string(),
        disk,
        s3_port: None,
    }
}

/// The local S3 server when `store` is `"s3"` (`Some(None)` for `"local"`); `None` when the
/// server is not installed (the caller skips; a failure under `CI=true`).
fn server_for(store: &str) -> Option<Option<S3Server>> {
    if store == "s3" {
        start_server("devise").map(Some)
    } else {
        Some(None)
    }
}

/// `config` as it is (local run dir) or moved into the S3 server's bucket.
fn place(config: &Path, server: Option<&S3Server>) -> (PathBuf, RunAt) {
    match server {
        Some(s) => at_s3(config, s),
        None => (config.to_path_buf(), local(config)),
    }
}

/// `devise-launch --nproc-per-node N ... -- devise train --config C WORKER_ARGS`.
fn launch_cmd(
    nproc: usize,
    launcher_args: &[&str],
    config: &Path,
    worker_args: &[&str],
) -> Command {
    // Released here: every caller runs the command right away.
    let port = ports::reserve().release().to_string();
    let mut cmd = Command::new(launcher());
    cmd.args(["--nproc-per-node", &nproc.to_string()])
        .args(["--master-port", &port, "--stop-timeout-secs", "10"])
        .args(launcher_args)
        .arg("--")
        .arg(devise())
        .args(["train", "--config", config.to_str().unwrap()])
        .args(worker_args);
    cmd
}

fn output(mut cmd: Command, s3_port: Option<u16>) -> Output {
    if let Some(port) = s3_port {
        cmd = s3_env(cmd, port);
    }
    cmd.output().unwrap()
}

/// `(step, stage)` of every metrics line.
fn stages(run: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["stage"].as_str()?.to_string())))
        .collect()
}

fn train_state(run: &Path) -> serde_json::Value {
    let latest = std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap();
    let path = run
        .join("checkpoints")
        .join(latest.trim())
        .join("train_state.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn reference(dir: &Path, softmax_epochs: f64, extra: &str) -> PathBuf {
    let config = write_config(dir, "reference", softmax_epochs, extra);
    let out = output(launch_cmd(2, &[], &config, &[]), None);
    assert!(out.status.success(), "{}", text(&out));
    run_dir(&config)
}

fn stopped_and_resumed_equals_uninterrupted(store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server_for(store) else {
        return;
    };
    // 0.2 epochs of softmax (19 steps), 3 devise steps on cached features, 3 finetune steps.
    let reference = reference(dir.path(), 0.2, "");
    let ref_stages = stages(&reference);
    let softmax_end = ref_stages
        .iter()
        .filter(|(_, s)| s == "softmax")
        .map(|(step, _)| *step)
        .max()
        .unwrap();
    let total = ref_stages.last().unwrap().0;
    // Between checkpoints (every 2 steps), on one, at the softmax stage's end, inside the
    // devise stage (cached features), inside finetune.
    let stops = [5, 12, softmax_end, softmax_end + 2, total - 1];

    let config = write_config(dir.path(), "stopped", 0.2, "");
    let (config, run) = place(&config, server.as_ref());
    for stop in stops {
        let s = stop.to_string();
        let out = output(
            launch_cmd(2, &[], &config, &["--stop-after-step", &s]),
            run.s3_port,
        );
        let log = text(&out);
        assert_eq!(out.status.code(), Some(75), "stop at {stop}:\n{log}");
        let step = devise::checkpoint::find_latest(&run.store()).unwrap();
        assert_eq!(step, Some(stop), "checkpoint written at the stop");
    }
    let out = output(
        launch_cmd(2, &[], &config, &["--resume", "auto"]),
        run.s3_port,
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains(&format!("resumed from {}", run.url)), "{log}");
    assert_eq!(
        losses(&run.disk),
        losses(&reference),
        "{store}: per-step losses after {} stops",
        stops.len()
    );
    assert!(
        final_weights(&run.disk) == final_weights(&reference),
        "{store}: final weights differ"
    );
    assert_eq!(
        train_state(&run.disk)["samples_seen"].as_u64(),
        Some(total * 16)
    );
}

#[test]
fn stopped_at_five_steps_and_resumed_equals_uninterrupted_local() {
    stopped_and_resumed_equals_uninterrupted("local");
}

#[test]
fn stopped_at_five_steps_and_resumed_equals_uninterrupted_s3() {
    stopped_and_resumed_equals_uninterrupted("s3");
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Where the runs of [`exact_resume_on_one_and_on_four_ranks`] read their shards: the
/// synthetic shapes on this disk, or a URL in the local S3 server (its port for the workers'
/// environment), with extra `[data]` keys.
struct ShardsAt<'a> {
    url: Option<&'a str>,
    s3_port: Option<u16>,
    data_keys: &'a str,
}

const LOCAL_SHARDS: ShardsAt<'static> = ShardsAt {
    url: None,
    s3_port: None,
    data_keys: "",
};

/// `write_config`'s run over 0.1 epochs of softmax (10 steps), reading `shards`.
fn config_reading(dir: &Path, name: &str, shards: &ShardsAt) -> PathBuf {
    let config = write_config(dir, name, 0.1, "");
    let local = format!("shards = \"{}\"", shapes().shards.display());
    let url = shards
        .url
        .map_or(local.clone(), |u| format!("shards = \"{u}\""));
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&local, &url)
        .replace("[data]\n", &format!("[data]\n{}", shards.data_keys));
    assert!(toml.contains(&url) && toml.contains(shards.data_keys));
    std::fs::write(&config, toml).unwrap();
    config
}

/// A 2-rank run stopped after step 7, resumed on 1 rank and on 4: per step, exactly the samples
/// of the uninterrupted 2-rank run.
fn exact_resume_on_one_and_on_four_ranks(shards: &ShardsAt) {
    let dir = tempfile::tempdir().unwrap();
    let reference = config_reading(dir.path(), "reference", shards);
    let out = output(launch_cmd(2, &[], &reference, &[]), shards.s3_port);
    assert!(out.status.success(), "{}", text(&out));
    let reference = run_dir(&reference);
    let want = trace(&reference, 2);
    let total = *want.keys().last().unwrap();

    let to1 = config_reading(dir.path(), "to1", shards);
    let to4 = config_reading(dir.path(), "to4", shards);
    // 2 ranks, stopped after step 7 (odd: between checkpoints, inside the softmax stage).
    let out = output(
        launch_cmd(2, &[], &to1, &["--stop-after-step", "7"]),
        shards.s3_port,
    );
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    std::fs::remove_dir_all(run_dir(&to4)).ok();
    copy_dir(&run_dir(&to1), &run_dir(&to4));

    // The same checkpoint resumed by 1 process (no launcher) and by 4.
    let mut one = Command::new(devise());
    one.args(["train", "--config", to1.to_str().unwrap()]);
    let out = output(one, shards.s3_port);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("step-000000007"), "{log}");
    let out = output(launch_cmd(4, &[], &to4, &[]), shards.s3_port);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("step-000000007"), "{log}");

    for (config, world) in [(&to1, 2), (&to4, 4)] {
        let run = run_dir(config);
        // Steps 1-7 from the 2 ranks, the rest from the new world: per step, exactly the
        // uninterrupted run's samples (ids: epoch + position in the global order, or cache rows);
        // `trace` also fails on a sample used by two ranks in one step.
        let got = trace(&run, world);
        assert_eq!(got, want, "{}: samples per step", run.display());
        let ids: Vec<&String> = got.values().flatten().collect();
        assert_eq!(ids.len() as u64, total * 16, "16 samples per step");
        assert_eq!(
            ids.iter().collect::<BTreeSet<_>>().len(),
            ids.len(),
            "a sample repeated within the run (all of it is inside epoch 0)"
        );
        let state = train_state(&run);
        assert_eq!(state["samples_seen"].as_u64(), Some(total * 16));
        assert_eq!(state["step"].as_u64(), Some(total));
        let world_after = if world == 2 { 1 } else { 4 };
        assert_eq!(state["world_size"].as_u64(), Some(world_after));
        // Another world size sums the gradient mean in another order: close, not bit-equal.
        assert_close(
            &losses(&run),
            &losses(&reference),
            &format!("resumed on {world_after} rank(s)"),
        );
    }
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_and_on_four_ranks_with_exact_sample_accounting() {
    exact_resume_on_one_and_on_four_ranks(&LOCAL_SHARDS);
}

/// The same from shards in the local S3 server, about 160 small train shards read in P = 4
/// virtual partitions (`[data] partitions = 4`): 1, 2 and 4 ranks all divide P, so every step's
/// global batch is the same on each.
#[test]
fn a_two_rank_checkpoint_resumes_on_one_and_on_four_ranks_from_s3_shards_in_four_partitions() {
    let Some(server) = start_server("devise") else {
        return;
    };
    let manifest = build_small_shards(&server, "shards", 160);
    assert!(manifest.splits["train"].shards.len() >= 80);
    exact_resume_on_one_and_on_four_ranks(&ShardsAt {
        url: Some("s3://devise/shards"),
        s3_port: Some(server.port),
        data_keys: "",
    });
}

const CHECKPOINT_FILES: [&str; 6] = [
    "model.safetensors",
    "optimizer.safetensors",
    "label_embedding.safetensors",
    "train_state.json",
    "config.toml",
    "manifest.json",
];

/// Where a checkpoint write is, seen from the disk (a local run dir, or the S3 server's files).
#[derive(Debug)]
struct WriteState {
    /// Newest step folder being written (local: `step-N.tmp`; S3: `step-N/` without manifest)
    /// and its file count.
    writing: Option<(u64, usize)>,
    /// Published steps (local: `step-N/`; S3: with `manifest.json`).
    published: Vec<u64>,
    latest: Option<u64>,
}

fn write_state(ck: &Path, s3: bool) -> WriteState {
    let mut st = WriteState {
        writing: None,
        published: Vec::new(),
        latest: std::fs::read_to_string(ck.join("LATEST"))
            .ok()
            .and_then(|t| t.trim().strip_prefix("step-")?.parse().ok()),
    };
    for entry in std::fs::read_dir(ck).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("step-") else {
            continue;
        };
        let (digits, tmp) = match rest.strip_suffix(".tmp") {
            Some(d) => (d, true),
            None => (rest, false),
        };
        let Ok(step) = digits.parse::<u64>() else {
            continue;
        };
        let files = CHECKPOINT_FILES
            .iter()
            .filter(|f| entry.path().join(f).exists())
            .count();
        let complete = if s3 {
            entry.path().join("manifest.json").exists()
        } else {
            !tmp
        };
        if complete {
            st.published.push(step);
        } else if st.writing.is_none_or(|(s, _)| step > s) {
            st.writing = Some((step, files));
        }
    }
    st.published.sort();
    st
}

fn kill_group_mid_checkpoint(store: &str, iterations: usize) {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = server_for(store) else {
        return;
    };
    let reference = reference(dir.path(), 0.6, "");
    let config = write_config(dir.path(), "killed", 0.6, "");
    // Keep only the newest checkpoint: retention deletes the previous one as soon as a newer
    // one is verified, the riskiest setting.
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("keep_last = 2", "keep_last = 1");
    std::fs::write(&config, toml).unwrap();
    let (config, run) = place(&config, server.as_ref());
    let s3 = server.is_some();
    let ck = run.disk.join("checkpoints");
    let log_dir = dir.path().join("logs");
    std::fs::create_dir_all(&log_dir).unwrap();

    // A first complete checkpoint (preempted after step 1).
    let out = output(
        launch_cmd(2, &[], &config, &["--stop-after-step", "1"]),
        run.s3_port,
    );
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    let mut known = devise::checkpoint::find_latest(&run.store()).unwrap();
    assert_eq!(known, Some(1));

    for i in 0..iterations {
        let phase = i % 4;
        let log = log_dir.join(format!("{i}.log"));
        let mut cmd = launch_cmd(2, &[], &config, &[]);
        cmd.env("DEVISE_FAULT", "checkpoint_pause_ms:150")
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(log.with_extension("err")).unwrap(),
            ));
        if let Some(port) = run.s3_port {
            cmd = s3_env(cmd, port);
        }
        let mut child: Child = cmd.spawn().unwrap();
        let before = known.unwrap();
        let started = Instant::now();
        // Wait for the chosen point of a newer checkpoint's write.
        let reached = loop {
            let st = write_state(&ck, s3);
            let newest = st.published.last().copied().filter(|&s| s > before);
            let hit = match phase {
                0 => st.writing.is_some_and(|(s, n)| s > before && n >= 1),
                1 => st.writing.is_some_and(|(s, n)| s > before && n >= 4),
                // Published and verified, LATEST not yet updated.
                2 => newest.is_some_and(|n| st.latest != Some(n)),
                // LATEST updated, the previous checkpoint not yet deleted by retention.
                _ => newest.is_some_and(|n| st.latest == Some(n)) && st.published.contains(&before),
            };
            if hit {
                break st;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "iteration {i}: the run ended ({status}) before phase {phase}:\n{}",
                    std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "iteration {i}: phase {phase} never reached: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        // SIGKILL the launcher and both workers at once.
        let mut pids = processes_of(&config);
        pids.push(child.id() as i32);
        let status = Command::new("kill")
            .arg("-9")
            .args(pids.iter().map(|p| p.to_string()))
            .stderr(Stdio::null())
            .status()
            .unwrap();
        let _ = status;
        child.wait().unwrap();
        let gone = Instant::now();
        while !processes_of(&config).is_empty() {
            assert!(gone.elapsed() < Duration::from_secs(20), "workers survived");
            std::thread::sleep(Duration::from_millis(20));
        }

        // A loadable checkpoint, no older than the last one known.
        let store = run.store();
        let latest = devise::checkpoint::find_latest(&store).unwrap();
        let step = latest.unwrap_or_else(|| {
            panic!("iteration {i} (phase {phase}, at {reached:?}): no loadable checkpoint")
        });
        assert!(step >= before, "iteration {i}: lost checkpoint {before}");
        match phase {
            // `LATEST` is the commit point: a complete step it does not name yet is ignored
            // (and written again by the resumed run).
            0..=2 => assert_eq!(step, before, "iteration {i} (phase {phase})"),
            _ => assert!(step > before, "iteration {i}: LATEST's step was not found"),
        }
        let loaded = devise::checkpoint::load(&store, step)
            .unwrap_or_else(|e| panic!("iteration {i}: step {step} does not load: {e:#}"));
        assert_eq!(loaded.state.step, step);
        known = Some(step);
    }

    // The run completes from whatever the kills left, with the uninterrupted run's results.
    let out = output(launch_cmd(2, &[], &config, &[]), run.s3_port);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(losses(&run.disk), losses(&reference));
    assert!(final_weights(&run.disk) == final_weights(&reference));
}

#[test]
fn sigkill_of_the_group_mid_checkpoint_10_times_always_leaves_a_loadable_one_local() {
    kill_group_mid_checkpoint("local", 10);
}

#[test]
fn sigkill_of_the_group_mid_checkpoint_10_times_always_leaves_a_loadable_one_s3() {
    kill_group_mid_checkpoint("s3", 10);
}

#[test]
fn a_hung_worker_is_noticed_by_its_heartbeat_and_the_group_restarts_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path(), 0.2, "");
    let config = write_config(dir.path(), "hung", 0.2, "");
    let mut cmd = launch_cmd(
        2,
        &["--max-restarts", "1", "--heartbeat-timeout-secs", "6"],
        &config,
        &[],
    );
    cmd.env("DEVISE_FAULT", "hang:9:1");
    let started = Instant::now();
    let out = output(cmd, None);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("no heartbeat for more than 6s from"));
    assert!(line.is_some_and(|l| l.contains("rank 1 (pid")), "{log}");
    assert!(
        log.contains("restarting the group (attempt 1 of 1)"),
        "{log}"
    );
    assert!(log.contains("resumed from"), "{log}");
    assert_eq!(losses(&run_dir(&config)), losses(&reference));
    assert!(final_weights(&run_dir(&config)) == final_weights(&reference));
    // Detected in seconds, not at the 60 s collective timeout.
    assert!(started.elapsed() < Duration::from_secs(120));

    // Without restarts: the launcher fails the group (exit 1) and names the hung rank.
    let config = write_config(dir.path(), "hung0", 0.2, "");
    let mut cmd = launch_cmd(2, &["--heartbeat-timeout-secs", "6"], &config, &[]);
    cmd.env("DEVISE_FAULT", "hang:3:0");
    let out = output(cmd, None);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("no heartbeat for more than 6s from"));
    assert!(line.is_some_and(|l| l.contains("rank 0 (pid")), "{log}");
}

#[test]
fn a_non_finite_loss_or_gradient_on_one_rank_stops_or_is_skipped_by_every_rank() {
    let dir = tempfile::tempdir().unwrap();

    // Default policy "stop": both ranks fail at step 4 naming rank 1; no update was applied, the
    // checkpoint of step 2 is the newest.
    let config = write_config(dir.path(), "stop", 0.1, "");
    let mut cmd = launch_cmd(2, &[], &config, &[]);
    cmd.env("DEVISE_FAULT", "nan_loss:4:1");
    let out = output(cmd, None);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    for rank in 0..2 {
        let prefix = format!("[rank {rank}] ");
        assert!(
            log.lines().any(|l| l.starts_with(&prefix)
                && l.contains(
                    "step 4 (softmax): non-finite loss (NaN/inf) on rank(s) 1; every rank stops"
                )),
            "rank {rank}:\n{log}"
        );
    }
    let store = Store::open(run_dir(&config).to_str().unwrap()).unwrap();
    assert_eq!(devise::checkpoint::find_latest(&store).unwrap(), Some(2));

    // "skip": a NaN loss on rank 1 at step 4 and an infinite gradient on rank 0 at step 6 are
    // skipped by both ranks (parameters stay identical: checked every step); the run completes.
    let config = write_config(dir.path(), "skip", 0.1, "");
    let toml = std::fs::read_to_string(&config).unwrap().replace(
        "trace_samples = true",
        "trace_samples = true\nnon_finite = \"skip\"",
    );
    std::fs::write(&config, toml).unwrap();
    let mut cmd = launch_cmd(2, &[], &config, &[]);
    cmd.env("DEVISE_FAULT", "nan_loss:4:1;inf_grad:6:0");
    let out = output(cmd, None);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("step 4 (softmax): non-finite loss (NaN/inf) on rank(s) 1; every rank skips"),
        "{log}"
    );
    assert!(
        log.contains(
            "step 6 (softmax): non-finite gradients (finite loss) on rank(s) 0; every rank skips"
        ),
        "{log}"
    );
    let run = run_dir(&config);
    assert_eq!(train_state(&run)["skipped_steps"].as_u64(), Some(2));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let skipped: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["train/skipped_steps"].as_u64() == Some(1))
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, [4, 6]);
    assert!(log.contains("parameters identical on all 2 ranks"), "{log}");

    // Skipping has a limit: two in a row with max_consecutive_skips = 1 stops.
    let config = write_config(dir.path(), "limit", 0.1, "");
    let toml = std::fs::read_to_string(&config).unwrap().replace(
        "trace_samples = true",
        "trace_samples = true\nnon_finite = \"skip\"\nmax_consecutive_skips = 1",
    );
    std::fs::write(&config, toml).unwrap();
    let mut cmd = launch_cmd(2, &[], &config, &[]);
    cmd.env("DEVISE_FAULT", "nan_loss:4:1;inf_grad:5:1");
    let out = output(cmd, None);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("step 5 (softmax): non-finite gradients (finite loss) on rank(s) 1; 2 steps in a row skipped"),
        "{log}"
    );
}

/// Starts `cmd`, waits until `metrics` has `lines` lines (steps logged), sends the process
/// SIGUSR1 (a preemption warning) and returns its output.
fn sigusr1_after_metrics_lines(
    cmd: &mut Command,
    metrics: &Path,
    lines: usize,
    limit: Duration,
) -> Output {
    signal_after_metrics_lines(cmd, metrics, lines, limit, "USR1")
}

/// [`sigusr1_after_metrics_lines`] with another signal (`kill -s NAME`).
fn signal_after_metrics_lines(
    cmd: &mut Command,
    metrics: &Path,
    lines: usize,
    limit: Duration,
    signal: &str,
) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(metrics).map_or(0, |m| m.lines().count()) < lines {
        assert!(
            started.elapsed() < limit,
            "fewer than {lines} metrics lines"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `run.preempt_signal = "usr2"`: SIGUSR2 (whose default action kills a process) stops a
/// worker started without the launcher (as plain srun starts it) with a checkpoint and exit
/// 75; `devise-launch --preempt-signal usr2` forwards SIGUSR2 to its workers as a preemption
/// (checkpoint, exit 75), and that run resumes to the uninterrupted run's losses. Both warn
/// that NCCL_PROXY_DUMP_SIGNAL=12 names the same signal.
#[test]
fn sigusr2_preempts_with_preempt_signal_usr2_with_and_without_the_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let warning = "NCCL_PROXY_DUMP_SIGNAL=12 names SIGUSR2, the preemption signal";

    // One worker, no launcher, the signal from the configuration.
    let config = write_config(dir.path(), "alone", 0.2, "");
    let mut cmd = Command::new(devise());
    cmd.args(["train", "--config", config.to_str().unwrap()])
        .args(["--set", "run.preempt_signal=usr2"])
        .env("NCCL_PROXY_DUMP_SIGNAL", "12");
    let metrics = run_dir(&config).join("metrics.jsonl");
    let out = signal_after_metrics_lines(&mut cmd, &metrics, 2, Duration::from_secs(120), "USR2");
    let log = text(&out);
    assert_eq!(out.status.code(), Some(75), "{:?}\n{log}", out.status);
    assert!(log.contains("SIGUSR2: finishing the current step"), "{log}");
    assert!(log.contains("preempted: checkpoint"), "{log}");
    assert!(log.contains(warning), "{log}");
    let store = Store::open(run_dir(&config).to_str().unwrap()).unwrap();
    assert!(devise::checkpoint::find_latest(&store).unwrap().is_some());

    // Two workers under the launcher, the signal from its flag.
    let reference = reference(dir.path(), 0.2, "");
    let config = write_config(dir.path(), "launched", 0.2, "");
    let metrics = run_dir(&config).join("metrics.jsonl");
    let mut cmd = launch_cmd(2, &["--preempt-signal", "usr2"], &config, &[]);
    cmd.env("NCCL_PROXY_DUMP_SIGNAL", "12");
    let out = signal_after_metrics_lines(&mut cmd, &metrics, 2, Duration::from_secs(120), "USR2");
    let log = text(&out);
    assert_eq!(out.status.code(), Some(75), "{:?}\n{log}", out.status);
    assert!(
        log.contains("got SIGUSR2: forwarded SIGUSR2 to 2 worker(s)"),
        "{log}"
    );
    assert!(log.contains("preempted: checkpoint"), "{log}");
    assert!(
        log.contains(&format!("devise-launch: warning: {warning}")),
        "{log}"
    );
    assert!(
        log.matches(warning).count() >= 3,
        "launcher and both workers warn: {log}"
    );
    let out = output(
        launch_cmd(
            2,
            &["--preempt-signal", "usr2"],
            &config,
            &["--resume", "auto"],
        ),
        None,
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resumed from"), "{log}");
    assert_eq!(losses(&run_dir(&config)), losses(&reference));
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn the_tiny_imagenet_config_resumes_with_resume_auto_after_sigusr1() {
    let (_, shards) = tiny::shards();
    let dir = tempfile::tempdir().unwrap();
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/tiny-imagenet-small.toml"
    );
    // The shipped configuration (ResNet-18, 56 px, augmentation, batch 64), on this module's 4
    // classes and shortened to a few steps per stage.
    let run = |name: &str| -> Command {
        let mut cmd = Command::new(devise());
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["train", "--config", config])
            .args([
                "--set",
                &format!("run.dir={}", dir.path().join(name).display()),
            ])
            .args(["--set", &format!("data.shards={}", shards.display())])
            .args(["--set", "labels.limit=4"])
            .args(["--set", "train.log_every_steps=1"])
            .args(["--set", "train.softmax.epochs=0.15"])
            .args(["--set", "train.devise.epochs=0.1"])
            .args(["--set", "train.finetune.epochs=0.1"]);
        cmd
    };
    let out = run("uninterrupted").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let metrics = dir.path().join("preempted/metrics.jsonl");
    let mut cmd = run("preempted");
    let out = sigusr1_after_metrics_lines(&mut cmd, &metrics, 2, Duration::from_secs(300));
    let log = text(&out);
    assert_eq!(out.status.code(), Some(75), "{log}");
    assert!(log.contains("preempted"), "{log}");
    let out = run("preempted")
        .args(["--resume", "auto"])
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resumed from"), "{log}");
    let (a, b) = (
        losses(&dir.path().join("preempted")),
        losses(&dir.path().join("uninterrupted")),
    );
    assert!(a.len() >= 6, "{a:?}");
    assert_eq!(a, b, "per-step losses after the SIGUSR1 resume");
    assert!(dir.path().join("preempted/report.md").exists());
}

/// `cluster/slurm/train.sbatch` on two "nodes" under a stand-in SLURM (tests/it/slurm.rs runs
/// both recipes under a real one-node SLURM; a real SLURM of two nodes needs two machines):
/// `srun` runs its command here once per node (with that node's `SLURM_NODEID` /
/// `SLURM_PROCID`, relaying signals to each), `scancel --signal=SIG JOB` signals that `srun`
/// (SLURM would signal the step's processes), `scontrol` records its arguments, and the
/// variables SLURM would set give a job of 2 nodes with 1 "GPU" each: two launcher processes
/// (`--nnodes 2` resolved from the SLURM variables, rendezvous at the first host of
/// `SLURM_JOB_NODELIST`), one worker each. SIGUSR1 to the batch script (what
/// `--signal=B:USR1@90` does) reaches the step; the workers checkpoint and exit 75, and the
/// script requeues the job. Running the script again (the requeued job) resumes with
/// `--resume auto` and finishes with the uninterrupted run's losses.
#[test]
fn the_slurm_recipe_runs_two_nodes_preempts_requeues_and_resumes_exactly() {
    slurm_recipe_preempt_requeue_resume(2);
}

fn slurm_recipe_preempt_requeue_resume(nodes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path(), 0.2, "");
    let config = write_config(dir.path(), &format!("slurm{nodes}"), 0.2, "");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = |name: &str, body: &str| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/bash\n{body}\n")).unwrap();
        Command::new("chmod").arg("+x").arg(&path).status().unwrap();
    };
    let srun_pid = dir.path().join("srun.pid");
    script(
        "srun",
        &format!(
            r#"while [[ $# -gt 0 && $1 == -* ]]; do shift; done
echo $$ > {srun_pid}
pids=()
for ((node = 0; node < {nodes}; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${{pids[@]}}"' USR1
trap 'kill -TERM "${{pids[@]}}"' TERM
rc=0
for pid in "${{pids[@]}}"; do
    wait "$pid"; code=$?
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; code=$?; done
    if [ "$code" -gt "$rc" ]; then rc=$code; fi
done
exit "$rc""#,
            srun_pid = srun_pid.display()
        ),
    );
    script(
        "scancel",
        &format!(
            r#"sig=${{1#--signal=}}
kill -s "$sig" "$(cat {srun_pid})""#,
            srun_pid = srun_pid.display()
        ),
    );
    let requeues = dir.path().join("scontrol.log");
    script(
        "scontrol",
        &format!("echo \"$@\" >> {}", requeues.display()),
    );
    // A job id whose SLURM-derived port (10000 + id % 20000) is free.
    let job_id = (0..20000u32)
        .map(|i| 4000 + (i * 7919 + std::process::id() + 10007 * nodes as u32) % 20000)
        .find(|id| std::net::TcpListener::bind(("127.0.0.1", (10000 + id % 20000) as u16)).is_ok())
        .unwrap();
    let sbatch = |_: ()| -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/cluster/slurm/train.sbatch"
        ))
        .arg(&config)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("DEVISE", devise())
        .env("DEVISE_LAUNCH", launcher())
        .env("SLURM_JOB_ID", job_id.to_string())
        .env("SLURM_JOB_NUM_NODES", nodes.to_string())
        .env("SLURM_NODEID", "0")
        .env(
            "SLURM_JOB_NODELIST",
            if nodes == 1 {
                "localhost"
            } else {
                "localhost,localhost"
            },
        )
        .env("SLURM_GPUS_ON_NODE", (2 / nodes).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    };
    let metrics = run_dir(&config).join("metrics.jsonl");
    let out = sigusr1_after_metrics_lines(&mut sbatch(()), &metrics, 5, Duration::from_secs(120));
    let log = text(&out);
    assert_eq!(out.status.code(), Some(75), "{log}");
    assert!(
        log.contains("devise: got USR1, passing it to the job step"),
        "{log}"
    );
    assert!(log.contains("world_size=2"), "{log}");
    for node in 0..nodes {
        let line = format!(
            "nnodes={nodes} node_rank={node} nproc_per_node={}",
            2 / nodes
        );
        assert!(log.contains(&line), "no '{line}' in {log}");
    }
    assert_eq!(
        std::fs::read_to_string(&requeues).unwrap().trim(),
        format!("requeue {job_id}")
    );

    let out = sbatch(()).output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resumed from"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&requeues).unwrap().lines().count(),
        1,
        "no requeue after success"
    );
    assert_eq!(losses(&run_dir(&config)), losses(&reference));
}
