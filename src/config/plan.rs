//! The validated plan: what the user wrote, resolved once against the shard
//! manifest, the split file and the word vectors into every number the run uses. Nothing after
//! this point re-validates. `devise train --dry-run` prints it.
//!
//! Which labels take part: a class is *seen* when the split file says so, its label vector maps
//! (text::labels) and the training split has images of it; *unseen* when the split says so, it
//! maps, and the validation split has images of it. Every other class is reported in
//! `left_out` with the reason and takes part in no stage — including the softmax stage, so the
//! softmax baseline and DeViSE are compared on the same classes and images.
use crate::config::RunConfig;
use crate::data::shards::{read_manifest, Manifest};
use crate::text::labels::LabelEmbeddings;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use tch::Tensor;

pub use crate::model::StageKind;

/// One stage's steps (global step numbers, 1-based, inclusive) and optimizer.
#[derive(Debug, Clone, Serialize)]
pub struct StagePlan {
    /// Which stage.
    pub kind: StageKind,
    /// First global step of the stage.
    pub first_step: u64,
    /// Last global step of the stage.
    pub last_step: u64,
    /// Epochs requested (over the seen-class training images).
    pub epochs: f64,
    /// Optimizer and schedule.
    pub optimizer: crate::optim::Config,
}

impl StagePlan {
    /// The learning rate of global step `step` of this stage.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.optimizer.lr_at(step - self.first_step, self.steps())
    }

    /// Number of steps in the stage.
    pub fn steps(&self) -> u64 {
        self.last_step + 1 - self.first_step
    }

    /// One line: `softmax steps 1..=1407 (1407 steps, 6 epochs, Sgd lr 0.05, warmup 50, Cosine)`.
    pub fn describe(&self) -> String {
        let o = &self.optimizer;
        format!(
            "{} steps {}..={} ({} steps, {} epochs, {:?} lr {}, warmup {}, {:?})",
            self.kind.name(),
            self.first_step,
            self.last_step,
            self.steps(),
            self.epochs,
            o.algorithm,
            o.lr,
            o.warmup_steps,
            o.schedule
        )
    }
}

/// Every derived number of the run.
#[derive(Serialize)]
pub struct Plan {
    /// This process's rank.
    pub rank: usize,
    /// Processes in the run.
    pub world_size: usize,
    /// Images per optimizer step, all ranks together.
    pub global_batch_size: usize,
    /// Images per optimizer step on one rank (`global_batch_size / world_size`).
    pub per_rank_batch_size: usize,
    /// Images per eval forward pass.
    pub eval_batch_size: usize,
    /// Data section (for the readers).
    pub data: crate::data::Config,
    /// The shard manifest.
    #[serde(skip)]
    pub manifest: Manifest,
    /// Seen wnids; training label `i` is `seen[i]`.
    pub seen: Vec<String>,
    /// Unseen (zero-shot) wnids; candidate `i` of the zero-shot set is `unseen[i]`.
    pub unseen: Vec<String>,
    /// Classes of the split left out of every stage, with the reason.
    pub left_out: Vec<(String, String)>,
    /// Groups of labels whose vectors are identical (reported).
    pub coincident_labels: Vec<Vec<String>>,
    /// Training images of the seen classes.
    pub train_images: u64,
    /// Validation images of the seen / unseen classes.
    pub val_images_seen: u64,
    /// Validation images of the unseen classes.
    pub val_images_unseen: u64,
    /// Manifest class index -> training label (seen classes only).
    #[serde(skip)]
    pub train_label_map: Vec<Option<i64>>,
    /// Manifest class index -> seen label, for validation images.
    #[serde(skip)]
    pub seen_val_map: Vec<Option<i64>>,
    /// Manifest class index -> unseen label, for validation images.
    #[serde(skip)]
    pub unseen_val_map: Vec<Option<i64>>,
    /// Dimension of the word space.
    pub embed_dim: usize,
    /// `eval.hierarchy`, loaded: hierarchical precision@k is measured when present.
    #[serde(skip)]
    pub hierarchy: Option<std::sync::Arc<crate::text::hierarchy::Hierarchy>>,
    /// Unit label vectors of `seen`, row-major `[seen, embed_dim]`.
    #[serde(skip)]
    pub seen_matrix: Vec<f32>,
    /// Unit label vectors of `unseen`, row-major `[unseen, embed_dim]`.
    #[serde(skip)]
    pub unseen_matrix: Vec<f32>,
    /// How each label mapped (name, match kind), for the report.
    #[serde(skip)]
    pub labels: LabelEmbeddings,
    /// How the label vectors were made (the `[text]` section and the format read), stored with
    /// each checkpoint's label-embedding matrix.
    #[serde(skip)]
    pub label_provenance: crate::text::Provenance,
    /// Stages with at least one step, in order.
    pub stages: Vec<StagePlan>,
    /// Last global step.
    pub total_steps: u64,
    /// The configuration this plan was built from.
    #[serde(skip)]
    pub config: RunConfig,
}

