//! The frozen encoder's features of the training images, for a `devise` stage with
//! `cache_features`.
use super::batches::Input;
use super::step::step_seed;
use crate::collective::{Collective, ReduceOp};
use crate::config::plan::Plan;
use crate::eval;
use crate::model::DeviseModel;
use anyhow::{bail, Context, Result};
use std::time::Instant;
use tch::{Device, Tensor};

/// The frozen encoder's features of every training image (eval transform), computed once per
/// process when the devise stage starts (or resumes): the encoder does not change during that
/// stage, so recomputing on resume gives the same cache.
///
/// Each rank encodes its share of the images (`i % world_size == rank` of the split's accepted
/// samples), then the shares are assembled on every rank (one all-reduce of a zero-filled
/// `[n, feature_dim]` matrix: simple, and once per stage), so that the rows, and hence every
/// step's global batch, are the same whatever the world size. Memory: `n x feature_dim x 4`
/// bytes per rank (Tiny ImageNet with the convnet: 77 MB; ImageNet-1k with ResNet-50: 10 GB,
/// then prefer `cache_features = false`).
pub(crate) struct FeatureCache {
    features: Tensor, // [n, feature_dim]
    labels: Tensor,   // [n]
    /// The row order of the current pass over the cache: `(pass, permutation [n])`.
    order: Option<(u64, Tensor)>,
}

impl FeatureCache {
    pub(crate) fn compute(
        model: &DeviseModel,
        plan: &Plan,
        collective: &dyn Collective,
        device: Device,
    ) -> Result<Self> {
        let started = Instant::now();
        let batches = crate::data::reader::eval_batches(
            &plan.data,
            &plan.manifest,
            &plan.data.train_split,
            plan.train_label_map.clone(),
            plan.eval_batch_size,
            collective.rank(),
            collective.world_size(),
        )?;
        // Each batch's features go straight into a preallocated matrix (one row per sample slot
        // of the split; rows of this rank's share filled, others zero): keeping a small tensor
        // per batch alive until the end pinned the heap regions of that batch's freed
        // activations under glibc malloc, and RSS grew by ~17 MiB per batch (BENCHMARKS.md,
        // memory). Labels are stored as label + 1 so rows nobody filled (images that failed to
        // decode, other ranks' rows before the all-reduce) stay 0 and are dropped below.
        let capacity = plan.manifest.split(&plan.data.train_split)?.samples as i64;
        let dim = model.feature_dim;
        let mut all_features = Tensor::zeros([capacity, dim], (tch::Kind::Float, device));
        let mut all_labels = Tensor::zeros([capacity], (tch::Kind::Float, device));
        let mut rows = Vec::new();
        for batch in batches {
            let batch = batch.context("caching features of the training images")?;
            devise_launch::heartbeat::beat();
            let batch_rows: Vec<i64> = batch.positions.iter().map(|&p| p as i64).collect();
            if let Some(&bad) = batch_rows.iter().find(|&&r| r >= capacity) {
                bail!(
                    "caching features: sample slot {bad} is outside split '{}' ({capacity} samples)",
                    plan.data.train_split
                );
            }
            let (images, y) = eval::batch_tensors(&batch, device);
            let index = Tensor::from_slice(&batch_rows).to(device);
            tch::no_grad(|| {
                let _ = all_features.index_copy_(0, &index, &model.features(&images, false));
                let _ = all_labels.index_copy_(0, &index, &(y + 1).to_kind(tch::Kind::Float));
            });
            rows.extend(batch_rows);
        }
        let [n] = all_reduce_max_rows(collective, &rows, device)?;
        if n == 0 {
            bail!("no training images to cache features of");
        }
        let all_features = all_features.narrow(0, 0, n);
        let mut all_labels = all_labels.narrow(0, 0, n);
        if collective.world_size() > 1 {
            let mut flat = all_features.view([-1]);
            collective.all_reduce(&mut flat, ReduceOp::Sum)?;
            collective.all_reduce(&mut all_labels, ReduceOp::Sum)?;
        }
        let present = all_labels.gt(0.5).nonzero().view([-1]); // [kept]
        let cache = FeatureCache {
            features: all_features.index_select(0, &present),
            labels: (all_labels.index_select(0, &present) - 1.0).to_kind(tch::Kind::Int64),
            order: None,
        };
        tracing::info!(
            "cached frozen-encoder features of {} training images ({:?}) in {:.1} s",
            cache.labels.size()[0],
            cache.features.size(),
            started.elapsed().as_secs_f64()
        );
        Ok(cache)
    }

    /// This rank's part of global batch `stage_step` (0-based within the stage): the global
    /// batch is `per_rank_batch_size * world_size` rows of a per-pass permutation (seeded by
    /// `(seed, pass)`), batches running on across passes, so it depends only on the step (exact
    /// resume needs no cursor) and not on the world size; rank `r` takes its `j % world_size == r`
    /// rows. Returns the input and the row ids.
    pub(crate) fn batch(
        &mut self,
        seed: u64,
        stage_step: u64,
        per_rank_batch_size: usize,
        collective: &dyn Collective,
    ) -> (Input, Vec<i64>) {
        let (w, r) = (collective.world_size() as i64, collective.rank() as i64);
        let global = per_rank_batch_size as u64 * w as u64;
        let n = self.labels.size()[0] as u64;
        let mut parts = Vec::new(); // slices of pass permutations
        let mut position = stage_step * global;
        let end = position + global;
        while position < end {
            let pass = position / n;
            let take = (end - position).min(n - position % n);
            parts.push(
                self.pass_order(seed, pass)
                    .narrow(0, (position % n) as i64, take as i64),
            );
            position += take;
        }
        let index = Tensor::cat(&parts, 0).slice(0, r, global as i64, w); // [per_rank_batch_size]
        let rows = Vec::<i64>::try_from(&index).unwrap_or_default();
        let index = index.to(self.features.device());
        (
            Input::Features(
                self.features.index_select(0, &index),
                self.labels.index_select(0, &index),
            ),
            rows,
        )
    }

    /// The permutation of pass `pass`, drawn once per pass from a generator seeded by
    /// `(seed, pass)` (the loop re-seeds the generator before each step anyway).
    fn pass_order(&mut self, seed: u64, pass: u64) -> Tensor {
        if self.order.as_ref().map(|(p, _)| *p) != Some(pass) {
            let n = self.labels.size()[0];
            tch::manual_seed(step_seed(seed ^ 0xFEA7_CAC4E, pass));
            self.order = Some((
                pass,
                Tensor::randperm(n, (tch::Kind::Int64, tch::Device::Cpu)),
            ));
        }
        self.order.as_ref().expect("set above").1.shallow_clone()
    }
}

/// The number of rows of the assembled cache: 1 + the largest row id any rank holds.
fn all_reduce_max_rows(
    collective: &dyn Collective,
    rows: &[i64],
    device: Device,
) -> Result<[i64; 1]> {
    // A sum of per-rank maxima is not a maximum: use one slot per rank.
    let w = collective.world_size();
    let mut per_rank = vec![0f64; w];
    per_rank[collective.rank()] = rows.iter().max().map_or(0.0, |&m| (m + 1) as f64);
    let mut t = Tensor::from_slice(&per_rank)
        .to_kind(tch::Kind::Float)
        .to_device(device);
    if w > 1 {
        collective.all_reduce(&mut t, ReduceOp::Sum)?;
    }
    let v = Vec::<f32>::try_from(t.to_device(Device::Cpu))?;
    Ok([v.iter().fold(0f32, |a, &b| a.max(b)) as i64])
}
