//! Scope: object storage for real: a local S3 server (`s3s-fs` 0.14.1, installed by
//! `scripts/test.sh` into `.deps/s3s/bin`, started here on a free port of 127.0.0.1 and stopped
//! after) holds the shards, the checkpoints and the report. Shards are built into it and
//! verified from it (`devise data verify s3://...`), a run trains from it, is stopped
//! (preempted) and resumed from the checkpoint it wrote there, and its losses match the same run
//! on the local file system step for step. Credentials and endpoint
//! reach `devise` only through the standard `AWS_*` environment variables.
use crate::common::{shared_dir, tiny_classes};
use crate::train::config_toml;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// A running `s3s-fs`; killed on drop.
struct S3Server {
    child: Child,
    port: u16,
    root: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ACCESS_KEY: &str = "devise-test-access";
const SECRET_KEY: &str = "devise-test-secret";

/// `s3s-fs` from `.deps/s3s/bin`, or `None` with a printed reason (a failure under `CI=true`).
fn s3s_fs() -> Option<PathBuf> {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".deps/s3s/bin/s3s-fs");
    if bin.exists() {
        return Some(bin);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "CI=true but {} is missing (scripts/test.sh installs it)",
            bin.display()
        );
    }
    eprintln!(
        "SKIP: {} not found: `cargo install --locked s3s-fs@0.14.1 --features binary --root .deps/s3s`",
        bin.display()
    );
    None
}

fn start_server(bucket: &str) -> Option<S3Server> {
    let bin = s3s_fs()?;
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join(bucket)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "s3s-fs did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(S3Server { child, port, root })
}

/// `devise` with the server's credentials in the standard variables.
fn devise(server: &S3Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devise"))
        .args(args)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", server.port))
        .env("AWS_ALLOW_HTTP", "true")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn losses(metrics: &str) -> Vec<(u64, f64)> {
    metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["train/loss"].as_f64()?)))
        .collect()
}

#[test]
fn shards_checkpoints_and_report_live_in_s3_and_resume_from_there() {
    let Some(shared) = shared_dir() else {
        return;
    };
    let Some(server) = start_server("devise") else {
        return;
    };
    let _ = shared;
    let tree = tiny_classes(&["n01443537", "n01629819", "n01641577", "n01644900"]).unwrap();
    let out = devise(
        &server,
        &[
            "data",
            "build-shards",
            "--src",
            tree.to_str().unwrap(),
            "--dst",
            "s3://devise/shards",
            "--shard-size-bytes",
            "1048576",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let bucket = server.root.path().join("devise");
    assert!(
        bucket.join("shards/manifest.json").is_file(),
        "the manifest is an object in the bucket"
    );
    // verify reads every shard back from the bucket: sizes, sha256, samples, every image.
    let out = devise(&server, &["data", "verify", "s3://devise/shards"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("OK: "), "{}", text(&out));

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, run: &str| -> PathBuf {
        let toml = config_toml(Path::new("s3://devise/shards"), Path::new(run));
        let path = dir.path().join(name);
        std::fs::write(&path, toml).unwrap();
        path
    };
    let s3_cfg = write("s3.toml", "s3://devise/run");
    let local_run = dir.path().join("local-run");
    let local_cfg = write("local.toml", local_run.to_str().unwrap());

    // Stopped after step 4 (preempted: checkpoint in the bucket, exit 75), then resumed.
    let out = devise(
        &server,
        &[
            "train",
            "--config",
            s3_cfg.to_str().unwrap(),
            "--stop-after-step",
            "4",
        ],
    );
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(bucket
        .join("run/checkpoints/step-000000004/manifest.json")
        .is_file());
    let out = devise(&server, &["train", "--config", s3_cfg.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("resumed from s3://devise/run/checkpoints/step-000000004"),
        "{log}"
    );
    assert!(bucket.join("run/report.md").is_file());
    assert!(
        !log.contains(SECRET_KEY) && !log.contains(ACCESS_KEY),
        "credentials never logged"
    );

    // The same run on the local file system, uninterrupted: the same losses.
    let out = devise(&server, &["train", "--config", local_cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let s3_losses = losses(&std::fs::read_to_string(bucket.join("run/metrics.jsonl")).unwrap());
    let local_losses = losses(&std::fs::read_to_string(local_run.join("metrics.jsonl")).unwrap());
    assert_eq!(s3_losses.len(), 9);
    assert_eq!(s3_losses, local_losses);
}
