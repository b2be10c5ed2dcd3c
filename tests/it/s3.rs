//! Scope: object storage for real: a local S3 server (`s3s-fs` 0.14.1, installed by
//! `scripts/test.sh` into `.deps/s3s/bin`, started here on a free port of 127.0.0.1 and stopped
//! after) holds the shards, the checkpoints and the report. Shards are built into it and
//! verified from it (`devise data verify s3://...`), a run trains from it, is stopped
//! (preempted) and resumed from the checkpoint it wrote there, and its losses match the same run
//! on the local file system step for step. A 2-worker run (`devise-launch --nproc-per-node 2`)
//! streams the shards through a proxy that first answers `503 Slow Down` (retried with backoff)
//! and then cuts one download mid-body: the read resumes at its byte offset (a `Range` request)
//! and every shard's sha256 still matches. Credentials and
//! endpoint reach `devise` only through the standard `AWS_*` environment variables. The data is
//! the synthetic shapes (`common::synthetic`).
use crate::common::launch::{launcher, run_launcher};
use crate::common::s3::{s3_env, start_server, S3Server, ACCESS_KEY, SECRET_KEY};
use crate::common::synthetic::{config_toml, shapes};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `devise` with the server's credentials in the standard variables.
fn devise(server: &S3Server, args: &[&str]) -> Output {
    s3_env(Command::new(env!("CARGO_BIN_EXE_devise")), server.port)
        .args(args)
        .output()
        .unwrap()
}

/// A TCP proxy in front of the S3 server that answers its first `throttle` connections with
/// `503 Slow Down` (S3 throttling), then cuts ONE connection (both directions) once it has
/// passed `cut_after` response bytes: a download dying mid-body, as on a flaky network. It
/// records the `Range` headers of the requests it forwards.
struct CuttingProxy {
    port: u16,
    throttled: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
    ranges: Arc<Mutex<Vec<String>>>,
}

