//! The rendezvous key-value store: how the ranks of one job find each other.
//!
//! Rank 0 hosts it on `0.0.0.0:MASTER_PORT` (a tokio task in this process); every rank,
//! rank 0 included, connects to `MASTER_ADDR:MASTER_PORT` (retrying while rank 0 is still
//! starting, up to `dist.timeout_secs`). It carries small values: the CPU backend's peer
//! addresses, NCCL's unique id, barrier counters.
//!
//! # Wire protocol (crosses processes and machines)
//!
//! Frames are a little-endian `u32` length then that many bytes of JSON ([`Request`] from the
//! client, [`Response`] from the server); frames over 16 MiB are refused and the connection
//! dropped. The first request of a connection must be `Hello` with the run's token and restart
//! attempt ([`crate::collective::WorkerEnv`]): anything else, a wrong token or another attempt's
//! worker gets `Error` and the connection is closed, so a stray or stale process never joins.
//! The token is never logged.
//!
//! # Failure
//!
//! `wait` blocks (server side) until every key exists or the timeout passes: the caller gets an
//! error naming the keys still missing. If rank 0 dies, every other rank's next store call fails
//! (connection closed). The store lives as long as rank 0's process: values are not persisted,
//! and a restarted group starts with an empty store.
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::WorkerEnv;

/// Largest frame either side accepts.
const MAX_FRAME: usize = 16 << 20;

/// Client -> server.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// First frame of every connection.
    Hello {
        /// The run's shared secret.
        token: String,
        /// The launcher's restart attempt; must equal the server's.
        attempt: u32,
        /// The connecting rank.
        rank: usize,
        /// The connecting rank's world size; must equal the server's.
        world_size: usize,
    },
    /// Stores `value` under `key` (replacing any value).
    Set {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// The value of `key`, if set; never blocks.
    Get {
        /// Key.
        key: String,
    },
    /// Blocks until every key is set, then returns their values in order.
    Wait {
        /// Keys.
        keys: Vec<String>,
        /// Give up after this many milliseconds.
        timeout_ms: u64,
    },
    /// Adds `delta` to the integer stored at `key` (missing: 0) and returns the new value.
    Add {
        /// Key.
        key: String,
        /// Increment.
        delta: i64,
    },
}

/// Server -> client.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// `Get`'s answer.
    Value(Option<Vec<u8>>),
    /// `Wait`'s answer.
    Values(Vec<Vec<u8>>),
    /// `Add`'s answer.
    Int(i64),
    /// The request failed (refused hello, timeout, malformed request).
    Error(String),
    /// Hello refused: the store serves an earlier restart attempt (the previous group's rank 0
    /// has not exited yet); the client retries until its deadline.
    Stale {
        /// The attempt the store serves.
        serves: u32,
    },
}

async fn write_frame<T: Serialize>(stream: &mut TcpStream, msg: &T) -> Result<()> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        bail!("rendezvous frame of {} bytes is over the limit", body.len());
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await?;
    Ok(())
}

async fn read_frame<T: for<'de> Deserialize<'de>>(stream: &mut TcpStream) -> Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        bail!("rendezvous frame of {len} bytes is over the limit of {MAX_FRAME}");
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// The server's state: the map and a version counter that wakes `Wait`ers on every change.
struct State {
    map: Mutex<HashMap<String, Vec<u8>>>,
    version: tokio::sync::watch::Sender<u64>,
    token: String,
    attempt: u32,
    world_size: usize,
}

impl State {
    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }
}

