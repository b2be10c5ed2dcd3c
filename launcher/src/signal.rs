//! Which signal means "preempted": shared by `devise train` (the worker) and `devise-launch`, so
//! both agree on it and on how repeats count.
//!
//! # The preemption signal
//!
//! Sites warn a job before they stop it with a signal of their choosing: SLURM's
//! `--signal=B:USR1@90` and `scancel --signal=USR1` (the default here), `SIGUSR2` on sites whose
//! tooling keeps `SIGUSR1` for itself, or only `SIGTERM` (Kubernetes, SLURM preemption without
//! `--signal`). [`PreemptSignal`] names it; `SIGTERM` and `SIGINT` always stop too.
//!
//! A worker takes it from its run configuration, `run.preempt_signal` (`usr1`, `usr2` or
//! `term`), layered as every key is: the config file, then the environment variable
//! [`ENV`] (`DEVISE__RUN__PREEMPT_SIGNAL`), then `--set run.preempt_signal=...`, later winning.
//! `devise-launch --preempt-signal` sets [`ENV`] for its workers, so a launcher and its workers
//! agree unless a `--set` says otherwise; without the flag the launcher reads [`ENV`] from its
//! own environment, else uses `usr1`.
//!
//! # Repeats
//!
//! One stop can reach a process twice: under SLURM `slurmstepd` signals every process of the
//! step (workers and launcher), the launcher forwards what it got, and a preemption's step
//! abort sends the launcher a second `SIGTERM`. Worker and launcher both count a stop signal
//! arriving within [`REPEAT_WINDOW`] of the first as the same stop; one after that window
//! means "stop now" (the worker exits 130 at once; the launcher SIGKILLs its workers and exits
//! 130).
use anyhow::{bail, Result};
use std::time::Duration;

/// The environment variable that carries `run.preempt_signal` (the config crate's
/// `DEVISE__SECTION__KEY` layering; `devise-launch --preempt-signal` sets it for its workers).
pub const ENV: &str = "DEVISE__RUN__PREEMPT_SIGNAL";

/// A stop signal arriving within this time of the first counts as the same stop (module docs).
pub const REPEAT_WINDOW: Duration = Duration::from_secs(5);

/// The signal that asks for "finish the step, checkpoint, exit 75". TOML and the command line
/// spell it `usr1`, `usr2` or `term`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PreemptSignal {
    /// `SIGUSR1` (SLURM's `--signal=B:USR1@90`, `scancel --signal=USR1`).
    #[default]
    Usr1,
    /// `SIGUSR2`.
    Usr2,
    /// `SIGTERM` only: no extra signal is caught, both `SIGUSR1` and `SIGUSR2` keep their
    /// default action (or NCCL's handler).
    Term,
}

/// Read by name (`usr1`, `usr2`, `term`); another value is an error listing them.
impl<'de> serde::Deserialize<'de> for PreemptSignal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = <String as serde::Deserialize>::deserialize(d)?;
        <PreemptSignal as clap::ValueEnum>::from_str(&name, false).map_err(|_| {
            serde::de::Error::custom(format!("{name:?} is not one of usr1, usr2, term"))
        })
    }
}

impl PreemptSignal {
    /// Its signal number (`libc::SIGUSR1`, ...).
    pub fn number(self) -> i32 {
        match self {
            PreemptSignal::Usr1 => libc::SIGUSR1,
            PreemptSignal::Usr2 => libc::SIGUSR2,
            PreemptSignal::Term => libc::SIGTERM,
        }
    }

