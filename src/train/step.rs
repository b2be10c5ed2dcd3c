//! One optimizer step: the stage's loss on a batch, backward, this rank's verdict on its loss and
//! gradients, the gradient mean across ranks, and the one small all-reduce where the ranks vote
//! (mean loss, ranks with a non-finite loss or gradient, stop). Also what each step is seeded
//! with, which parameters each stage trains, the current stage's optimizer, and the upkeep of the
//! data-parallel replicas.
use super::batches::Input;
use super::fault;
use crate::checkpoint;
use crate::collective::{ddp, Collective, ReduceOp};
use crate::config::plan::{StageKind, StagePlan};
use crate::data::reader::Cursor;
use crate::loss;
use crate::model::DeviseModel;
use crate::optim::Optimizer;
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// One optimizer step on one batch; returns the batch's loss (this rank's) and the time spent
/// averaging gradients across ranks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_step(
    model: &DeviseModel,
    opt: &mut Optimizer,
    collective: &dyn Collective,
    reducer: &ddp::GradientBuckets,
    kind: StageKind,
    input: Input,
    seen_labels: &Tensor,
    loss_cfg: &loss::Config,
    step: u64,
) -> Result<(f64, Health, Duration)> {
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
    loss.backward();
    let mut grads = opt.grads();
    if faults.inf_grad == Some((step, rank)) {
        tracing::warn!(
            "{}: +inf gradient at step {step} (injected fault)",
            fault::ENV
        );
        tch::no_grad(|| {
            let _ = grads[0].view([-1]).get(0).fill_(f64::INFINITY);
        });
    }
    // Checked on this rank's own gradients, before the all-reduce mixes them: the vote below
    // names the rank where it happened.
    let loss = f64::try_from(&loss)?;
    let health = if !loss.is_finite() {
        Health::NonFiniteLoss
    } else if !all_finite(&grads)? {
        Health::NonFiniteGradients
    } else {
        Health::Finite
    };
    let comm = Instant::now();
    reducer.all_reduce_mean(collective, &mut grads)?;
    Ok((loss, health, comm.elapsed()))
}

/// Whether every element of every tensor is finite (one host sync for all of them): one
/// `aminmax` pass per tensor (NaN propagates to both, an infinity shows in one), then the sum
/// of those extremes in float64 (finite float32 extremes cannot overflow it). 7x cheaper than
/// `isfinite().all()`, which writes and re-reads a bool tensor of every gradient's size
/// (BENCHMARKS.md, training step).
fn all_finite(tensors: &[Tensor]) -> Result<bool> {
    let extremes: Vec<Tensor> = tensors
        .iter()
        .filter(|t| t.numel() > 0)
        .flat_map(|t| {
            let (min, max) = t.aminmax(None::<i64>, false);
            [
                min.to_kind(tch::Kind::Double),
                max.to_kind(tch::Kind::Double),
            ]
        })
        .collect();
    if extremes.is_empty() {
        return Ok(true);
    }
    Ok(f64::try_from(Tensor::stack(&extremes, 0).sum(tch::Kind::Double))?.is_finite())
}

/// One rank's loss and gradients before the all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Finite,
    NonFiniteLoss,
    NonFiniteGradients,
}

/// What the ranks agreed on after a step's backward pass (one all-reduce of `2 + world_size`
/// floats).
pub(crate) struct StepVotes {
    /// Mean of the ranks' losses (finite ones only; NaN when none is).
    pub(crate) mean_loss: f64,
    /// Some rank was asked to stop.
    pub(crate) stop: bool,
    /// `(rank, what)` of every rank whose loss or gradients were not finite.
    pub(crate) unhealthy: Vec<(usize, Health)>,
}

impl StepVotes {
    pub(crate) fn all_reduce(
        collective: &dyn Collective,
        loss: f64,
        health: Health,
        want_stop: bool,
        device: Device,
    ) -> Result<Self> {
        let (w, r) = (collective.world_size(), collective.rank());
        // [sum of finite losses, ranks with a finite loss, stop votes, health code per rank]
        let mut values = vec![0f32; 3 + w];
        if loss.is_finite() {
            values[0] = loss as f32;
            values[1] = 1.0;
        }
        values[2] = f32::from(u8::from(want_stop));
        values[3 + r] = match health {
            Health::Finite => 0.0,
            Health::NonFiniteLoss => 1.0,
            Health::NonFiniteGradients => 2.0,
        };
        if w > 1 {
            let mut t = Tensor::from_slice(&values).to_device(device);
            collective.all_reduce(&mut t, ReduceOp::Sum)?;
            values = Vec::<f32>::try_from(t.to_device(Device::Cpu))?;
        }
        let unhealthy = values[3..]
            .iter()
            .enumerate()
            .filter_map(|(rank, &code)| match code as u8 {
                0 => None,
                1 => Some((rank, Health::NonFiniteLoss)),
                _ => Some((rank, Health::NonFiniteGradients)),
            })
            .collect();
        Ok(StepVotes {
            mean_loss: if values[1] > 0.0 {
                f64::from(values[0]) / f64::from(values[1])
            } else {
                f64::NAN
            },
            stop: values[2] > 0.0,
            unhealthy,
        })
    }

