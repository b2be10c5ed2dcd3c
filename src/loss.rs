//! Losses: softmax cross-entropy for the pretraining stage, and DeViSE's hinge rank loss
//! (paper §3.3, equation 1).
//!
//! The hinge rank loss compares each image against a fixed `label_embedding` table that every
//! rank holds in full, so data-parallel training needs no cross-rank gather of negatives: each
//! rank's loss is a function of its own batch only and the gradient all-reduce is all there is.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// `[loss]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Hinge margin, a fraction of the unit norm of the label vectors. Paper: 0.1.
    #[serde(default = "default_margin")]
    pub margin: f64,
    /// Paper §3.3 speed-up (as in WSABIE): visit the false labels in random order and keep only
    /// the first margin-violating term, instead of summing all of them (equation 1).
    #[serde(default)]
    pub stop_at_first_violation: bool,
}

fn default_margin() -> f64 {
    0.1
}

impl Config {
    /// Checks the section; errors name the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.margin.is_finite() && self.margin > 0.0) {
            anyhow::bail!("loss.margin must be a positive number, got {}", self.margin);
        }
        Ok(())
    }
}

/// Softmax cross-entropy: logits `[batch, classes]`, labels `[batch]` (int64) -> scalar mean.
pub fn softmax_cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.cross_entropy_for_logits(labels)
}

/// DeViSE hinge rank loss (paper equation 1), averaged over the batch:
/// `loss_i = sum_{j != y_i} max(0, margin - t_{y_i}·M v_i + t_j·M v_i)`.
///
/// - `image_embedding`: `[batch, embed_dim]`, `M v(image)` (not normalised).
/// - `label_embedding`: `[classes, embed_dim]`, unit-norm label vectors `t_j` of the training
///   labels (the paper restricts false labels to training labels).
/// - `labels`: `[batch]` int64 indices into `label_embedding`.
/// - With `stop_at_first_violation`, the false labels are visited in random order and only the
///   first violating term counts. Visiting in random order and stopping at the first violation
///   picks a violating label uniformly at random, which is what this computes in one pass: the
///   violating label with the smallest of `order_keys` (`[batch, classes]`, uniform in [0, 1));
///   `None` draws them from libtorch's global generator. The training step passes its rows of
///   keys drawn for the whole global batch, so each sample's draw does not depend on the number
///   of ranks.
pub fn hinge_rank_loss(
    image_embedding: &Tensor,
    label_embedding: &Tensor,
    labels: &Tensor,
    cfg: &Config,
    order_keys: Option<&Tensor>,
) -> Tensor {
    let scores = image_embedding.matmul(&label_embedding.transpose(0, 1)); // [batch, classes]
    let true_scores = scores.gather(1, &labels.unsqueeze(1), false); // [batch, 1]
    let is_true = scores
        .zeros_like()
        .scatter_value(1, &labels.unsqueeze(1), 1.0); // [batch, classes]
                                                      // [batch, classes]; the true label's own term (= margin) is masked out.
    let not_true = is_true.ones_like() - &is_true;
    let terms: Tensor = ((scores - &true_scores) + cfg.margin).clamp_min(0.0) * not_true;
    if !cfg.stop_at_first_violation {
        return terms
            .sum_dim_intlist(1, false, Kind::Float)
            .mean(Kind::Float);
    }
    let keys = match order_keys {
        Some(k) => k.shallow_clone(),
        None => Tensor::rand_like(&terms),
    };
    let keys = keys.masked_fill(&terms.le(0.0), 2.0); // [batch, classes]
    let first = keys.argmin(1, true); // [batch, 1]
    terms.gather(1, &first, false).mean(Kind::Float) // a row without violations gathers a 0 term
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], rows: i64) -> Tensor {
        Tensor::from_slice(v).view([rows, -1])
    }

    #[test]
    fn hinge_matches_hand_computation() {
        // Two unit labels e0, e1; image embedding scores: s0 = 0.5, s1 = 0.45 for true label 0.
        let labels_emb = t(&[1.0, 0.0, 0.0, 1.0], 2);
        let img = t(&[0.5, 0.45], 1);
        let y = Tensor::from_slice(&[0i64]);
        let cfg = Config {
            margin: 0.1,
            stop_at_first_violation: false,
        };
        // max(0, 0.1 - 0.5 + 0.45) = 0.05
        let l = f64::try_from(hinge_rank_loss(&img, &labels_emb, &y, &cfg, None)).unwrap();
        assert!((l - 0.05).abs() < 1e-6, "{l}");
        // A well-separated image has zero loss.
        let img = t(&[0.9, 0.1], 1);
        let l = f64::try_from(hinge_rank_loss(&img, &labels_emb, &y, &cfg, None)).unwrap();
        assert_eq!(l, 0.0);
    }

    #[test]
    fn first_violation_picks_one_violating_term() {
        // Three labels; true label 0 scores 0; labels 1 and 2 violate with 0.3 and 0.6.
        let labels_emb = t(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 3);
        let img = t(&[0.0, 0.2, 0.5], 1);
        let y = Tensor::from_slice(&[0i64]);
        let sum = Config {
            margin: 0.1,
            stop_at_first_violation: false,
        };
        let first = Config {
            margin: 0.1,
            stop_at_first_violation: true,
        };
        let s = f64::try_from(hinge_rank_loss(&img, &labels_emb, &y, &sum, None)).unwrap();
        assert!((s - 0.9).abs() < 1e-6);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..40 {
            tch::manual_seed(seed);
            let f = f64::try_from(hinge_rank_loss(&img, &labels_emb, &y, &first, None)).unwrap();
            seen.insert((f * 1000.0).round() as i64);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![300, 600]);
    }
}
