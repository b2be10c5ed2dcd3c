//! One optimizer step: the stage's loss on a batch and backward, with the gradient mean across
//! ranks overlapped with it and the ranks' vote (mean loss, ranks with a non-finite loss or
//! gradient, stop) carried in its last all-reduce (`collective::reducer`). Also what each step is seeded
//! with, which parameters each stage trains, the current stage's optimizer, and the upkeep of the
//! data-parallel replicas.
use super::batches::Input;
use super::fault;
use crate::checkpoint;
use crate::collective::reducer::{self, Reducer, StepInput};
use crate::collective::{ddp, Collective};
use crate::config::plan::{StageKind, StagePlan};
use crate::data::reader::Cursor;
use crate::loss;
use crate::model::DeviseModel;
use crate::optim::Optimizer;
use anyhow::{bail, Context, Result};
use std::time::Duration;
use tch::Tensor;

pub(crate) use reducer::Votes as StepVotes;

/// One optimizer step's forward and backward on one batch, with the gradients averaged across
/// ranks (overlapped with backward, [`Reducer`]); returns the ranks' votes and the time this rank
/// waited for communication after its backward pass. `want_stop` is asked when this rank's vote
/// is cast; `broadcast` (BatchNorm statistics, or empty) takes rank 0's values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_step(
    model: &DeviseModel,
    opt: &mut Optimizer,
    reducer: &Reducer,
    collective: &dyn Collective,
    kind: StageKind,
    input: Input,
    seen_labels: &Tensor,
    loss_cfg: &loss::Config,
    step: u64,
    want_stop: &(dyn Fn() -> bool + Sync),
    broadcast: &mut [Tensor],
) -> Result<(StepVotes, Duration)> {
    opt.zero_grad();
    // The first-violation hinge's random label order: keys for the whole global batch
    // `[batch * world_size, classes]`, this rank keeping rows `rank, rank + world_size, ...` (its
    // samples' rows), so every sample gets the same draw whatever the world size.
    let order_keys = (kind != StageKind::Softmax && loss_cfg.stop_at_first_violation).then(|| {
        let (w, r) = (collective.world_size() as i64, collective.rank() as i64);
        let global = input.len() as i64 * w;
        let classes = seen_labels.size()[0];
        Tensor::rand([global, classes], (tch::Kind::Float, seen_labels.device()))
            .slice(0, r, global, w)
    });
    let order_keys = order_keys.as_ref();
    let loss = match (kind, input) {
        (StageKind::Softmax, Input::Images(images, labels)) => {
            loss::softmax_cross_entropy(&model.logits(&model.features(&images, true)), &labels)
        }
        (StageKind::Devise, Input::Images(images, labels)) => {
            // Frozen encoder: running statistics, no graph through it.
            let features = tch::no_grad(|| model.features(&images, false));
            loss::hinge_rank_loss(
                &model.image_embedding(&features),
                seen_labels,
                &labels,
                loss_cfg,
                order_keys,
            )
        }
        (StageKind::Devise, Input::Features(features, labels)) => loss::hinge_rank_loss(
            &model.image_embedding(&features),
            seen_labels,
            &labels,
            loss_cfg,
            order_keys,
        ),
        (StageKind::Finetune, Input::Images(images, labels)) => {
            let features = model.features(&images, true);
            loss::hinge_rank_loss(
                &model.image_embedding(&features),
                seen_labels,
                &labels,
                loss_cfg,
                order_keys,
            )
        }
        (kind, Input::Features(..)) => {
            bail!("stage {} cannot train on cached features", kind.name())
        }
    };
    let rank = collective.rank();
    let faults = fault::get();
    let loss = if faults.nan_loss == Some((step, rank)) {
        tracing::warn!("{}: NaN loss at step {step} (injected fault)", fault::ENV);
        loss * f64::NAN
    } else {
        loss
    };
    let inf_grad = faults.inf_grad == Some((step, rank));
    if inf_grad {
        tracing::warn!(
            "{}: +inf gradient at step {step} (injected fault)",
            fault::ENV
        );
    }
    let step_input = StepInput {
        loss: &loss,
        want_stop,
        broadcast,
        inf_grad,
    };
    reducer.backward(collective, step_input, || {
        loss.f_backward().context("backward")?;
        Ok(())
    })
}

