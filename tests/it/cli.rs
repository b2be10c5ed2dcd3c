//! Scope: the `devise` binary as a user runs it — `data build-shards`, `train --dry-run`,
//! configuration errors (exit 1, message names the key), preemption (exit 75 after writing a
//! checkpoint) and resume to completion (exit 0, report written).
use crate::common::tiny::{config_toml, shards, tiny_classes};
use std::process::Command;

fn devise() -> Command {
    Command::new(env!("CARGO_BIN_EXE_devise"))
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn build_shards_command_writes_manifest() {
    let tree = tiny_classes(&["n01443537", "n01629819", "n01641577", "n01644900"]);
    let dst = tempfile::tempdir().unwrap();
    let classes = dst.path().join("classes.txt");
    std::fs::write(
        &classes,
        "# two of them\nn01629819\textra column\nn01443537\nn01641577\n",
    )
    .unwrap();
    let out = devise()
        .args(["data", "build-shards", "--src"])
        .arg(&tree)
        .arg("--dst")
        .arg(dst.path().join("shards"))
        .args([
            "--limit-classes",
            "2",
            "--shard-size-bytes",
            "300000",
            "--classes",
        ])
        .arg(&classes)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.path().join("shards/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["classes"],
        serde_json::json!(["n01443537", "n01629819"])
    );
    assert_eq!(manifest["splits"]["train"]["samples"], 1000);
    assert!(
        manifest["splits"]["train"]["shards"]
            .as_array()
            .unwrap()
            .len()
            > 1
    );
}

/// `devise <args> <cfg>` (args end with `--config`), its output.
fn train_cli(args: &[&str], cfg: &std::path::Path) -> std::process::Output {
    devise().args(args).arg(cfg).output().unwrap()
}

#[test]
#[cfg_attr(devise_no_shared, ignore = "needs ../shared (real ImageNet data)")]
fn train_dry_run_errors_preemption_and_resume() {
    let (_dir, shards) = shards();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, config_toml(shards, &dir.path().join("run"))).unwrap();

    let out = train_cli(&["train", "--dry-run", "--config"], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("3 seen") && plan.contains("total steps 9"),
        "{plan}"
    );
    assert!(
        !dir.path().join("run/checkpoints").exists(),
        "--dry-run must not train"
    );

    let out = train_cli(&["train", "--set", "train.bogus_key=1", "--config"], &cfg);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_key"));

    let out = train_cli(&["train", "--stop-after-step", "4", "--config"], &cfg);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir
        .path()
        .join("run/checkpoints/step-000000004/manifest.json")
        .exists());

    let out = train_cli(&["train", "--config"], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("zero_shot/devise_0") && stdout.contains("report:"),
        "{stdout}"
    );
    assert!(dir.path().join("run/report.md").exists());
}
