//! Worker heartbeats: how `devise-launch` notices a worker that hangs (alive, but making no
//! progress: a deadlock, a stuck device, an all-reduce whose peer vanished without a trace).
//!
//! The launcher creates one empty file per local worker, `rank-<R>.heartbeat` in a private
//! temporary folder, with its modification time set to the Unix epoch ("no beat yet"), and
//! passes its path in [`ENV`]. The worker calls [`beat`] whenever it makes progress (`devise
//! train`: every optimizer step, every evaluation batch, every feature-cache batch); a beat sets
//! the file's modification time to now (one `futimens(2)`, at most one per [`MIN_INTERVAL`]).
//! The launcher reads the times ([`Watch::stale`]) and treats a worker whose last beat is older
//! than `--heartbeat-timeout-secs` as failed: it stops the group and restarts it when restarts
//! are left.
//!
//! The watch is armed at a worker's first beat: startup (rendezvous, reading word vectors,
//! building the plan) is not watched, since its length depends on the input and each of its
//! network waits has its own timeout. A worker command that never beats (not `devise`) is never
//! watched. Wall-clock times of one host are compared (the launcher watches only its own node's
//! workers), so a clock step of more than the timeout can cause one false alarm.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Environment variable naming the worker's heartbeat file.
pub const ENV: &str = "DEVISE_HEARTBEAT_FILE";

/// Beats closer together than this are dropped (one syscall per second at most).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Records progress. Cheap: a no-op without [`ENV`], else at most one `futimens(2)` per
/// [`MIN_INTERVAL`]. Errors (the launcher's folder removed) are ignored: a missing beat is the
/// launcher's signal, not the worker's problem.
pub fn beat() {
    static FILE: OnceLock<Option<(File, Instant)>> = OnceLock::new();
    static LAST_MS: AtomicU64 = AtomicU64::new(u64::MAX);
    let Some((file, start)) = FILE
        .get_or_init(|| {
            let path = std::env::var_os(ENV)?;
            let file = std::fs::OpenOptions::new().write(true).open(path).ok()?;
            Some((file, Instant::now()))
        })
        .as_ref()
    else {
        return;
    };
    let now_ms = start.elapsed().as_millis() as u64;
    let last = LAST_MS.load(Ordering::Relaxed);
    if last != u64::MAX && now_ms.saturating_sub(last) < MIN_INTERVAL.as_millis() as u64 {
        return;
    }
    LAST_MS.store(now_ms, Ordering::Relaxed);
    let _ = file.set_modified(SystemTime::now());
}

/// The launcher's side: one heartbeat file per local worker in a private folder, removed when
/// the watch is dropped.
pub struct Watch {
    dir: PathBuf,
    timeout: Duration,
}

impl Watch {
    /// A folder for this launcher's heartbeat files under the system temporary directory.
    /// `timeout` zero disables the watch (files are still created, so workers behave alike).
    pub fn new(timeout: Duration) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "devise-launch-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Watch { dir, timeout })
    }

    /// The timeout (zero: disabled).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// (Re)creates rank `rank`'s file with "no beat yet" and returns its path, for [`ENV`].
    pub fn arm(&self, rank: usize) -> std::io::Result<PathBuf> {
        let path = self.dir.join(format!("rank-{rank}.heartbeat"));
        let file = File::create(&path)?;
        file.set_modified(UNIX_EPOCH)?;
        Ok(path)
    }

    /// `Some(age of the last beat)` when `path`'s worker has beaten at least once and not for
    /// longer than the timeout; `None` otherwise (disabled, no beat yet, fresh, or unreadable).
    pub fn stale(&self, path: &Path) -> Option<Duration> {
        self.age(path).filter(|age| *age > self.timeout)
    }

    /// `Some(age of the last beat)` when the watch is on and `path`'s worker has beaten at least
    /// once; `None` otherwise. An age is known to within [`MIN_INTERVAL`] (beats closer together
    /// are dropped), so of two workers that stopped at the same step, either can look older.
    pub fn age(&self, path: &Path) -> Option<Duration> {
        if self.timeout.is_zero() {
            return None;
        }
        let modified = std::fs::metadata(path).ok()?.modified().ok()?;
        if modified <= UNIX_EPOCH {
            return None;
        }
        SystemTime::now().duration_since(modified).ok()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_at_the_first_beat_and_stale_after_the_timeout() {
        let watch = Watch::new(Duration::from_secs(5)).unwrap();
        let path = watch.arm(3).unwrap();
        assert!(path.ends_with("rank-3.heartbeat"));
        assert_eq!(watch.stale(&path), None, "no beat yet: not watched");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now()).unwrap();
        assert_eq!(watch.stale(&path), None, "fresh beat");
        f.set_modified(SystemTime::now() - Duration::from_secs(6))
            .unwrap();
        let age = watch.stale(&path).expect("6 s old beat, 5 s timeout");
        assert!(age >= Duration::from_secs(6));
        assert!(watch.age(&path).expect("armed") >= Duration::from_secs(6));
        // Disabled watch never reports.
        let off = Watch::new(Duration::ZERO).unwrap();
        let p = off.arm(0).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(UNIX_EPOCH + Duration::from_secs(1))
            .unwrap();
        assert_eq!(off.stale(&p), None);
        let dir = watch.dir.clone();
        drop(watch);
        assert!(!dir.exists(), "folder removed on drop");
    }
}
