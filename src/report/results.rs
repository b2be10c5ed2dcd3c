//! What an evaluation measured, as the reports render it and `eval/<stage>.json` stores it
//! (produced by `eval`, read back on resume and by the report writers).
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The k of hit@k, as in the paper's tables.
pub const HIT_KS: [usize; 5] = [1, 2, 5, 10, 20];

/// One row of a results table: hit@k of one model on one image set with one candidate set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlatHits {
    /// Images evaluated (all ranks).
    pub images: u64,
    /// Number of candidate labels ranked.
    pub candidates: usize,
    /// k -> fraction of images whose true label is in the top k.
    pub hit_at_k: BTreeMap<usize, f64>,
    /// k -> chance rate `min(k, candidates) / candidates`.
    pub chance_at_k: BTreeMap<usize, f64>,
    /// Hierarchical precision@k (k = 1, 2, 5, 10, 20 capped at the candidates), mean correct-set
    /// sizes and chance, when `eval.hierarchy` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hp: Option<HpAtK>,
    /// Per true label (zero-shot DeViSE-0 rows and `devise eval --labels` rows): images,
    /// hit@1 and hit@5 of that label's images, for labels with at least one image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_class: Vec<ClassHits>,
}

/// hit@1 / hit@5 of the images of one true label.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassHits {
    /// The label.
    pub wnid: String,
    /// Its images (all ranks).
    pub images: u64,
    /// Fraction of them with the label ranked first.
    pub hit_at_1: f64,
    /// Fraction of them with the label in the top 5.
    pub hit_at_5: f64,
}

/// What a stage-end evaluation measured, keyed by row name (`seen/softmax`, `seen/devise`,
/// `zero_shot/devise_0`, `zero_shot/devise_plus_seen`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageEval {
    /// Stage evaluated (`softmax`, `devise`, `finetune`).
    pub stage: crate::model::StageKind,
    /// Optimizer step at which it was evaluated.
    pub step: u64,
    /// Rows.
    pub rows: BTreeMap<String, FlatHits>,
    /// Wall time of the evaluation, seconds.
    pub seconds: f64,
    /// A few unseen validation images (rank 0's first) with their DeViSE-0 top-5, for the
    /// HTML report (devise / finetune evaluations only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<Example>,
}

/// One example image and its top labels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Example {
    /// True label.
    pub wnid: String,
    /// The evaluated image (after the eval transform), PNG, base64.
    pub png_base64: String,
    /// `(wnid, score)` best first (dot product of the image embedding with the unit label
    /// vector).
    pub top: Vec<(String, f32)>,
}

/// hp@k results of one row.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HpAtK {
    /// k -> mean hierarchical precision@k.
    pub hp_at_k: std::collections::BTreeMap<usize, f64>,
    /// k -> mean |hCorrectSet| (the paper's Table 5).
    pub mean_correct_set_size: std::collections::BTreeMap<usize, f64>,
    /// k -> chance hp@k: mean |hCorrectSet| / candidates.
    pub chance_hp_at_k: std::collections::BTreeMap<usize, f64>,
}