/// libtorch generator seed for `step`: a SplitMix64 mix of (seed, step), so every step's random
/// choices are independent of how the run got there.
pub fn step_seed(seed: u64, step: u64) -> i64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// The parameter name prefixes a stage trains.
pub(crate) fn stage_parameters(kind: StageKind) -> &'static [&'static str] {
    match kind {
        StageKind::Softmax => &["encoder.", "classifier."],
        StageKind::Devise => &["projection."],
        StageKind::Finetune => &["encoder.", "projection."],
    }
}

/// What every step of a run shares: the model, the ranks, the label vectors it trains against.
pub(crate) struct Stepper<'a> {
    model: &'a DeviseModel,
    collective: &'a dyn Collective,
    /// The training labels' vectors `[seen, embed_dim]`, on the model's device.
    seen_labels: Tensor,
    loss: &'a loss::Config,
    /// `run.seed`.
    seed: u64,
}

impl<'a> Stepper<'a> {
    /// Steps of `model` against `seen_labels` with the `loss` settings.
    pub(crate) fn new(
        model: &'a DeviseModel,
        collective: &'a dyn Collective,
        seen_labels: Tensor,
        loss: &'a loss::Config,
        seed: u64,
    ) -> Self {
        Stepper {
            model,
            collective,
            seen_labels,
            loss,
            seed,
        }
    }

    /// Global step `step` of a `kind` stage on `input`: re-seeds libtorch's generator from
    /// `(seed, step)` and runs [`train_step`] with the stage's `reducer`. The votes: the global
    /// batch's mean loss, the ranks whose loss or gradients are not finite, and whether any rank
    /// was asked to stop (`want_stop`; a signal may reach only some ranks, and all must
    /// checkpoint at the same step). `buffers` (BatchNorm statistics, empty in stages that do not
    /// change them) take rank 0's values. Returns the votes and the time spent waiting for
    /// communication after backward.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        &self,
        opt: &mut Optimizer,
        reducer: &Reducer,
        kind: StageKind,
        input: Input,
        step: u64,
        want_stop: &(dyn Fn() -> bool + Sync),
        buffers: &mut [Tensor],
    ) -> Result<(StepVotes, Duration)> {
        tch::manual_seed(step_seed(self.seed, step));
        train_step(
            self.model,
            opt,
            reducer,
            self.collective,
            kind,
            input,
            &self.seen_labels,
            self.loss,
            step,
            want_stop,
            buffers,
        )
    }
}

/// The current stage's optimizer and gradient reducer: fresh ones when a stage starts, or, when
/// resuming inside the stage the checkpoint was written in, an optimizer with the checkpoint's
/// state.
#[derive(Default)]
pub(crate) struct StageOptimizer {
    current: Option<(StageKind, Optimizer, Reducer)>,
}

impl StageOptimizer {
    /// The optimizer and reducer of `stage` at global step `step`, made when the stage changes
    /// (`plan`: the reducer's buckets and overlap).
    pub(crate) fn for_stage(
        &mut self,
        model: &DeviseModel,
        stage: &StagePlan,
        resumed: Option<&checkpoint::Loaded>,
        step: u64,
        collective: &dyn Collective,
        plan: reducer::Plan,
    ) -> Result<(&mut Optimizer, &Reducer)> {
        if self.current.as_ref().map(|(k, ..)| *k) != Some(stage.kind) {
            // The old reducer lets go of its hooks and gradient views before the new one takes
            // the parameters the stages share.
            self.current = None;
            let opt = stage_optimizer(model, stage, resumed, step)?;
            let params: Vec<Tensor> = opt
                .params()
                .iter()
                .map(|(_, p)| p.shallow_clone())
                .collect();
            let order = model.creation_order(&params);
            let reducer = Reducer::new(collective, plan, &params, &order)?;
            let buckets = reducer.bucket_bytes();
            if collective.rank() == 0 && !buckets.is_empty() {
                let mib: Vec<String> = buckets
                    .iter()
                    .map(|&b| format!("{:.2}", b as f64 / f64::from(1 << 20)))
                    .collect();
                tracing::info!(
                    "{}: gradients averaged in {} bucket(s) of [{}] MiB, {}",
                    stage.kind,
                    buckets.len(),
                    mib.join(", "),
                    if plan.overlap {
                        "overlapped with backward"
                    } else {
                        "after backward (dist.overlap = false)"
                    }
                );
            }
            self.current = Some((stage.kind, opt, reducer));
        }
        let (_, opt, reducer) = self.current.as_mut().expect("set above");
        Ok((opt, reducer))
    }
}

