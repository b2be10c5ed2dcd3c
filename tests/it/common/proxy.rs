//! A counting HTTP/1.1 proxy in front of the local S3 server ([`super::s3`]): it forwards every
//! request unchanged (the `Host` header included, so SigV4 signatures still verify) and counts,
//! per (rank, method, object path), the requests and the response body bytes it passed on. The
//! rank is read from the request's `User-Agent` (`devise/<version> rank/<R>`, see
//! `devise::storage`); requests without one count under `None`.
//!
//! hyper parses both sides (the request heads, keep-alive connections carrying several requests,
//! chunked or `Content-Length` bodies), so every body byte is attributed to the request it
//! answers, not guessed from a raw byte stream.
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What went through the proxy for one (rank, method, path).
#[derive(Debug, Default)]
pub struct Tally {
    pub requests: AtomicU64,
    /// Response body bytes passed on to the client.
    pub bytes: AtomicU64,
}

/// (rank from the User-Agent, method, path without the query).
pub type Key = (Option<u64>, String, String);

/// A running proxy; its thread and runtime live until the test process ends.
pub struct CountingProxy {
    pub port: u16,
    counts: Arc<Mutex<BTreeMap<Key, Arc<Tally>>>>,
}

type ProxyBody = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

/// Serves HTTP/1.1 on a free port of 127.0.0.1 from a thread (and runtime) of its own, every
/// request answered by `handle(state, request)`; returns the port. The proxies of the tests are
/// built on it.
pub fn serve<S, H, F, B>(state: S, handle: H) -> u16
where
    S: Clone + Send + 'static,
    H: Fn(S, hyper::Request<hyper::body::Incoming>) -> F + Copy + Send + 'static,
    F: std::future::Future<Output = Result<hyper::Response<B>, std::io::Error>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((client, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| handle(state.clone(), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(client), service)
                        .await;
                });
            }
        });
    });
    port
}

impl CountingProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> CountingProxy {
        let counts: Arc<Mutex<BTreeMap<Key, Arc<Tally>>>> = Arc::default();
        let port = serve(counts.clone(), move |counts, request| {
            forward(counts, upstream, request)
        });
        CountingProxy { port, counts }
    }

    /// `(requests, response body bytes)` per (rank, method, path) so far.
    pub fn counts(&self) -> BTreeMap<Key, (u64, u64)> {
        self.counts
            .lock()
            .unwrap()
            .iter()
            .map(|(k, t)| {
                let tally = (
                    t.requests.load(Ordering::SeqCst),
                    t.bytes.load(Ordering::SeqCst),
                );
                (k.clone(), tally)
            })
            .collect()
    }
}

/// The `R` of `rank/R` in a User-Agent.
pub fn rank_of(user_agent: &str) -> Option<u64> {
    user_agent
        .split_whitespace()
        .find_map(|token| token.strip_prefix("rank/")?.parse().ok())
}

/// Sends `request` to `127.0.0.1:upstream` on a fresh connection; its answer, body unread.
pub async fn send_upstream(
    upstream: u16,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<hyper::body::Incoming>, std::io::Error> {
    let io_error = |e: hyper::Error| std::io::Error::other(e);
    let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(server))
            .await
            .map_err(io_error)?;
    tokio::spawn(connection);
    sender.send_request(request).await.map_err(io_error)
}

/// One request: forwarded on a fresh upstream connection, its answer's body counted as it
/// passes.
async fn forward(
    counts: Arc<Mutex<BTreeMap<Key, Arc<Tally>>>>,
    upstream: u16,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<ProxyBody>, std::io::Error> {
    use http_body_util::BodyExt;
    let rank = request
        .headers()
        .get(hyper::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(rank_of);
    let key = (
        rank,
        request.method().to_string(),
        request.uri().path().to_string(),
    );
    let tally = counts.lock().unwrap().entry(key).or_default().clone();
    tally.requests.fetch_add(1, Ordering::SeqCst);
    let response = send_upstream(upstream, request).await?;
    Ok(response.map(|body| {
        body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                tally.bytes.fetch_add(data.len() as u64, Ordering::SeqCst);
            }
            frame
        })
        .boxed()
    }))
}

#[test]
fn ranks_are_read_from_the_user_agent() {
    assert_eq!(rank_of("devise/0.1.0 rank/3"), Some(3));
    assert_eq!(rank_of("site/2 devise/0.1.0 rank/12"), Some(12));
    assert_eq!(rank_of("devise/0.1.0"), None);
    assert_eq!(rank_of("devise/0.1.0 rank/x"), None);
}
