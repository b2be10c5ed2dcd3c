//! Evaluation (paper §4): flat hit@k for k = 1, 2, 5, 10, 20 on
//! - seen classes: validation images of the training labels, ranked among the training labels, by
//!   DeViSE (nearest label vectors) and by the softmax baseline (the pretrained classifier);
//! - zero-shot: validation images of the unseen labels, ranked among the unseen labels only
//!   ("DeViSE-0") and among seen + unseen labels ("DeViSE+seen", the paper's DeViSE+1K shape).
//!
//! Prediction ranks synsets directly by `t_label · M v` (the paper's "simpler variant", appendix
//! A.2): one unit vector per label, no term-to-synset expansion. With unit label vectors this is
//! the same ranking as cosine similarity. Chance at k is `min(k, candidates) / candidates`.
//!
//! Data parallel: each rank evaluates its share of the images; hit counts are summed over ranks
//! with the collective before dividing, so every rank computes the same numbers.
pub mod checkpoint;
pub mod hierarchy;
pub mod predict;
use crate::collective::Collective;
use crate::config::plan::{Plan, StageKind};
use crate::data::reader::eval_batches;
use crate::eval::hierarchy::HpCounter;
use crate::model::DeviseModel;
pub use crate::report::results::{ClassHits, Example, FlatHits, HpAtK, StageEval, HIT_KS};
use crate::text::hierarchy::{CandidateIndex, Hierarchy};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The T of ConSE's top-T convex combination (Norouzi et al. 2014 report T = 1, 5, 10).
pub const CONSE_TS: [usize; 3] = [1, 5, 10];

/// `[eval]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Images per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// A `parent child` wnid file (ImageNet's `wordnet.is_a.txt`): with it, every row also
    /// reports hierarchical precision@k (paper appendix A.3, `crate::eval::hierarchy`).
    #[serde(default)]
    pub hierarchy: Option<String>,
    /// Also evaluate every this many optimizer steps (0: only at the end of each stage). Each
    /// evaluation is logged as `eval/...` metrics; the report keeps each stage's latest.
    #[serde(default)]
    pub every_steps: u64,
    /// Shards (URL of a directory with `manifest.json`, as written by `devise data
    /// build-shards`) whose images `devise eval --labels` ranks, e.g. held-out images of
    /// ImageNet-21K classes for the paper's zero-shot Table 2. Default: `data.shards`.
    #[serde(default)]
    pub label_set_shards: Option<String>,
    /// Split of `label_set_shards` (or of `data.shards`) those images come from. Default:
    /// `data.val_split`.
    #[serde(default)]
    pub label_set_split: Option<String>,
}

fn default_batch_size() -> usize {
    256
}

impl Default for Config {
    fn default() -> Self {
        Config {
            batch_size: default_batch_size(),
            hierarchy: None,
            every_steps: 0,
            label_set_shards: None,
            label_set_split: None,
        }
    }
}

impl Config {
    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("eval.batch_size must be > 0");
        }
        Ok(())
    }
}

/// How many example images a devise-head evaluation keeps.
pub const EXAMPLES: usize = 8;

