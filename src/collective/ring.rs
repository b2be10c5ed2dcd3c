//! The `cpu` backend: ring all-reduce over TCP (Patarasuk & Yuan's bandwidth-optimal ring, the
//! algorithm of NCCL's and Gloo's rings), for tests, development and CPU-only clusters.
//!
//! # Topology (set up once, through the rendezvous store)
//!
//! Rank `r` listens on an ephemeral TCP port of the interface that reaches rank 0 and, on Linux,
//! on a Unix domain socket under the temporary directory; it publishes both with its host's
//! boot id as `ring/<r>`, connects to its successor `r + 1 mod w` (the *send* link) and accepts
//! its predecessor `r - 1 mod w` (the *recv* link). A successor on the same host (same boot id)
//! is dialled through the Unix socket (measured 1.4-1.6x the bandwidth of TCP loopback here,
//! BENCHMARKS.md); if that fails (another mount namespace, a container) or the hosts differ, TCP.
//! The connecting side must first present the run's token, its rank and the restart attempt and
//! gets a one-byte acknowledgement; anything else is dropped, so a stray client cannot inject
//! bytes into a reduction. Every link has `dist.timeout_secs` read/write timeouts: a peer that
//! hangs makes the operation fail after that long, a peer that dies makes it fail at once
//! (connection reset / end of stream).
//!
//! # All-reduce of `n` floats (`w` ranks)
//!
//! The buffer is cut into `w` segments. Reduce-scatter: at step `k = 0..w-1` rank `r` sends
//! segment `r - k` and receives segment `r - k - 1`, adding it into its own; after `w - 1` steps
//! it holds segment `r + 1` summed over all ranks (divided by `w` for a mean). All-gather: at
//! step `k` it sends segment `r + 1 - k` and receives segment `r - k`, overwriting its own. Each
//! rank sends and receives `2 (w-1)/w n` floats, the minimum.
//!
//! Pipelining: segments travel in chunks of [`CHUNK_BYTES`]. A sender thread writes chunks from
//! a queue while the calling thread receives: a chunk it finished reducing (or receiving, in the
//! all-gather) is queued for sending at once, so sending, receiving and adding overlap, and the
//! two directions of every link are busy at the same time (with blocking sockets they must be:
//! two ranks both writing a large buffer before reading would deadlock on full socket buffers).
//!
//! Every element is summed by exactly one rank and then copied, so the result is bit-identical
//! on every rank (the sum order depends on the world size, not on timing).
//!
//! `BFloat16` buffers are reduced in f32 (converted before, rounded after): the wire carries
//! f32, twice the bytes, and the sum is more accurate than a bf16 ring's.
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

use super::store::Rendezvous;
use super::{check_1d, check_flat, Collective, ReduceOp};

/// Bytes per pipelined chunk.
pub const CHUNK_BYTES: usize = 256 << 10;

/// A process group of `world_size` CPU ranks connected in a ring.
pub struct Ring {
    rank: usize,
    world_size: usize,
    /// To rank `r + 1`: written by the sender thread only.
    send: Link,
    /// From rank `r - 1`: read by the calling thread only.
    recv: Link,
    /// One operation at a time (the sockets carry one byte stream each).
    op: Mutex<()>,
    /// Kept alive: on rank 0 it hosts the store (the others may still be rendezvousing).
    _store: Rendezvous,
}

/// A byte range of the caller's buffer handed to the sender thread. It is only ever read by the
/// kernel (`send(2)` on the raw pointer, [`Link::send_span`]): no Rust reference to its bytes is
/// formed on the sender thread, so the calling thread's writes to bytes the successor has
/// already received (all-gather results arriving while the tail of a span is still being sent)
/// alias nothing.
struct Span(*const u8, usize);
// SAFETY: a Span points into the buffer of the operation in progress, which outlives the sender
// thread (scoped); the calling thread does not write a span's bytes before the successor has
// received them (see `all_reduce_f32` for why), and the sender only hands them to the kernel.
unsafe impl Send for Span {}

#[derive(serde::Serialize, serde::Deserialize)]
struct Handshake {
    token: String,
    rank: usize,
    attempt: u32,
}

/// What a rank publishes in the store for its predecessor to dial.
#[derive(serde::Serialize, serde::Deserialize)]
struct PeerAddress {
    /// `ip:port` of its TCP listener.
    tcp: String,
    /// Path of its Unix socket, if it has one.
    unix: Option<String>,
    /// Its host's boot id (Linux), which says whether the Unix socket is reachable.
    host: Option<String>,
}