    /// `SIGUSR1`, `SIGUSR2`, `SIGTERM`.
    pub fn name(self) -> &'static str {
        match self {
            PreemptSignal::Usr1 => "SIGUSR1",
            PreemptSignal::Usr2 => "SIGUSR2",
            PreemptSignal::Term => "SIGTERM",
        }
    }

    /// Its spelling in TOML and on the command line (`usr1`, `usr2`, `term`).
    pub fn key(self) -> &'static str {
        match self {
            PreemptSignal::Usr1 => "usr1",
            PreemptSignal::Usr2 => "usr2",
            PreemptSignal::Term => "term",
        }
    }

    /// Every signal that stops a worker with a checkpoint: `SIGTERM`, `SIGINT`, and this one
    /// when it is another.
    pub fn stop_signals(self) -> Vec<i32> {
        let mut sigs = vec![libc::SIGTERM, libc::SIGINT];
        if !sigs.contains(&self.number()) {
            sigs.push(self.number());
        }
        sigs
    }

    /// Reads [`ENV`] from the variables `get` gives: `None` when unset or empty. Errors name the
    /// variable and list the accepted values.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<PreemptSignal>> {
        let Some(v) = get(ENV).filter(|v| !v.trim().is_empty()) else {
            return Ok(None);
        };
        match <PreemptSignal as clap::ValueEnum>::from_str(v.trim(), false) {
            Ok(s) => Ok(Some(s)),
            Err(_) => bail!("{ENV}={v:?} is not a preemption signal: expected usr1, usr2 or term"),
        }
    }
}

/// The warning to print at start when `NCCL_PROXY_DUMP_SIGNAL` (a signal number, as NCCL reads
/// it; `-1` or unset: off) names one of `preempt`'s stop signals: NCCL installs its own handler
/// for that signal when its backend starts, after ours, so the stop would dump NCCL's proxy
/// state instead of checkpointing. `None` when there is no clash (or the value is no number,
/// which NCCL does not act on either).
pub fn nccl_dump_signal_clash(
    preempt: PreemptSignal,
    get: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let v = get("NCCL_PROXY_DUMP_SIGNAL")?;
    let n: i32 = v.trim().parse().ok()?;
    if !preempt.stop_signals().contains(&n) {
        return None;
    }
    let what = if n == preempt.number() {
        format!(
            "the preemption signal (run.preempt_signal = {})",
            preempt.key()
        )
    } else {
        "a stop signal".to_string()
    };
    Some(format!(
        "NCCL_PROXY_DUMP_SIGNAL={} names {}, {what}: NCCL takes that signal over when the nccl \
         backend starts, so a preemption would dump NCCL's state instead of writing a \
         checkpoint. Unset NCCL_PROXY_DUMP_SIGNAL or choose another preemption signal \
         (run.preempt_signal / devise-launch --preempt-signal: usr1, usr2, term)",
        v.trim(),
        signal_name(n)
    ))
}

/// A worker's stop handlers (`devise train`, `devise demo`): SIGTERM and SIGINT from the start,
/// the preemption signal once the configuration names it ([`WorkerStop::catch_preempt`]), all
/// setting `stop` (finish the step, checkpoint, exit 75). A repeat within [`REPEAT_WINDOW`] of
/// the first counts as the same stop (module docs); a stop signal after that window exits the
/// process at once with 130 (no checkpoint). Commands without these handlers keep the default
/// action: they are killed, and write nothing that looks complete.
pub struct WorkerStop {
    handle: signal_hook::iterator::Handle,
}

impl WorkerStop {
    /// Installs the handlers, on a thread of their own. Errors: the OS refused a handler.
    pub fn install(stop: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::io::Result<Self> {
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])?;
        let handle = signals.handle();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("devise-signals".into())
            .spawn(move || {
                let mut first: Option<std::time::Instant> = None;
                for sig in signals.forever() {
                    let name = signal_name(sig);
                    match first {
                        None => {
                            first = Some(std::time::Instant::now());
                            stop.store(true, std::sync::atomic::Ordering::SeqCst);
                            eprintln!("{name}: finishing the current step, then checkpoint and exit 75 (a stop signal again after {} s exits at once)", REPEAT_WINDOW.as_secs());
                        }
                        Some(t) if t.elapsed() < REPEAT_WINDOW => {}
                        Some(_) => {
                            eprintln!("{name} again: exiting at once (130), no checkpoint");
                            std::process::exit(130);
                        }
                    }
                }
            })?;
        Ok(WorkerStop { handle })
    }

    /// Adds the preemption signal `preempt` to the stop signals; `term` adds none (SIGTERM is
    /// always one), leaving SIGUSR1 and SIGUSR2 their default action. Returns the warning to
    /// log when `NCCL_PROXY_DUMP_SIGNAL` (read through `get`) names a stop signal
    /// ([`nccl_dump_signal_clash`]). Errors: the OS refused the handler.
    pub fn catch_preempt(
        &self,
        preempt: PreemptSignal,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<String>> {
        if preempt != PreemptSignal::Term {
            self.handle.add_signal(preempt.number()).map_err(|e| {
                anyhow::anyhow!("cannot install a handler for {}: {e}", preempt.name())
            })?;
        }
        Ok(nccl_dump_signal_clash(preempt, get))
    }
}