fn stage_optimizer(
    model: &DeviseModel,
    stage: &StagePlan,
    resumed: Option<&checkpoint::Loaded>,
    step: u64,
) -> Result<Optimizer> {
    let mut opt = Optimizer::new(
        &stage.optimizer,
        model.parameters(stage_parameters(stage.kind)),
    );
    if let Some(ck) = resumed {
        if ck.state.step + 1 == step
            && ck.state.stage == stage.kind
            && ck.state.step != stage.last_step
        {
            opt.load_state_dict(&ck.optimizer)
                .with_context(|| format!("optimizer state of {}", ck.url))?;
        }
    }
    Ok(opt)
}

/// What keeps the data-parallel replicas the same: every rank starts from rank 0's variables,
/// follows rank 0's BatchNorm statistics (broadcast in each step, [`Reducer`]), and checks now
/// and then that all ranks hold the same parameters and data cursor.
pub(crate) struct Replicas {
    /// Every model variable (shallow views: writing them writes the model).
    variables: Vec<Tensor>,
    /// The variables without gradients: BatchNorm running statistics.
    pub(crate) buffers: Vec<Tensor>,
}

impl Replicas {
    /// Checks that every rank runs the same configuration and model, then gives every rank rank
    /// 0's variables (fresh initialisation or checkpoint alike). `bucket_bytes`: largest bucket.
    pub(crate) fn start(
        collective: &dyn Collective,
        config_toml: &str,
        model: &DeviseModel,
        bucket_bytes: usize,
    ) -> Result<Self> {
        ddp::check_same_setup(collective, config_toml, &model.state_dict())?;
        let mut variables: Vec<Tensor> = model.state_dict().into_iter().map(|(_, t)| t).collect();
        ddp::broadcast_variables(collective, &mut variables, bucket_bytes)?;
        let buffers: Vec<Tensor> = variables
            .iter()
            .filter(|t| !t.requires_grad())
            .map(|t| t.shallow_clone())
            .collect();
        Ok(Replicas { variables, buffers })
    }

    /// After `step`: the ranks' parameters are identical and their data cursors agree.
    pub(crate) fn check(
        &self,
        collective: &dyn Collective,
        step: u64,
        cursor: &Cursor,
    ) -> Result<()> {
        ddp::check_identical(collective, &self.variables, step)?;
        // Ranks that read a shard differently (one saw a checksum mismatch the others did
        // not) keep the same batch count but walk different slots: their cursors differ.
        let cursor = ((cursor.partitions as u64) << 48) ^ cursor.position;
        ddp::check_agree(collective, cursor, &format!("after step {step}: the data cursor"))
            .context("the ranks read the training data differently (a shard that failed its checksum or was truncated on some ranks only?)")
    }

    /// At the end of training (`last_step`), with more than one rank: the parameters are
    /// identical on all ranks (rank 0 logs their checksum).
    pub(crate) fn check_end(&self, collective: &dyn Collective, last_step: u64) -> Result<()> {
        if collective.world_size() > 1 {
            ddp::check_identical(collective, &self.variables, last_step)?;
            if collective.rank() == 0 {
                tracing::info!(
                    "parameters identical on all {} ranks at the end (checksum {:016x})",
                    collective.world_size(),
                    ddp::checksum(&self.variables)
                );
            }
        }
        Ok(())
    }
}
