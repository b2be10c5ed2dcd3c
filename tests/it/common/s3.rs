//! A local S3 server for real: `s3s-fs` 0.14.1, installed by `scripts/test.sh` into
//! `.deps/s3s/bin`, started on a reserved port of 127.0.0.1 and stopped on drop. Credentials and
//! endpoint reach `devise` only through the standard `AWS_*` environment variables.
use super::ports;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running `s3s-fs`; killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
    /// The served folder: each bucket is a folder, each object a file at its key.
    pub root: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const ACCESS_KEY: &str = "devise-test-access";
pub const SECRET_KEY: &str = "devise-test-secret";

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

/// A server with an empty `bucket`, answering on its port (a new port when another program
/// took the reserved one first).
pub fn start_server(bucket: &str) -> Option<S3Server> {
    let bin = s3s_fs()?;
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join(bucket)).unwrap();
    for _ in 0..4 {
        let port = ports::reserve().release();
        let mut child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(S3Server { child, port, root });
            }
            if child.try_wait().unwrap().is_some() {
                break; // could not bind: try another port
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("s3s-fs exited at start on 4 ports in a row");
}

/// `cmd` with the server's credentials and endpoint in the standard variables.
pub fn s3_env(mut cmd: Command, port: u16) -> Command {
    cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("AWS_ALLOW_HTTP", "true");
    cmd
}

/// The synthetic shapes ([`super::synthetic::shapes`]) built by `devise data build-shards` into
/// `s3://devise/<prefix>` of `server` in small shards, about `train_shards` of them in the train
/// split (the shard size is the split's bytes at 1 MiB shards over `train_shards`); returns the
/// manifest, read from the server's folder.
pub fn build_small_shards(
    server: &S3Server,
    prefix: &str,
    train_shards: u64,
) -> devise::data::shards::Manifest {
    let data = super::synthetic::shapes();
    let read = |dir: &std::path::Path| -> devise::data::shards::Manifest {
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
    };
    let train_bytes: u64 = read(&data.shards).splits["train"]
        .shards
        .iter()
        .map(|s| s.bytes)
        .sum();
    let shard_size = (train_bytes / train_shards).to_string();
    let out = s3_env(Command::new(env!("CARGO_BIN_EXE_devise")), server.port)
        .args(["data", "build-shards", "--src", data.tree.to_str().unwrap()])
        .args(["--dst", &format!("s3://devise/{prefix}")])
        .args(["--shard-size-bytes", &shard_size])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    read(&server.root.path().join("devise").join(prefix))
}
