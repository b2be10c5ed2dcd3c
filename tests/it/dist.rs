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
//! are identical. The data is the synthetic shapes (`common::synthetic`).
use crate::common::launch::{
    assert_close, devise, final_weights, launch, launcher, losses, run_dir, text, trace,
    worker_pid, write_config,
};
use crate::common::ports;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn two_ranks_through_the_launcher_match_one_rank_with_twice_the_batch() {
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
    let dir = tempfile::tempdir().unwrap();
    // 0.6 epochs of softmax = 56 steps, checkpoint every 2 steps.
    let reference = write_config(dir.path(), "reference", 0.6, "");
    let out = launch(&[], &reference);
    assert!(out.status.success(), "{}", text(&out));

    for restarts in ["0", "1"] {
        let config = write_config(dir.path(), &format!("killed{restarts}"), 0.6, "");
        let port = ports::reserve();
        let mut cmd = Command::new(launcher());
        cmd.args([
            "--nproc-per-node",
            "2",
            "--master-port",
            &port.port().to_string(),
            "--stop-timeout-secs",
            "10",
        ])
        .args(["--max-restarts", restarts])
        .arg("--")
        .arg(devise())
        .args(["train", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        port.release();
        let child = cmd.spawn().unwrap();
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
                final_weights(&run_dir(&config)) == final_weights(&run_dir(&reference)),
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
    let dir = tempfile::tempdir().unwrap();
    let reference = write_config(dir.path(), "reference", 0.6, "");
    let out = launch(&[], &reference);
    assert!(out.status.success(), "{}", text(&out));

    let config = write_config(dir.path(), "nodes", 0.6, "");
    let lease = ports::reserve();
    let port = lease.port().to_string();
    lease.release();
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

#[test]
fn gradients_reduced_during_backward_give_the_parameters_of_reduction_after_it() {
    // BatchNorm (its statistics are broadcast within the step too) and buckets of ~1 KB: the
    // small convnet's gradients fill several, so the overlapped path starts them during
    // backward, in another order of time than the sequential path.
    let dir = tempfile::tempdir().unwrap();
    let buckets = "first_bucket_size_mb = 0.0005\nbucket_size_mb = 0.001\n";
    let config = |name: &str, overlap: bool| {
        let path = write_config(
            dir.path(),
            name,
            0.032,
            &format!("{buckets}overlap = {overlap}\n"),
        );
        let toml = std::fs::read_to_string(&path)
            .unwrap()
            .replace("norm = \"group\"", "norm = \"batch\"");
        std::fs::write(&path, toml).unwrap();
        path
    };
    let (on, off) = (config("on", true), config("off", false));
    for c in [&on, &off] {
        let out = launch(&[], c);
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("parameters identical on all 2 ranks"));
    }
    assert_eq!(
        losses(&run_dir(&on)),
        losses(&run_dir(&off)),
        "the same losses, bit for bit"
    );
    assert!(
        final_weights(&run_dir(&on)) == final_weights(&run_dir(&off)),
        "dist.overlap = true and false: bit-identical final weights"
    );
}