impl Plan {
    /// What the run report says about this run and its configuration (besides the evaluations).
    pub fn report_facts(&self) -> Result<crate::report::RunFacts<'_>> {
        let cfg = &self.config;
        Ok(crate::report::RunFacts {
            name: &cfg.run.name,
            config: serde_json::to_value(cfg)?,
            plan: serde_json::to_value(self)?,
            encoder: format!("{:?}", cfg.model.encoder),
            embed_dim: self.embed_dim,
            global_batch_size: self.global_batch_size,
            world_size: self.world_size,
            seen: self.seen.len(),
            train_images: self.train_images,
            val_images_seen: self.val_images_seen,
            unseen: self.unseen.len(),
            val_images_unseen: self.val_images_unseen,
            vectors: &cfg.text.vectors,
            left_out: &self.left_out,
            coincident_labels: &self.coincident_labels,
            stages: self.stages.iter().map(StagePlan::describe).collect(),
            labels: &self.labels,
        })
    }

    /// Resolves `cfg` for a run of `world_size` processes, as rank `rank`. Reads the manifest,
    /// the split file, the names file and the needed word vectors.
    pub fn build(cfg: &RunConfig, rank: usize, world_size: usize) -> Result<Plan> {
        if world_size == 0 || rank >= world_size {
            bail!("rank {rank} is not in a world of size {world_size}");
        }
        let global_batch_size = cfg.train.global_batch_size;
        if !global_batch_size.is_multiple_of(world_size) {
            bail!("train.global_batch_size = {global_batch_size} is not divisible by world_size = {world_size}");
        }
        let manifest =
            read_manifest(&cfg.data.shards).context("reading the shards named by data.shards")?;
        for split in [&cfg.data.train_split, &cfg.data.val_split] {
            if !manifest.splits.contains_key(split.as_str()) {
                bail!(
                    "data.shards = {}: the manifest has no split '{split}'",
                    cfg.data.shards
                );
            }
        }
        let split = crate::data::split::read_split(&cfg.labels)?;
        let mut wanted: Vec<String> = split.seen.clone();
        wanted.extend(split.unseen.iter().cloned());
        let labels = crate::text::load_label_embeddings(&cfg.text, &wanted)?;

        let class_index: HashMap<&str, usize> = manifest
            .classes
            .iter()
            .enumerate()
            .map(|(i, w)| (w.as_str(), i))
            .collect();
        let train = &manifest.splits[&cfg.data.train_split];
        let val = &manifest.splits[&cfg.data.val_split];
        let count = |counts: &[u64], wnid: &str| {
            class_index
                .get(wnid)
                .map_or(0, |&i| counts.get(i).copied().unwrap_or(0))
        };

        let mut left_out: Vec<(String, String)> = cfg
            .labels
            .exclude
            .iter()
            .map(|w| (w.clone(), "excluded by labels.exclude".to_string()))
            .collect();
        // A class takes part when its label maps and its split (train for seen, val for unseen)
        // has images of it; otherwise it is reported with the reason.
        let mut usable = |classes: &[String], role: &str, counts: &[u64], split_name: &str| {
            let mut kept = Vec::new();
            for wnid in classes {
                if !labels.is_mapped(wnid) {
                    left_out.push((
                        wnid.clone(),
                        format!("{role}: no name maps to a word vector"),
                    ));
                } else if count(counts, wnid) == 0 {
                    left_out.push((
                        wnid.clone(),
                        format!("{role}: no images in split '{split_name}'"),
                    ));
                } else {
                    kept.push(wnid.clone());
                }
            }
            kept
        };
        let seen = usable(
            &split.seen,
            "seen",
            &train.class_counts,
            &cfg.data.train_split,
        );
        let unseen = usable(
            &split.unseen,
            "unseen",
            &val.class_counts,
            &cfg.data.val_split,
        );
        if seen.len() < 2 {
            bail!(
                "{} seen classes usable (need at least 2); left out: {left_out:?}",
                seen.len()
            );
        }
        for (wnid, why) in &left_out {
            tracing::warn!("label {wnid} left out: {why}");
        }
        let map_for = |classes: &[String]| -> Vec<Option<i64>> {
            let pos: HashMap<&str, i64> = classes
                .iter()
                .enumerate()
                .map(|(i, w)| (w.as_str(), i as i64))
                .collect();
            manifest
                .classes
                .iter()
                .map(|w| pos.get(w.as_str()).copied())
                .collect()
        };
        let train_label_map = map_for(&seen);
        let unseen_val_map = map_for(&unseen);
        let seen_val_map = train_label_map.clone();
        let total = |counts: &[u64], classes: &[String]| {
            classes.iter().map(|w| count(counts, w)).sum::<u64>()
        };
        let train_images = total(&train.class_counts, &seen);
        let val_images_seen = total(&val.class_counts, &seen);
        let val_images_unseen = total(&val.class_counts, &unseen);

        let mut stages = Vec::new();
        let mut next = 1u64;
        for kind in StageKind::ALL {
            let stage = cfg.train.stage(kind);
            let steps =
                (stage.epochs * train_images as f64 / global_batch_size as f64).ceil() as u64;
            if steps == 0 {
                continue;
            }
            stages.push(StagePlan {
                kind,
                first_step: next,
                last_step: next + steps - 1,
                epochs: stage.epochs,
                optimizer: stage.optimizer.clone(),
            });
            next += steps;
        }
        if stages.is_empty() {
            bail!("train: every stage has 0 epochs");
        }
        let coincident_labels = labels.coincident.clone();
        let hierarchy = match &cfg.eval.hierarchy {
            Some(path) => {
                let h = crate::text::hierarchy::Hierarchy::load(std::path::Path::new(path))
                    .context("eval.hierarchy")?;
                let missing: Vec<&String> = seen
                    .iter()
                    .chain(&unseen)
                    .filter(|w| !h.contains(w))
                    .collect();
                if !missing.is_empty() {
                    tracing::warn!(
                        "eval.hierarchy {path}: {} label(s) not in the hierarchy (their correct \
                         sets hold only themselves): {missing:?}",
                        missing.len()
                    );
                }
                Some(std::sync::Arc::new(h))
            }
            None => None,
        };
        Ok(Plan {
            hierarchy,
            rank,
            world_size,
            global_batch_size,
            per_rank_batch_size: global_batch_size / world_size,
            eval_batch_size: cfg.eval.batch_size,
            data: cfg.data.clone(),
            seen_matrix: labels.matrix(&seen)?,
            unseen_matrix: labels.matrix(&unseen)?,
            embed_dim: labels.dim,
            manifest,
            seen,
            unseen,
            left_out,
            coincident_labels,
            train_images,
            val_images_seen,
            val_images_unseen,
            train_label_map,
            seen_val_map,
            unseen_val_map,
            label_provenance: crate::text::provenance(&cfg.text, &labels.vectors_report),
            labels,
            total_steps: next - 1,
            config: cfg.clone(),
            stages,
        })
    }

    /// The stage global step `step` (1-based) belongs to.
    pub fn stage_at(&self, step: u64) -> &StagePlan {
        self.stages
            .iter()
            .find(|s| (s.first_step..=s.last_step).contains(&step))
            .unwrap_or_else(|| self.stages.last().expect("plan has stages"))
    }

    /// Label vectors of the seen classes as a tensor `[seen, embed_dim]` (CPU).
    pub fn seen_label_embedding(&self) -> Tensor {
        Tensor::from_slice(&self.seen_matrix).view([self.seen.len() as i64, self.embed_dim as i64])
    }

    /// The seen classes' label vectors with their wnids and provenance: what each checkpoint
    /// stores (`label_embedding.safetensors`, format in [`crate::text::label_embedding`]).
    pub fn seen_label_matrix(&self) -> crate::text::LabelEmbeddingMatrix {
        crate::text::LabelEmbeddingMatrix {
            wnids: self.seen.clone(),
            dim: self.embed_dim,
            values: self.seen_matrix.clone(),
            made_by: self.label_provenance.clone(),
        }
    }

    /// Label vectors of the unseen classes as a tensor `[unseen, embed_dim]` (CPU).
    pub fn unseen_label_embedding(&self) -> Tensor {
        Tensor::from_slice(&self.unseen_matrix)
            .view([self.unseen.len() as i64, self.embed_dim as i64])
    }

    /// Human-readable summary (`--dry-run`, start of every run's log).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        use std::fmt::Write;
        let _ = writeln!(
            s,
            "world_size {} (rank {}), global_batch_size {}, per_rank_batch_size {}",
            self.world_size, self.rank, self.global_batch_size, self.per_rank_batch_size
        );
        let _ = writeln!(s, "classes: {} seen ({} train images, {} val images), {} unseen ({} val images), {} left out, embed_dim {}", self.seen.len(), self.train_images, self.val_images_seen, self.unseen.len(), self.val_images_unseen, self.left_out.len(), self.embed_dim);
        let _ = writeln!(s, "seen: {}", self.seen.join(" "));
        let _ = writeln!(s, "unseen: {}", self.unseen.join(" "));
        for (wnid, why) in &self.left_out {
            let _ = writeln!(s, "  left out {wnid}: {why}");
        }
        for st in &self.stages {
            let _ = writeln!(s, "stage {}", st.describe());
        }
        let _ = write!(s, "total steps {}", self.total_steps);
        s
    }
}
