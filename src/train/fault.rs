//! Fault injection, for the tests of preemption, restarts and non-finite handling: the faults a
//! real cluster produces (a NaN on one rank, a hung worker, a kill in the middle of a checkpoint
//! write) on demand, at a chosen step and rank.
//!
//! Read once from the environment variable `DEVISE_FAULT`: `;`-separated items, each
//! `kind:args`:
//!
//! | item | effect |
//! |------|--------|
//! | `nan_loss:STEP:RANK` | rank RANK's loss at step STEP becomes NaN before backward (so its gradients too) |
//! | `inf_grad:STEP:RANK` | one gradient element of rank RANK becomes +inf after backward at step STEP (its loss stays finite) |
//! | `hang:STEP:RANK` | rank RANK stops making progress at the start of step STEP (sleeps forever, ignores the stop flag) |
//! | `checkpoint_pause_ms:MS` | saving a checkpoint sleeps MS milliseconds after each file, after publishing and after `LATEST` ([`crate::checkpoint::set_write_pause`]) |
//!
//! Step and rank faults fire only in the first attempt (`DEVISE_RESTART_ATTEMPT` unset or 0), so
//! a restarted group runs clean. Unset: no fault, no cost beyond one check. A malformed value is
//! an error naming the item.
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::sync::OnceLock;
use std::time::Duration;

/// Environment variable holding the faults.
pub const ENV: &str = "DEVISE_FAULT";

/// Environment variable holding the restart attempt (`devise-launch` sets it; unset or `0` is
/// the first attempt).
pub const RESTART_ATTEMPT_ENV: &str = "DEVISE_RESTART_ATTEMPT";

/// The parsed faults (see the module docs).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Faults {
    /// `(step, rank)` whose loss becomes NaN.
    pub nan_loss: Option<(u64, usize)>,
    /// `(step, rank)` with one +inf gradient element.
    pub inf_grad: Option<(u64, usize)>,
    /// `(step, rank)` that hangs.
    pub hang: Option<(u64, usize)>,
    /// Pause between the steps of a checkpoint save.
    pub checkpoint_pause: Option<Duration>,
}

impl Faults {
    /// Parses a `DEVISE_FAULT` value; `first_attempt` false drops the step/rank faults.
    pub fn parse(text: &str, first_attempt: bool) -> Result<Self> {
        let mut f = Faults::default();
        for item in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = item.split(':').collect();
            let num = |i: usize| -> Result<u64> {
                parts
                    .get(i)
                    .with_context(|| format!("{ENV}: '{item}' needs more fields"))?
                    .parse::<u64>()
                    .with_context(|| format!("{ENV}: '{item}': field {i} is not a number"))
            };
            let at = || -> Result<(u64, usize)> {
                if parts.len() != 3 {
                    bail!("{ENV}: '{item}': expected {}:STEP:RANK", parts[0]);
                }
                Ok((num(1)?, num(2)? as usize))
            };
            match parts[0] {
                "nan_loss" => f.nan_loss = Some(at()?),
                "inf_grad" => f.inf_grad = Some(at()?),
                "hang" => f.hang = Some(at()?),
                "checkpoint_pause_ms" if parts.len() == 2 => {
                    f.checkpoint_pause = Some(Duration::from_millis(num(1)?))
                }
                other => bail!(
                    "{ENV}: unknown fault '{other}' in '{item}' (nan_loss:STEP:RANK, \
                     inf_grad:STEP:RANK, hang:STEP:RANK, checkpoint_pause_ms:MS)"
                ),
            }
        }
        if !first_attempt {
            f.nan_loss = None;
            f.inf_grad = None;
            f.hang = None;
        }
        Ok(f)
    }

    /// The faults of the values of [`ENV`] and [`RESTART_ATTEMPT_ENV`] as the environment holds
    /// them (`None`: unset). Errors: a value that is not Unicode (naming its variable), and those
    /// of [`Faults::parse`].
    pub fn from_env_values(fault: Option<&OsStr>, restart_attempt: Option<&OsStr>) -> Result<Self> {
        let text = |name: &str, value: Option<&OsStr>| -> Result<String> {
            value.map_or(Ok(String::new()), |v| {
                v.to_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{name}: the value {v:?} is not Unicode"))
            })
        };
        let fault = text(ENV, fault)?;
        let first_attempt =
            restart_attempt.is_none() || text(RESTART_ATTEMPT_ENV, restart_attempt)?.trim() == "0";
        Faults::parse(&fault, first_attempt)
    }
}

impl Faults {
    /// `hang:STEP:RANK`: at `step` on `rank`, stop making progress for good (sleep forever,
    /// ignoring the stop flag).
    pub fn hang_if_due(&self, step: u64, rank: usize) {
        if self.hang.is_some_and(|(s, r)| s == step && r == rank) {
            tracing::warn!("{ENV}: hanging at step {step} (injected fault)");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

static FAULTS: OnceLock<Faults> = OnceLock::new();

/// Reads [`ENV`] once (and `DEVISE_RESTART_ATTEMPT`); call at startup so a malformed value fails
/// before training. Later calls return the first result.
pub fn init() -> Result<&'static Faults> {
    if let Some(f) = FAULTS.get() {
        return Ok(f);
    }
    let parsed = Faults::from_env_values(
        std::env::var_os(ENV).as_deref(),
        std::env::var_os(RESTART_ATTEMPT_ENV).as_deref(),
    )?;
    if parsed != Faults::default() {
        tracing::warn!("{ENV} is set: injecting faults {parsed:?} (tests only)");
    }
    let faults = FAULTS.get_or_init(|| parsed);
    if let Some(pause) = faults.checkpoint_pause {
        crate::checkpoint::set_write_pause(pause);
    }
    Ok(faults)
}

/// The faults in effect (none when [`init`] was not called or failed).
pub fn get() -> &'static Faults {
    static NONE: Faults = Faults {
        nan_loss: None,
        inf_grad: None,
        hang: None,
        checkpoint_pause: None,
    };
    FAULTS.get().unwrap_or(&NONE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_items_and_names_bad_ones() {
        let f = Faults::parse("nan_loss:7:1; checkpoint_pause_ms:250;hang:3:0", true).unwrap();
        assert_eq!(f.nan_loss, Some((7, 1)));
        assert_eq!(f.hang, Some((3, 0)));
        assert_eq!(f.checkpoint_pause, Some(Duration::from_millis(250)));
        assert_eq!(f.inf_grad, None);
        let later = Faults::parse("nan_loss:7:1;checkpoint_pause_ms:5", false).unwrap();
        assert_eq!(
            later.nan_loss, None,
            "step faults only in the first attempt"
        );
        assert_eq!(later.checkpoint_pause, Some(Duration::from_millis(5)));
        assert_eq!(Faults::parse("", true).unwrap(), Faults::default());
        for bad in [
            "nan_loss:7",
            "nan_loss:x:1",
            "boom:1:1",
            "checkpoint_pause_ms",
        ] {
            let e = Faults::parse(bad, true).unwrap_err().to_string();
            assert!(e.contains(bad.split(':').next().unwrap()), "{bad}: {e}");
        }
    }
}
