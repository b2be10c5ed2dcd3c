//! Scope: the `devise` binary as a user runs it — `data build-shards`, `train --dry-run`,
//! configuration errors (exit 1, message names the key; a wrong choice lists the values),
//! preemption (exit 75 after writing a checkpoint) and resume to completion (exit 0, report
//! written); `--help` of `devise`, its worker commands and `devise-launch` (every choice's
//! values, exit codes, environment); `--device` and `--dry-run` on `train`, `eval`, `predict`
//! and `bench-step`, also run once by `devise-launch --dry-run`; a run directory as `eval` /
//! `predict --checkpoint`. All on the synthetic shapes dataset (no `../shared`).
use crate::common::synthetic::{config_toml, shapes};
use std::process::Command;

fn devise() -> Command {
    Command::new(env!("CARGO_BIN_EXE_devise"))
}

#[test]
fn build_shards_command_writes_manifest() {
    let tree = &shapes().tree;
    let dst = tempfile::tempdir().unwrap();
    let classes = dst.path().join("classes.txt");
    std::fs::write(
        &classes,
        "# two of them\nblue_cross\textra column\nblue_circle\nblue_square\n",
    )
    .unwrap();
    let out = devise()
        .args(["data", "build-shards", "--src"])
        .arg(tree)
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
        serde_json::json!(["blue_circle", "blue_cross"])
    );
    assert_eq!(manifest["splits"]["train"]["samples"], 150);
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
fn train_dry_run_errors_preemption_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, config_toml(&shapes().shards, &dir.path().join("run"))).unwrap();

    let out = train_cli(&["train", "--dry-run", "--config"], &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("20 seen") && plan.contains("total steps 9"),
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

/// `devise-launch`, built beside `devise` by `cargo test --workspace`.
fn devise_launch() -> std::path::PathBuf {
    let path =
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_devise")).with_file_name("devise-launch");
    assert!(
        path.exists(),
        "{} not found: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `help` has a line `  <code>  <meaning>` under its "Exit codes:" heading.
fn lists_exit_code(help: &str, code: &str) -> bool {
    help.lines()
        .skip_while(|l| !l.starts_with("Exit codes:"))
        .any(|l| l.split_whitespace().next() == Some(code) && l.starts_with("  "))
}

/// The values of every typed choice, as `--help` must list them.
fn every_choice() -> Vec<(&'static str, String)> {
    use devise::config::{choice_values, DeviceKind};
    vec![
        ("device", choice_values::<DeviceKind>()),
        ("backend", choice_values::<devise::collective::Backend>()),
        ("stage", choice_values::<devise::model::StageKind>()),
        ("encoder", choice_values::<devise::model::Encoder>()),
        (
            "precision",
            choice_values::<devise::model::gpu::Precision>(),
        ),
        ("vectors format", choice_values::<devise::text::Format>()),
        (
            "non-finite policy",
            choice_values::<devise::optim::NonFinite>(),
        ),
        (
            "preempt signal",
            choice_values::<devise_launch::signal::PreemptSignal>(),
        ),
    ]
}

/// `devise --help` and the worker commands' `--help`: every choice with its values, the exit
/// codes, the environment variables read; test-only flags hidden. `--device` takes the same
/// values on all four worker commands, and a value outside them is a usage error listing them.
#[test]
fn help_lists_every_choice_exit_codes_and_environment() {
    for cmd in [
        &[][..],
        &["train"],
        &["eval"],
        &["predict"],
        &["bench-step"],
    ] {
        let out = devise().args(cmd).arg("--help").output().unwrap();
        let help = output_text(&out);
        assert!(out.status.success(), "{cmd:?}: {help}");
        for (what, values) in every_choice() {
            assert!(
                help.contains(&values),
                "{cmd:?}: no {what} values {values:?} in\n{help}"
            );
        }
        for code in ["0", "1", "2", "75", "130"] {
            assert!(
                lists_exit_code(&help, code),
                "{cmd:?}: no exit code {code} in\n{help}"
            );
        }
        for var in [
            "RUST_LOG",
            "DEVISE__SECTION__KEY",
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "SLURM_PROCID",
            "DEVISE_RDZV_TOKEN",
            "DEVISE_RUN_ID",
            "DEVISE_RESTART_ATTEMPT",
            "CUDA_VISIBLE_DEVICES",
        ] {
            assert!(help.contains(var), "{cmd:?}: no {var} in\n{help}");
        }
        assert!(
            !help.contains("stop-after-step"),
            "{cmd:?}: a test-only flag shows\n{help}"
        );
        if !cmd.is_empty() {
            assert!(
                help.contains("--device") && help.contains("--dry-run"),
                "{cmd:?}\n{help}"
            );
            let out = devise()
                .args(cmd)
                .args(["--device", "gpu"])
                .output()
                .unwrap();
            let err = output_text(&out);
            assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
            assert!(
                err.contains("'gpu'") && err.contains("cpu, cuda, auto"),
                "{cmd:?}: {err}"
            );
        }
    }

    let out = std::process::Command::new(devise_launch())
        .arg("--help")
        .output()
        .unwrap();
    let help = output_text(&out);
    assert!(out.status.success(), "{help}");
    for code in ["0", "1", "2", "75", "130"] {
        assert!(
            lists_exit_code(&help, code),
            "no exit code {code} in\n{help}"
        );
    }
    for want in [
        "- usr1:",
        "- usr2:",
        "- term:",
        "SLURM_JOB_ID",
        "SLURM_GPUS_ON_NODE",
        "CUDA_VISIBLE_DEVICES",
        "DEVISE_RDZV_TOKEN",
        "DEVISE__RUN__PREEMPT_SIGNAL",
    ] {
        assert!(help.contains(want), "no {want:?} in\n{help}");
    }
}

/// A configuration choice with a value outside its set: exit 1, the message names the key and
/// lists the values.
#[test]
fn a_wrong_choice_in_toml_names_the_key_and_the_values() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/smoke.toml"))
        .unwrap();
    for (section, key, bad, values) in [
        ("run", "preempt_signal", "hup", "usr1, usr2, term"),
        ("dist", "backend", "gloo", "auto, cpu, nccl"),
        (
            "model",
            "encoder",
            "vgg16",
            "resnet18, resnet34, resnet50, convnet",
        ),
        ("model", "precision", "fp16", "fp32, bf16"),
        ("run", "device", "gpu", "cpu, cuda, auto"),
        ("train", "non_finite", "ignore", "stop, skip"),
    ] {
        // Through --set (the TOML value syntax) and the environment: the same parser.
        let cfg = dir.path().join("run.toml");
        std::fs::write(&cfg, &base).unwrap();
        let out = devise()
            .args(["train", "--dry-run", "--config"])
            .arg(&cfg)
            .args(["--set", &format!("{section}.{key}=\"{bad}\"")])
            .output()
            .unwrap();
        let err = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(key) && err.contains(bad), "{key}: {err}");
        for v in values.split(", ") {
            assert!(err.contains(v), "{key}: no {v} in {err}");
        }
    }
}

/// The shared synthetic run (`common::synthetic::trained_run`): (its folder, the run directory,
/// the validation images). `devise train --device cpu` accepts it (`--dry-run`: it is trained).
fn synthetic_run() -> (&'static std::path::Path, std::path::PathBuf, Vec<String>) {
    let (dir, run) = crate::common::synthetic::trained_run();
    let out = devise()
        .args(["train", "--device", "cpu", "--dry-run", "--config"])
        .arg(dir.path().join("run.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let mut images: Vec<String> = std::fs::read_dir(shapes().tree.join("val"))
        .unwrap()
        .flat_map(|class| std::fs::read_dir(class.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path().to_str().unwrap().to_string())
        .collect();
    images.sort();
    (dir.path(), run.clone(), images)
}

/// `eval` and `predict` take a run directory for its latest checkpoint (the same report as
/// naming that step); a path that is neither is an error naming it. `--device` is accepted by
/// every worker command, and `devise-launch --dry-run` runs eval, predict and bench-step once
/// with `--dry-run` (nothing is evaluated).
#[test]
fn a_run_directory_stands_for_its_latest_checkpoint_and_every_worker_takes_device_and_dry_run() {
    let (dir, run, images) = synthetic_run();
    let latest = std::fs::read_to_string(run.join("checkpoints/LATEST")).unwrap();
    let step = run.join("checkpoints").join(latest.trim());
    let eval = |checkpoint: &std::path::Path| {
        let out = devise()
            .args(["eval", "--device", "cpu", "--checkpoint"])
            .arg(checkpoint)
            .output()
            .unwrap();
        let log = output_text(&out);
        assert!(out.status.success(), "{log}");
        let report = log
            .lines()
            .find_map(|l| l.strip_prefix("report: "))
            .unwrap_or_else(|| panic!("{log}"))
            .trim()
            .to_string();
        let json = std::path::Path::new(&report).with_file_name("report.json");
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        (
            doc["checkpoint"].clone(),
            doc["evaluations"][0]["rows"].clone(),
        )
    };
    let (from_run, rows_run) = eval(&run);
    let (from_step, rows_step) = eval(&step);
    assert_eq!(from_run, from_step);
    assert!(
        from_run.as_str().unwrap().ends_with(latest.trim()),
        "{from_run}"
    );
    assert!(rows_run.get("zero_shot/devise_0").is_some(), "{rows_run}");
    assert_eq!(rows_run, rows_step);

    let out = devise()
        .args([
            "predict",
            "--device",
            "cpu",
            "--labels",
            "seen",
            "--json",
            "--checkpoint",
        ])
        .arg(&run)
        .arg(&images[0])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        doc["checkpoint"].as_str().unwrap().ends_with(latest.trim()),
        "{doc}"
    );

    for cmd in ["eval", "predict"] {
        let nowhere = dir.join("no-such-run");
        let mut command = devise();
        command
            .args([cmd, "--labels", "seen", "--checkpoint"])
            .arg(&nowhere);
        if cmd == "predict" {
            command.arg(&images[0]);
        }
        let out = command.output().unwrap();
        let err = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains(nowhere.to_str().unwrap()) && !err.contains("panicked"),
            "{cmd}: {err}"
        );
    }

    let out = devise()
        .args([
            "bench-step",
            "--device",
            "cpu",
            "--encoder",
            "convnet",
            "--image-size",
            "16",
            "--batch-size",
            "2",
            "--classes",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--stage",
            "devise",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            &line["encoder"],
            &line["stage"],
            &line["precision"],
            &line["device"]
        ),
        (
            &serde_json::json!("convnet"),
            &serde_json::json!("devise"),
            &serde_json::json!("fp32"),
            &serde_json::json!("Cpu")
        )
    );

    // devise-launch --dry-run with commands other than train: each runs once with --dry-run.
    let evals_before = std::fs::read_dir(run.join("eval")).unwrap().count();
    let devise_bin = env!("CARGO_BIN_EXE_devise");
    let run_s = run.to_str().unwrap();
    for (worker, wanted) in [
        (
            vec![devise_bin, "eval", "--device", "cpu", "--checkpoint", run_s],
            vec![
                "world: rank 0",
                "checkpoint: ",
                latest.trim(),
                "device: cpu -> Cpu",
            ],
        ),
        (
            vec![
                devise_bin,
                "predict",
                "--device",
                "cpu",
                "--labels",
                "seen",
                "--checkpoint",
                run_s,
                &images[0],
            ],
            vec!["checkpoint: ", latest.trim(), "images: 1"],
        ),
        (
            vec![
                devise_bin,
                "bench-step",
                "--device",
                "cpu",
                "--collective",
                "cpu",
            ],
            vec!["world: rank 0", "device: cpu -> Cpu", "collective: cpu"],
        ),
    ] {
        let out = std::process::Command::new(devise_launch())
            .args(["--nproc-per-node", "1", "--dry-run", "--"])
            .args(&worker)
            .output()
            .unwrap();
        let log = output_text(&out);
        assert!(out.status.success(), "{worker:?}: {log}");
        assert!(log.contains("local worker 0: RANK=0 LOCAL_RANK=0"), "{log}");
        for w in wanted {
            assert!(log.contains(w), "{worker:?}: no {w:?} in\n{log}");
        }
    }
    assert_eq!(
        std::fs::read_dir(run.join("eval")).unwrap().count(),
        evals_before,
        "--dry-run must not evaluate"
    );
}
