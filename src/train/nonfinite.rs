//! `train.non_finite`: what every rank does when the loss or a gradient is NaN or infinite on
//! any rank. The ranks learn it from the step's vote ([`super::step::StepVotes`]), checked
//! before the optimizer step, so the weights never see a non-finite value and every rank makes
//! the same choice.
use super::step::StepVotes;
use crate::config::plan::StageKind;
use anyhow::{bail, Result};
use tch::Tensor;

pub use crate::optim::NonFinite;

/// The policy at work: it counts the updates skipped in a row and keeps the BatchNorm statistics
/// of a step whose update may be skipped.
pub(crate) struct NonFinitePolicy {
    policy: NonFinite,
    max_consecutive_skips: u64,
    consecutive_skips: u64,
}

impl NonFinitePolicy {
    /// `train.non_finite` and `train.max_consecutive_skips`.
    pub(crate) fn new(policy: NonFinite, max_consecutive_skips: u64) -> Self {
        NonFinitePolicy {
            policy,
            max_consecutive_skips,
            consecutive_skips: 0,
        }
    }

    /// Before a step: a copy of the BatchNorm statistics, restored if the update is skipped
    /// (only with `skip`, and in the stages that update them: not `devise`, whose encoder is
    /// frozen).
    pub(crate) fn snapshot(&self, kind: StageKind, buffers: &[Tensor]) -> Option<Vec<Tensor>> {
        (self.policy == NonFinite::Skip && kind != StageKind::Devise)
            .then(|| buffers.iter().map(|b| b.copy()).collect())
    }

    /// After the vote of `step`: `Ok(true)` when every rank's loss and gradients were finite
    /// (apply the update); `Ok(false)` when every rank skips it (the BatchNorm statistics
    /// `buffers` restored from `snapshot`); an error naming the step, the stage and the ranks
    /// when the policy stops the run.
    pub(crate) fn verdict(
        &mut self,
        votes: &StepVotes,
        step: u64,
        kind: StageKind,
        snapshot: Option<Vec<Tensor>>,
        buffers: &mut [Tensor],
    ) -> Result<bool> {
        if votes.unhealthy.is_empty() {
            self.consecutive_skips = 0;
            return Ok(true);
        }
        self.consecutive_skips += 1;
        let consecutive_skips = self.consecutive_skips;
        let what = format!(
            "step {step} ({}): {}",
            kind.name(),
            votes.describe_unhealthy()
        );
        if self.policy == NonFinite::Stop {
            bail!(
                "{what}; every rank stops without applying the update (train.non_finite = \
                 \"stop\"; the last checkpoint is intact: lower the learning rate, or set \
                 train.non_finite = \"skip\")"
            );
        }
        if consecutive_skips > self.max_consecutive_skips {
            bail!(
                "{what}; {consecutive_skips} steps in a row skipped, more than \
                 train.max_consecutive_skips = {}: every rank stops (the run diverged: lower \
                 the learning rate)",
                self.max_consecutive_skips
            );
        }
        tracing::warn!(
            "{what}; every rank skips this update (train.non_finite = \"skip\", \
             {consecutive_skips} in a row)"
        );
        if let Some(before) = &snapshot {
            tch::no_grad(|| {
                for (b, old) in buffers.iter_mut().zip(before) {
                    b.copy_(old);
                }
            });
        }
        Ok(false)
    }
}