/// Serves one connection until it closes. Errors end only this connection.
async fn serve_connection(state: Arc<State>, mut stream: TcpStream, peer: SocketAddr) {
    let hello = tokio::time::timeout(Duration::from_secs(30), read_frame::<Request>(&mut stream));
    let rank = match hello.await {
        Ok(Ok(Request::Hello {
            token,
            attempt,
            rank,
            world_size,
        })) => {
            if token != state.token {
                tracing::warn!("rendezvous: refused {peer} (rank {rank}): wrong token");
                let _ =
                    write_frame(&mut stream, &Response::Error("refused: wrong token".into())).await;
                return;
            }
            if attempt > state.attempt {
                let _ = write_frame(
                    &mut stream,
                    &Response::Stale {
                        serves: state.attempt,
                    },
                )
                .await;
                return;
            }
            if world_size != state.world_size {
                tracing::warn!(
                    "rendezvous: refused {peer} (rank {rank}): world size {world_size}, the store serves {}",
                    state.world_size
                );
                let msg = format!(
                    "refused: world size {world_size}, but rank 0 has {} (the ranks were started with different WORLD_SIZE / --nnodes / --nproc-per-node)",
                    state.world_size
                );
                let _ = write_frame(&mut stream, &Response::Error(msg)).await;
                return;
            }
            if attempt != state.attempt {
                tracing::warn!(
                    "rendezvous: refused {peer} (rank {rank}): restart attempt {attempt}, the store serves attempt {}",
                    state.attempt
                );
                let msg = format!(
                    "refused: restart attempt {attempt}, the store serves attempt {}",
                    state.attempt
                );
                let _ = write_frame(&mut stream, &Response::Error(msg)).await;
                return;
            }
            rank
        }
        _ => {
            tracing::warn!("rendezvous: refused {peer}: no valid hello");
            let _ = write_frame(
                &mut stream,
                &Response::Error("refused: expected hello".into()),
            )
            .await;
            return;
        }
    };
    if write_frame(&mut stream, &Response::Ok).await.is_err() {
        return;
    }
    loop {
        let request = match read_frame::<Request>(&mut stream).await {
            Ok(r) => r,
            Err(_) => return, // closed (normal at exit) or garbage: drop the connection
        };
        let response = match request {
            Request::Hello { .. } => Response::Error("hello sent twice".into()),
            Request::Set { key, value } => {
                state.map.lock().expect("store lock").insert(key, value);
                state.changed();
                Response::Ok
            }
            Request::Get { key } => {
                Response::Value(state.map.lock().expect("store lock").get(&key).cloned())
            }
            Request::Add { key, delta } => {
                let mut map = state.map.lock().expect("store lock");
                let now = map
                    .get(&key)
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
                    .unwrap_or(0)
                    + delta;
                map.insert(key, now.to_string().into_bytes());
                drop(map);
                state.changed();
                Response::Int(now)
            }
            Request::Wait { keys, timeout_ms } => {
                let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
                let mut rx = state.version.subscribe();
                loop {
                    let found: Vec<Option<Vec<u8>>> = {
                        let map = state.map.lock().expect("store lock");
                        keys.iter().map(|k| map.get(k).cloned()).collect()
                    };
                    if found.iter().all(Option::is_some) {
                        break Response::Values(found.into_iter().flatten().collect());
                    }
                    match tokio::time::timeout_at(deadline, rx.changed()).await {
                        Ok(Ok(())) => continue,
                        _ => {
                            let missing: Vec<&String> = keys
                                .iter()
                                .zip(&found)
                                .filter(|(_, v)| v.is_none())
                                .map(|(k, _)| k)
                                .collect();
                            break Response::Error(format!(
                                "rank {rank}: timed out after {timeout_ms} ms waiting for {missing:?}"
                            ));
                        }
                    }
                }
            }
        };
        if write_frame(&mut stream, &response).await.is_err() {
            return;
        }
    }
}

/// A rank's handle on the store (and, on rank 0, the store itself).
pub struct Rendezvous {
    rt: tokio::runtime::Runtime,
    conn: Mutex<TcpStream>,
    rank: usize,
    world_size: usize,
    token: String,
    attempt: u32,
    timeout: Duration,
    local_ip: IpAddr,
    barriers: AtomicU64,
    /// The job spans several hosts (`local_world_size < world_size`).
    multi_node: bool,
    /// The store's port.
    port: u16,
}