impl CuttingProxy {
    fn start(upstream: u16, throttle: u64, cut_after: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let throttled = Arc::new(AtomicU64::new(0));
        let cuts = Arc::new(AtomicU64::new(0));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let armed = Arc::new(AtomicBool::new(true));
        let (c, r, t) = (cuts.clone(), ranges.clone(), throttled.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { break };
                if t.load(Ordering::SeqCst) < throttle {
                    t.fetch_add(1, Ordering::SeqCst);
                    let mut request = [0u8; 4096];
                    let _ = client.read(&mut request);
                    let body = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                    let _ = write!(
                        client,
                        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                // Requests: forwarded as they are, Range headers noted.
                let (mut from, mut to, ranges) = (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    r.clone(),
                );
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                        for line in text.lines().filter(|l| l.starts_with("range:")) {
                            ranges.lock().unwrap().push(line.trim().to_string());
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
                // Responses: forwarded until the one cut.
                let (mut from, mut to) = (server, client);
                let (armed, cuts) = (armed.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut passed = 0u64;
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        passed += n as u64;
                        if passed > cut_after && armed.swap(false, Ordering::SeqCst) {
                            cuts.fetch_add(1, Ordering::SeqCst);
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        });
        CuttingProxy {
            port,
            throttled,
            cuts,
            ranges,
        }
    }
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

/// The synthetic shapes built into `s3://devise/shards`.
fn build_shards_into_bucket(server: &S3Server) {
    let tree = &shapes().tree;
    let out = devise(
        server,
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
}

#[test]
fn shards_checkpoints_and_report_live_in_s3_and_resume_from_there() {
    let Some(server) = start_server("devise") else {
        return;
    };
    build_shards_into_bucket(&server);
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

#[test]
fn two_workers_stream_shards_from_s3_and_a_cut_download_resumes_at_its_offset() {
    let Some(server) = start_server("devise") else {
        return;
    };
    build_shards_into_bucket(&server);
    // Throttle the first two connections (503 SlowDown: retried with backoff), then cut the
    // first response that passes 300 KB: a shard download (the manifest is ~2 KB).
    let proxy = CuttingProxy::start(server.port, 2, 300 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("two.toml");
    std::fs::write(
        &config,
        config_toml(
            Path::new("s3://devise/shards"),
            Path::new("s3://devise/two"),
        ),
    )
    .unwrap();
    let out = run_launcher(|port| {
        let mut cmd = s3_env(Command::new(launcher()), proxy.port);
        cmd.args(["--nproc-per-node", "2", "--master-port", port])
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_devise"))
            .args(["train", "--config", config.to_str().unwrap()]);
        cmd
    });
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        proxy.throttled.load(Ordering::SeqCst),
        2,
        "two requests throttled"
    );
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1, "one download was cut");
    let ranges = proxy.ranges.lock().unwrap().clone();
    eprintln!("range requests through the proxy: {ranges:?}");
    assert!(
        ranges
            .iter()
            .any(|r| r.starts_with("range: bytes=") && !r.starts_with("range: bytes=0-")),
        "the cut download resumed with a Range request from its offset: {ranges:?}"
    );
    // Every shard was streamed whole and checked against the manifest's sha256 at its end.
    let bucket = server.root.path().join("devise");
    let metrics = std::fs::read_to_string(bucket.join("two/metrics.jsonl")).unwrap();
    let mut windows = 0;
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v.get("data/shard_errors").is_some() {
            windows += 1;
            assert_eq!(v["data/shard_errors"], 0, "{line}");
            assert_eq!(v["data/skipped_samples/shard_error"], 0, "{line}");
            assert!(v["data/peak_buffered_mb"].as_f64().unwrap() > 0.0, "{line}");
        }
    }
    assert!(windows > 0, "metrics have data counters: {metrics}");
    assert!(bucket.join("two/report.md").is_file());
    assert_eq!(losses(&metrics).len(), 9, "{metrics}");
}

/// Faults and counts of a [`ChunkingProxy`], shared with its connection tasks.
#[derive(Default)]
struct ChunkingState {
    /// Presigned GETs (`X-Amz-Signature` in the query) still to answer `503 Slow Down`.
    throttle: AtomicU64,
    /// Cut the next presigned GET body that passes this many bytes (`u64::MAX`: none).
    cut_after: AtomicU64,
    throttled: AtomicU64,
    cuts: AtomicU64,
    /// Answers re-sent chunked.
    chunked: AtomicU64,
    /// `Range` and `If-Match` headers of the presigned GETs ("" when absent).
    requests: Mutex<Vec<(String, String)>>,
    /// `User-Agent` headers of the presigned GETs ("" when absent).
    agents: Mutex<Vec<String>>,
}

/// A loopback HTTP/1.1 proxy (hyper, on its own tokio runtime) in front of the S3 server: it
/// forwards every request unchanged (the `Host` header included, so SigV4 signatures still
/// verify) and re-sends every answer that has a body with `Transfer-Encoding: chunked` and no
/// `Content-Length`, as some S3-compatible gateways and proxies do (HEAD answers, which have no
/// body, pass unchanged). [`ChunkingProxy::faults`] makes it throttle and cut presigned GETs.
struct ChunkingProxy {
    port: u16,
    state: Arc<ChunkingState>,
}

type ProxyBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

impl ChunkingProxy {
    fn start(upstream: u16) -> ChunkingProxy {
        let state = Arc::new(ChunkingState::default());
        state.cut_after.store(u64::MAX, Ordering::SeqCst);
        let port = crate::common::proxy::serve(state.clone(), move |state, request| {
            chunking_forward(state, upstream, request)
        });
        ChunkingProxy { port, state }
    }

    /// Answers the next `throttle` presigned GETs with `503 Slow Down`, then cuts the first
    /// presigned GET body that passes `cut_after` bytes (the connection drops mid-body).
    fn faults(&self, throttle: u64, cut_after: u64) {
        self.state.throttle.store(throttle, Ordering::SeqCst);
        self.state.cut_after.store(cut_after, Ordering::SeqCst);
    }
}

/// One request through the [`ChunkingProxy`].
async fn chunking_forward(
    state: Arc<ChunkingState>,
    upstream: u16,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<ProxyBody>, std::io::Error> {
    use http_body_util::BodyExt;
    let method = request.method().clone();
    let presigned = method == hyper::Method::GET
        && request
            .uri()
            .query()
            .is_some_and(|q| q.contains("X-Amz-Signature="));
    if presigned {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let headers = (header("range"), header("if-match"));
        state.requests.lock().unwrap().push(headers);
        state.agents.lock().unwrap().push(header("user-agent"));
        let throttle = state
            .throttle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if throttle.is_ok() {
            state.throttled.fetch_add(1, Ordering::SeqCst);
            let body = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            return Ok(hyper::Response::builder()
                .status(503)
                .header("content-type", "application/xml")
                .body(
                    http_body_util::Full::new(bytes::Bytes::from(body))
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .unwrap());
        }
    }
    let io_error = |e: hyper::Error| std::io::Error::other(e);
    let response = crate::common::proxy::send_upstream(upstream, request).await?;
    let (mut parts, body) = response.into_parts();
    if method == hyper::Method::HEAD {
        return Ok(hyper::Response::from_parts(
            parts,
            body.map_err(io_error).boxed(),
        ));
    }
    // A body of unknown length: hyper sends it chunked.
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    state.chunked.fetch_add(1, Ordering::SeqCst);
    let cut_after = if presigned {
        state.cut_after.load(Ordering::SeqCst)
    } else {
        u64::MAX
    };
    let frames = futures::stream::unfold(
        (body, 0u64, state.clone()),
        move |(mut body, mut passed, state)| async move {
            let frame = body.frame().await?;
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => return Some((Err(io_error(e)), (body, passed, state))),
            };
            passed += frame.data_ref().map_or(0, |d| d.len() as u64);
            if passed > cut_after
                && state
                    .cut_after
                    .compare_exchange(cut_after, u64::MAX, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                state.cuts.fetch_add(1, Ordering::SeqCst);
                // An error instead of the rest: hyper drops the connection before the last chunk.
                let cut = std::io::Error::other("cut by the test proxy");
                return Some((Err(cut), (body, passed, state)));
            }
            Some((Ok(frame), (body, passed, state)))
        },
    );
    Ok(hyper::Response::from_parts(
        parts,
        http_body_util::StreamBody::new(frames).boxed(),
    ))
}

/// The status line and headers of a raw `GET path` through the proxy (unsigned: the server
/// answers with an error document, which is enough to see how the answer is framed).
fn raw_response_head(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    raw.split("\r\n\r\n").next().unwrap_or("").to_string()
}

#[test]
fn chunked_answers_without_content_length_are_read_through_presigned_urls() {
    let Some(server) = start_server("devise") else {
        return;
    };
    build_shards_into_bucket(&server);
    let proxy = ChunkingProxy::start(server.port);
    let head = raw_response_head(proxy.port, "/devise/shards/manifest.json");
    assert!(
        head.contains("transfer-encoding: chunked") && !head.contains("content-length"),
        "the proxy answers chunked, without Content-Length: {head}"
    );
    let via_proxy = |args: &[&str]| -> Output {
        s3_env(Command::new(env!("CARGO_BIN_EXE_devise")), proxy.port)
            .args(args)
            .output()
            .unwrap()
    };
    let switch_notice = format!(
        "http://127.0.0.1:{} answered the GET of s3://devise/",
        proxy.port
    );

    // verify: every shard read back whole, sizes and sha256 against the manifest. Two presigned
    // GETs throttled, one body cut after 300 KB (a shard: the manifest is ~2 KB) and resumed.
    proxy.faults(2, 300 * 1024);
    let out = via_proxy(&["data", "verify", "s3://devise/shards"]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("OK: "), "{log}");
    assert_eq!(
        log.matches(&switch_notice).count(),
        1,
        "the switch is logged once, naming the endpoint: {log}"
    );
    assert_eq!(proxy.state.throttled.load(Ordering::SeqCst), 2);
    assert_eq!(proxy.state.cuts.load(Ordering::SeqCst), 1);
    // Resumed reads: a Range from a later offset, guarded by the ETag.
    let resumed = |state: &ChunkingState| {
        let requests = state.requests.lock().unwrap();
        eprintln!("presigned GETs (range, if-match): {requests:?}");
        requests
            .iter()
            .filter(|(range, if_match)| {
                let from = range
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse::<u64>().ok());
                from.is_some_and(|n| n > 0) && !if_match.is_empty()
            })
            .count()
    };
    assert_eq!(
        resumed(&proxy.state),
        1,
        "the cut body resumed at its offset, guarded by its ETag"
    );
    // Presigned GETs name devise as the store's own requests do (` rank/R` only under `RANK`).
    let agent = format!("devise/{}", env!("CARGO_PKG_VERSION"));
    let agents = proxy.state.agents.lock().unwrap().clone();
    assert!(
        !agents.is_empty() && agents.iter().all(|a| a.starts_with(&agent)),
        "User-Agent of the presigned GETs: {agents:?}"
    );

    // Training streams the shards and keeps its run (checkpoints included) behind the proxy:
    // stopped after step 4, resumed from the checkpoint read back through it, with throttling
    // and a cut shard download again. Its losses match a direct run's.
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, run: &str| -> PathBuf {
        let toml = config_toml(Path::new("s3://devise/shards"), Path::new(run));
        let path = dir.path().join(name);
        std::fs::write(&path, toml).unwrap();
        path
    };
    let proxied_cfg = write("proxied.toml", "s3://devise/chunked-run");
    let direct_run = dir.path().join("direct-run");
    let direct_cfg = write("direct.toml", direct_run.to_str().unwrap());
    proxy.faults(2, 300 * 1024);
    let out = via_proxy(&[
        "train",
        "--config",
        proxied_cfg.to_str().unwrap(),
        "--stop-after-step",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    let out = via_proxy(&["train", "--config", proxied_cfg.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("resumed from s3://devise/chunked-run/checkpoints/step-000000004"),
        "{log}"
    );
    assert_eq!(proxy.state.throttled.load(Ordering::SeqCst), 4);
    assert_eq!(proxy.state.cuts.load(Ordering::SeqCst), 2);
    assert_eq!(resumed(&proxy.state), 2);
    let out = devise(
        &server,
        &["train", "--config", direct_cfg.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let bucket = server.root.path().join("devise");
    let metrics = std::fs::read_to_string(bucket.join("chunked-run/metrics.jsonl")).unwrap();
    for line in metrics.lines().filter(|l| l.contains("data/shard_errors")) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["data/shard_errors"], 0, "{line}");
    }
    let proxied_losses = losses(&metrics);
    let direct_losses = losses(&std::fs::read_to_string(direct_run.join("metrics.jsonl")).unwrap());
    assert_eq!(proxied_losses.len(), 9);
    assert_eq!(proxied_losses, direct_losses);
    assert!(
        proxy.state.chunked.load(Ordering::SeqCst) > 20,
        "the answers went through the proxy"
    );

    // Corrupted objects are still caught against the manifest, by name: one shard with a byte
    // changed (same size, other sha256), one cut short (other size); a missing one is named too.
    let shard_dir = bucket.join("shards");
    let originals: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&shard_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shard_dir.join("manifest.json")).unwrap())
            .unwrap();
    let names: Vec<String> = manifest["splits"]["train"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|shard| shard["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.len() >= 3, "enough shards to spoil three: {names:?}");
    let flipped = shard_dir.join(&names[0]);
    let mut bytes = std::fs::read(&flipped).unwrap();
    bytes[700] ^= 0x20;
    std::fs::write(&flipped, &bytes).unwrap();
    let short = shard_dir.join(&names[1]);
    let bytes = std::fs::read(&short).unwrap();
    std::fs::write(&short, &bytes[..bytes.len() - 512]).unwrap();
    std::fs::remove_file(shard_dir.join(&names[2])).unwrap();
    let out = via_proxy(&["data", "verify", "s3://devise/shards"]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    let lines_naming = |name: &str| -> String {
        log.lines()
            .filter(|l| l.contains(name))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        lines_naming(&names[0]).contains("but the manifest says"),
        "{log}"
    );
    assert!(lines_naming(&names[0]).contains("sha256"), "{log}");
    assert!(
        lines_naming(&names[1]).contains("bytes but the manifest says"),
        "{log}"
    );
    assert!(
        log.contains(&format!("s3://devise/shards/{}: not found", names[2])),
        "{log}"
    );

    // Streamed by training: every shard cut short by 512 bytes (its tar end blocks, so every
    // sample still parses) is caught by size and sha256 at its end (evaluation reads its split
    // to the end), warned by URL; every shard missing stops the run with an error naming one.
    for (path, bytes) in &originals {
        std::fs::write(path, &bytes[..bytes.len() - 512]).unwrap();
    }
    let short_cfg = write("short.toml", "s3://devise/short-run");
    let out = via_proxy(&["train", "--config", short_cfg.to_str().unwrap()]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let mismatches: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("shard s3://devise/shards/") && l.contains("does not match the manifest's")
        })
        .collect();
    assert!(!mismatches.is_empty(), "{log}");
    assert!(
        mismatches
            .iter()
            .all(|l| l.contains(" bytes) does not match")),
        "{mismatches:?}"
    );
    for (path, _) in &originals {
        std::fs::remove_file(path).unwrap();
    }
    let gone_cfg = write("gone.toml", "s3://devise/gone-run");
    let out = via_proxy(&["train", "--config", gone_cfg.to_str().unwrap()]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    let missing = log
        .lines()
        .find(|l| l.contains(": not found"))
        .unwrap_or_else(|| panic!("no error names the missing shard: {log}"));
    assert!(
        missing.contains("s3://devise/shards/") && missing.contains(".tar: not found"),
        "{missing}"
    );
}
