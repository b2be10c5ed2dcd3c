//! When a periodic action of the loop is due (a metrics line, an evaluation, a checkpoint, the
//! cross-rank check): every N optimizer steps, or every N minutes of wall time. One type for all
//! of them, in the manner of big_vision's `u.itstime`
//! (<https://github.com/google-research/big_vision/blob/main/big_vision/utils.py>).
use std::time::{Duration, Instant};

/// How often an action is due.
#[derive(Debug, Clone, PartialEq)]
pub enum Cadence {
    /// At every global step that is a multiple of N (0: never). Global step numbers, so a resumed
    /// run acts at the same steps as an uninterrupted one.
    EverySteps(u64),
    /// At the first step at least this long after the last time it was due (the clock starts at
    /// the first step asked about).
    EveryMinutes {
        /// The interval.
        every: Duration,
        /// When it was last due (or the clock started).
        since: Option<Instant>,
    },
}

impl Cadence {
    /// Every `n` steps; 0 is never.
    pub fn steps(n: u64) -> Self {
        Cadence::EverySteps(n)
    }

    /// Every `minutes` minutes of wall time (> 0, finite).
    pub fn minutes(minutes: f64) -> Self {
        Cadence::EveryMinutes {
            every: Duration::from_secs_f64(minutes * 60.0),
            since: None,
        }
    }

    /// Whether the action is due after global step `step`, at `now`. Ask once per step: a
    /// time cadence restarts its interval each time it answers yes.
    pub fn due(&mut self, step: u64, now: Instant) -> bool {
        match self {
            Cadence::EverySteps(0) => false,
            Cadence::EverySteps(n) => step.is_multiple_of(*n),
            Cadence::EveryMinutes { every, since } => {
                let start = *since.get_or_insert(now);
                let due = now.saturating_duration_since(start) >= *every;
                if due {
                    *since = Some(now);
                }
                due
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_steps_is_due_on_multiples_of_the_global_step_and_zero_is_never() {
        let now = Instant::now();
        let mut c = Cadence::steps(3);
        let due: Vec<u64> = (1..=10).filter(|&s| c.due(s, now)).collect();
        assert_eq!(due, vec![3, 6, 9]);
        // A resumed run asks from step 5 on: the same steps.
        let mut resumed = Cadence::steps(3);
        let due: Vec<u64> = (5..=10).filter(|&s| resumed.due(s, now)).collect();
        assert_eq!(due, vec![6, 9]);
        let mut never = Cadence::steps(0);
        assert!((1..=100).all(|s| !never.due(s, now)));
        let mut every = Cadence::steps(1);
        assert!((1..=5).all(|s| every.due(s, now)));
    }

    #[test]
    fn every_minutes_is_due_once_per_interval_from_the_last_time() {
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut c = Cadence::minutes(2.0);
        assert!(!c.due(1, at(0)), "the clock starts at the first question");
        assert!(!c.due(2, at(119)));
        assert!(c.due(3, at(120)));
        assert!(!c.due(4, at(200)), "the interval restarts at the last yes");
        assert!(c.due(5, at(241)));
        // A step that took several intervals is due once.
        assert!(c.due(6, at(1000)));
        assert!(!c.due(7, at(1001)));
    }
}