/// This host's boot id: equal on two ranks exactly when they share a kernel.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string()).filter(|s| !s.is_empty())
}

/// A short tag of the token for file names (the token itself never leaves the store protocol).
fn token_tag(token: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    h.write(token.as_bytes());
    h.finish()
}

/// Removes the file when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One direction of the ring: a TCP connection, or a Unix domain socket to a same-host peer.
enum Link {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Link {
    fn kind(&self) -> &'static str {
        match self {
            Link::Tcp(_) => "TCP",
            Link::Unix(_) => "a Unix socket",
        }
    }

    fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => (&*s).write_all(bytes),
            Link::Unix(s) => (&*s).write_all(bytes),
        }
    }

    fn read_exact(&self, into: &mut [u8]) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => (&*s).read_exact(into),
            Link::Unix(s) => (&*s).read_exact(into),
        }
    }

    /// Sends the bytes of `span` with `send(2)` on its raw pointer (see [`Span`] for why not a
    /// slice), retrying on partial writes and interrupts; `MSG_NOSIGNAL`: a closed peer is an
    /// error, not SIGPIPE. The link's write timeout applies (then `TimedOut`).
    fn send_span(&self, span: Span) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Link::Tcp(s) => s.as_raw_fd(),
            Link::Unix(s) => s.as_raw_fd(),
        };
        let Span(mut ptr, mut len) = span;
        while len > 0 {
            // SAFETY: [ptr, ptr + len) lies in the live buffer of the operation in progress (see
            // `Span`); the kernel only reads it; `fd` is this link's open socket.
            let n = unsafe { libc::send(fd, ptr.cast(), len, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "send timed out (dist.timeout_secs)",
                        ))
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            // SAFETY: 0 < n <= len, so the result stays inside the span.
            ptr = unsafe { ptr.add(n as usize) };
            len -= n as usize;
        }
        Ok(())
    }

    /// Unblocks a thread blocked on this link (it gets an error).
    fn shutdown(&self) {
        let _ = match self {
            Link::Tcp(s) => s.shutdown(Shutdown::Both),
            Link::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_blocking(&self) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => s.set_nonblocking(false),
            Link::Unix(s) => s.set_nonblocking(false),
        }
    }

    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Link::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Link::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    /// A length-prefixed message (the handshake).
    fn read_msg(&self, max: usize) -> Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > max {
            bail!("message of {len} bytes over the limit of {max}");
        }
        let mut body = vec![0u8; len];
        self.read_exact(&mut body)?;
        Ok(body)
    }

    /// Sends the handshake and waits (10 s) for the one-byte acknowledgement.
    fn introduce(&self, hello: &[u8]) -> Result<()> {
        self.set_timeouts(Duration::from_secs(10))?;
        self.write_all(&(hello.len() as u32).to_le_bytes())?;
        self.write_all(hello)?;
        let mut ack = [0u8; 1];
        self.read_exact(&mut ack)
            .context("no acknowledgement of the handshake")?;
        if ack != [1] {
            bail!("handshake refused");
        }
        Ok(())
    }
}