/// `SIGUSR1` for 10 (Linux numbering); `signal N` for numbers without a name here.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn only(k: &'static str, v: &str) -> impl Fn(&str) -> Option<String> {
        let v = v.to_string();
        move |key: &str| (key == k).then(|| v.clone())
    }

    #[test]
    fn names_numbers_and_stop_sets() {
        assert_eq!(PreemptSignal::default(), PreemptSignal::Usr1);
        assert_eq!(PreemptSignal::Usr2.number(), libc::SIGUSR2);
        assert_eq!(PreemptSignal::Usr2.name(), "SIGUSR2");
        assert_eq!(
            PreemptSignal::Usr1.stop_signals(),
            [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1]
        );
        assert_eq!(
            PreemptSignal::Term.stop_signals(),
            [libc::SIGTERM, libc::SIGINT]
        );
        for s in [
            PreemptSignal::Usr1,
            PreemptSignal::Usr2,
            PreemptSignal::Term,
        ] {
            assert_eq!(
                PreemptSignal::from_vars(only(ENV, s.key())).unwrap(),
                Some(s)
            );
        }
        assert_eq!(PreemptSignal::from_vars(only(ENV, " ")).unwrap(), None);
        let e = PreemptSignal::from_vars(only(ENV, "SIGUSR2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(ENV) && e.contains("\"SIGUSR2\""), "{e}");
    }

    #[test]
    fn an_nccl_dump_signal_on_a_stop_signal_is_named() {
        let w = nccl_dump_signal_clash(PreemptSignal::Usr2, only("NCCL_PROXY_DUMP_SIGNAL", "12"))
            .unwrap();
        assert!(
            w.contains("NCCL_PROXY_DUMP_SIGNAL=12 names SIGUSR2, the preemption signal"),
            "{w}"
        );
        let w = nccl_dump_signal_clash(PreemptSignal::Usr1, only("NCCL_PROXY_DUMP_SIGNAL", "15"))
            .unwrap();
        assert!(w.contains("SIGTERM, a stop signal"), "{w}");
        for (preempt, v) in [
            (PreemptSignal::Usr1, "12"),
            (PreemptSignal::Usr2, "10"),
            (PreemptSignal::Term, "10"),
            (PreemptSignal::Usr1, "-1"),
            (PreemptSignal::Usr1, "USR1"),
        ] {
            assert_eq!(
                nccl_dump_signal_clash(preempt, only("NCCL_PROXY_DUMP_SIGNAL", v)),
                None,
                "{preempt:?} {v}"
            );
        }
        assert_eq!(nccl_dump_signal_clash(PreemptSignal::Usr1, |_| None), None);
    }

    proptest! {
        /// Arbitrary Unicode in either variable never panics; a refusal names the variable.
        #[test]
        fn arbitrary_values_never_panic(v in any::<String>()) {
            match PreemptSignal::from_vars(only(ENV, &v)) {
                Ok(_) => {}
                Err(e) => prop_assert!(e.to_string().contains(ENV), "{}", e),
            }
            if let Some(w) = nccl_dump_signal_clash(PreemptSignal::Usr1, only("NCCL_PROXY_DUMP_SIGNAL", &v)) {
                prop_assert!(w.contains("NCCL_PROXY_DUMP_SIGNAL"));
            }
        }
    }
}