impl Rendezvous {
    /// Rank 0 starts the store; every rank connects to `MASTER_ADDR:MASTER_PORT`, retrying
    /// while it is not up yet, until `timeout`. A rank 0 given port 0 hosts the store on a port
    /// the system chooses ([`Rendezvous::port`]), for ranks in the same process.
    ///
    /// Errors: rank 0 cannot bind the port (another job on it? set `MASTER_PORT`); the store is
    /// unreachable within `timeout`; the store refused the token or attempt.
    pub fn join(env: &WorkerEnv, timeout: Duration) -> Result<Rendezvous> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("devise-rendezvous")
            .enable_all()
            .build()
            .context("starting the rendezvous runtime")?;
        let mut port = env.master_port;
        if env.rank == 0 {
            let bind = SocketAddr::from(([0, 0, 0, 0], env.master_port));
            let listener = rt.block_on(TcpListener::bind(bind)).with_context(|| {
                format!(
                    "rank 0 cannot host the rendezvous store on port {} (another job using it? set MASTER_PORT / --master-port)",
                    env.master_port
                )
            })?;
            port = listener
                .local_addr()
                .context("the rendezvous store's address")?
                .port();
            let state = Arc::new(State {
                map: Mutex::new(HashMap::new()),
                version: tokio::sync::watch::channel(0).0,
                token: env.token.clone(),
                attempt: env.restart_attempt,
                world_size: env.world_size,
            });
            rt.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            tokio::spawn(serve_connection(state.clone(), stream, peer));
                        }
                        Err(e) => {
                            tracing::warn!("rendezvous: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        let addr = format!("{}:{port}", env.master_addr);
        let deadline = Instant::now() + timeout;
        let unreachable = || {
            anyhow!(
                "rank {}: rendezvous store at {addr} unreachable for {} s",
                env.rank,
                timeout.as_secs()
            )
        };
        let hello = Request::Hello {
            token: env.token.clone(),
            attempt: env.restart_attempt,
            rank: env.rank,
            world_size: env.world_size,
        };
        // Connect and say hello, retrying while the store is not up yet or still serves the
        // previous attempt (a restarted group may be faster than the old rank 0's exit).
        let (stream, local_ip) = loop {
            let connected = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr)).await
            });
            let mut stream = match connected {
                Ok(Ok(s)) => s,
                Ok(Err(e)) if Instant::now() >= deadline => {
                    return Err(anyhow!(e).context(unreachable()))
                }
                Err(_) if Instant::now() >= deadline => return Err(unreachable()),
                _ => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            stream.set_nodelay(true).ok();
            let local_ip = stream.local_addr()?.ip();
            let answer: Response = rt
                .block_on(async {
                    write_frame(&mut stream, &hello).await?;
                    tokio::time::timeout(timeout, read_frame(&mut stream))
                        .await
                        .map_err(|_| anyhow!("no answer to hello within {} s", timeout.as_secs()))?
                })
                .with_context(|| format!("rank {}: rendezvous with {addr}", env.rank))?;
            match answer {
                Response::Ok => break (stream, local_ip),
                Response::Stale { serves } if Instant::now() < deadline => {
                    tracing::info!(
                        "rank {}: the store at {addr} still serves restart attempt {serves} (this is {}): waiting for it to go",
                        env.rank,
                        env.restart_attempt
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                Response::Stale { serves } => bail!(
                    "rank {}: the store at {addr} still served restart attempt {serves} after {} s (this is attempt {})",
                    env.rank,
                    timeout.as_secs(),
                    env.restart_attempt
                ),
                Response::Error(e) => {
                    bail!("rank {}: the rendezvous store at {addr} {e}", env.rank)
                }
                other => bail!(
                    "rank {}: unexpected hello answer from {addr}: {other:?}",
                    env.rank
                ),
            }
        };
        let store = Rendezvous {
            rt,
            conn: Mutex::new(stream),
            rank: env.rank,
            world_size: env.world_size,
            token: env.token.clone(),
            attempt: env.restart_attempt,
            timeout,
            local_ip,
            barriers: AtomicU64::new(0),
            multi_node: env.local_world_size < env.world_size,
            port,
        };
        // Two workers with the same RANK would corrupt every collective: refuse the second.
        if store.add(&format!("rank/{}", env.rank), 1)? > 1 {
            bail!(
                "rank {}: another worker already joined as rank {} (RANK / SLURM_PROCID duplicated?)",
                env.rank,
                env.rank
            );
        }
        Ok(store)
    }

    fn call(&self, request: Request) -> Result<Response> {
        let mut conn = self.conn.lock().expect("store connection lock");
        let timeout = self.timeout + Duration::from_secs(5);
        let answer = self.rt.block_on(async {
            write_frame(&mut conn, &request).await?;
            tokio::time::timeout(timeout, read_frame::<Response>(&mut conn))
                .await
                .map_err(|_| anyhow!("no answer within {} s", timeout.as_secs()))?
        });
        match answer {
            Ok(Response::Error(e)) => bail!("rendezvous store: {e}"),
            Ok(r) => Ok(r),
            Err(e) => Err(e.context(format!(
                "rank {}: rendezvous store connection failed (rank 0 gone?)",
                self.rank
            ))),
        }
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.call(Request::Set {
            key: key.into(),
            value: value.to_vec(),
        })?;
        Ok(())
    }

    /// The value of `key`, if any (does not wait).
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.call(Request::Get { key: key.into() })? {
            Response::Value(v) => Ok(v),
            other => bail!("unexpected answer to get: {other:?}"),
        }
    }

    /// Waits (up to `dist.timeout_secs`) until every key is set; their values in order.
    pub fn wait(&self, keys: &[String]) -> Result<Vec<Vec<u8>>> {
        match self.call(Request::Wait {
            keys: keys.to_vec(),
            timeout_ms: self.timeout.as_millis() as u64,
        })? {
            Response::Values(v) => Ok(v),
            other => bail!("unexpected answer to wait: {other:?}"),
        }
    }

    /// Adds `delta` to the counter `key`; the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        match self.call(Request::Add {
            key: key.into(),
            delta,
        })? {
            Response::Int(v) => Ok(v),
            other => bail!("unexpected answer to add: {other:?}"),
        }
    }

    /// Returns once every rank has called `barrier` the same number of times (or errors after
    /// `dist.timeout_secs`).
    pub fn barrier(&self) -> Result<()> {
        let n = self.barriers.fetch_add(1, Ordering::SeqCst);
        let count = self.add(&format!("barrier/{n}/arrived"), 1)?;
        if count == self.world_size as i64 {
            self.set(&format!("barrier/{n}/done"), b"1")?;
        }
        self.wait(&[format!("barrier/{n}/done")])
            .with_context(|| format!("barrier {n}"))?;
        Ok(())
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The run's token (backends use it in their own handshakes; never log it).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The launcher's restart attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The per-operation timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// This host's address on the interface that reaches rank 0 (what peers should dial).
    pub fn local_ip(&self) -> IpAddr {
        self.local_ip
    }

    /// Whether the job spans several hosts.
    pub fn multi_node(&self) -> bool {
        self.multi_node
    }

    /// The TCP port of the store this rank joined.
    pub fn port(&self) -> u16 {
        self.port
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::collective::EnvSource;

    /// Rank 0 of a `world`-rank group, hosting its store on a port the system chose when it
    /// bound it (no other program can take the port in between), and that port for the other
    /// ranks.
    pub(crate) fn host(world: usize, token: &str, timeout: Duration) -> (Rendezvous, u16) {
        let store = Rendezvous::join(&env(0, world, 0, token), timeout).unwrap();
        let port = store.port();
        assert_ne!(port, 0);
        (store, port)
    }

    pub(crate) fn env(rank: usize, world: usize, port: u16, token: &str) -> WorkerEnv {
        WorkerEnv {
            rank,
            local_rank: rank,
            world_size: world,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            run_id: "test".into(),
            token: token.into(),
            restart_attempt: 0,
            source: EnvSource::Torchrun,
            read_from: Vec::new(),
        }
    }

    #[test]
    fn set_get_wait_add_barrier_across_threads() {
        let t = Duration::from_secs(10);
        let (host, port) = host(3, "secret", t);
        let mut host = Some(host);
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let hosted = host.take();
                std::thread::spawn(move || {
                    let s = hosted.unwrap_or_else(|| {
                        Rendezvous::join(&env(rank, 3, port, "secret"), t).unwrap()
                    });
                    s.set(&format!("addr/{rank}"), format!("r{rank}").as_bytes())
                        .unwrap();
                    let all = s
                        .wait(&(0..3).map(|r| format!("addr/{r}")).collect::<Vec<_>>())
                        .unwrap();
                    assert_eq!(all, vec![b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
                    s.add("count", 2).unwrap();
                    s.barrier().unwrap();
                    assert_eq!(s.get("count").unwrap(), Some(b"6".to_vec()));
                    assert_eq!(s.get("nothing").unwrap(), None);
                    s.barrier().unwrap();
                    s // keep rank 0's store alive until everyone is done
                })
            })
            .collect();
        let stores: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        drop(stores);
    }

    #[test]
    fn wrong_token_and_stray_connections_are_refused() {
        let t = Duration::from_secs(5);
        let (host, port) = host(2, "right", t);
        let e = Rendezvous::join(&env(1, 2, port, "wrong"), t)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("wrong token"), "{e:#}");
        // A stray client speaking another protocol: refused, and the store keeps serving.
        {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
        // A worker of an older attempt is refused at once; one of a newer attempt waits for
        // the old store to go, and gives up at its deadline.
        let host1 = {
            let mut e = env(0, 2, 0, "right");
            e.restart_attempt = 1;
            e
        };
        let h1 = Rendezvous::join(&host1, t).unwrap();
        let mut old = env(1, 2, h1.port(), "right");
        old.restart_attempt = 0;
        let e = Rendezvous::join(&old, t).err().unwrap();
        assert!(format!("{e:#}").contains("restart attempt 0"), "{e:#}");
        drop(h1);
        let mut newer = env(1, 2, port, "right");
        newer.restart_attempt = 1;
        let e = Rendezvous::join(&newer, Duration::from_millis(1200))
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("still served restart attempt 0"),
            "{e:#}"
        );
        let e = Rendezvous::join(&env(1, 3, port, "right"), t)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("world size 3"), "{e:#}");
        let ok = Rendezvous::join(&env(1, 2, port, "right"), t).unwrap();
        ok.set("k", b"v").unwrap();
        assert_eq!(host.get("k").unwrap(), Some(b"v".to_vec()));
        let e = Rendezvous::join(&env(1, 2, port, "right"), t)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("already joined as rank 1"),
            "{e:#}"
        );
    }

    #[test]
    fn wait_times_out_naming_the_missing_key() {
        let s = Rendezvous::join(&env(0, 2, 0, "t"), Duration::from_millis(300)).unwrap();
        let e = s.wait(&["never".to_string()]).unwrap_err();
        assert!(format!("{e:#}").contains("never"), "{e:#}");
    }

    #[test]
    fn unreachable_store_is_an_error_after_the_timeout() {
        // Bound, never listening: connections to it are refused, and no other program can
        // listen on it meanwhile.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
        let port = socket.local_addr().unwrap().port();
        let started = Instant::now();
        let e = Rendezvous::join(&env(1, 2, port, "t"), Duration::from_millis(500))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("unreachable"), "{e:#}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
