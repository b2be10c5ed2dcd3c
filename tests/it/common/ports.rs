//! TCP ports for servers that a child process binds (rank 0 of `devise-launch`'s workers hosts
//! the rendezvous store on `--master-port`; `s3s-fs` listens on `--port`). A test cannot hand
//! such a child a bound socket, and binding port 0, reading the port and closing the socket
//! leaves it free for anyone until the child binds it. So [`reserve`]:
//!
//! - takes ports below the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`),
//!   which the kernel never hands to an outgoing connection or a `bind` to port 0;
//! - never gives out the same port twice in this process (parallel tests), starting at an
//!   offset drawn from the process id (parallel test processes);
//! - keeps the port bound until [`PortLease::release`], called right before the child starts.
//!
//! Another program may still bind the port in that instant: [`retry_on_port_in_use`] runs
//! again with a new port when the child says so.
use std::net::TcpListener;
use std::sync::Mutex;

/// A port held bound by this process until [`PortLease::release`].
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    listener: TcpListener,
}

impl PortLease {
    /// The reserved port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes the reserving socket and returns the port: call it right before starting the
    /// child that binds the port.
    pub fn release(self) -> u16 {
        drop(self.listener);
        self.port
    }
}

/// `[first, end)`: the ports below the ephemeral range (ports 10000.. when the range starts
/// high enough, as Linux's default 32768 does), else above it.
fn unreserved_range() -> (u16, u16) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut nums = text
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let (low, high) = match (nums.next(), nums.next()) {
        (Some(l), Some(h)) => (l, h),
        _ => (32768, 60999),
    };
    if low >= 12000 {
        (10000, low)
    } else {
        (high.saturating_add(1).max(1024), u16::MAX)
    }
}

/// A free port, bound by this process until the lease is released. Panics when no port of
/// the unreserved range can be bound.
pub fn reserve() -> PortLease {
    static NEXT: Mutex<Option<u32>> = Mutex::new(None);
    let (first, end) = unreserved_range();
    let span = u32::from(end - first);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let mut offset = next.unwrap_or_else(|| std::process::id().wrapping_mul(7919) % span);
    for _ in 0..span {
        let port = first + (offset % span) as u16;
        offset = (offset + 1) % span;
        if let Ok(listener) = TcpListener::bind(("0.0.0.0", port)) {
            *next = Some(offset);
            return PortLease { port, listener };
        }
    }
    panic!("no free TCP port in {first}..{end}");
}

/// Runs `run` with a freshly reserved port (released just before `run` is called), again with
/// a new port (at most 4 times in all) while `port_taken` says the child could not bind it.
pub fn retry_on_port_in_use<T>(
    mut run: impl FnMut(u16) -> T,
    port_taken: impl Fn(&T) -> bool,
) -> T {
    let mut tries = 1;
    loop {
        let out = run(reserve().release());
        if tries == 4 || !port_taken(&out) {
            return out;
        }
        tries += 1;
    }
}

#[test]
fn reserved_ports_are_distinct_bound_and_outside_the_ephemeral_range() {
    let (first, end) = unreserved_range();
    let leases: Vec<PortLease> = (0..20).map(|_| reserve()).collect();
    let mut ports: Vec<u16> = leases.iter().map(|l| l.port).collect();
    assert!(ports.iter().all(|p| (first..end).contains(p)), "{ports:?}");
    // Held: nobody else can bind them.
    assert!(ports
        .iter()
        .all(|p| TcpListener::bind(("0.0.0.0", *p)).is_err()));
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 20);
    // Released: the child can bind it, and this process never hands it out again.
    let port = leases.into_iter().next().unwrap().release();
    let child = TcpListener::bind(("0.0.0.0", port)).unwrap();
    assert!((0..20).all(|_| reserve().release() != port));
    drop(child);
}