/// A normalised `[3, s, s]` image back to PNG bytes (undoing `(x/255 - mean) / std`).
fn to_png(image: &Tensor, data: &crate::data::Config) -> Result<Vec<u8>> {
    let size = image.size();
    let (h, w) = (size[1] as u32, size[2] as u32);
    let chw: Vec<f32> = Vec::try_from(
        image
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .flatten(0, -1),
    )?;
    let plane = (h * w) as usize;
    let mut rgb = vec![0u8; 3 * plane];
    for c in 0..3 {
        for i in 0..plane {
            let v = (chw[c * plane + i] * data.std[c] + data.mean[c]) * 255.0;
            rgb[3 * i + c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    let img = image::RgbImage::from_raw(w, h, rgb).context("example image buffer")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

/// Accumulates hit counts (and hp@k when a hierarchy is given) for one row.
struct HitCounter {
    hits: [u64; HIT_KS.len()],
    images: u64,
    candidates: usize,
    hp: Option<HpRow>,
    /// `(wnids, [images, hit@1, hit@5] per candidate)` when per-class counts are kept.
    per_class: Option<(Vec<String>, Vec<[u64; 3]>)>,
}

/// hp@k state of one row: the hierarchy, the row's candidates located in it, the counter.
struct HpRow {
    hierarchy: Arc<Hierarchy>,
    wnids: Vec<String>,
    index: CandidateIndex,
    counter: HpCounter,
}

impl HitCounter {
    /// `wnids`: the row's candidate labels in candidate order (used for hp@k only).
    fn new(wnids: &[String], hierarchy: Option<&Arc<Hierarchy>>) -> Self {
        let candidates = wnids.len();
        HitCounter {
            hits: [0; HIT_KS.len()],
            images: 0,
            candidates,
            hp: hierarchy.map(|h| HpRow {
                hierarchy: h.clone(),
                wnids: wnids.to_vec(),
                index: h.candidate_index(wnids),
                counter: HpCounter::new(&HIT_KS, candidates),
            }),
            per_class: None,
        }
    }

    /// Also count hit@1 / hit@5 per true label.
    fn with_per_class(mut self, wnids: &[String]) -> Self {
        self.per_class = Some((wnids.to_vec(), vec![[0; 3]; wnids.len()]));
        self
    }

    /// scores `[batch, candidates]`, labels `[batch]` (indices into the candidates).
    fn add(&mut self, scores: &Tensor, labels: &Tensor) -> Result<()> {
        let kmax = (*HIT_KS.last().unwrap()).min(self.candidates) as i64;
        let (_, top) = scores.topk(kmax, 1, true, true); // [batch, kmax]
        let hit = top.eq_tensor(&labels.unsqueeze(1)); // [batch, kmax]
        let first_hit = hit.to_kind(Kind::Int64).cumsum(1, Kind::Int64).clamp_max(1); // [batch, kmax]
        for (i, &k) in HIT_KS.iter().enumerate() {
            let col = (k.min(self.candidates) as i64) - 1;
            self.hits[i] += i64::try_from(first_hit.select(1, col).sum(Kind::Int64))? as u64;
        }
        self.images += labels.size()[0] as u64;
        if self.per_class.is_none() && self.hp.is_none() {
            return Ok(());
        }
        let truth: Vec<i64> = Vec::try_from(labels.to_device(Device::Cpu))?;
        if let Some((_, counts)) = &mut self.per_class {
            let at1: Vec<i64> = Vec::try_from(first_hit.select(1, 0).to_device(Device::Cpu))?;
            let col5 = (5.min(self.candidates) as i64) - 1;
            let at5: Vec<i64> = Vec::try_from(first_hit.select(1, col5).to_device(Device::Cpu))?;
            for (i, &t) in truth.iter().enumerate() {
                let c = &mut counts[t as usize];
                c[0] += 1;
                c[1] += at1[i] as u64;
                c[2] += at5[i] as u64;
            }
        }
        if let Some(hp) = &mut self.hp {
            let top: Vec<i64> = Vec::try_from(top.to_device(Device::Cpu).flatten(0, 1))?;
            let top: Vec<u32> = top.iter().map(|&c| c as u32).collect();
            for (i, &t) in truth.iter().enumerate() {
                let row = &top[i * kmax as usize..(i + 1) * kmax as usize];
                hp.counter.add(
                    &hp.hierarchy,
                    &hp.index,
                    (t as u32, &hp.wnids[t as usize]),
                    row,
                );
            }
        }
        Ok(())
    }

    fn finish(&self, collective: &dyn Collective) -> Result<FlatHits> {
        let mut counts: Vec<f64> = self.hits.iter().map(|&h| h as f64).collect();
        counts.push(self.images as f64);
        let hp_sums = self.hp.as_ref().map(|hp| hp.counter.sums());
        let hp_len = hp_sums.as_ref().map_or(0, Vec::len);
        counts.extend(hp_sums.iter().flatten());
        if let Some((_, per)) = &self.per_class {
            counts.extend(per.iter().flatten().map(|&c| c as f64));
        }
        let mut t = [Tensor::from_slice(&counts).to_kind(Kind::Double)];
        // Summed in f32 by the backend: exact for counts below 2^24 (16.7 M images).
        collective.all_reduce_tensors(&mut t, crate::collective::ReduceOp::Sum)?;
        let all: Vec<f64> = Vec::<f64>::try_from(&t[0])?;
        let summed: Vec<f64> = all[..=HIT_KS.len()].iter().map(|c| c.round()).collect();
        let images = summed[HIT_KS.len()].round() as u64;
        let mut hit_at_k = BTreeMap::new();
        let mut chance_at_k = BTreeMap::new();
        for (i, &k) in HIT_KS.iter().enumerate() {
            hit_at_k.insert(
                k,
                if images == 0 {
                    0.0
                } else {
                    summed[i].round() / images as f64
                },
            );
            chance_at_k.insert(k, k.min(self.candidates) as f64 / self.candidates as f64);
        }
        let rest = &all[HIT_KS.len() + 1..];
        let hp = self
            .hp
            .as_ref()
            .map(|hp| hp.counter.finish(&rest[..hp_len]));
        let mut per_class = Vec::new();
        if let Some((wnids, _)) = &self.per_class {
            for (i, wnid) in wnids.iter().enumerate() {
                let c = &rest[hp_len + 3 * i..hp_len + 3 * i + 3];
                let n = c[0].round();
                if n > 0.0 {
                    per_class.push(ClassHits {
                        wnid: wnid.clone(),
                        images: n as u64,
                        hit_at_1: c[1].round() / n,
                        hit_at_5: c[2].round() / n,
                    });
                }
            }
        }
        Ok(FlatHits {
            images,
            candidates: self.candidates,
            hit_at_k,
            chance_at_k,
            hp,
            per_class,
        })
    }
}

/// Which rows a stage's evaluation produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    /// The softmax classifier (after the `softmax` stage): `seen/softmax`.
    Softmax,
    /// The projection (after `devise` / `finetune`): `seen/devise`, `seen/devise_plus_unseen`,
    /// `zero_shot/devise_0`, `zero_shot/devise_plus_seen`.
    Devise,
}

impl Heads {
    /// The heads a stage trained, whose rows its evaluation reports.
    pub fn after(stage: StageKind) -> Self {
        match stage {
            StageKind::Softmax => Heads::Softmax,
            StageKind::Devise | StageKind::Finetune => Heads::Devise,
        }
    }
}

/// Evaluates `model` on the validation split. `stage`/`step` label the result.
pub fn evaluate(
    model: &DeviseModel,
    plan: &Plan,
    heads: Heads,
    collective: &dyn Collective,
    device: Device,
    stage: StageKind,
    step: u64,
) -> Result<StageEval> {
    let started = std::time::Instant::now();
    let (rank, world) = (collective.rank(), collective.world_size());
    let n_seen = plan.seen.len();
    let n_unseen = plan.unseen.len();
    let seen_labels = plan.seen_label_embedding().to(device); // [seen, dim]
    let unseen_labels = plan.unseen_label_embedding().to(device); // [unseen, dim]
    let all_labels = Tensor::cat(&[&seen_labels, &unseen_labels], 0); // [seen + unseen, dim]
                                                                      // One pass over the validation split: label l < n_seen is seen class l, label n_seen + i is
                                                                      // unseen class i (its index in the seen + unseen candidate list).
    let val_map: Vec<Option<i64>> = plan
        .seen_val_map
        .iter()
        .zip(&plan.unseen_val_map)
        .map(|(s, u)| s.or(u.map(|i| n_seen as i64 + i)))
        .collect();
    let h = plan.hierarchy.as_ref();
    let all_wnids: Vec<String> = plan.seen.iter().chain(&plan.unseen).cloned().collect();
    let mut softmax = HitCounter::new(&plan.seen, h);
    let mut softmax_zero_plus = HitCounter::new(&all_wnids, h);
    let mut devise = HitCounter::new(&plan.seen, h);
    let mut devise_plus = HitCounter::new(&all_wnids, h);
    let mut zero = HitCounter::new(&plan.unseen, h).with_per_class(&plan.unseen);
    let mut examples: Vec<Example> = Vec::new();
    let mut zero_plus = HitCounter::new(&all_wnids, h);
    // ConSE per T: (unseen labels only, seen + unseen labels).
    let mut conse: Vec<(HitCounter, HitCounter)> = CONSE_TS
        .iter()
        .map(|_| {
            (
                HitCounter::new(&plan.unseen, h),
                HitCounter::new(&all_wnids, h),
            )
        })
        .collect();
    let batches = eval_batches(
        &plan.data,
        &plan.manifest,
        &plan.data.val_split,
        val_map,
        plan.eval_batch_size,
        rank,
        world,
    )?;
    for batch in batches {
        let batch = batch?;
        devise_launch::heartbeat::beat();
        let (images, labels) = batch_tensors(&batch, device);
        tch::no_grad(|| -> Result<()> {
            let features = model.features(&images, false); // [batch, feature_dim]
            let is_seen = labels.lt(n_seen as i64); // [batch]
            let seen_rows = is_seen.nonzero().squeeze_dim(1);
            let unseen_rows = is_seen.logical_not().nonzero().squeeze_dim(1);
            let (seen_y, unseen_y) = (
                labels.index_select(0, &seen_rows),
                labels.index_select(0, &unseen_rows),
            );
            match heads {
                Heads::Softmax => {
                    let logits = model.logits(&features.index_select(0, &seen_rows));
                    softmax.add(&logits, &seen_y)?;
                    if n_unseen > 0 {
                        let logits = model.logits(&features.index_select(0, &unseen_rows));
                        // The softmax baseline on unseen images (paper Table 3): it can only
                        // name seen labels (unseen candidates score -inf), so hit@k is 0 and
                        // hp@k credits seen labels near the true one.
                        let never = Tensor::full(
                            [logits.size()[0], n_unseen as i64],
                            f64::NEG_INFINITY,
                            (logits.kind(), logits.device()),
                        );
                        softmax_zero_plus.add(&Tensor::cat(&[&logits, &never], 1), &unseen_y)?;
                        for (i, &t) in CONSE_TS.iter().enumerate() {
                            let emb = conse_embedding(&logits, &seen_labels, t); // [unseen batch, dim]
                            conse[i].0.add(
                                &emb.matmul(&unseen_labels.tr()),
                                &(&unseen_y - n_seen as i64),
                            )?;
                            conse[i].1.add(&emb.matmul(&all_labels.tr()), &unseen_y)?;
                        }
                    }
                }
                Heads::Devise => {
                    let emb = model.image_embedding(&features); // [batch, dim]
                    let (seen_emb, unseen_emb) = (
                        emb.index_select(0, &seen_rows),
                        emb.index_select(0, &unseen_rows),
                    );
                    devise.add(&seen_emb.matmul(&seen_labels.tr()), &seen_y)?;
                    devise_plus.add(&seen_emb.matmul(&all_labels.tr()), &seen_y)?;
                    if n_unseen > 0 {
                        let scores = unseen_emb.matmul(&unseen_labels.tr()); // [unseen batch, unseen]
                        let want = (EXAMPLES - examples.len()).min(scores.size()[0] as usize);
                        if rank == 0 && want > 0 {
                            let k = 5.min(n_unseen) as i64;
                            let (top_s, top_i) = scores.topk(k, 1, true, true);
                            let unseen_images = images.index_select(0, &unseen_rows);
                            for j in 0..want as i64 {
                                let s: Vec<f32> =
                                    Vec::try_from(top_s.get(j).to_device(Device::Cpu))?;
                                let i: Vec<i64> =
                                    Vec::try_from(top_i.get(j).to_device(Device::Cpu))?;
                                let truth = i64::try_from(unseen_y.get(j))? as usize - n_seen;
                                examples.push(Example {
                                    wnid: plan.unseen[truth].clone(),
                                    png_base64: base64::Engine::encode(
                                        &base64::engine::general_purpose::STANDARD,
                                        to_png(&unseen_images.get(j), &plan.data)?,
                                    ),
                                    top: i
                                        .iter()
                                        .zip(s)
                                        .map(|(&c, v)| (plan.unseen[c as usize].clone(), v))
                                        .collect(),
                                });
                            }
                        }
                        zero.add(&scores, &(&unseen_y - n_seen as i64))?;
                        zero_plus.add(&unseen_emb.matmul(&all_labels.tr()), &unseen_y)?;
                    }
                }
            }
            Ok(())
        })?;
    }
    // Every rank reaches the same finish() calls in the same order (they all-reduce).
    let mut rows = BTreeMap::new();
    match heads {
        Heads::Softmax => {
            rows.insert("seen/softmax".to_string(), softmax.finish(collective)?);
            if n_unseen > 0 {
                rows.insert(
                    "zero_shot/softmax_plus_seen".to_string(),
                    softmax_zero_plus.finish(collective)?,
                );
                for (&t, (only, plus)) in CONSE_TS.iter().zip(&conse) {
                    rows.insert(format!("zero_shot/conse_t{t}_0"), only.finish(collective)?);
                    rows.insert(
                        format!("zero_shot/conse_t{t}_plus_seen"),
                        plus.finish(collective)?,
                    );
                }
            }
        }
        Heads::Devise => {
            rows.insert("seen/devise".to_string(), devise.finish(collective)?);
            if n_unseen > 0 {
                rows.insert(
                    "seen/devise_plus_unseen".to_string(),
                    devise_plus.finish(collective)?,
                );
                // Zero-shot: unseen images; only the projection can rank unseen labels.
                rows.insert("zero_shot/devise_0".to_string(), zero.finish(collective)?);
                rows.insert(
                    "zero_shot/devise_plus_seen".to_string(),
                    zero_plus.finish(collective)?,
                );
            }
        }
    }
    Ok(StageEval {
        stage,
        step,
        rows,
        seconds: started.elapsed().as_secs_f64(),
        examples,
    })
}

/// Where the images of a label-set evaluation come from: `eval.label_set_shards` /
/// `eval.label_set_split` when set, else the run's own validation split.
pub struct LabelSetImages {
    /// The shard directory URL (for messages).
    pub shards: String,
    /// Its manifest.
    pub manifest: crate::data::shards::Manifest,
    /// The split whose images are ranked.
    pub split: String,
}

impl LabelSetImages {
    /// Resolves the source for `plan` and the `[eval]` section `cfg`. Errors: an unreadable
    /// manifest or a split it does not have (both named).
    pub fn resolve(plan: &Plan, cfg: &Config) -> Result<LabelSetImages> {
        let split = cfg
            .label_set_split
            .clone()
            .unwrap_or_else(|| plan.data.val_split.clone());
        let (shards, manifest) = match &cfg.label_set_shards {
            Some(url) => (
                url.clone(),
                crate::data::shards::read_manifest(url)
                    .with_context(|| format!("eval.label_set_shards = {url}"))?,
            ),
            None => (plan.data.shards.clone(), plan.manifest.clone()),
        };
        if !manifest.splits.contains_key(split.as_str()) {
            bail!("{shards}: the manifest has no split '{split}' (eval.label_set_split)");
        }
        Ok(LabelSetImages {
            shards,
            manifest,
            split,
        })
    }
}

/// Evaluates the projection against any candidate label list (`devise eval --labels`): the
/// images of `images` whose class is a candidate, ranked among `wnids` (`matrix` `[candidates,
/// dim]`, unit rows). Returns the row, with hp@k when the plan has a hierarchy. Errors when no
/// image has a candidate label.
pub fn evaluate_label_set(
    model: &DeviseModel,
    plan: &Plan,
    images: &LabelSetImages,
    wnids: &[String],
    matrix: &Tensor,
    collective: &dyn Collective,
    device: Device,
) -> Result<FlatHits> {
    let pos: std::collections::HashMap<&str, i64> = wnids
        .iter()
        .enumerate()
        .map(|(i, w)| (w.as_str(), i as i64))
        .collect();
    let val_map: Vec<Option<i64>> = images
        .manifest
        .classes
        .iter()
        .map(|w| pos.get(w.as_str()).copied())
        .collect();
    if val_map.iter().all(Option::is_none) {
        bail!(
            "no class of split '{}' of {} is among the {} candidate labels: nothing to evaluate",
            images.split,
            images.shards,
            wnids.len()
        );
    }
    let matrix = matrix.to(device);
    let mut counter = HitCounter::new(wnids, plan.hierarchy.as_ref()).with_per_class(wnids);
    let mut data = plan.data.clone();
    data.shards = images.shards.clone();
    let batches = eval_batches(
        &data,
        &images.manifest,
        &images.split,
        val_map,
        plan.eval_batch_size,
        collective.rank(),
        collective.world_size(),
    )?;
    for batch in batches {
        let batch = batch?;
        devise_launch::heartbeat::beat();
        let (images, labels) = batch_tensors(&batch, device);
        tch::no_grad(|| -> Result<()> {
            let emb = model.image_embedding(&model.features(&images, false));
            counter.add(&emb.matmul(&matrix.tr()), &labels)
        })?;
    }
    counter.finish(collective)
}

/// ConSE (Norouzi et al., ICLR 2014, "Zero-Shot Learning by Convex Combination of Semantic
/// Embeddings"): the image's embedding is the softmax-probability-weighted mean of the label
/// vectors of its top-`t` seen classes, `sum_i p_i t_i / sum_i p_i`. It needs no training beyond
/// the softmax classifier. `logits` `[batch, seen]`, `seen_labels` `[seen, dim]` -> `[batch, dim]`.
/// Ranking labels by dot product with it equals ranking by cosine (the label vectors are unit).
pub fn conse_embedding(logits: &Tensor, seen_labels: &Tensor, t: usize) -> Tensor {
    let t = (t as i64).min(logits.size()[1]);
    let probs = logits.softmax(1, Kind::Float); // [batch, seen]
    let (p, idx) = probs.topk(t, 1, true, true); // [batch, t]
    let dim = seen_labels.size()[1];
    let vecs = seen_labels
        .index_select(0, &idx.flatten(0, 1))
        .view([-1, t, dim]); // [batch, t, dim]
    let weighted = (vecs * p.unsqueeze(2)).sum_dim_intlist(1, false, Kind::Float); // [batch, dim]
    weighted / p.sum_dim_intlist(1, true, Kind::Float)
}

/// A data batch as tensors on `device`: images `[n, 3, s, s]` float, labels `[n]` int64. On
/// CUDA both go through pinned host memory and are copied without blocking the host (queued on
/// the current stream; the kernels that read them wait for the copy).
pub fn batch_tensors(batch: &crate::data::reader::Batch, device: Device) -> (Tensor, Tensor) {
    let s = batch.image_size as i64;
    let images = Tensor::from_slice(&batch.images).view([batch.n as i64, 3, s, s]);
    let labels = Tensor::from_slice(&batch.labels);
    if device.is_cuda() {
        let to = |t: Tensor, kind| t.pin_memory(device).to_device_(device, kind, true, false);
        (to(images, Kind::Float), to(labels, Kind::Int64))
    } else {
        (images, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::SingleProcess;

    #[test]
    fn conse_by_hand() {
        // 3 seen labels e0, e1, e2 in 3-d; logits give p = softmax([ln 3, ln 1, ln 0+]) ~ (0.75, 0.25, 0).
        let labels = Tensor::eye(3, (Kind::Float, tch::Device::Cpu));
        let logits = Tensor::from_slice(&[3f32.ln(), 0.0, -30.0]).view([1, 3]);
        let t1 = Vec::<f32>::try_from(conse_embedding(&logits, &labels, 1).flatten(0, 1)).unwrap();
        assert_eq!(t1, vec![1.0, 0.0, 0.0]);
        let t2 = Vec::<f32>::try_from(conse_embedding(&logits, &labels, 2).flatten(0, 1)).unwrap();
        assert!(
            (t2[0] - 0.75).abs() < 1e-5 && (t2[1] - 0.25).abs() < 1e-5 && t2[2] == 0.0,
            "{t2:?}"
        );
        // T larger than the number of seen labels uses all of them.
        let t10 = conse_embedding(&logits, &labels, 10);
        assert_eq!(t10.size(), vec![1, 3]);
    }

    #[test]
    fn hit_at_k_by_hand() {
        // 3 candidates; image 0 true label 2 ranked 1st; image 1 true label 0 ranked 3rd.
        let scores = Tensor::from_slice(&[0.1f32, 0.2, 0.9, 0.1, 0.5, 0.3]).view([2, 3]);
        let labels = Tensor::from_slice(&[2i64, 0]);
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut c = HitCounter::new(&names, None);
        c.add(&scores, &labels).unwrap();
        let r = c.finish(&SingleProcess).unwrap();
        assert_eq!(r.images, 2);
        assert_eq!(r.hit_at_k[&1], 0.5);
        assert_eq!(r.hit_at_k[&2], 0.5);
        assert_eq!(r.hit_at_k[&5], 1.0); // k > candidates: every label is in the top k
        assert!((r.chance_at_k[&1] - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.chance_at_k[&20], 1.0);
    }
}