    /// `non-finite loss on rank(s) 1; non-finite gradients (finite loss) on rank(s) 0, 3`.
    pub(crate) fn describe_unhealthy(&self) -> String {
        let ranks = |h: Health| -> Vec<String> {
            self.unhealthy
                .iter()
                .filter(|(_, x)| *x == h)
                .map(|(r, _)| r.to_string())
                .collect()
        };
        let mut parts = Vec::new();
        for (h, what) in [
            (Health::NonFiniteLoss, "non-finite loss (NaN/inf)"),
            (
                Health::NonFiniteGradients,
                "non-finite gradients (finite loss)",
            ),
        ] {
            let r = ranks(h);
            if !r.is_empty() {
                parts.push(format!("{what} on rank(s) {}", r.join(", ")));
            }
        }
        parts.join("; ")
    }
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
    /// The gradient mean, bucket by bucket.
    reducer: ddp::GradientBuckets,
    /// The training labels' vectors `[seen, embed_dim]`, on the model's device.
    seen_labels: Tensor,
    loss: &'a loss::Config,
    /// `run.seed`.
    seed: u64,
    device: Device,
}

impl<'a> Stepper<'a> {
    /// Steps of `model` against `seen_labels` with the `loss` settings; gradients are averaged in
    /// buckets of at most `bucket_bytes`.
    pub(crate) fn new(
        model: &'a DeviseModel,
        collective: &'a dyn Collective,
        bucket_bytes: usize,
        seen_labels: Tensor,
        loss: &'a loss::Config,
        seed: u64,
    ) -> Self {
        let device = seen_labels.device();
        Stepper {
            model,
            collective,
            reducer: ddp::GradientBuckets { bucket_bytes },
            seen_labels,
            loss,
            seed,
            device,
        }
    }

    /// Global step `step` of a `kind` stage on `input`: re-seeds libtorch's generator from
    /// `(seed, step)`, runs [`train_step`], then one small all-reduce: the global batch's mean
    /// loss, the ranks whose loss or gradients are not finite, and whether any rank was asked to
    /// stop (`want_stop`, asked after the step; a signal may reach only some ranks, and all must
    /// checkpoint at the same step). Returns the votes and the time spent communicating.
    pub(crate) fn step(
        &self,
        opt: &mut Optimizer,
        kind: StageKind,
        input: Input,
        step: u64,
        want_stop: impl FnOnce() -> bool,
    ) -> Result<(StepVotes, Duration)> {
        tch::manual_seed(step_seed(self.seed, step));
        let (loss, health, comm) = train_step(
            self.model,
            opt,
            self.collective,
            &self.reducer,
            kind,
            input,
            &self.seen_labels,
            self.loss,
            step,
        )?;
        let voting = Instant::now();
        let votes = StepVotes::all_reduce(self.collective, loss, health, want_stop(), self.device)?;
        Ok((votes, comm + voting.elapsed()))
    }
}

/// The current stage's optimizer: a fresh one when a stage starts, or, when resuming inside the
/// stage the checkpoint was written in, one with the checkpoint's state.
#[derive(Default)]
pub(crate) struct StageOptimizer {
    current: Option<(StageKind, Optimizer)>,
}

impl StageOptimizer {
    /// The optimizer of `stage` at global step `step`, made when the stage changes.
    pub(crate) fn for_stage(
        &mut self,
        model: &DeviseModel,
        stage: &StagePlan,
        resumed: Option<&checkpoint::Loaded>,
        step: u64,
    ) -> Result<&mut Optimizer> {
        if self.current.as_ref().map(|(k, _)| *k) != Some(stage.kind) {
            self.current = Some((stage.kind, stage_optimizer(model, stage, resumed, step)?));
        }
        Ok(&mut self.current.as_mut().expect("set above").1)
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
/// averages gradients in buckets, follows rank 0's BatchNorm statistics, and checks now and then
/// that all ranks hold the same parameters and data cursor.
pub(crate) struct Replicas {
    /// Every model variable (shallow views: writing them writes the model).
    variables: Vec<Tensor>,
    /// The variables without gradients: BatchNorm running statistics.
    pub(crate) buffers: Vec<Tensor>,
    /// Largest broadcast bucket, bytes.
    bucket_bytes: usize,
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
        Ok(Replicas {
            variables,
            buffers,
            bucket_bytes,
        })
    }

    /// BatchNorm running statistics follow rank 0's (PyTorch DDP's `broadcast_buffers`); returns
    /// the time spent.
    pub(crate) fn broadcast_buffers(&mut self, collective: &dyn Collective) -> Result<Duration> {
        let started = Instant::now();
        ddp::broadcast_variables(collective, &mut self.buffers, self.bucket_bytes)?;
        Ok(started.elapsed())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_finite_sees_any_nan_or_infinity_and_nothing_else() {
        let t = |v: &[f32]| Tensor::from_slice(v);
        let big = f32::MAX;
        // Finite extremes of float32 in many tensors do not overflow the check.
        let finite: Vec<Tensor> = (0..64).map(|_| t(&[big, -big, 1.0])).collect();
        assert!(all_finite(&finite).unwrap());
        assert!(all_finite(&[]).unwrap());
        assert!(all_finite(&[t(&[]), t(&[0.0])]).unwrap());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(
                !all_finite(&[t(&[1.0, 2.0]), t(&[0.5, bad, 3.0])]).unwrap(),
                "{bad}"
            );
        }
        // +inf in one tensor and -inf in another do not cancel.
        assert!(!all_finite(&[t(&[f32::INFINITY]), t(&[f32::NEG_INFINITY])]).unwrap());
        // A 2-d gradient.
        let m = Tensor::zeros([3, 4], (tch::Kind::Float, Device::Cpu));
        let _ = m.get(2).get(1).fill_(f64::NAN);
        assert!(!all_finite(&[m]).unwrap());
    }
}
