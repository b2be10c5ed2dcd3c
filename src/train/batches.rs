//! What each step trains on: the next batch of the training stream (images, decoded and
//! augmented), or, in a `devise` stage with `cache_features`, rows of the frozen encoder's
//! features ([`super::feature_cache`]). `train.trace_samples` records which samples.
use super::feature_cache::FeatureCache;
use super::trace::SampleTrace;
use crate::collective::Collective;
use crate::config::plan::{Plan, StageKind, StagePlan};
use crate::data::reader::{Cursor, DataStats, TrainStream};
use crate::eval;
use crate::model::DeviseModel;
use anyhow::{Context, Result};
use tch::{Device, Tensor};

/// What a step trains on: images `[n, 3, s, s]` with labels `[n]`, or cached frozen-encoder
/// features `[n, feature_dim]` with labels `[n]` (devise stage with `cache_features`).
pub(crate) enum Input {
    Images(Tensor, Tensor),
    Features(Tensor, Tensor),
}

impl Input {
    pub(crate) fn len(&self) -> usize {
        match self {
            Input::Images(_, y) | Input::Features(_, y) => y.size()[0] as usize,
        }
    }
}

/// The source of every step's input.
pub(crate) struct Batches<'a> {
    plan: &'a Plan,
    collective: &'a dyn Collective,
    device: Device,
    stream: TrainStream,
    cache: Option<FeatureCache>,
    trace: SampleTrace,
}

impl<'a> Batches<'a> {
    /// Starts the training stream at `cursor` (this rank's share of each global batch).
    pub(crate) fn start(
        plan: &'a Plan,
        cursor: Cursor,
        collective: &'a dyn Collective,
        device: Device,
        trace: SampleTrace,
    ) -> Result<Self> {
        let cfg = &plan.config;
        let stream = TrainStream::start(
            &cfg.data,
            &plan.manifest,
            plan.train_label_map.clone(),
            plan.per_rank_batch_size,
            cfg.run.seed,
            cursor,
            collective.rank(),
            collective.world_size(),
        )?;
        Ok(Batches {
            plan,
            collective,
            device,
            stream,
            cache: None,
            trace,
        })
    }

    /// The input of global step `step` in `stage`. Reading the stream moves `cursor`; the
    /// feature cache is computed with `model` when a cached stage first needs it.
    pub(crate) fn next(
        &mut self,
        step: u64,
        stage: &StagePlan,
        model: &DeviseModel,
        cursor: &mut Cursor,
    ) -> Result<Input> {
        let (plan, collective, device) = (self.plan, self.collective, self.device);
        let cached = stage.kind == StageKind::Devise && plan.config.train.devise.cache_features;
        Ok(if cached {
            if self.cache.is_none() {
                self.cache = Some(FeatureCache::compute(model, plan, collective, device)?);
            }
            let c = self.cache.as_mut().expect("set above");
            let (input, rows) = c.batch(
                plan.config.run.seed,
                step - stage.first_step,
                plan.per_rank_batch_size,
                collective,
            );
            self.trace.rows(step, stage.kind, &rows)?;
            input
        } else {
            let (batch, next) = self
                .stream
                .next_batch()
                .with_context(|| format!("step {step}: reading training data"))?;
            *cursor = next;
            self.trace
                .positions(step, stage.kind, &batch.positions, &batch.keys)?;
            let (images, labels) = eval::batch_tensors(&batch, device);
            Input::Images(images, labels)
        })
    }

    /// The training stream's counters (decode errors, skipped samples, buffered bytes).
    pub(crate) fn stats(&self) -> DataStats {
        self.stream.stats()
    }
}