impl Ring {
    /// Builds the ring through `store` (every rank calls it at the same time). `unix_sockets`
    /// allows Unix domain sockets to a successor on the same host. Errors: a peer's address
    /// never published, the successor unreachable, or no valid predecessor connection within
    /// `timeout`.
    pub fn connect(store: Rendezvous, timeout: Duration, unix_sockets: bool) -> Result<Ring> {
        let (rank, world) = (store.rank(), store.world_size());
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let loopback_hint = if store.multi_node() && store.local_ip().is_loopback() {
            // Fine when the "nodes" are processes of one host (tests); fatal on real hosts.
            tracing::warn!(
                "rank {rank}: the job spans several nodes but this host reaches the rendezvous store \
                 through a loopback address ({}): ranks on other hosts will not reach this one",
                store.local_ip()
            );
            " (this host advertised a loopback address: set MASTER_ADDR / --master-addr to an \
             address of rank 0's host that the other hosts can reach; a hostname that /etc/hosts \
             maps to 127.0.1.1 is the usual cause)"
        } else {
            ""
        };
        let tcp = TcpListener::bind(SocketAddr::new(store.local_ip(), 0))
            .with_context(|| format!("rank {rank}: binding the ring listener"))?;
        let host = boot_id().filter(|_| unix_sockets);
        // The socket file's name is unguessable from outside the run (token hash) and unique on
        // the host (our TCP port is); it is removed once the predecessor is connected (and on
        // every error path).
        let unix = match &host {
            Some(_) => {
                let path = std::env::temp_dir().join(format!(
                    "devise-ring-{:016x}-{rank}-{}.sock",
                    token_tag(store.token()),
                    tcp.local_addr()?.port()
                ));
                let _ = std::fs::remove_file(&path);
                match UnixListener::bind(&path) {
                    Ok(l) => Some((l, RemoveOnDrop(path))),
                    Err(e) => {
                        tracing::warn!("rank {rank}: no Unix socket for the ring ({e}); TCP only");
                        None
                    }
                }
            }
            None => None,
        };
        let me = PeerAddress {
            tcp: tcp.local_addr()?.to_string(),
            unix: unix
                .as_ref()
                .map(|(_, p)| p.0.to_string_lossy().into_owned()),
            host: host.clone(),
        };
        store.set(&format!("ring/{rank}"), &serde_json::to_vec(&me)?)?;
        let peer: PeerAddress =
            serde_json::from_slice(&store.wait(&[format!("ring/{next}")])?.remove(0))
                .with_context(|| format!("rank {rank}: rank {next}'s ring address"))?;
        let deadline = Instant::now() + timeout;
        let hello = serde_json::to_vec(&Handshake {
            token: store.token().to_string(),
            rank,
            attempt: store.attempt(),
        })?;

        // Dial the successor (in a thread: it waits for the successor's acknowledgement, which
        // comes from the successor's accept loop, while this thread runs our own accept loop).
        let dial = || -> Result<Link> {
            let same_host = host.is_some() && peer.host == host;
            let via_unix = match (&peer.unix, same_host) {
                (Some(path), true) => UnixStream::connect(path)
                    .map(Link::Unix)
                    .map_err(anyhow::Error::from)
                    .and_then(|l| l.introduce(&hello).map(|_| l))
                    .map_err(|e| {
                        tracing::warn!(
                            "rank {rank}: Unix socket to rank {next} failed ({e:#}); using TCP"
                        )
                    })
                    .ok(),
                _ => None,
            };
            Ok(match via_unix {
                Some(link) => link,
                None => loop {
                    let attempt = TcpStream::connect(&peer.tcp)
                        .map_err(anyhow::Error::from)
                        .and_then(|s| {
                            s.set_nodelay(true)?;
                            let l = Link::Tcp(s);
                            l.introduce(&hello)?;
                            Ok(l)
                        });
                    match attempt {
                        Ok(l) => break l,
                        Err(e) if Instant::now() >= deadline => {
                            return Err(e.context(format!(
                                "rank {rank}: cannot connect to rank {next} at {}{loopback_hint}",
                                peer.tcp
                            )))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                },
            })
        };

        // Accept the predecessor on either listener; drop anything that does not present the
        // token, its rank and our attempt.
        tcp.set_nonblocking(true)?;
        if let Some((l, _)) = &unix {
            l.set_nonblocking(true)?;
        }
        let valid = |b: &[u8]| {
            serde_json::from_slice::<Handshake>(b).is_ok_and(|h| {
                h.token == store.token() && h.rank == prev && h.attempt == store.attempt()
            })
        };
        let accept = || -> Result<Link> {
            let recv = loop {
                let incoming = match tcp.accept() {
                    Ok((s, peer)) => Some((Link::Tcp(s), peer.to_string())),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                    Err(e) => return Err(anyhow!(e).context(format!("rank {rank}: ring accept"))),
                };
                let incoming = match (incoming, &unix) {
                    (Some(found), _) => Some(found),
                    (None, Some((l, path))) => match l.accept() {
                        Ok((s, _)) => Some((Link::Unix(s), path.0.display().to_string())),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                        Err(e) => {
                            return Err(anyhow!(e).context(format!("rank {rank}: ring accept")))
                        }
                    },
                    (None, None) => None,
                };
                match incoming {
                    Some((link, from)) => {
                        link.set_blocking()?;
                        link.set_timeouts(Duration::from_secs(10))?;
                        let ok = link.read_msg(4096).is_ok_and(|b| valid(&b))
                            && link.write_all(&[1]).is_ok();
                        if ok {
                            break link;
                        }
                        tracing::warn!("rank {rank}: ring: refused a connection from {from} (not rank {prev} of this run)");
                    }
                    None => {
                        if Instant::now() >= deadline {
                            bail!(
                                "rank {rank}: rank {prev} did not connect within {} s{loopback_hint}",
                                timeout.as_secs()
                            );
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            };
            Ok(recv)
        };
        let (send, recv) = std::thread::scope(|scope| {
            let dialing = scope.spawn(dial);
            let recv = accept();
            let send = dialing
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the dialing thread panicked")));
            (send, recv)
        });
        let (send, recv) = (send?, recv?);
        drop(unix); // removes the socket file
        for l in [&send, &recv] {
            l.set_timeouts(timeout)?;
        }
        tracing::debug!(
            "rank {rank}: ring links: to rank {next} over {}, from rank {prev} over {}",
            send.kind(),
            recv.kind()
        );
        Ok(Ring {
            rank,
            world_size: world,
            send,
            recv,
            op: Mutex::new(()),
            _store: store,
        })
    }

    /// How the links run: `(to the successor, from the predecessor)`, each `"TCP"` or
    /// `"a Unix socket"`.
    pub fn transport(&self) -> (&'static str, &'static str) {
        (self.send.kind(), self.recv.kind())
    }

    fn next(&self) -> usize {
        (self.rank + 1) % self.world_size
    }

    fn prev(&self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }

    /// Runs `body` with a sender thread writing the spans it queues, in order, to the successor.
    /// On any error both directions are shut down (a blocked peer fails at once instead of
    /// waiting for the timeout) and the first error is returned.
    fn with_sender<F>(&self, what: &str, body: F) -> Result<()>
    where
        F: FnOnce(&mpsc::Sender<Span>) -> Result<()>,
    {
        let (tx, rx) = mpsc::channel::<Span>();
        // `tx` moves into the scope's closure: if `body` panics, unwinding drops it, the sender
        // thread's loop ends and the scope can join it (no deadlock on the way out).
        let next = self.next();
        let result = std::thread::scope(|scope| {
            let sender = scope.spawn(move || -> Result<()> {
                for span in rx {
                    self.send
                        .send_span(span)
                        .with_context(|| format!("sending to rank {next}"))?;
                }
                Ok(())
            });
            let tx = tx;
            let received = body(&tx);
            drop(tx);
            if received.is_err() {
                self.send.shutdown();
            }
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the sender thread panicked")));
            received.and(sent)
        });
        result.with_context(|| {
            format!(
                "rank {}: {what} failed (rank {} or {} died, hung past dist.timeout_secs, or closed the ring); the group is unusable",
                self.rank,
                self.prev(),
                next
            )
        })
    }

    fn receive(&self, into: &mut [u8]) -> Result<()> {
        self.recv
            .read_exact(into)
            .with_context(|| format!("receiving from rank {}", self.prev()))
    }

    /// The ring all-reduce of the module docs over `data` (`[n]` f32, in place).
    fn all_reduce_f32(&self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        // (n == 0 returns before any pointer arithmetic: an empty tensor's data pointer may be
        // null.)
        let (w, r, n) = (self.world_size, self.rank, data.len());
        if w == 1 || n == 0 {
            return Ok(());
        }
        let ptr = data.as_mut_ptr();
        let seg = |i: usize| (i * n / w, (i + 1) * n / w); // [start, end) of segment i
        let chunk = CHUNK_BYTES / 4;
        let chunks = |i: usize| {
            let (a, b) = seg(i);
            (a..b).step_by(chunk).map(move |s| (s, (s + chunk).min(b)))
        };
        let span = |a: usize, b: usize| Span(ptr.wrapping_add(a) as *const u8, (b - a) * 4);
        let scale = 1.0 / w as f32;
        let mut scratch = vec![0f32; chunk];
        // Why the calling thread never writes a span the sender still reads: it writes segment
        // `r - k - 1` at reduce-scatter step k (never sent before step k + 1) and segment `r - k`
        // at all-gather step k; that segment's chunks were sent at reduce-scatter step k, and
        // their final values can only arrive after the successor has read them (every final
        // value includes this rank's contribution), i.e. after the sender is done with them.
        self.with_sender("all-reduce", |tx| {
            for (a, b) in chunks(r) {
                tx.send(span(a, b)).ok();
            }
            for k in 0..w - 1 {
                let last = k == w - 2;
                for (a, b) in chunks((r + 2 * w - k - 1) % w) {
                    let incoming = &mut scratch[..b - a];
                    self.receive(bytemuck::cast_slice_mut(incoming))?;
                    // SAFETY: [a, b) is inside `data` and not queued for sending (above).
                    let own = unsafe { std::slice::from_raw_parts_mut(ptr.add(a), b - a) };
                    for (x, y) in own.iter_mut().zip(incoming.iter()) {
                        *x += *y;
                    }
                    if last && op == ReduceOp::Mean {
                        for x in own.iter_mut() {
                            *x *= scale;
                        }
                    }
                    tx.send(span(a, b)).ok();
                }
            }
            for k in 0..w - 1 {
                let forward = k < w - 2;
                for (a, b) in chunks((r + w - k) % w) {
                    // SAFETY: as above.
                    let own = unsafe { std::slice::from_raw_parts_mut(ptr.add(a), b - a) };
                    self.receive(bytemuck::cast_slice_mut(own))?;
                    if forward {
                        tx.send(span(a, b)).ok();
                    }
                }
            }
            Ok(())
        })
    }

    /// Rank 0's `data` to every rank, pipelined along the ring.
    fn broadcast_raw(&self, data: &mut [u8]) -> Result<()> {
        if self.world_size == 1 || data.is_empty() {
            return Ok(());
        }
        let ptr = data.as_mut_ptr();
        let forward = self.next() != 0;
        self.with_sender("broadcast", |tx| {
            for a in (0..data.len()).step_by(CHUNK_BYTES) {
                let b = (a + CHUNK_BYTES).min(data.len());
                if self.rank != 0 {
                    // SAFETY: [a, b) is inside `data`; only chunks already received were queued.
                    let own = unsafe { std::slice::from_raw_parts_mut(ptr.add(a), b - a) };
                    self.receive(own)?;
                }
                if self.rank == 0 || forward {
                    tx.send(Span(ptr.wrapping_add(a) as *const u8, b - a)).ok();
                }
            }
            Ok(())
        })
    }
}

/// `buffer`'s storage as f32, after checking it is a flat contiguous CPU `Float` tensor.
fn as_f32(buffer: &mut Tensor) -> Result<&mut [f32]> {
    if buffer.device() != Device::Cpu || buffer.kind() != Kind::Float {
        bail!(
            "cpu backend: expected a CPU Float buffer, got {:?} {:?}",
            buffer.device(),
            buffer.kind()
        );
    }
    let n = buffer.numel();
    if n == 0 {
        return Ok(&mut []); // an empty tensor's data pointer may be null
    }
    // SAFETY: a contiguous CPU Float tensor of n elements owns n f32 at data_ptr (checked above
    // and by check_flat); the returned slice borrows `buffer` mutably, so no other Rust access to
    // it can happen while the slice lives.
    Ok(unsafe { std::slice::from_raw_parts_mut(buffer.data_ptr() as *mut f32, n) })
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn all_reduce(&self, buffer: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_flat(buffer, "all_reduce")?;
        let _op = self.op.lock().expect("ring lock");
        if buffer.kind() == Kind::BFloat16 {
            let mut wide = buffer.to_kind(Kind::Float);
            self.all_reduce_f32(as_f32(&mut wide)?, op)?;
            tch::no_grad(|| buffer.copy_(&wide));
            return Ok(());
        }
        self.all_reduce_f32(as_f32(buffer)?, op)
    }

    fn broadcast(&self, buffer: &mut Tensor) -> Result<()> {
        check_1d(buffer, "broadcast")?;
        if buffer.device() != Device::Cpu {
            bail!(
                "cpu backend: expected a CPU buffer, got {:?}",
                buffer.device()
            );
        }
        let _op = self.op.lock().expect("ring lock");
        let bytes = buffer.numel() * buffer.kind().elt_size_in_bytes();
        if bytes == 0 {
            return Ok(()); // every rank sees the same empty shape; nothing to send
        }
        // SAFETY: contiguous CPU tensor of `bytes` bytes (checked above), borrowed mutably.
        let data = unsafe { std::slice::from_raw_parts_mut(buffer.data_ptr() as *mut u8, bytes) };
        self.broadcast_raw(data)
    }

    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        let _op = self.op.lock().expect("ring lock");
        let mut len = (bytes.len() as u64).to_le_bytes();
        self.broadcast_raw(&mut len)?;
        let mut data = if self.rank == 0 {
            bytes
        } else {
            vec![0u8; u64::from_le_bytes(len) as usize]
        };
        self.broadcast_raw(&mut data)?;
        Ok(data)
    }

    fn barrier(&self) -> Result<()> {
        let mut one = Tensor::ones([1], (Kind::Float, Device::Cpu));
        self.all_reduce(&mut one, ReduceOp::Sum).context("barrier")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::collective::store::tests::{env, host};

    /// Runs `f` on `world` ranks connected by a ring (threads of this process).
    pub(crate) fn with_ring<T: Send + 'static>(
        world: usize,
        f: impl Fn(Ring) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        with_ring_over(world, true, f)
    }

    /// [`with_ring`], choosing whether same-host links may use Unix sockets.
    pub(crate) fn with_ring_over<T: Send + 'static>(
        world: usize,
        unix_sockets: bool,
        f: impl Fn(Ring) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let t = Duration::from_secs(20);
        let (host, port) = host(world, "tok", t);
        let mut host = Some(host);
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let hosted = host.take();
                std::thread::spawn(move || {
                    let store = hosted.unwrap_or_else(|| {
                        Rendezvous::join(&env(rank, world, port, "tok"), t).unwrap()
                    });
                    f(Ring::connect(store, t, unix_sockets).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_and_means_exactly_for_many_sizes_and_world_sizes() {
        for (world, unix) in [(2usize, true), (3, true), (4, true), (2, false), (3, false)] {
            let out = with_ring_over(world, unix, move |ring| {
                let want = if unix { "a Unix socket" } else { "TCP" };
                assert_eq!(
                    ring.transport(),
                    (want, want),
                    "same host, unix_sockets = {unix}"
                );
                let mut results = Vec::new();
                // Sizes around the segment/chunk boundaries, including n < world.
                for n in [1usize, 2, 5, 1000, CHUNK_BYTES / 4 * 3 + 7] {
                    let r = ring.rank() as f64;
                    let mut t = Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) + r;
                    ring.all_reduce(&mut t, ReduceOp::Sum).unwrap();
                    let mut m = Tensor::full([n as i64], r, (Kind::Float, Device::Cpu));
                    ring.all_reduce(&mut m, ReduceOp::Mean).unwrap();
                    results.push((
                        Vec::<f32>::try_from(&t).unwrap(),
                        Vec::<f32>::try_from(&m).unwrap(),
                    ));
                }
                results
            });
            let ranks_sum: f32 = (0..world).map(|r| r as f32).sum();
            for (i, n) in [1usize, 2, 5, 1000, CHUNK_BYTES / 4 * 3 + 7]
                .iter()
                .enumerate()
            {
                let want: Vec<f32> = (0..*n)
                    .map(|j| world as f32 * j as f32 + ranks_sum)
                    .collect();
                let mean = ranks_sum / world as f32;
                for rank_out in &out {
                    assert_eq!(rank_out[i].0, want, "sum, world {world}, n {n}");
                    assert!(rank_out[i].1.iter().all(|&x| (x - mean).abs() < 1e-6));
                }
                // Bit-identical across ranks.
                assert!(out.iter().all(|o| o[i] == out[0][i]));
            }
        }
    }

    #[test]
    fn bf16_broadcast_bytes_and_barrier() {
        let out = with_ring(3, |ring| {
            let r = ring.rank() as f64;
            let mut t = Tensor::full([300], r + 1.0, (Kind::BFloat16, Device::Cpu));
            ring.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            let mut b = Tensor::full([70_000], r, (Kind::Float, Device::Cpu));
            ring.broadcast(&mut b).unwrap();
            let bytes = ring
                .broadcast_bytes(if ring.rank() == 0 {
                    b"from rank 0".to_vec()
                } else {
                    vec![9; 3]
                })
                .unwrap();
            ring.barrier().unwrap();
            (
                Vec::<f32>::try_from(t.to_kind(Kind::Float)).unwrap(),
                Vec::<f32>::try_from(&b).unwrap(),
                bytes,
            )
        });
        for (t, b, bytes) in out {
            assert!(t.iter().all(|&x| x == 6.0));
            assert!(b.iter().all(|&x| x == 0.0));
            assert_eq!(bytes, b"from rank 0");
        }
    }

    #[test]
    fn a_dead_peer_fails_the_operation_promptly() {
        let started = Instant::now();
        let out = with_ring(2, |ring| {
            if ring.rank() == 1 {
                drop(ring); // "dies": its sockets close
                return None;
            }
            let mut t = Tensor::ones([1 << 20], (Kind::Float, Device::Cpu));
            Some(format!(
                "{:#}",
                ring.all_reduce(&mut t, ReduceOp::Sum).unwrap_err()
            ))
        });
        let msg = out[0].clone().unwrap();
        assert!(msg.contains("all-reduce failed"), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(15));
    }
}
